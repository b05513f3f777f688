"""`megalite-eval harness`: lm-evaluation-harness (lm_eval 0.4) tasks on a megalite checkpoint,
read directly (any layout megalite saves; no conversion to Hugging Face format).

megalite-eval harness runs/cpu_demo --tasks hellaswag,arc_easy --num-fewshot 0 --limit 100
megalite-eval harness runs/cpu_demo/checkpoints/step_00000400 --tasks my_task \\
    --include-path my_tasks/ --out results/      # local task YAMLs work offline

`MegaliteLM` is an `lm_eval.api.model.TemplateLM`: the harness's own code turns requests into
token ids (context / continuation split, empty contexts, rolling windows), so the model scores
exactly what lm_eval's `hf` backend scores for the same tokenizer and context length:
- `loglikelihood`: right-padded batches sorted by length, one forward each, log-softmax in fp32;
  a context longer than the model's max_seq_len is cut from the left, as `hf` does;
- `loglikelihood_rolling`: lm_eval's disjoint rolling windows of max_seq_len tokens, batched;
- `generate_until`: the KV-cache decoder of megalite/generate.py (greedy unless the task
  samples), cut at the task's stop strings and EOS.

Tasks are resolved and their datasets loaded before the model is: an unknown task, or one whose
data must be downloaded on an offline machine, is one clear error, not a traceback after a long
model load. Local task YAMLs (`--include-path DIR`) are indexed alone first, so a run that needs
only them skips indexing lm_eval's ~15k built-in tasks (~10 s).

Shape legend: B batch, T sequence, V vocab.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megalite import cli_args
from megalite.checkpoint import (
    check_compatible,
    inference_config,
    load_for_inference,
    quiet_dcp,
    resolve_checkpoint,
)
from megalite.data.tokenizer import vocab_size
from megalite.errors import CheckpointError, ConfigError, MegaliteError, cli_error
from megalite.evaluate import (
    autocast_for,
    eos_ids,
    find_tokenizer,
    load_tokenizer,
    resolve_device,
    run_data_config,
)
from megalite.generate import SamplingConfig, generate
from megalite.model.transformer import Transformer
from megalite.rundir import DCP_INDEX, read_meta

DEEPSPEED = "deepspeed"  # meta.json's engine of a DeepSpeed ZeRO checkpoint (parallel/deepspeed.py)
# Keys of a result row that are not metrics.
_NOT_METRICS = ("alias", "samples", "name", "sample_len", "sample_count")


class HarnessError(MegaliteError, ValueError):
    """A harness task that cannot be run as asked (unknown, or its data cannot be loaded)."""


# ------------------------------------------------------------------------------ the model
@register_model("megalite")
class MegaliteLM(TemplateLM):
    """A megalite checkpoint as an lm_eval model. From Python: `MegaliteLM("runs/x")`; from
    lm_eval's registry: `simple_evaluate(model="megalite", model_args="checkpoint=runs/x")`."""

    def __init__(
        self,
        checkpoint: str | Path,
        tokenizer: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = 8,
        precision: str = "fp32",
        max_gen_toks: int = 256,
        seed: int = 0,
        **_: Any,  # lm_eval passes max_batch_size and the like to every model
    ) -> None:
        super().__init__()
        try:
            self.batch = int(batch_size or 8)
        except ValueError:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer") from None
        if self.batch < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        self.precision = precision
        autocast_for(precision, torch.device("cpu"))  # checks the name before the load
        self.dev = resolve_device(device or "auto")
        self.ckpt = resolve_checkpoint(checkpoint)
        run = run_data_config(self.ckpt)
        tok_path = find_tokenizer(self.ckpt, tokenizer, run)
        self.tok = load_tokenizer(tok_path)
        self.model, self.meta = load_model(self.ckpt, self.dev)
        if vocab_size(self.tok) > self.model.cfg.vocab_size:
            raise CheckpointError(
                f"tokenizer {str(tok_path)!r} has ids up to {vocab_size(self.tok) - 1}, beyond "
                f"the checkpoint's model.vocab_size={self.model.cfg.vocab_size}; pass the "
                "tokenizer the model was trained with (--tokenizer)"
            )
        self.eos = eos_ids(self.meta, self.tok, run)
        if not self.eos:
            raise CheckpointError(
                f"checkpoint {str(self.ckpt)!r} names no end-of-sequence token (meta.json "
                "eos_token_ids, the data manifest's eos_id, or <|endoftext|> in the tokenizer); "
                "lm_eval needs one to score empty contexts and to stop generations"
            )
        bos = self.meta.get("bos_token_id")
        # As lm_eval's hf backend: BOS conditions empty contexts when the model has one, else EOS.
        self._prefix = int(bos) if bos is not None else self.eos[0]
        self._prefix_text = self.tok.decode([self._prefix], skip_special_tokens=False)
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    # ---- what TemplateLM and the evaluator ask for
    @property
    def eot_token_id(self) -> int:
        return self.eos[0]

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def get_model_info(self) -> dict[str, Any]:
        return {"checkpoint": str(self.ckpt), "step": self.meta.get("step")}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        # As the hf backend: the tokenizer's own special-token rule (its post-processor), except
        # for a string that already starts with the prefix token.
        if add_special_tokens is None:
            add_special_tokens = not (self._prefix_text and string.startswith(self._prefix_text))
        return self.tok.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)

    # ---- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per request."""
        n = self.max_length
        rows = []
        for key, ctx, cont in requests:
            if not ctx or not cont or len(cont) > n:
                raise HarnessError(
                    f"a request has {len(ctx)} context and {len(cont)} continuation tokens; both "
                    f"must be non-empty and the continuation at most max_seq_len={n}"
                )
            rows.append((key, (ctx + cont)[-(n + 1) :][:-1], cont))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        # Longest first: equal lengths share batches (little padding), and memory peaks at once.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))
        for start in range(0, len(order), self.batch):
            chunk = order[start : start + self.batch]
            t = max(len(rows[i][1]) for i in chunk)
            # Right padding: a causal model's positions never see the padding after them.
            x_BT = torch.zeros(len(chunk), t, dtype=torch.long)
            for b, i in enumerate(chunk):
                x_BT[b, : len(rows[i][1])] = torch.tensor(rows[i][1])
            with autocast_for(self.precision, self.dev):
                logits_BTV = self.model(x_BT.to(self.dev))
            logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
            for b, i in enumerate(chunk):
                key, inp, cont = rows[i]
                cont_T = torch.tensor(cont, device=self.dev)
                # The logits at position j predict token j + 1: the continuation's are the last
                # len(cont) positions of this row's input.
                logp_TV = logp_BTV[b, len(inp) - len(cont) : len(inp)]
                ll = logp_TV.gather(-1, cont_T[:, None]).sum().item()
                greedy = bool((logp_TV.argmax(-1) == cont_T).all())
                out[i] = (ll, greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: lm_eval's disjoint windows of max_seq_len tokens
        (the first conditioned on the prefix token), all windows of all documents batched."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched KV-cache decoding, one batch per set of generation settings. Each row ends at
        EOS or as soon as its text holds a stop string, the batch when every row has ended (or at
        max_gen_toks); the text is then cut at the first stop string."""
        from lm_eval.models.utils import (
            Collator,
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        coll = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos_text = self.tok.decode([self.eot_token_id], skip_special_tokens=False)
        res = []
        for chunk in coll.get_batched(n=self.batch):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room < 1:
                raise HarnessError(
                    f"the task asks for max_gen_toks={max_gen} new tokens, which leaves no room "
                    f"for a prompt within the model's max_seq_len={self.max_length}"
                )
            prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
            sample = kwargs.get("do_sample", False)
            s = SamplingConfig(
                max_new_tokens=max_gen,
                temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
                top_k=kwargs.get("top_k") if sample else None,
                top_p=kwargs.get("top_p") if sample else None,
                seed=self.seed,
            )
            with autocast_for(self.precision, self.dev):
                done = generate(self.model, prompts, s, self.eos, stop=self._stop_check(until))
            for ctx, c in zip(contexts, done):
                text = postprocess_generated_text(self.tok_decode(c.tokens), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), text)
        return coll.get_original(res)

    def _stop_check(self, until: Sequence[str]) -> Callable[[list[int]], bool] | None:
        """Whether generated tokens hold a stop string, decoding only their tail: a string of n
        bytes that first appears with the newest token lies within its last n tokens (every
        token is at least one byte; twice that, for tokenizers that drop a leading space when
        decoding from the middle), so checking after each token finds it when it appears."""
        stops = [u for u in until if u]
        if not stops:
            return None
        window = 2 * max(len(u.encode("utf-8")) for u in stops) + 2

        def check(tokens: list[int]) -> bool:
            tail = self.tok_decode(tokens[-window:])
            return any(u in tail for u in stops)

        return check


# ------------------------------------------------------------------------------ the tasks
@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool):
    """lm_eval's task index (cached: indexing the built-in tasks takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def load_tasks(
    tasks: Sequence[str], include_path: str | Path | None = None, default_tasks: bool = True
) -> tuple[Any, list]:
    """(the TaskManager, the lm_eval Task / Group objects for `tasks`: names, tags, groups or
    YAML paths, with their datasets loaded). Raises HarnessError naming the task and the fix
    when a name is unknown or a dataset cannot be loaded (offline, a missing local file).
    `default_tasks=False` looks only in `include_path` (lm_eval's own tasks are not indexed)."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ConfigError("no harness task; pass --tasks NAME[,NAME...] (eval.harness.tasks)")
    inc = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path={str(include_path)!r} is not a directory")
        inc = str(include_path)
    tm = None
    if inc is not None:
        local = task_manager(inc, False)
        if all(n in local.all_tasks or Path(n).is_file() for n in names):
            tm = local
    tm = tm or task_manager(inc, default_tasks)
    unknown = [n for n in names if n not in tm.all_tasks and not Path(n).is_file()]
    if unknown:
        near = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        where = "lm_eval's tasks, groups or tags" if default_tasks else "the tasks"
        where += f" in --include-path={inc!r}" if inc else " (local task YAMLs: --include-path)"
        raise HarnessError(
            f"unknown harness task {unknown[0]!r}: not among {where}; {hint}list lm_eval's with "
            "`lm_eval ls tasks`"
        )
    from datasets.exceptions import DatasetNotFoundError

    loaded: dict[str, Any] = {}
    for name in names:
        try:
            loaded[name] = tm.load([name])
        except (ConnectionError, DatasetNotFoundError, OSError) as e:
            raise _data_error(name, e) from e
        except (KeyError, ValueError, TypeError) as e:
            raise HarnessError(f"harness task {name!r} cannot be built: {e}") from e
    return tm, _top_level(names, loaded)


def _top_level(names: list[str], loaded: dict[str, Any]) -> list:
    """What to hand to simple_evaluate: a named group whole (its aggregate is reported), a
    named task alone, a tag's tasks one by one."""
    out: list = []
    for name in names:
        built = loaded[name]
        groups, tasks = built["groups"], built["tasks"]
        if name in groups:
            objs = [groups[name]]
        elif name in tasks:
            objs = [tasks[name]]
        elif groups:  # a YAML path to a group: its outermost groups
            inner = {c for children in built["group_map"].values() for c in children}
            objs = [g for n, g in groups.items() if n not in inner]
        else:
            objs = list(tasks.values())
        out += [o for o in objs if all(o is not seen for seen in out)]
    return out


def _data_error(task: str, e: BaseException) -> HarnessError:
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ConnectionError) or "offline" in cause.lower() or "Hub" in cause:
        how = (
            "this machine is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set)"
            if _offline()
            else "the Hugging Face Hub cannot be reached"
        )
        return HarnessError(
            f"harness task {task!r} needs its dataset from the Hugging Face Hub and {how} "
            f"({cause}); run it once with network to fill the datasets cache, or give a local "
            "task YAML (dataset_path: json, dataset_kwargs: {data_files: ...}) with --include-path"
        )
    return HarnessError(
        f"the dataset of harness task {task!r} cannot be loaded ({cause}); check the task's "
        "dataset_path / data_files (relative data_files count from the current directory)"
    )


# ------------------------------------------------------------------------------ running
def load_model(ckpt: Path, device: torch.device) -> tuple[Transformer, dict[str, Any]]:
    """The checkpoint's model in eval mode and its meta.json: `load_for_inference` for DCP
    checkpoints (any layout); a DeepSpeed ZeRO checkpoint's fp32 weights gathered in memory,
    as `megalite-convert from-deepspeed` gathers them, so it needs no conversion step."""
    meta = read_meta(ckpt)
    if meta.get("engine") != DEEPSPEED:
        return load_for_inference(ckpt, device)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{str(ckpt)!r} is a DeepSpeed checkpoint; reading it needs DeepSpeed, which is not "
            "installed (`pip install megalite[deepspeed]`)"
        )
    from megalite.parallel.deepspeed import _import_deepspeed

    _import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = inference_config(meta, ckpt)
    with quiet_dcp():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()
    want = set(model.state_dict())
    missing = sorted(want - set(state) - ({"output.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise CheckpointError(
            f"DeepSpeed checkpoint {str(ckpt)!r} lacks {missing[:3]} ({len(missing)} tensors); "
            "use another step_N dir"
        )
    model.load_state_dict({k: v.float() for k, v in state.items() if k in want}, strict=False)
    return model.eval(), meta


def check_loadable(ckpt: Path) -> None:
    """What loading would refuse, without loading a weight: a meta.json without a usable
    model, a checkpoint missing its index (DCP's .metadata, DeepSpeed's files)."""
    meta = read_meta(ckpt)
    cfg = inference_config(meta, ckpt)
    if meta.get("engine") == DEEPSPEED:
        if not any(ckpt.rglob("*model_states.pt")):
            raise CheckpointError(
                f"{str(ckpt)!r} has a meta.json but no DeepSpeed model states: the checkpoint "
                "is incomplete; use another step_N dir"
            )
        return
    check_compatible(ckpt, cfg, engine="dcp")
    if not (ckpt / DCP_INDEX).is_file():
        raise CheckpointError(
            f"{str(ckpt)!r} has a meta.json but no {DCP_INDEX} (the DCP index of its tensors): "
            "the checkpoint is incomplete; use another step_N dir"
        )


def run_harness(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    tokenizer: str | None = None,
    seed: int = 0,
    log_samples: bool = False,
    default_tasks: bool = True,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on a megalite checkpoint; returns the harness's results dict
    (JSON-serializable with `to_json`). Every input is checked before the model loads."""
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot={num_fewshot} must be >= 0")
    if limit is not None and not limit > 0:
        raise ConfigError(f"--limit={limit} must be > 0 (a count, or a fraction below 1)")
    ckpt = resolve_checkpoint(checkpoint)  # a missing / half-written checkpoint fails first
    check_loadable(ckpt)
    find_tokenizer(ckpt, tokenizer, run_data_config(ckpt))
    tm, objs = load_tasks(tasks, include_path, default_tasks)
    from lm_eval import simple_evaluate

    lm = MegaliteLM(
        ckpt, tokenizer=tokenizer, device=device, batch_size=batch_size,
        precision=precision, seed=seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=objs,
        task_manager=tm,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    assert results is not None  # one process: always the main one
    results["config"]["model"] = "megalite"
    results["megalite"] = {**lm.get_model_info(), "eval_s": time.perf_counter() - t0}
    return results


def to_json(results: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable) + "\n"


def metric_rows(results: dict[str, Any]) -> dict[str, float]:
    """The finite metrics of a results dict, flat: {"harness/<task>/<metric>[/<filter>]": v}
    (lm_eval's "acc,none" -> "acc"); standard errors stay in the JSON."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key in _NOT_METRICS or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            flat[f"harness/{task}/{name}"] = float(value)
    return flat


def markdown_table(results: dict[str, Any]) -> str:
    """The harness's own results table (and groups table), in markdown."""
    from lm_eval.utils import make_table

    info = results.get("megalite", {})
    head = f"# lm-eval results: {info.get('checkpoint', '?')} (step {info.get('step')})\n\n"
    out = head + make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out


def write_results(results: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    """`<out>/<stem>.json` and `<out>/<stem>.md`, each written whole (temp file + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in (("json", to_json(results)), ("md", markdown_table(results))):
        path = out / f"{stem}.{suffix}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    args = cli_args.harness().parse_args(argv)
    # lm_eval logs each task's set-up at INFO; the table below is the output.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        results = run_harness(
            args.checkpoint,
            args.tasks.split(","),
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            tokenizer=args.tokenizer,
            seed=args.seed,
            default_tasks=not args.no_default_tasks,
            log_samples=args.log_samples,
        )
    except MegaliteError as e:
        return cli_error("megalite-eval harness", e)
    json_path, md_path = write_results(results, Path(args.out), "results")
    print(markdown_table(results))
    print(f"megalite-eval harness: wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
