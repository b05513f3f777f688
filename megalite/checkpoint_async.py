"""Asynchronous checkpoints (`train.ckpt_async=thread|process`): training goes on while the
previous checkpoint is written.

A save blocks the loop only to take the state: each rank writes its small trainer-state file,
then `torch.distributed.checkpoint.async_save` stages a copy of model + optimizer into host
memory (pinned on a GPU, so the device-to-host copy runs on a side stream; shared memory for the
process mode) in a background thread, overlapped with the next step's forward and backward. The
copy must be complete before the optimizer changes the weights: an optimizer step pre-hook waits
for it. DCP then writes the staged copy from a background thread (`thread`) or a helper process
(`process`), over a gloo group of its own, so its collectives never interleave with the
training loop's.

The atomic-commit rule is the synchronous one (checkpoint.py): the files go to `step_N.tmp/`;
DCP's coordinator writes its `.metadata` only after every rank's shards are written and fsynced
(FileSystemWriter's sync_files), each rank's trainer-state file was fsynced before it joined the
save, so once rank 0's save completes every file is durable, and rank 0 alone then commits —
meta.json, fsync, rename to `step_N/`, `latest`, prune (checkpoint.commit). A process killed
before that leaves a `.tmp` dir, which resume ignores.

At most one save is in flight: the next save, a rollback, preemption and the end of training
wait for it first. A save that failed in the background raises there.

Process mode starts a helper with multiprocessing's spawn, which re-imports the script that
started training: a script without an `if __name__ == "__main__":` guard would start a second
training run inside the helper. `refuse_reimported_main` turns that into one clear error.
"""

from __future__ import annotations

import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from megalite import checkpoint
from megalite.config import Config, ModelConfig
from megalite.errors import ConfigError
from megalite.parallel.distributed import DistInfo
from megalite.resilience import failpoint

if TYPE_CHECKING:
    from megalite.engine import Engine


class _Writer(FileSystemWriter):
    """DCP's file writer with a failpoint before this rank's shards are written (inert without
    MEGALITE_FAULT): tests hold the writer there and kill the process mid-save."""

    def __init__(self, path: Path, step: int, run_dir: Path) -> None:
        super().__init__(str(path))  # sync_files=True: every shard fsynced before it counts
        self._step, self._run_dir = step, run_dir

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 (DCP's signature)
        failpoint("async_save_writing", self._step, run_dir=self._run_dir)
        return super().write_data(plan, planner)


class AsyncSaver:
    """Saves checkpoints in the background; at most one in flight. Every rank makes one (a
    collective: it creates the saver's gloo group) and calls `save` at the same steps."""

    def __init__(self, mode: str, engine: Engine, dist_info: DistInfo, timeout_s: int) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"train.ckpt_async={mode!r}: AsyncSaver takes thread or process")
        self.mode, self.engine, self.dist = mode, engine, dist_info
        on_gpu = dist_info.device.type == "cuda"
        # One stager for the run: it keeps its host buffers, so later saves copy into memory
        # already allocated (and pinned) instead of allocating the model's size again.
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=on_gpu,
                use_shared_memory=mode == "process",
                use_async_staging=True,
                use_non_blocking_copy=on_gpu,
            )
        )
        # DCP's collectives (plan, gather of write results) run off the main thread: a group of
        # their own keeps them from interleaving with the loop's; gloo, as async_save needs a
        # CPU backend (the run's group may be NCCL).
        self.group = None
        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        else:
            # One process saving alone is intended (checkpoint.quiet_dcp); DCP warns from its
            # writer thread, out of reach of a context manager in this one.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megalite-ckpt")
        self._staging: Future | None = None
        self._pending: Future | None = None
        # The weights must not change while they are being copied.
        self._hook = engine.optimizer.register_step_pre_hook(lambda *_: self.wait_for_staging())

    @property
    def writing(self) -> bool:
        """A save is in flight and not finished yet."""
        return self._pending is not None and not self._pending.done()

    def save(
        self,
        run_dir: str | Path,
        step: int,
        trainer_state: dict[str, Any],
        model_cfg: ModelConfig,
        keep_last: int,
    ) -> Path:
        """Starts the checkpoint of `step` and returns the path it will have once committed."""
        self.wait()  # at most one in flight
        run_dir = Path(run_dir)
        final, tmp = checkpoint.begin_save(run_dir, step, self.dist)
        # Small, and it must be the state of this step: written now, durable before DCP's
        # collective save can complete on any rank.
        checkpoint.write_rank_state(tmp, trainer_state, self.dist)
        kind = (
            AsyncCheckpointerType.PROCESS
            if self.mode == "process"
            else AsyncCheckpointerType.THREAD
        )
        with checkpoint.quiet_dcp():
            response = dcp.async_save(
                checkpoint.dcp_state_dict(self.engine.model, self.engine.optimizer),
                storage_writer=_Writer(tmp, step, run_dir),
                process_group=self.group,
                async_checkpointer_type=kind,
                async_stager=self.stager,
                no_dist=self.group is None,  # one process: nothing to coordinate
            )
        self._staging = response.staging_completion
        self._pending = self._commits.submit(
            self._finish,
            response.upload_completion,
            run_dir,
            step,
            trainer_state.get("tokens"),
            model_cfg,
            keep_last,
        )
        return final

    def _finish(
        self,
        upload: Future,
        run_dir: Path,
        step: int,
        tokens: int | None,
        model_cfg: ModelConfig,
        keep_last: int,
    ) -> None:
        upload.result()  # every rank's shards written and fsynced, .metadata written
        failpoint("async_save_before_meta", step, run_dir=run_dir)
        if self.dist.is_main:
            checkpoint.commit(
                run_dir,
                step,
                tokens=tokens,
                world_size=self.dist.world_size,
                engine_format=self.engine.checkpoint_format,
                model_cfg=model_cfg,
                keep_last=keep_last,
            )

    def wait_for_staging(self) -> None:
        """Blocks until the in-flight save's copy of the state is taken (a no-op otherwise)."""
        if self._staging is not None:
            staging, self._staging = self._staging, None
            staging.result()

    def wait(self) -> None:
        """Blocks until the in-flight save is written (and, on rank 0, committed); raises its
        error if it failed. A no-op when none is in flight."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            self.wait_for_staging()
        finally:
            pending.result()

    def close(self, wait: bool = True) -> None:
        """Waits for the in-flight save (unless the run failed: peers may be gone) and releases
        the staging buffers and the saver's group."""
        self._hook.remove()
        if wait:
            self.wait()
        self._commits.shutdown(wait=wait)
        self.stager.close()
        if self.group is not None and wait:
            dist.destroy_process_group(self.group)
        self.group = None
        # The trainer drops the (DDP-wrapped) model before the group goes: no reference here.
        self.engine = None


def build_saver(cfg: Config, engine: Engine, dist_info: DistInfo) -> AsyncSaver | None:
    """The saver for `train.ckpt_async`, or None for synchronous saves."""
    if cfg.train.ckpt_async == "none":
        return None
    return AsyncSaver(cfg.train.ckpt_async, engine, dist_info, cfg.parallel.timeout_s)


def async_problems(cfg: Config, world_size: int, deepspeed: bool) -> list[str]:
    """What stops `train.ckpt_async` from running, each with its fix (preflight)."""
    mode = cfg.train.ckpt_async
    problems = []
    if mode != "none" and deepspeed:
        problems.append(
            f"train.ckpt_async={mode} saves through DCP; DeepSpeed (parallel.strategy="
            f"{cfg.parallel.strategy}) writes its own files synchronously: use "
            "train.ckpt_async=none, or parallel.strategy=fsdp"
        )
    if mode == "process" and world_size == 1:
        problems.append(
            "train.ckpt_async=process starts its helper from a process group, and a "
            "single-process run has none: use train.ckpt_async=thread (the same overlap for "
            "one process), or launch with torchrun on 2+ ranks"
        )
    return problems


def refuse_reimported_main() -> None:
    """Raises if this code runs while multiprocessing's spawn re-imports the main script in a
    child (DCP's process-mode helper): the script starts training at import time."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name in ("_fixup_main_from_path", "_fixup_main_from_name") and (
            frame.f_code.co_filename.endswith("multiprocessing/spawn.py")
        ):
            # The path spawn is running (the module is not in sys.modules until it finishes).
            main = frame.f_locals.get("main_path") or frame.f_locals.get("mod_name")
            main = main or "the main script"
            raise ConfigError(
                f"training was started while a helper process re-imported {main} "
                "(train.ckpt_async=process spawns one, and spawn re-runs the main script's top "
                "level): put the code that starts training under "
                'if __name__ == "__main__": in that script'
            )
        frame = frame.f_back
