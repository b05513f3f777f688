"""Config composition, typing and validation: failures name the key, the value and the fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from megalite.config import ConfigError, check_world_size
from megalite.model.transformer import Transformer, count_params
from tests.conftest import BIN, compose, run_cli


def test_default_is_cpu_demo():
    cfg = compose([])
    assert cfg.name == "cpu_demo"
    assert cfg.model.name == "debug"
    assert cfg.parallel.strategy == "ddp"
    assert cfg.train.run_dir == "runs/cpu_demo"


def test_unknown_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="train.max_stepz"):
        compose(["train.max_stepz=3"])


def test_wrong_type_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ValidationError), match="max_steps"):
        compose(["train.max_steps=many"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["model.n_heads=4", "model.n_kv_heads=3"],
            "model.n_heads=4 is not divisible by model.n_kv_heads=3",
        ),
        (["model.dim=250", "model.n_heads=4"], "model.dim=250 is not divisible by model.n_heads=4"),
        (["model.attention=xformers"], "model.attention='xformers' is not one of"),
        (["train.precision=fp8"], "train.precision='fp8'"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0 must be in [0, 1]"),
        (["data.seq_len=1024"], "data.seq_len=1024 exceeds model.max_seq_len=512"),
        (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be > 0"),
    ],
)
def test_invalid_values_name_key_value_and_fix(override, message):
    with pytest.raises(ConfigError) as e:
        compose(override)
    assert message in str(e.value)


def test_global_batch_must_equal_micro_times_accum_times_dp():
    cfg = compose(
        ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=16"]
    )
    assert check_world_size(cfg, 2) == 16
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 does not equal .* = 8"):
        check_world_size(cfg, 1)


def test_single_refuses_many_ranks():
    cfg = compose(["parallel=single"])
    with pytest.raises(ConfigError, match="parallel.strategy=single but the world size is 4"):
        check_world_size(cfg, 4)


# Published parameter counts (Meta's model cards / Hugging Face configs).
@pytest.mark.parametrize(
    "preset, params",
    [
        ("llama3_1b", 1.236e9),  # Llama 3.2 1B: 1.24B with tied embeddings
        ("llama3_8b", 8.030e9),
        ("llama3_70b", 70.554e9),
        ("llama_125m", 0.125e9),  # GPT-3 Small (123.6M here: no learned position embeddings)
    ],
)
def test_presets_have_published_shapes(preset, params):
    import torch

    cfg = compose([f"model={preset}"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert count_params(model) == pytest.approx(params, rel=0.015)


def test_cli_prints_resolved_config():
    out = run_cli([str(BIN / "megalite-train"), "--cfg", "job", "model=llama3_8b"])
    assert out.returncode == 0, out.stderr
    assert "n_layers: 32" in out.stdout and "run_dir: runs/cpu_demo" in out.stdout


@pytest.mark.parametrize(
    "override, world, message",
    [
        (
            ["parallel=tp", "model.n_kv_heads=2"],
            4,
            "parallel.tp=4 does not divide model.n_kv_heads=2",
        ),
        (
            ["parallel=tp", "model.n_heads=4", "model.n_kv_heads=4"],
            8,
            "parallel.tp=8 does not divide model.n_heads=4",
        ),
        (
            ["parallel=fsdp_tp", "parallel.tp=2", "parallel.dp_shard=3"],
            4,
            "dp_shard=3 x tp=2 = 6 but the world size is 4",
        ),
        (
            ["parallel=hsdp", "parallel.dp_shard=3"],
            4,
            "multiply to 3, which does not divide the world size 4",
        ),
        (
            ["parallel=zero3", "parallel.tp=2"],
            2,
            "DeepSpeed ZeRO does not combine with tensor parallelism",
        ),
        (["parallel=fsdp", "parallel.tp=2"], 2, "parallel.strategy=fsdp with parallel.tp=2"),
        (
            ["parallel=fsdp_tp", "parallel.tp=2", "train.loss=fused_linear"],
            2,
            "train.loss=fused_linear does not support a vocab-sharded",
        ),
    ],
)
def test_impossible_layouts_fail_before_any_process_group(override, world, message):
    """Raised while composing or checking the config: no process group exists yet."""
    import torch.distributed as dist

    with pytest.raises(ConfigError) as e:
        check_world_size(compose(override), world)
    assert message in str(e.value)
    assert not dist.is_initialized()


def test_deepspeed_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    with pytest.raises(
        ConfigError,
        match=r"needs DeepSpeed, which is not installed; `pip install megalite\[deepspeed\]`",
    ):
        check_world_size(compose(["parallel=zero2"]), 2)
