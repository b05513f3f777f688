"""megalite-plan: the budget arithmetic against hand-computed cases, the closest preset, device
memory, the preemption grace and the CLI (the memory estimate: tests/test_memory.py)."""

from __future__ import annotations

import math

import pytest

from megalite.plan import (
    checkpoint_save_seconds,
    closest_preset,
    compute_budget,
    compute_optimal,
    device_memory_gb,
    load_presets,
    main,
    preemption_grace,
    training_flops,
    wall_time_hours,
)
from megalite.shapes import flops_per_token
from tests.conftest import compose

# Published parameter counts (the Hugging Face model card / safetensors index).
LLAMA3_8B = 8_030_261_248
LLAMA3_70B = 70_553_706_496


# ------------------------------------------------------------------------- arithmetic
def test_llama3_405b_training_flops():
    # 6 x 405e9 x 15.6e12 = 3.7908e25, the "3.8e25 FLOPs" of the Llama 3 paper.
    assert training_flops(405e9, 15.6e12) == pytest.approx(3.7908e25, rel=1e-9)
    assert training_flops(405e9, 15.6e12) == pytest.approx(3.8e25, rel=0.01)


def test_compute_budget_by_hand():
    # 1024 GPUs x 989.4e12 FLOP/s x 0.4 x 720 h x 3600 s/h = 1.05042935808e24
    assert compute_budget(1024, 989.4, 720, 0.4) == pytest.approx(1.05042935808e24, rel=1e-9)
    with pytest.raises(ValueError, match="mfu=40"):
        compute_budget(8, 989.4, 1, 40)
    with pytest.raises(ValueError, match="gpus=0"):
        compute_budget(0, 989.4, 1, 0.4)


def test_chinchilla_optimal_and_inference_heavy():
    # Chinchilla itself: 70B parameters on 1.4T tokens = 6 x 70e9 x 1.4e12 = 5.88e23 FLOPs.
    n, d = compute_optimal(5.88e23)
    assert n == pytest.approx(70e9, rel=1e-9) and d == pytest.approx(1.4e12, rel=1e-9)
    # 200 tokens per parameter at C = 1.2e24: N = sqrt(1.2e24 / 1200) = sqrt(1e21).
    n, d = compute_optimal(1.2e24, 200)
    assert n == pytest.approx(math.sqrt(1e21), rel=1e-9) and d == pytest.approx(200 * n)
    assert training_flops(n, d) == pytest.approx(1.2e24)


def test_wall_time_by_hand():
    # 3.7908e25 FLOPs / (16384 x 989.4e12 x 0.4 FLOP/s) = 5.846245e6 s = 1623.96 h.
    assert wall_time_hours(3.7908e25, 16384, 989.4, 0.4) == pytest.approx(1623.96, rel=1e-5)


# --------------------------------------------------------------------------- presets
def test_closest_preset_on_a_log_scale():
    presets = load_presets()
    assert closest_preset(7e9, presets) == ("llama3_8b", LLAMA3_8B)
    assert closest_preset(30e9, presets)[0] == "llama3_70b"  # 70.6/30 = 2.4 < 30/8.03 = 3.7
    assert closest_preset(2e9, presets)[0] == "llama3_1b"


def test_device_memory_from_name_or_table():
    assert device_memory_gb("NVIDIA A100-SXM4-40GB") == 40
    assert device_memory_gb("NVIDIA H100 80GB HBM3") == 80
    assert device_memory_gb("h200") == 141
    assert device_memory_gb("NVIDIA GH200 480GB") == 96  # 480 GB is CPU + GPU memory
    assert device_memory_gb("Tesla T4") is None


# ------------------------------------------------------------------------- preemption
def test_checkpoint_save_time_by_hand():
    """70B: 70.55e9 params x 12 bytes (fp32 weights + two AdamW moments) x 1.05 = 889 GB; 8 nodes
    writing 1 GB/s each take 111 s, twice the nodes half that."""
    one = checkpoint_save_seconds(LLAMA3_70B, nodes=8, write_gb_s_per_node=1.0)
    assert one == pytest.approx(LLAMA3_70B * 12 * 1.05 / 8e9)
    assert one == pytest.approx(111.1, abs=0.1)
    assert checkpoint_save_seconds(LLAMA3_70B, 16, 1.0) == pytest.approx(one / 2)
    with pytest.raises(ValueError, match="must be > 0"):
        checkpoint_save_seconds(LLAMA3_70B, 8, 0.0)


def test_preemption_grace_adds_step_checkpoint_and_margin_with_a_floor():
    cfg = compose(["experiment=llama3_70b"])
    grace = preemption_grace(cfg, 8, 64, 1.0, margin_s=60, peak_tflops=989.4, mfu=0.3)
    # One step: 4M tokens x megalite's FLOPs per token over 64 GPUs at 30 % of 989.4 TFLOP/s.
    step = flops_per_token(cfg.model, 8192) * 4 * 2**20 / (64 * 989.4e12 * 0.3)
    assert grace.step_s == pytest.approx(step)
    assert grace.seconds == math.ceil(step + grace.save_s + 60)
    assert grace.seconds > 250 and "889 GB" in grace.summary()
    # Without a peak (CPU nodes) the step is left out; a tiny model gets the floor.
    assert preemption_grace(cfg, 8, 64).step_s is None
    tiny = preemption_grace(compose([]), 1, 1, floor_s=120)
    assert tiny.seconds == 120 and "raised to the floor of 120 s" in tiny.summary()


# ------------------------------------------------------------------------------- CLI
def test_cli_plans_a_budget(capsys):
    assert main(["--gpus", "1024", "--gpu", "h100", "--hours", "720", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "compute budget C = 1.05e+24 FLOPs" in out
    # N = sqrt(1.0504e24 / 120) = 93.6e9 -> llama3_70b is the closest preset.
    assert "93.6B" in out and "1.87T" in out and "llama3_70b (70.6B)" in out
    assert "inference-heavy" in out and "29.6B" in out and "5.92T" in out
    assert "memory per rank: llama3_70b" in out and "fits" in out and "does not fit" in out
    assert "wall time: llama3_70b on 1.41T tokens" in out


def test_cli_memory_plan_for_a_chosen_layout(capsys):
    args = ["--gpus", "8", "--gpu", "NVIDIA A100-SXM4-40GB", "--hours", "24", "--mfu", "0.5"]
    args += ["--model", "llama3_8b", "--layout", "fsdp_tp", "--tokens", "1e11", "parallel.tp=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fsdp_tp dp_replicate 1 x dp_shard 4 x tp 2" in out and "on 40 GB" in out
    assert "wall time: llama3_8b on 100B tokens" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "tesla t4"], "--gpu='tesla t4' is not in the peak table"),
        (["--gpu", "a100", "--precision", "fp8"], "'a100' has no fp8 peak in the table"),
        (["--model", "gpt5"], "--model='gpt5' is not a preset"),
        (
            ["--model", "llama3_8b", "--layout", "tp", "parallel.tp=3"],
            "parallel.tp=3 does not divide model.n_heads=32",
        ),
        (["--mfu", "1.5"], "mfu=1.5 must be in (0, 1]"),
    ],
)
def test_cli_errors_name_the_flag(args, message, capsys):
    assert main(["--gpus", "8", "--hours", "1", *args]) == 2
    assert message in capsys.readouterr().err
