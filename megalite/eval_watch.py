"""`megalite-eval watch RUN_DIR`: lm-evaluation-harness on each new checkpoint of a run, beside
training, in a process of its own, so training never waits for an eval and never dies from one.

megalite-eval watch runs/cpu_demo                  # settings from the run's eval.harness config
megalite-eval watch runs/x --tasks hellaswag --every 1000 --device cuda   # as its own job
megalite-eval watch runs/x --once                  # evaluate what is there, then exit

With `eval.harness.every` set, the trainer's rank 0 starts this process itself (`start_watcher`)
with its stdin on a pipe the trainer holds: when training ends, or its process dies, the pipe
closes and the watcher evaluates what is left and exits. Started by hand (a SLURM job of its
own), it exits once the run's summary.json reaches train.max_steps.

Which checkpoints: every complete one (a `step_N` dir with meta.json; never a `.tmp` being
written) whose step is a multiple of `every`, and the run's final one, in step order, each
once. Per checkpoint, in `<run_dir>/harness/`: `step_N.json` (the harness's JSON), `step_N.md`
(its table), or `step_N.error.json` / `step_N.skipped.json`. These files are the watcher's
memory: a restarted watcher (a resumed run) skips what is done, and re-appends a metrics row
that a crash lost.

Results: one row per checkpoint appended to metrics.jsonl, `{"step", "kind": "harness",
"harness/<task>/<metric>": value, ...}` (megalite/metrics.py reads and plots them beside the
loss), and to wandb when the run logs there (a run of its own in the training run's group,
job_type "eval", its x axis `trainer/step`: two processes cannot append to one wandb run).

Failures: an eval that raises is reported (watch.log, a `harness_error` row) and retried once;
a second failure leaves the error file and moves on. `train.keep_last`: checkpoints are NOT
protected from pruning. A checkpoint deleted before (or while) its eval ran is skipped with a
warning (a `harness_skipped` row): keep train.keep_last x train.ckpt_every steps longer than one
eval takes, or run the watcher on a faster device. Protecting them would let a slow watcher
fill the disk of a run that never waits for it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from megalite import cli_args
from megalite.config import Config, HarnessConfig
from megalite.errors import MegaliteError, cli_error
from megalite.rundir import RunDir

_STEP = re.compile(r"^step_(\d+)$")
# Environment a torchrun worker sets that must not leak into the watcher (lm_eval reads
# LOCAL_RANK; nothing here joins a process group).
_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


@dataclasses.dataclass
class WatchSettings:
    harness: HarnessConfig
    final_step: int | None = None  # train.max_steps: its checkpoint is always evaluated
    poll_s: float = 10.0
    wandb: Any = None  # the run's logging.wandb config, or None
    run_name: str | None = None
    plot: bool = True
    jsonl: bool = True  # logging.jsonl: rows go to metrics.jsonl


def read_run_config(run_dir: Path) -> Config | None:
    """The typed config the run saved (config.yaml), or None when it has none."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from megalite.compose import to_config

    return to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def settings_for(run_dir: Path, overrides: dict[str, Any] | None = None) -> WatchSettings:
    """The run's eval.harness settings (its config.yaml), with `overrides` (CLI options) on top;
    checked as the config checks them."""
    cfg = read_run_config(run_dir)
    base = dataclasses.asdict(cfg.eval.harness) if cfg is not None else {}
    merged = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    harness = HarnessConfig(**merged)
    if not harness.tasks:
        raise MegaliteError(
            f"no harness tasks for {str(run_dir)!r}: its config.yaml sets no eval.harness.tasks;"
            " pass --tasks NAME[,NAME...]"
        )
    if cfg is None:
        return WatchSettings(harness)
    return WatchSettings(
        harness,
        final_step=cfg.train.max_steps,
        wandb=cfg.logging.wandb if cfg.logging.wandb.mode != "disabled" else None,
        run_name=cfg.logging.wandb.name or cfg.name,
        plot=cfg.train.plot and cfg.logging.jsonl,
        jsonl=cfg.logging.jsonl,
    )


EvalFn = Callable[[Path, HarnessConfig], dict]


def harness_eval(ckpt: Path, h: HarnessConfig) -> dict:
    """The default eval: the harness on one checkpoint (megalite/harness.py)."""
    from megalite.harness import run_harness

    return run_harness(
        ckpt,
        h.tasks,
        num_fewshot=h.num_fewshot,
        limit=int(h.limit) if h.limit is not None and h.limit >= 1 else h.limit,
        include_path=h.include_path,
        batch_size=h.batch_size,
        device=h.device,
        precision=h.precision,
    )


class Watcher:
    """Evaluates the wanted checkpoints of one run dir, each once (see the module doc)."""

    def __init__(
        self,
        run_dir: str | Path,
        settings: WatchSettings,
        *,
        evaluate: EvalFn = harness_eval,
        out: IO[str] | None = None,
    ) -> None:
        self.run = RunDir(run_dir)
        self.dir = self.run.harness
        self.dir.mkdir(parents=True, exist_ok=True)
        self.s = settings
        self.evaluate = evaluate
        self.out = out or sys.stdout
        self._wandb = None
        self._seen_max = 0  # the newest step seen, for noticing pruned checkpoints

    # ---- bookkeeping: the files in harness/ are the state
    def _stem(self, step: int) -> str:
        return f"step_{step:08d}"

    def status(self, step: int) -> str | None:
        """done, failed, skipped, or None (not evaluated yet)."""
        stem = self._stem(step)
        if (self.dir / f"{stem}.json").is_file():
            return "done"
        if (self.dir / f"{stem}.skipped.json").is_file():
            return "skipped"
        err = self.dir / f"{stem}.error.json"
        if err.is_file() and json.loads(err.read_text()).get("attempts", 0) >= 2:
            return "failed"
        return None

    def wanted(self, step: int) -> bool:
        every = self.s.harness.every
        return not every or step % every == 0 or step == self.s.final_step

    def log(self, msg: str) -> None:
        print(f"megalite-eval watch: {msg}", file=self.out, flush=True)

    def _write(self, name: str, record: dict) -> None:
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.dir / name)

    # ---- one pass
    def pending(self) -> list[tuple[int, Path]]:
        found = []
        for ckpt in self.run.complete_checkpoints():
            step = int(_STEP.match(ckpt.name).group(1))
            self._seen_max = max(self._seen_max, step)
            if self.wanted(step) and self.status(step) is None:
                found.append((step, ckpt))
        return found

    def scan(self) -> int:
        """Evaluates every pending checkpoint, oldest first; returns how many were handled."""
        todo = self.pending()
        self._note_pruned()
        for step, ckpt in todo:
            self.evaluate_one(step, ckpt)
        return len(todo)

    def _note_pruned(self) -> None:
        """Wanted steps below the newest seen that have neither a checkpoint nor a result were
        pruned (train.keep_last) before the watcher saw them: say so once."""
        every = self.s.harness.every
        if not every or not self._seen_max:
            return
        existing = {int(_STEP.match(c.name).group(1)) for c in self.run.complete_checkpoints()}
        for step in range(every, self._seen_max, every):
            if step not in existing and self.status(step) is None:
                self._skip(step, "deleted (train.keep_last) before the watcher saw it")

    def _skip(self, step: int, why: str) -> None:
        self.log(f"warning: checkpoint {self._stem(step)} skipped: {why}")
        self._write(f"{self._stem(step)}.skipped.json", {"step": step, "reason": why})
        self._append_row({"step": step, "kind": "harness", "harness_skipped": why})

    def evaluate_one(self, step: int, ckpt: Path) -> None:
        """One checkpoint: at most two attempts; a checkpoint that vanishes is skipped."""
        stem = self._stem(step)
        for attempt in (1, 2):
            if not ckpt.is_dir():
                self._skip(step, "deleted (train.keep_last) before its eval ran")
                return
            self.log(f"evaluating {ckpt} (attempt {attempt})")
            t0 = time.perf_counter()
            try:
                results = self.evaluate(ckpt, self.s.harness)
            except Exception as e:  # any failure is the eval's, never the run's
                if not ckpt.is_dir():
                    self._skip(step, "deleted (train.keep_last) while its eval ran")
                    return
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                self.log(f"eval of {stem} failed (attempt {attempt}): {msg}")
                if not isinstance(e, MegaliteError):
                    traceback.print_exc(file=self.out)
                self._write(f"{stem}.error.json", {"step": step, "attempts": attempt, "error": msg})
                self._append_row({"step": step, "kind": "harness", "harness_error": msg})
                continue
            self._finish(step, ckpt, results, time.perf_counter() - t0)
            return

    def _finish(self, step: int, ckpt: Path, results: dict, seconds: float) -> None:
        from megalite.harness import metric_rows, write_results

        results.setdefault("megalite", {}).update(step=step, checkpoint=str(ckpt))
        write_results(results, self.dir, self._stem(step))
        (self.dir / f"{self._stem(step)}.error.json").unlink(missing_ok=True)
        row = {"step": step, "kind": "harness", **metric_rows(results), "harness_eval_s": seconds}
        self._append_row(row)
        self.log(
            f"{self._stem(step)}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if "/" in k)
        )

    # ---- sinks
    def _append_row(self, row: dict) -> None:
        if self.s.jsonl:
            # One write() of one line, in append mode: safe beside the trainer's own appends.
            with self.run.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self._to_wandb(row)
        if self.s.plot:
            self._plot()

    def reconcile(self) -> None:
        """Re-appends the metrics row of a done checkpoint that metrics.jsonl lacks (a watcher
        that died between the two writes, or a resume that truncated the file)."""
        from megalite.harness import metric_rows
        from megalite.metrics import read_metrics

        if not self.s.jsonl:
            return
        have = {r["step"] for r in read_metrics(self.run.metrics) if r.get("kind") == "harness"}
        for path in sorted(self.dir.glob("step_*.json")):
            m = _STEP.match(path.name.removesuffix(".json"))
            if m and int(m.group(1)) not in have:
                results = json.loads(path.read_text())
                row = {"step": int(m.group(1)), "kind": "harness", **metric_rows(results)}
                self._append_row(row)

    def _to_wandb(self, row: dict) -> None:
        if self.s.wandb is None:
            return
        try:
            if self._wandb is None:
                import wandb

                w = self.s.wandb
                self._wandb = wandb.init(
                    mode=w.mode, project=w.project, entity=w.entity,
                    name=f"{self.s.run_name}-harness", group=self.s.run_name,
                    job_type="eval", dir=str(self.dir), resume="allow",
                )  # fmt: skip
                self._wandb.define_metric("trainer/step")
                self._wandb.define_metric("harness/*", step_metric="trainer/step")
            numbers = {k: v for k, v in row.items() if k.startswith("harness/")}
            if numbers:
                self._wandb.log({"trainer/step": row["step"], **numbers})
        except Exception as e:  # a wandb outage loses the wandb copy only
            self.log(f"warning: wandb logging failed ({type(e).__name__}: {e})")

    def _plot(self) -> None:
        from megalite.metrics import plot_losses

        summary = self.run.summary
        baseline = None
        if summary.is_file():
            baseline = json.loads(summary.read_text()).get("unigram_val_loss")
        try:
            plot_losses(self.run.metrics, self.run.loss_plot, baseline=baseline)
        except Exception as e:  # matplotlib missing or a bad record: the plot only
            self.log(f"warning: plot failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    # ---- the loop
    def training_finished(self) -> bool:
        """Started by hand: summary.json (written when a run ends) says the last step is done."""
        if self.s.final_step is None or not self.run.summary.is_file():
            return False
        try:
            return json.loads(self.run.summary.read_text()).get("step", 0) >= self.s.final_step
        except (OSError, ValueError):
            return False

    def run_until(self, stop: threading.Event | None = None, once: bool = False) -> None:
        """Scans until `stop` is set (or, without one, the run finishes), then scans once more so
        the final checkpoint is evaluated; waits poll_s between scans (woken early by stop)."""
        self.reconcile()
        while True:
            ended = once or (stop.is_set() if stop is not None else self.training_finished())
            self.scan()
            if ended:
                while self.scan():  # checkpoints written while the last scan ran
                    pass
                return
            if stop is not None:
                stop.wait(self.s.poll_s)
            else:
                time.sleep(self.s.poll_s)


# ------------------------------------------------------------------------ started by training
@dataclasses.dataclass
class WatcherProcess:
    """The trainer's handle: `training_done()` closes the pipe, which ends the watcher after it
    evaluates the remaining checkpoints. The trainer never waits for it."""

    process: subprocess.Popen
    log: Path

    def training_done(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass


def start_watcher(cfg: Config, run_dir: str | Path) -> WatcherProcess | None:
    """Starts `megalite-eval watch run_dir` as a detached process when eval.harness.every is set
    (call on the main rank only). A watcher that cannot start is reported, never raised: the
    run goes on without evals."""
    h = cfg.eval.harness
    if not h.every:
        return None
    out = RunDir(run_dir).harness
    out.mkdir(parents=True, exist_ok=True)
    log = out / "watch.log"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    if h.threads:
        env["OMP_NUM_THREADS"] = str(h.threads)
    env["TQDM_DISABLE"] = "1"  # lm_eval's progress bars would fill the log
    if h.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # never touches (or initializes) the training GPUs
    cmd = [sys.executable, "-m", "megalite.eval_watch", str(run_dir), "--until-stdin-closes"]
    try:
        with log.open("ab") as f:
            # A session of its own: a Ctrl-C or a launcher's signal to the training processes
            # does not cut an eval short; the closed pipe tells it training is over.
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
    except OSError as e:
        print(f"megalite: warning: harness evals not started ({e}); the run goes on", flush=True)
        return None
    if cfg.logging.console:
        print(
            f"harness evals every {h.every} steps ({', '.join(h.tasks)}): megalite-eval watch, "
            f"pid {proc.pid}, log {log}",
            flush=True,
        )
    return WatcherProcess(proc, log)


def _stdin_closed() -> threading.Event:
    """Set when stdin reaches end of file: the trainer closed its end, or its process died."""
    ev = threading.Event()

    def wait() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            ev.set()

    threading.Thread(target=wait, name="stdin-eof", daemon=True).start()
    return ev


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    args = cli_args.watch().parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    run_dir = Path(args.run_dir)
    try:
        if not run_dir.is_dir():
            raise MegaliteError(f"run dir {str(run_dir)!r} does not exist")
        overrides = {
            "tasks": args.tasks.split(",") if args.tasks else None,
            "every": args.every,
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "include_path": args.include_path,
            "batch_size": args.batch_size,
            "device": args.device,
            "precision": args.precision,
        }
        s = settings_for(run_dir, overrides)
        s.poll_s = args.poll_s
    except MegaliteError as e:
        return cli_error("megalite-eval watch", e)
    stop = _stdin_closed() if args.until_stdin_closes else None
    os.nice(s.harness.nice)  # training keeps the cores it needs
    if s.harness.threads:
        import torch

        torch.set_num_threads(s.harness.threads)
    lock_path = RunDir(run_dir).harness / "watch.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        # One watcher per run dir: a resumed run's watcher waits for the previous one to finish.
        fcntl.flock(lock, fcntl.LOCK_EX)
        watcher = Watcher(run_dir, s)
        try:
            watcher.run_until(stop, once=args.once)
        finally:
            watcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
