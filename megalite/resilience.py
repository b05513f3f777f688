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
- `failpoint(name)` and `loss_factor(attempt)` do nothing unless the environment variable
  MEGALITE_FAULT names them; tests use them to kill a process in the middle of a checkpoint
  save, hang a step, or poison a loss.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

from megalite.config import GuardConfig

PREEMPTED = "PREEMPTED"


# ---------------------------------------------------------------------------------- failpoints
def _faults() -> dict[str, str]:
    spec = os.environ.get("MEGALITE_FAULT", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def failpoint(name: str, step: int | None = None) -> None:
    """Test-only fault injection, inert unless MEGALITE_FAULT is set:
    `kill_at=<name>` or `kill_at=<name>@<step>` SIGKILLs this process at the named point (of
    that step); `hang_at_step=<n>` sleeps forever at the start of step n."""
    faults = _faults()
    if not faults:
        return
    kill = faults.get("kill_at")
    if kill is not None:
        where, _, at = kill.partition("@")
        if where == name and (not at or (step is not None and int(at) == step)):
            os.kill(os.getpid(), signal.SIGKILL)
    if name == "step" and step is not None and faults.get("hang_at_step") == str(step):
        while True:
            time.sleep(3600)


def loss_factor(attempt: int) -> float:
    """Test-only: `MEGALITE_FAULT=nan_at=4:5:6` makes the loss of this process's 4th, 5th and
    6th step attempts NaN; `spike_at=8` multiplies the 8th's by 20. Attempts count every step
    this process runs (they are not rolled back with the step number), like a bad batch."""
    faults = _faults()
    if str(attempt) in faults.get("nan_at", "").split(":"):
        return float("nan")
    if str(attempt) in faults.get("spike_at", "").split(":"):
        return 20.0
    return 1.0


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
            self.bad_in_a_row += 1
            self.skipped += 1
            reason = f"non-finite loss {loss} / grad norm {grad_norm}"
            if self.cfg.max_bad_steps and self.bad_in_a_row >= self.cfg.max_bad_steps:
                return Verdict(apply=False, rollback=True, reason=reason)
            return Verdict(apply=False, reason=reason)
        spike = self._is_spike(loss)
        self.recent.append(loss)
        if spike:
            self.spikes += 1
            if self.cfg.spike_action == "skip":
                self.skipped += 1
                self.bad_in_a_row += 1
                reason = f"loss spike {loss:.4f}"
                if self.cfg.max_bad_steps and self.bad_in_a_row >= self.cfg.max_bad_steps:
                    return Verdict(apply=False, rollback=True, reason=reason)
                return Verdict(apply=False, reason=reason)
            self.bad_in_a_row = 0
            return Verdict(apply=True, reason=f"loss spike {loss:.4f} (logged)")
        self.bad_in_a_row = 0
        return Verdict(apply=True)

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
