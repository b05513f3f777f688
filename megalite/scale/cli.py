"""`megalite-scale`: an IsoFLOP scaling study as four commands (docs/scale.md).

    megalite-scale plan --budgets 1e15,3e15,1e16 --sizes 5 --out study data=shakespeare ...
    megalite-scale run study                       # here, one run after another (resumable)
    megalite-scale run study --slurm --nodes 1 --gpus-per-node 8 --partition gpu --time 4:00:00
    megalite-scale collect study                   # states of the runs, results.csv
    megalite-scale fit study/results.csv --out study/fit
    megalite-scale recommend study/fit --budget 1e21 --gpus 64 --gpu h100

Trailing KEY=VALUE arguments of `plan` and `recommend` are megalite-train overrides for the
base config (data, batch, optimizer, precision, layout); the model shape and run length are
the plan's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megalite.errors import ConfigError, MegaliteError, cli_error

PROG = "megalite-scale"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (e.g. 1e15,3e15,1e16)"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    plan = sub.add_parser("plan", help="an IsoFLOP grid: shapes, tokens, one config per run")
    plan.add_argument("--budgets", type=_floats, required=True, help="FLOPs, e.g. 1e15,3e15")
    plan.add_argument("--sizes", type=int, default=5, help="model sizes per budget (5)")
    plan.add_argument("--family", default="llama", help="shape rule (llama)")
    plan.add_argument("--out", required=True, help="grid dir to create")
    plan.add_argument("--span", type=float, default=16.0, help="max/min params per budget (16)")
    plan.add_argument(
        "--tokens-per-param", type=float, default=20.0, help="centre of the sizes (20)"
    )
    plan.add_argument("--min-steps", type=int, default=50, help="fewest steps of a run (50)")
    plan.add_argument("--warmup-fraction", type=float, default=0.05, help="lr warmup (0.05)")
    plan.add_argument("--world-size", type=int, default=1, help="ranks per run (1)")
    plan.add_argument("overrides", nargs="*", help="megalite-train overrides (base config)")

    run = sub.add_parser("run", help="train the grid's unfinished runs")
    run.add_argument("grid", help="grid dir (or its grid.csv)")
    run.add_argument("--torchrun", action="store_true", help="each run under torchrun")
    run.add_argument("--slurm", action="store_true", help="one SLURM job array instead")
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU nodes (8)")
    run.add_argument("--nproc-per-node", type=int)
    run.add_argument("--cpus-per-task", type=int)
    run.add_argument("--partition")
    run.add_argument("--account")
    run.add_argument("--qos")
    run.add_argument("--time", help="per task: minutes, HH:MM:SS or D-HH:MM:SS")
    run.add_argument("--gpu", default="h100", help="GPU type, for the preemption grace (h100)")
    run.add_argument("--max-parallel", type=int, help="at most this many tasks at once")
    run.add_argument("--dry-run", action="store_true", help="--slurm: print the script")

    collect = sub.add_parser("collect", help="states of the runs; write results.csv")
    collect.add_argument("grid")

    fit = sub.add_parser("fit", help="approaches 2 and 3, bootstrap CIs, plots, summary")
    fit.add_argument("results", help="CSV with params,tokens,loss (flops optional)")
    fit.add_argument("--out", required=True, help="dir for fit.json, plots, summary.md")
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples for the CIs (200)")
    fit.add_argument("--seed", type=int, default=0)

    rec = sub.add_parser("recommend", help="compute-optimal N, D, loss, shape and config")
    rec.add_argument("fit_dir", help="dir with fit.json")
    rec.add_argument("--budget", type=float, required=True, help="FLOPs")
    rec.add_argument("--approach", choices=("isoflop", "parametric"), default=None,
                     help="law for N and D (isoflop when the fit has it)")  # fmt: skip
    rec.add_argument("--family", default="llama")
    rec.add_argument("--gpus", type=int, help="GPUs, for megalite-plan's layout and time")
    rec.add_argument("--gpu", default="h100")
    rec.add_argument("--mfu", type=float, default=0.4)
    rec.add_argument("--layout", default="fsdp", help="conf/parallel preset (fsdp)")
    rec.add_argument("--seq-len", type=int, help="default: the base config's data.seq_len")
    rec.add_argument("--out", help="config to write (FIT_DIR/experiment/recommended.yaml)")
    rec.add_argument("overrides", nargs="*", help="megalite-train overrides (base config)")
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from megalite.compose import compose_config
    from megalite.scale.grid import PlanOptions, check_base_overrides, plan_grid, write_grid

    opts = PlanOptions(
        budgets=args.budgets,
        sizes=args.sizes,
        family=args.family,
        span=args.span,
        tokens_per_param=args.tokens_per_param,
        min_steps=args.min_steps,
        warmup_fraction=args.warmup_fraction,
        world_size=args.world_size,
    )
    check_base_overrides(args.overrides)
    cfg = compose_config(args.overrides)
    runs = plan_grid(cfg, opts)
    out = Path(args.out)
    write_grid(cfg, runs, out, opts, args.overrides)
    print(f"{'run':<14}{'params':>12}{'tokens':>13}{'steps':>7}{'FLOPs':>11}{'6ND':>11}{'D/N':>8}")
    for r in runs:
        row = r.row()
        print(
            f"{r.run:<14}{r.params:>12,}{r.tokens:>13,}{r.steps:>7}{r.flops:>11.3g}"
            f"{float(row['flops_6nd']):>11.3g}{r.tokens / r.params:>8.3g}"
        )
    total = sum(r.flops for r in runs)
    print(f"{len(runs)} runs, {total:.3g} FLOPs in all; grid: {out / 'grid.csv'}, configs: "
          f"{out / 'configs/experiment'}; next: {PROG} run {out}")  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from megalite.scale.runner import SlurmOptions, run_local, submit_array

    if args.slurm:
        opts = SlurmOptions(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            nproc_per_node=args.nproc_per_node,
            cpus_per_task=args.cpus_per_task,
            partition=args.partition,
            account=args.account,
            qos=args.qos,
            time=args.time,
            gpu=args.gpu,
            max_parallel=args.max_parallel,
            dry_run=args.dry_run,
        )
        out = submit_array(Path(args.grid), opts, argv)
        if args.dry_run:
            sys.stdout.write(out)
        else:
            print(f"submitted job array {out}; when it is done: {PROG} collect {args.grid}",
                  file=sys.stderr)  # fmt: skip
            print(out)
        return 0
    report = run_local(Path(args.grid), torchrun=args.torchrun)
    print(report.summary())
    print(f"results: {Path(args.grid) / 'results.csv'}")
    return 1 if report.by_state("failed") or report.by_state("diverged") else 0


def cmd_collect(args: argparse.Namespace) -> int:
    from megalite.scale.runner import collect

    report = collect(Path(args.grid))
    print(report.summary())
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from megalite.scale.fit import fit_all, read_points
    from megalite.scale.report import write_fit

    pts = read_points(Path(args.results))
    result = fit_all(pts, n_boot=args.bootstrap, seed=args.seed)
    out = Path(args.out)
    paths = write_fit(result, pts, out)
    print(paths["summary"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from megalite.scale.recommend import recommend

    fit_path = Path(args.fit_dir) / "fit.json"
    if not fit_path.is_file():
        raise ConfigError(f"{fit_path} does not exist; run `{PROG} fit RESULTS --out DIR` first")
    fit = json.loads(fit_path.read_text())
    out = Path(args.out) if args.out else Path(args.fit_dir) / "experiment" / "recommended.yaml"
    return recommend(fit, args, out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Overrides after the options of a command with a positional (recommend DIR --budget X
    # data=...) are left over by argparse: take them when they are KEY=VALUE.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "run":
            return cmd_run(args, argv)
        if args.cmd == "collect":
            return cmd_collect(args)
        if args.cmd == "fit":
            return cmd_fit(args)
        return cmd_recommend(args)
    except MegaliteError as e:
        return cli_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
