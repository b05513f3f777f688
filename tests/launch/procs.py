"""Process helpers for the launch tests: poll for a condition with a deadline, find a process's
children and environment in /proc, stop processes by PID, read metrics.jsonl while it grows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Polls `condition` until it returns something truthy (returned) or `timeout` seconds pass
    (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def children(pid: int) -> list[int]:
    return [p for p in all_pids() if _ppid(p) == pid]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, parents before their children."""
    out, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        out.extend(kids)
        frontier = kids
    return out


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Ends a process the test started and everything under it, by PID: SIGTERM to the process,
    then SIGKILL to whatever of its tree is left after `timeout`."""
    if proc.poll() is None:
        tree = descendants(proc.pid)
        kill_pids([proc.pid], signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_pids([proc.pid, *tree])
            proc.wait(timeout=timeout)
        kill_pids([p for p in tree if alive(p)])
    else:
        kill_pids([p for p in descendants(proc.pid) if alive(p)])


def records(path: Path) -> list[dict]:
    """metrics.jsonl records, skipping a last line that is still being written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir / "metrics.jsonl") if "loss" in r]


def last_step(run_dir: Path) -> int:
    recs = train_records(run_dir)
    return recs[-1]["step"] if recs else 0
