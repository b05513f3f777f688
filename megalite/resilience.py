"""What keeps a long run alive: the loss guard, the hang watchdog, preemption signals, and the
failpoints the tests use to inject faults.

- `LossGuard` decides, from the globally reduced loss and gradient norm (so every rank decides
  the same), whether a step's update is applied, skipped, or the run rolls back to its last
  checkpoint; it also flags loss spikes (z standard deviations above the running mean).
- `Watchdog` arms faulthandler before each step: a step that outlives `train.watchdog_s` gets
  every thread's stack dumped to stderr and the process exits non-zero, so a hung collective
  turns into a restart (torchrun, SLURM) instead of a silent stall.
- `StopSignals` turns SIGUSR1 (SLURM's warning before the time limit / preemption) and SIGTERM
  into a flag the loop checks between steps: finish the step, checkpoint, leave a PREEMPTED
  marker, exit 0 — the launcher requeues the job and `train.resume=auto` continues it.
- `Faults` (MEGALITE_FAULT) is test machinery: it lets tests kill a process in the middle of a
  checkpoint save, hold or fail a chosen step, or poison a loss. Parsed once; a run without it
  does no per-step work for it.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from megalite.config import GuardConfig


# ---------------------------------------------------------------------------------- failpoints
class Faults:
    """Test-only fault injection, parsed once from MEGALITE_FAULT (comma-separated items); a
    production run has none, and the trainer then skips every fault hook (`active` is False).

    - `kill_at=<name>` or `kill_at=<name>@<step>`: SIGKILL this process at the named point.
    - `hold_at=<name>@<step>`: at the named point, write `<run_dir>/FAILPOINT_HOLDING` and block
      that thread forever (an asynchronous checkpoint's writer: training goes on meanwhile, and
      the test kills the process while the save is in flight).
    - `hang_at_step=<n>`: sleep forever at the start of step n (the watchdog's test).
    - `wait_at_step=<n>`: at the start of step n, write `<run_dir>/FAILPOINT_WAITING` and block
      until a signal arrives — the test then signals or kills the process at a step it chose.
    - `raise_at_step=<n>`: raise at the start of step n (`fault_rank=<r>`: on rank r only).
    - `nan_at=4:5:6` / `spike_at=8`: make those step attempts' loss NaN / 20x (`loss_factor`).
    """

    def __init__(self, spec: str = "", rank: int = 0, run_dir: Path | None = None) -> None:
        self.items: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            self.items[key] = value
        self.rank = rank
        self.run_dir = run_dir
        rank_filter = self.items.get("fault_rank")
        self.on_this_rank = rank_filter is None or int(rank_filter) == rank

    @classmethod
    def from_env(cls, rank: int = 0, run_dir: Path | None = None) -> Faults:
        return cls(os.environ.get("MEGALITE_FAULT", ""), rank, run_dir)

    @property
    def active(self) -> bool:
        return bool(self.items)

    @property
    def poisons_loss(self) -> bool:
        return "nan_at" in self.items or "spike_at" in self.items

    def at(self, name: str, step: int | None = None) -> None:
        if not self.items or not self.on_this_rank:
            return
        kill = self.items.get("kill_at")
        if kill is not None:
            where, _, at = kill.partition("@")
            if where == name and (not at or (step is not None and int(at) == step)):
                os.kill(os.getpid(), signal.SIGKILL)
        hold = self.items.get("hold_at")
        if hold is not None and hold == f"{name}@{step}":
            self._hold(hold)
        if name != "step" or step is None:
            return
        if self.items.get("raise_at_step") == str(step):
            raise RuntimeError(f"failpoint: injected error at step {step} on rank {self.rank}")
        if self.items.get("wait_at_step") == str(step):
            self._wait_for_signal(step)
        if self.items.get("hang_at_step") == str(step):
            while True:
                time.sleep(3600)

    def _hold(self, where: str) -> None:
        if self.run_dir is not None:
            (self.run_dir / "FAILPOINT_HOLDING").write_text(f"{where}\n")
        threading.Event().wait()  # never set: only the end of the process ends the wait

    def _wait_for_signal(self, step: int) -> None:
        """Announces the wait in a file, then blocks until SIGUSR1 / SIGTERM (SIGKILL just ends
        the process). The signals are blocked before the file is written, so one sent as soon
        as the file appears is not lost; it is delivered to the regular handler afterwards."""
        sigs = {signal.SIGUSR1, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            if self.run_dir is not None:
                (self.run_dir / "FAILPOINT_WAITING").write_text(f"{step}\n")
            received = signal.sigwait(sigs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        signal.raise_signal(received)

    def loss_factor(self, attempt: int) -> float:
        """`nan_at=4:5:6` makes the loss of this process's 4th, 5th and 6th step attempts NaN;
        `spike_at=8` multiplies the 8th's by 20. Attempts count every step this process runs
        (they are not rolled back with the step number), like a bad batch."""
        if str(attempt) in self.items.get("nan_at", "").split(":"):
            return float("nan")
        if str(attempt) in self.items.get("spike_at", "").split(":"):
            return 20.0
        return 1.0


def failpoint(name: str, step: int | None = None, run_dir: Path | None = None) -> None:
    """A fault point outside the step loop (checkpoint saves); inert without MEGALITE_FAULT.
    `run_dir`: where a holding failpoint announces itself."""
    if os.environ.get("MEGALITE_FAULT"):
        Faults.from_env(run_dir=run_dir).at(name, step)


# ---------------------------------------------------------------------------------- loss guard
@dataclass
class Verdict:
    apply: bool
    rollback: bool = False
    reason: str = ""


class LossGuard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.bad_in_a_row = 0
        self.skipped = 0
        self.spikes = 0
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)

    def check(self, loss: float, grad_norm: float) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._skip(f"non-finite loss {loss} / grad norm {grad_norm}")
        spike = self._is_spike(loss)
        self.recent.append(loss)
        if spike:
            self.spikes += 1
            if self.cfg.spike_action == "skip":
                return self._skip(f"loss spike {loss:.4f}")
            self.bad_in_a_row = 0
            return Verdict(apply=True, reason=f"loss spike {loss:.4f} (logged)")
        self.bad_in_a_row = 0
        return Verdict(apply=True)

    def _skip(self, reason: str) -> Verdict:
        """A bad step: skip its update; after max_bad_steps in a row, roll back."""
        self.bad_in_a_row += 1
        self.skipped += 1
        rollback = bool(self.cfg.max_bad_steps) and self.bad_in_a_row >= self.cfg.max_bad_steps
        return Verdict(apply=False, rollback=rollback, reason=reason)

    def _is_spike(self, loss: float) -> bool:
        if self.cfg.spike_z <= 0 or len(self.recent) < self.recent.maxlen:
            return False
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
        return loss > mean + self.cfg.spike_z * max(std, 1e-8)

    def after_rollback(self) -> None:
        self.bad_in_a_row = 0
        self.recent.clear()


# ------------------------------------------------------------------------------------ watchdog
class Watchdog:
    def __init__(self, timeout_s: int) -> None:
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s > 0:
            # faulthandler's timer runs in C, so it fires even when Python is stuck inside a
            # collective; it prints "Timeout (h:mm:ss)!" and every thread's stack to stderr,
            # then exits with status 1.
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, exit=True)

    def disarm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------------- signals
class StopSignals:
    """SIGUSR1 / SIGTERM set a flag instead of killing the process (main thread only)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
