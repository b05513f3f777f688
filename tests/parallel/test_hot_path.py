"""The GPU hot path, checked on CPU: collectives only on the run's device, gradient reduction
once per optimizer step under accumulation, one device-to-host sync per step, and a failing
rank ending the job at once instead of leaving its peers in a collective until the timeout."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.parallel.distributed import CollectiveDeviceError, DistInfo
from tests.conftest import REPO, compose, run_torchrun, tiny_train_overrides

PACKAGE = REPO / "megalite"
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
}


# ------------------------------------------------------------------ 1. the device rule
def test_collective_on_a_tensor_off_the_run_device_is_refused():
    """The NCCL rule ("CUDA tensors only"), enforced by the helper on any machine: a CPU tensor
    handed to a collective of a CUDA run fails here, on CPU, before any backend sees it."""
    gpu_run = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    with pytest.raises(CollectiveDeviceError, match="on cpu, but this run's process group"):
        gpu_run.all_reduce(torch.tensor(1.0))
    cpu_run = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert cpu_run.all_reduce(cpu_run.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    with pytest.raises(CollectiveDeviceError):
        cpu_run.all_reduce(torch.zeros(1, device="meta"))


def test_no_collective_bypasses_the_helper():
    """Every torch.distributed collective in the package goes through megalite/parallel/
    distributed.py (which checks the device); anything else is a new path to audit."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "parallel" / "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("dist", "torch.distributed")
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.func.attr}")
    # The streaming shared-memory handshake gathers host objects (no tensors).
    allowed = {"megalite/data/shm.py"}
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []


CUDA_GLOO = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("cuda:gloo")
try:
    dist.all_reduce(torch.ones(1))
    result = "NO ERROR"
except RuntimeError as e:
    result = f"REFUSED: {e}"
# One file per rank: the ranks' stdout lines would interleave.
open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w").write(result)
dist.destroy_process_group()
"""


def test_cuda_only_group_reproduces_the_nccl_rule(tmp_path):
    """A process group bound to the cuda device type only (what NCCL is) refuses a CPU
    tensor on this CPU machine, the failure every multi-GPU run hit before step 1."""
    script = tmp_path / "cuda_gloo.py"
    script.write_text(CUDA_GLOO)
    res = run_torchrun(2, [str(script), str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        got = (tmp_path / f"rank{rank}.txt").read_text()
        assert got.startswith("REFUSED: No backend type associated with device type cpu"), got


# ------------------------------------------------------- 2. reduction once per step
def test_fsdp_gradient_accumulation_reduces_once_per_optimizer_step(tiny_data, tmp_path):
    """2 ranks, 3 steps: with 4 micro-batches per step FSDP2 issues exactly as many
    reduce-scatters per step as with 1 (before: 4x);
    HSDP (2 replicas) as many all-reduces; and with parallel.defer_grad_sync=false FSDP goes
    back to one reduce-scatter per micro-batch."""

    def case(name: str, accum: int, *extra: str) -> list[str]:
        return [
            *tiny_train_overrides(
                tiny_data,
                tmp_path / name,
                max_steps=3,
                micro_batch_size=2,
                grad_accum_steps=accum,
                eval_every=0,
                ckpt_every=0,
            ),
            *extra,
        ]

    cases = {
        "fsdp_1": case("fsdp_1", 1, "parallel=fsdp"),
        "fsdp_4": case("fsdp_4", 4, "parallel=fsdp"),
        "fsdp_4_every": case("fsdp_4_every", 4, "parallel=fsdp", "parallel.defer_grad_sync=false"),
        "hsdp_1": case("hsdp_1", 1, "parallel=hsdp", "parallel.dp_shard=1"),
        "hsdp_4": case("hsdp_4", 4, "parallel=hsdp", "parallel.dp_shard=1"),
    }
    spec, out = tmp_path / "cases.json", tmp_path / "counts.json"
    spec.write_text(json.dumps(cases))
    driver = REPO / "tests/parallel/comm_count_driver.py"
    res = run_torchrun(2, [str(driver), str(spec), str(out)], timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    n = json.loads(out.read_text())
    assert n["fsdp_1"]["reduce_scatter"] > 0
    assert n["fsdp_4"]["reduce_scatter"] == n["fsdp_1"]["reduce_scatter"]
    # Parameters are all-gathered for every micro-batch's forward and backward: holding them
    # unsharded across micro-batches would cost what FSDP exists to save (see README).
    assert n["fsdp_4"]["all_gather"] == 4 * n["fsdp_1"]["all_gather"]
    assert n["fsdp_4_every"]["reduce_scatter"] == 4 * n["fsdp_1"]["reduce_scatter"]
    assert n["hsdp_1"]["all_reduce"] > 3  # the per-step loss all-reduce plus the gradients'
    assert n["hsdp_4"]["all_reduce"] == n["hsdp_1"]["all_reduce"]


# ---------------------------------------------------------------- 3. host syncs
class SyncCounter(TorchDispatchMode):
    """Counts device-to-host reads made by megalite's code: `.item()` / `float(t)` / `bool(t)`
    (aten._local_scalar_dense) and `.tolist()`. On a GPU each one stalls the host until the
    device has finished all queued work. Reads inside torch.optim are left out: AdamW reads its
    CPU-resident step counter (not a device sync; fused AdamW on CUDA keeps it on the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _ours(self) -> bool:
        import traceback

        files = [f.filename for f in traceback.extract_stack()]
        return not any("torch/optim/" in f for f in files)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self._ours():
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_device_to_host_sync_per_step_that_does_not_log(tiny_data, tmp_path, monkeypatch):
    from megalite.trainer import Trainer

    monkeypatch.delenv("MEGALITE_DEBUG", raising=False)
    monkeypatch.delenv("MEGALITE_FAULT", raising=False)
    cfg = compose(
        tiny_train_overrides(
            tiny_data, tmp_path / "run", max_steps=6, grad_accum_steps=2, eval_every=0
        )
    )
    trainer = Trainer(cfg)
    counter = SyncCounter()
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        counter.count += 1
        return original_tolist(self)

    try:
        trainer.train_step()  # warm-up
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        with counter:
            for _ in range(4):
                trainer.train_step()
    finally:
        monkeypatch.undo()
        trainer.close()
    assert counter.count == 4, f"{counter.count} device-to-host syncs in 4 steps"


# --------------------------------------------------------------- 8. fail fast
def test_a_rank_that_fails_ends_the_job_at_once(tiny_data, tmp_path):
    """Rank 1 raises at step 3 of 2-rank DDP. The job must end non-zero with the error and the
    rank named, without any rank waiting for the process-group timeout (600 s: the subprocess
    cap below is half that, so a rank parked in a barrier or collective fails this test)."""
    run = tmp_path / "run"
    res = run_torchrun(
        2,
        [
            "-m",
            "megalite.train",
            *tiny_train_overrides(tiny_data, run, max_steps=6, micro_batch_size=2, eval_every=0),
            "parallel=ddp",
            "parallel.timeout_s=600",
        ],
        env={
            "MEGALITE_FAULT": "raise_at_step=3,fault_rank=1",
            "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
        },
        timeout=300,
    )
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "megalite: rank 1 failed: RuntimeError: failpoint: injected error at step 3" in out
    assert "ChildFailedError" in out  # torchrun saw a worker fail, not a clean exit
