"""The `prepare` options of `megalite-data` beyond reading and tokenizing: the quality stages, the
tasks, and a `--config` YAML file, plus the `train-quality`, `report` and `mixture` commands.

Options come, last one winning, from PrepareOptions' defaults, the `--config` file (keys are the
option names: `near_dedup: true`, `near_dedup_threshold: 0.8`, `filters: {min_words: 50}`), and
the command line. The config is checked against PrepareOptions (OmegaConf structured config), so
a misspelled key or a wrong type is refused naming the file and the key.

Tasks: `--tasks N` splits the inputs over N tasks. Without `--task`/`--merge` every task that has
no result yet runs here (`--executor local`, the default) and then the merge; `--executor slurm`
submits a job array of the N tasks and a merge job after it instead. `--task K` runs task K alone
and `--merge` only merges (what the array's elements and its merge job run).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from pathlib import Path

from megalite.data.common import DataError
from megalite.data.filters import GOPHER, FilterOptions
from megalite.data.prepare import PrepareOptions, default_workers


def add_stage_flags(pr: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = pr.add_argument_group("deduplication")
    g.add_argument("--no-dedup", action="store_true", default=S, help="keep exact duplicates")
    g.add_argument(
        "--near-dedup", action="store_true", default=S, help="MinHash + LSH near-duplicates"
    )
    g.add_argument(
        "--near-dedup-threshold",
        type=float,
        default=S,
        help="Jaccard similarity of word n-gram sets (0.8; 0.3 catches ~10%% of words edited)",
    )
    g.add_argument("--near-dedup-ngram", type=int, default=S, help="words per shingle (5)")
    g.add_argument("--near-dedup-num-perm", type=int, default=S, help="MinHash size (128)")
    g = pr.add_argument_group("language, quality, PII, blocklist, decontamination")
    g.add_argument("--languages", default=S, help="keep these languages, e.g. en,de (langid)")
    g.add_argument("--language-threshold", type=float, default=S, help="min probability (0.5)")
    g.add_argument("--quality-model", default=S, help="a model from megalite-data train-quality")
    g.add_argument("--quality-threshold", type=float, default=S, help="min P(hq) (0.5)")
    g.add_argument(
        "--pii", action="store_true", default=S, help="replace e-mails, IPs, phone numbers"
    )
    g.add_argument("--blocklist", default=S, help="file of blocked domains / URLs, one a line")
    g.add_argument("--url-field", default=S, help="JSON field of a document's URL (url)")
    g.add_argument(
        "--decontaminate",
        nargs="+",
        default=S,
        metavar="EVAL",
        help="eval sets (.txt / .jsonl files or folders): drop documents sharing an n-gram "
        "(give it after the inputs: it takes every path that follows)",
    )
    g.add_argument("--decontam-ngram", type=int, default=S, help="words per n-gram (13)")


def add_task_flags(pr: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = pr.add_argument_group("tasks (scale-out)")
    g.add_argument("--tasks", type=int, default=S, help="independent tasks over the input files")
    g.add_argument("--work-dir", default=S, help="where task results go (.<out>.tasks)")
    g.add_argument("--task", type=int, help="run only task K (0-based) and exit")
    g.add_argument("--merge", action="store_true", help="only merge finished tasks")
    g.add_argument("--executor", choices=("local", "slurm"), default="local")
    g.add_argument("--partition", help="SLURM partition (--executor slurm)")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--time", help="SLURM time limit per task, e.g. 4:00:00")
    g.add_argument("--job-name", default="megalite-prepare", help="SLURM job name")
    g.add_argument("--log-dir", help="SLURM scripts and logs (<out>.logs)")
    g.add_argument("--dry-run", action="store_true", help="print the SLURM scripts only")


_FILTER_FLAGS = {
    "min_chars": "min_chars",
    "min_words": "min_words",
    "max_words": "max_words",
    "max_symbol_ratio": "max_symbol_word_ratio",
    "max_ellipsis_lines": "max_ellipsis_line_fraction",
    "max_bullet_lines": "max_bullet_line_fraction",
}


def _cli_values(args: argparse.Namespace) -> dict:
    names = {f.name for f in fields(PrepareOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "no_dedup" in vars(args):
        values["dedup"] = False
    if "shard_size" in vars(args):
        values["shard_size_limit"] = args.shard_size
    if isinstance(values.get("languages"), str):
        values["languages"] = [c.strip() for c in values["languages"].split(",") if c.strip()]
    if "special_tokens" in values:
        eos = getattr(args, "eos_token", PrepareOptions.eos_token)
        values["special_tokens"] = [eos] + [
            t for t in values["special_tokens"].split(",") if t and t != eos
        ]
    elif "eos_token" in values:
        values["special_tokens"] = [values["eos_token"]]
    filters: dict = asdict(GOPHER) if args.gopher else {}
    for flag, name in _FILTER_FLAGS.items():
        if getattr(args, flag) is not None:
            filters[name] = getattr(args, flag)
    if args.mean_word_length is not None:
        filters["min_mean_word_length"], filters["max_mean_word_length"] = args.mean_word_length
    if filters:
        values["filters"] = filters
    return values


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """PrepareOptions from defaults < --config < the command line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(PrepareOptions)
    layers = [schema, {"workers": default_workers()}]
    where = "the command line"
    try:
        if args.config:
            where = f"--config {args.config}"
            if not Path(args.config).is_file():
                raise DataError(f"--config {args.config!r} does not exist")
            layers.append(OmegaConf.load(args.config))
            OmegaConf.merge(*layers)  # a bad key or type is the config file's
        where = "the command line"
        layers.append(_cli_values(args))
        merged = OmegaConf.merge(*layers)
        for key in ("inputs", "out"):
            if OmegaConf.is_missing(merged, key) or not merged[key]:
                raise DataError(
                    f"no {key} given; pass {'input files' if key == 'inputs' else '--out DIR'} "
                    f"or set {key} in --config"
                )
        opts = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise DataError(f"{where}: {str(e).splitlines()[0]}; see megalite-data prepare -h") from e
    assert isinstance(opts, PrepareOptions)
    if not isinstance(opts.filters, FilterOptions):
        opts.filters = FilterOptions(**opts.filters)
    return opts


def save_config(opts: PrepareOptions, path: Path) -> None:
    """Writes the options as a --config file (what SLURM array elements read)."""
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.structured(opts)
    cfg.progress = False
    # Jobs may start elsewhere than the submitting shell: paths absolute ('shakespeare' stays).
    cfg.inputs = [str(Path(i).resolve()) if Path(i).exists() else i for i in opts.inputs]
    cfg.out = str(Path(opts.out).resolve())
    path.write_text(OmegaConf.to_yaml(cfg))


def run_prepare(args: argparse.Namespace, argv: list[str] | None) -> dict | None:
    """Runs the prepare command as its flags say; returns the manifest when one was written."""
    from megalite.data.prepare import _plan, prepare, prepare_task

    opts = options_from_args(args)
    if args.task is not None and args.merge:
        raise DataError("--task and --merge are two steps; give one of them")
    if args.task is not None:
        path = prepare_task(opts, args.task)
        print(f"task {args.task} of {opts.tasks}: wrote {path}")
        return None
    if args.merge:
        return prepare(opts, run_tasks=False)
    if args.executor == "slurm":
        from megalite.data.slurm_prepare import SlurmArray, submit_array

        _, _, _, plan, _ = _plan(opts)  # everything is checked before the queue wait
        job = SlurmArray(
            tasks=opts.tasks,
            job_name=args.job_name,
            partition=args.partition,
            account=args.account,
            time=args.time,
            cpus_per_task=opts.workers,
            log_dir=str(Path(args.log_dir or f"{opts.out}.logs").resolve()),
        )
        config = plan.work / "options.yaml"
        if not args.dry_run:
            save_config(opts, config)
        ids = submit_array(job, config, dry_run=args.dry_run)
        if ids is not None:
            print(f"submitted tasks {ids[0]} (array of {opts.tasks}) and merge {ids[1]}")
        return None
    return prepare(opts)
