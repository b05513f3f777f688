"""A backend the device cannot run is refused by preflight, before any process group, model or
data stream exists, naming the option and what to use instead (it used to crash at step 1)."""

from __future__ import annotations

import pytest

from megalite.preflight import PreflightError, backends_the_device_cannot_run, preflight
from tests.conftest import compose, tiny_train_overrides


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.attention=triton",
            "model.attention=triton is a Triton kernel and needs a CUDA GPU",
        ),
        ("model.attention=flash_attn", "model.attention=flash_attn needs a CUDA GPU"),
        ("model.norm=triton", "use model.norm=torch (or auto)"),
        ("train.loss=fused_linear", "use train.loss=torch (or auto)"),
        ("train.loss=triton", "train.loss=triton is a Triton kernel"),
    ],
)
def test_cpu_run_refuses_a_gpu_backend(tiny_data, tmp_path, monkeypatch, override, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = compose(
        [*tiny_train_overrides(tiny_data, tmp_path / "run"), "train.device=cpu", override]
    )
    with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(cfg, 1)
    assert not (tmp_path / "run").exists()  # nothing written before the check


def test_interpreter_and_cuda_accept_triton_backends(tiny_data, tmp_path, monkeypatch):
    cfg = compose([*tiny_train_overrides(tiny_data, tmp_path / "run"), "model.attention=triton"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends_the_device_cannot_run(cfg, "cuda") == []
    assert len(backends_the_device_cannot_run(cfg, "cpu")) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # numerics checks on a CPU
    assert backends_the_device_cannot_run(cfg, "cpu") == []
