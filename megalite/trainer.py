"""The training loop: setup, step (accumulate, clip, update), eval, checkpoint, log.

Reads top to bottom: `Trainer.__init__` checks everything that can be checked cheaply before any
process group, model or data stream exists (config against world size, dataset against model,
checkpoint against model), then builds; `fit` runs the loop.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megalite import checkpoint
from megalite.bpb import bits_per_byte, data_token_bytes
from megalite.checkpoint_async import build_saver, refuse_reimported_main
from megalite.config import Config
from megalite.data.loader import TrainStream, ValSet, verify_shard_hashes
from megalite.engine import build_engine
from megalite.errors import DataError, MegaliteError, TrainingError
from megalite.eval_watch import start_watcher
from megalite.memory import estimate_memory
from megalite.metrics import (
    MetricsLogger,
    mfu_warning,
    peak_memory_gb,
    plot_losses,
    read_metrics,
    redact,
    resolve_peak,
)
from megalite.optim import lr_at
from megalite.parallel.distributed import (
    abort,
    barrier,
    init_distributed,
    shutdown,
    world_size_from_env,
)
from megalite.parallel.float8 import summary as float8_summary
from megalite.preflight import Plan, preflight
from megalite.resilience import (
    Faults,
    LossGuard,
    StopSignals,
    Verdict,
    Watchdog,
)
from megalite.rundir import RunDir, point_latest
from megalite.shapes import flops_per_token


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    verdict: Verdict
    # Some rank received SIGUSR1 / SIGTERM: every rank stops after this step.
    stop: bool = False
    # Fingerprint of the tokens the step consumed over all ranks (MEGALITE_DEBUG=fingerprint).
    data_crc: int | None = None


def debug_flags() -> set[str]:
    """MEGALITE_DEBUG=fingerprint,...: checks tests switch on; production steps skip them."""
    return set(filter(None, os.environ.get("MEGALITE_DEBUG", "").split(",")))


class Trainer:
    def __init__(self, cfg: Config) -> None:
        refuse_reimported_main()  # train.ckpt_async=process's helper re-imports the script
        # ---- preflight: every cheap check, before any process group, model or data stream
        plan = preflight(cfg, world_size_from_env())
        # SIGUSR1 / SIGTERM from here on become a clean stop, also during a long start-up; a
        # start-up that fails gives the handlers back.
        self.signals = StopSignals().install()
        try:
            self._setup(plan)
        except BaseException as e:
            self.signals.restore()
            if getattr(self, "dist", None) is not None and self.dist.owns_group:
                # Peers may be waiting in a collective for this rank: do not wait for them.
                report_failure(self.dist.rank, e)
                abort()
            raise

    def _setup(self, plan: Plan) -> None:
        self.cfg = cfg = plan.cfg
        tcfg = cfg.train
        self.global_batch, self.dims = plan.global_batch, plan.dims
        self.manifest, self.resume_from = plan.manifest, plan.resume_from

        # ---- distributed + device
        self.dist = init_distributed(tcfg.device, cfg.parallel.backend, cfg.parallel.timeout_s)
        self.device = self.dist.device
        self.mesh = self.dims.build_mesh(self.device.type)
        torch.manual_seed(tcfg.seed + self.dist.rank)
        self.run_dir = Path(tcfg.run_dir)
        self.run = RunDir(self.run_dir)  # where each file of a run lives (rundir.py)
        self._verify_shard_hashes()
        # Test machinery, parsed once; a production run has none and skips every hook.
        self.faults = Faults.from_env(self.dist.rank, self.run_dir)
        self.fingerprint = "fingerprint" in debug_flags()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._save_config()
            point_latest(self.run_dir)  # runs/latest -> this run (rundir.py)

        # ---- model + optimizer: the engine for parallel.strategy (engine.py) builds the model
        # on the meta device, parallelizes it from outside, then materializes it (ZeRO-3:
        # partitioned as it is built, so no rank ever holds the whole model)
        self.n_params = plan.n_params
        init_from = None
        if tcfg.init_from is not None and self.resume_from is None:
            init_from = Path(tcfg.init_from)
        self.engine = build_engine(
            cfg, self.dims, self.mesh, self.device, self.global_batch, init_from, plan.model
        )
        # train.ckpt_async: checkpoints written in the background (checkpoint_async.py), or None.
        self.saver = build_saver(cfg, self.engine, self.dist)

        # ---- data: the ranks of one cp x tp block read the same samples
        dp_rank = self.dims.dp_rank(self.dist.rank)
        # mosaicml-streaming names its shared memory by scanning /dev/shm on every rank: start
        # the ranks together so they see the same segments.
        barrier()
        self.stream = TrainStream(
            cfg.data, tcfg.micro_batch_size, seed=tcfg.seed, replication=self.dims.replication
        )
        barrier()
        self.val = ValSet(cfg.data, dp_rank, self.dims.dp)

        # ---- state, resumed if asked
        self.step, self.tokens = 0, 0
        self.guard = LossGuard(tcfg.guard)
        self.rollbacks = 0
        self.attempts = 0  # steps run by this process, rollbacks included
        self._data_crc = 0
        self._saved_step: int | None = None  # the step of the newest checkpoint this job wrote
        self._mfu_warned = False
        if self.resume_from is not None:
            state = checkpoint.load(self.resume_from, self.engine, cfg.model, self.dist)
            self.step, self.tokens = state["step"], state["tokens"]
            self.stream.load_state_dict(state["data"])

        # ---- metrics
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        dtype = torch.bfloat16 if tcfg.precision == "bf16" else torch.float32
        self.peak = resolve_peak(self.device, dtype, cfg.logging.peak_tflops)
        if self.dist.is_main and self.resume_from is not None:
            self._truncate_metrics(self.step)
            self.run.preempted.unlink(missing_ok=True)
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.dist.is_main,
            console=cfg.logging.console,
            jsonl=cfg.logging.jsonl,
            wandb_cfg=cfg.logging.wandb,
            config=self._config_dict(),
        )
        self.logger.info(plan.precision_reason)
        if tcfg.float8 != "none":
            self.logger.info(
                float8_summary(self.engine.model, cfg, self.device.type, self.peak.device_name)
            )
        for line in plan.warnings:  # found by preflight, printed once the logger exists
            self.logger.info(f"warning: {line}")
        self.logger.info(
            f"megalite: {cfg.name} | model {cfg.model.name} {self.n_params / 1e6:.2f}M params | "
            f"{cfg.parallel.strategy} {self._layout()} on {self.device} | "
            f"{tcfg.precision} | global batch {self.global_batch} x {cfg.data.seq_len} tokens | "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token | MFU {self.peak.label}"
        )
        self.memory_plan = estimate_memory(cfg, self.dims)
        self.logger.info(self.memory_plan.summary())
        self._memory_compared = False  # the measured peak is logged next to it once
        if self.resume_from is not None:
            self.logger.info(f"resumed from {self.resume_from} at step {self.step}")
        # Bits per byte beside val loss (bpb.py): the bytes each token of the data spells.
        self._token_bytes = data_token_bytes(cfg.data.dir, cfg.model.vocab_size)
        self.val_bpb: float | None = None
        # Downstream evals in a process of their own (eval.harness.every; eval_watch.py).
        self.eval_watcher = start_watcher(cfg, self.run_dir) if self.dist.is_main else None

    # ------------------------------------------------------------------------------ helpers
    def _verify_shard_hashes(self) -> None:
        """data.verify_shards=hash: every rank hashes its share of the shards, now that the
        process group exists (before it, a long hash would outlast the rendezvous)."""
        if self.cfg.data.verify_shards != "hash":
            return
        problems = verify_shard_hashes(self.cfg.data, self.dist.rank, self.dist.world_size)
        found = [
            p for rank_problems in self.dist.all_gather_object(problems) for p in rank_problems
        ]
        if found:
            raise DataError(
                f"{len(found)} shard(s) fail data.verify_shards=hash:\n" + "\n".join(found)
            )

    def _layout(self) -> str:
        d = self.dims
        pp = f"pp {d.pp} ({self.cfg.parallel.pp_schedule}) x " if d.pp > 1 else ""
        cp = f" x cp {d.cp} ({self.cfg.parallel.cp_mode})" if d.cp > 1 else ""
        return f"({pp}dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x tp {d.tp}{cp})"

    def _config_dict(self) -> dict:
        return redact(OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True))

    def _save_config(self) -> None:
        """The resolved config, in the run dir; a resumed run with other settings keeps both."""
        text = OmegaConf.to_yaml(OmegaConf.create(self._config_dict()))
        path = self.run.config
        if path.exists() and path.read_text() != text:
            path = self.run.resumed_config(time.strftime("%Y%m%d-%H%M%S"))
        path.write_text(text)

    def _truncate_metrics(self, step: int) -> None:
        """Drops records past the resumed step: those steps are about to be run again."""
        path = self.run.metrics
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)

    def _micro_batches(self):
        """One optimizer step's micro-batches, on the device."""
        on_gpu = self.device.type == "cuda"
        for _ in range(self.cfg.train.grad_accum_steps):
            x, y = next(self.stream)
            if self.fingerprint:  # the tokens this step consumed (resume tests compare them)
                self._data_crc = zlib.crc32(x.numpy().tobytes(), self._data_crc)
            if on_gpu:  # a page-locked copy makes the host-to-device copy truly asynchronous
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum_steps micro-batches. The update is applied only
        if the loss guard accepts the (globally reduced) loss and gradient norm.

        One device-to-host sync per step: loss, stop flag (and the debug fingerprint) are
        all-reduced together on the device, and read back with the grad norm in one copy."""
        tcfg = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, tcfg.max_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.model.train()
        self._data_crc = 0
        self.attempts += 1
        poison = self.faults.loss_factor(self.attempts) if self.faults.poisons_loss else None
        loss_sum, grad_norm = self.engine.forward_backward(self._micro_batches(), poison)
        # Every rank of a tensor-parallel group holds the same loss: average over all ranks.
        # The grad norm is already global on every rank: not reduced again.
        summed = [loss_sum / tcfg.grad_accum_steps, self.dist.tensor(self._stop_flag())]
        if self.fingerprint:
            summed.append(self.dist.tensor(self._data_crc, torch.float64))
        reduced = self.dist.all_reduce(torch.stack([t.double() for t in summed]), "sum")
        host = torch.cat([reduced, grad_norm.detach().double().view(1)]).tolist()  # the sync
        loss, stop, norm = host[0] / self.dist.world_size, host[1] > 0, host[-1]
        verdict = self.guard.check(loss, norm)
        self.engine.optimizer_step(verdict.apply)
        self.step += 1
        self.tokens += self.global_batch * self.cfg.data.seq_len
        crc = int(host[2]) if self.fingerprint else None
        return StepResult(loss, norm, verdict, stop, crc)

    def _stop_flag(self) -> float:
        return float(self.signals.received is not None)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first eval_batches batches (the same ones each time)."""
        self.engine.model.eval()
        total = torch.zeros((), device=self.device)
        n, tokens, nbytes = 0, 0, 0
        for x, y in self.val.batches(self.cfg.train.micro_batch_size, self.cfg.train.eval_batches):
            total += self.engine.eval_loss(x.to(self.device), y.to(self.device))
            n += 1
            tokens += y.numel()
            if self._token_bytes is not None:  # a lookup on the host copy: no device sync
                nbytes += int(self._token_bytes[y].sum())
        if n == 0:
            return float("nan")
        # One collective: the mean loss, and the token and byte counts for bits per byte.
        counts = torch.tensor([tokens, nbytes], dtype=torch.float64, device=self.device)
        packed = self.dist.all_reduce(torch.cat([(total / n).double().view(1), counts]), "sum")
        loss, tokens_all, bytes_all = packed.tolist()
        loss /= self.dist.world_size
        self.val_bpb = bits_per_byte(loss, tokens_all, bytes_all) if bytes_all else None
        return loss

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "data": self.stream.state_dict()}
        self._saved_step = self.step
        if self.saver is not None:
            return self.saver.save(
                self.run_dir, self.step, state, self.cfg.model, self.cfg.train.keep_last
            )
        return checkpoint.save(
            self.run_dir,
            self.step,
            self.engine,
            state,
            self.cfg.model,
            self.dist,
            self.cfg.train.keep_last,
        )

    # --------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        tcfg = self.cfg.train
        window_time, window_tokens = 0.0, 0
        last_val = None
        last_step = min(tcfg.max_steps, tcfg.stop_at_step or tcfg.max_steps)
        if self.step >= last_step:
            self.logger.info(f"nothing to do: the run is at step {self.step} of {last_step}")
        watchdog = Watchdog(tcfg.watchdog_s)
        signals = self.signals
        failed = False
        try:
            if self._stop_requested():  # a signal during start-up: nothing new to save
                return self._preempted(signals.received, save=False)
            while self.step < last_step:
                t0 = time.perf_counter()
                watchdog.arm()
                if self.faults.active:
                    self.faults.at("step", self.step + 1)
                # Ends with the step's one device-to-host copy, so the time below is real.
                result = self.train_step()
                watchdog.disarm()
                window_time += time.perf_counter() - t0
                window_tokens += self.global_batch * self.cfg.data.seq_len
                if result.verdict.reason:
                    self.logger.info(f"step {self.step}: {result.verdict.reason}")
                if result.verdict.rollback:
                    self._rollback(result.verdict.reason)
                    continue
                done = self.step == last_step
                if self.step % tcfg.log_every == 0 or done:
                    self._log_step(result, window_tokens, window_time)
                    window_time, window_tokens = 0.0, 0
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or done:
                    last_val = self.evaluate()
                    self.logger.log(
                        {
                            "step": self.step,
                            "val_loss": last_val,
                            "val_ppl": math.exp(min(last_val, 50.0)),
                            **({"val_bpb": self.val_bpb} if self.val_bpb is not None else {}),
                            "tokens": self.tokens,
                        }
                    )
                if (tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0) or done:
                    path = self.save_checkpoint()
                    self.logger.info(f"checkpoint {path}")
                # Every rank stops after the same step, even if only one got the signal (the
                # flag was all-reduced with the step's loss).
                if result.stop and not done:
                    return self._preempted(signals.received)
            return self._finish(last_val)
        except BaseException as e:
            failed = True
            report_failure(self.dist.rank, e)
            raise
        finally:
            watchdog.disarm()
            self.close(failed=failed)

    def _log_step(self, result: StepResult, tokens: int, seconds: float) -> None:
        tok_s = tokens / seconds
        tflops = self.flops_per_token * tok_s / self.dist.world_size / 1e12
        mfu = tflops / self.peak.tflops
        if not self._mfu_warned and (msg := mfu_warning(mfu, self.peak)):
            self._mfu_warned = True  # once: the peak is wrong for the whole run
            self.logger.info(f"warning: {msg}")
        rec = {
            "step": self.step,
            "loss": result.loss,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / self.dist.world_size,
            "tflops_per_device": tflops,
            "mfu": mfu,
            "peak_tflops": self.peak.tflops,
            "peak_source": self.peak.source,
            "mem_gb": peak_memory_gb(self.device),
            "step_time_s": seconds / max(1, self.cfg.train.log_every),
            "skipped_steps": self.guard.skipped,
            "rollbacks": self.rollbacks,
        }
        if result.data_crc is not None:
            rec["data_crc"] = result.data_crc
        self.logger.log(rec)
        if not self._memory_compared:
            self._memory_compared = True
            self.logger.info(self.memory_plan.compare(peak_memory_gb(self.device), self.device))

    def _rollback(self, reason: str) -> None:
        """Restores model and optimizer from the newest checkpoint and goes on from the data
        position reached, so the batches that produced the bad steps are not seen again."""
        self._wait_for_save()  # an in-flight save may be the newest checkpoint
        path = self.run.newest_checkpoint()
        if path is None:
            raise TrainingError(
                f"step {self.step}: {self.cfg.train.guard.max_bad_steps} bad steps in a row "
                f"({reason}) and no checkpoint in {self.run_dir} to roll back to; lower "
                "optim.lr, set train.ckpt_every, or train.guard.max_bad_steps=0 to only skip"
            )
        data_state = self.stream.state_dict()
        state = checkpoint.load(path, self.engine, self.cfg.model, self.dist)
        self.stream.load_state_dict(data_state)
        skipped_batches = self.step - state["step"]
        self.step, self.tokens = state["step"], state["tokens"]
        self.rollbacks += 1
        self.guard.after_rollback()
        self.logger.info(
            f"rolled back to {path.name} after {reason}; skipping the {skipped_batches} "
            "batches consumed since"
        )

    def _wait_for_save(self) -> None:
        if self.saver is not None:
            self.saver.wait()

    def _stop_requested(self) -> bool:
        """Did any rank get a stop signal? (Start-up only: steps carry the flag themselves.)"""
        return self.dist.all_reduce(self.dist.tensor(self._stop_flag()), "max").item() > 0

    def _preempted(self, signum: int | None, save: bool = True) -> dict:
        """SIGUSR1 / SIGTERM: checkpoint now, leave a marker for the launcher, exit cleanly.
        A periodic checkpoint written at this very step is not written again."""
        fresh = save and self._saved_step != self.step
        self._wait_for_save()  # the in-flight save first (it may be this step's), then this one
        path = self.save_checkpoint() if fresh else self.run.newest_checkpoint()
        self._wait_for_save()  # committed before the marker says so
        name = signal.Signals(signum).name if signum else "signal"
        if self.dist.is_main:
            marker = {"step": self.step, "signal": name, "checkpoint": str(path)}
            self.run.preempted.write_text(json.dumps(marker) + "\n")
        what = "checkpointed" if fresh else "newest checkpoint"
        self.logger.info(f"{name}: {what} {path} at step {self.step}; exiting for requeue")
        return {"step": self.step, "tokens": self.tokens, "preempted": True}

    def _finish(self, val_loss: float | None) -> dict:
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "val_loss": val_loss,
            "unigram_val_loss": self.manifest.get("unigram_val_loss"),
            "n_params": self.n_params,
        }
        if self.dist.is_main:
            self.run.summary.write_text(json.dumps(summary, indent=2) + "\n")
            if self.cfg.train.plot and self.cfg.logging.jsonl:
                plot_losses(
                    self.run.metrics,
                    self.run.loss_plot,
                    baseline=summary["unigram_val_loss"],
                )
            if val_loss is not None and summary["unigram_val_loss"] is not None:
                self.logger.info(
                    f"done: step {self.step}, val_loss {val_loss:.4f} vs unigram baseline "
                    f"{summary['unigram_val_loss']:.4f} | {self.run.loss_plot}"
                )
        return summary

    def close(self, failed: bool = False) -> None:
        """Releases the data streams and the process group (in that order); safe to call twice.
        After a failure nothing waits for the other ranks: no barrier (a peer may never arrive,
        and this rank would sit in it until the group's timeout); the group is aborted."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if getattr(self, "saver", None) is not None:
                # The last checkpoint is committed before exit (after a failure: not waited
                # for), and before the watcher hears training is done, so it sees that one.
                self.saver.close(wait=not failed)
        finally:
            if getattr(self, "eval_watcher", None) is not None:
                self.eval_watcher.training_done()  # it finishes the last evals alone
            self.logger.close()
            self.stream.close()
            self.val.close()
        # Dropping the DDP wrapper before destroying the group avoids an abort at exit.
        del self.engine
        gc.collect()
        self.signals.restore()
        if failed:
            if self.dist.owns_group:
                abort()
            return
        # Every rank has now released its streaming shared memory; a dataset opened next in
        # this process (a sweep, a test driver) must not see another rank's stale segments.
        barrier()
        if self.dist.owns_group:
            shutdown()


def report_failure(rank: int, error: BaseException) -> None:
    """One line naming the rank and the error, before the traceback, so the failing rank stands
    out in a job's interleaved logs (user errors are printed once by the CLI instead)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, MegaliteError)):
        return
    print(
        f"megalite: rank {rank} failed: {type(error).__name__}: {error}",
        file=sys.stderr,
        flush=True,
    )
