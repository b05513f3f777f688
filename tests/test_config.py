"""Config composition, typing and validation: failures name the key, the value and the fix."""

from __future__ import annotations

import pytest

from megalite.config import Config, ConfigError
from megalite.model.transformer import Transformer, count_params
from megalite.parallel.dims import ParallelDims, check_world_size
from tests.conftest import BIN, compose, run_cli


def check(cfg: Config, world_size: int) -> int:
    """What preflight does: the degrees for this world size, then the config against them."""
    return check_world_size(cfg, ParallelDims.from_config(cfg.parallel, world_size))


def test_root_config_is_no_recipe():
    """Nothing of the CPU demo (or any experiment) leaks into a run that names none: a user's
    `model=llama3_8b` gets the optimizer's and the loop's own defaults, not lr 2e-3 on Shakespeare
    in runs/cpu_demo."""
    cfg = compose(["model=llama3_8b"])
    assert cfg.name == "default"
    assert cfg.data.name == "train" and cfg.data.dir == "data/train"
    assert "shakespeare" not in f"{cfg.data.prepare_hint} {cfg.data.dir}"
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (3e-4, 100)  # conf/optim/adamw.yaml
    assert (cfg.train.max_steps, cfg.train.micro_batch_size) == (1000, 8)  # conf/train/default
    assert cfg.train.run_dir == "runs/default"


def test_cpu_demo_is_an_experiment_that_sets_everything_it_needs():
    cfg = compose(["experiment=cpu_demo"])
    assert (cfg.name, cfg.model.name, cfg.parallel.strategy) == ("cpu_demo", "debug", "ddp")
    assert (cfg.data.name, cfg.data.dir) == ("shakespeare", "data/shakespeare")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (2e-3, 40)
    assert (cfg.train.max_steps, cfg.train.micro_batch_size) == (400, 16)
    assert cfg.train.run_dir == "runs/cpu_demo"
    # Later overrides still win over the experiment's groups.
    assert compose(["experiment=cpu_demo", "model=llama_125m"]).model.name == "llama_125m"


def test_unknown_key_fails_at_compose():
    with pytest.raises(ConfigError, match="train.max_stepz.*not in .TrainConfig"):
        compose(["train.max_stepz=3"])


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigError, match="max_steps=many.*could not be converted"):
        compose(["train.max_steps=many"])


def test_unknown_preset_names_the_ones_that_exist():
    with pytest.raises(ConfigError, match="model/nope.*pick one of .*llama3_8b") as e:
        compose(["model=nope"])
    assert "base_model" not in str(e.value)


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
    assert check(cfg, 2) == 16
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 does not equal .* = 8"):
        check(cfg, 1)


def test_single_refuses_many_ranks():
    cfg = compose(["parallel=single"])
    with pytest.raises(ConfigError, match="parallel.strategy=single but the world size is 4"):
        check(cfg, 4)


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
    assert "n_layers: 32" in out.stdout and "run_dir: runs/default" in out.stdout
    assert "cpu_demo" not in out.stdout and "shakespeare" not in out.stdout


# ------------------------------------------------------------------------ GPU recipes
# (experiment, world size, peak lr, warmup steps, layout): the published hyperparameters each
# recipe cites (conf/experiment/<name>.yaml), at 4M tokens per step of 8,192-token sequences.
RECIPES = [
    ("llama3_8b", 8, 3e-4, 2000, ("fsdp", 1, 8, 1)),
    ("llama3_70b", 64, 1.5e-4, 2000, ("fsdp_tp", 1, 8, 8)),
]


@pytest.mark.parametrize(("experiment", "world", "lr", "warmup", "layout"), RECIPES)
def test_gpu_recipe_resolves_to_its_published_hyperparameters(
    experiment, world, lr, warmup, layout
):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.model.name == experiment
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (lr, warmup, "cosine")
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ([0.9, 0.95], 1e-5, 0.1)
    assert (cfg.optim.min_lr_ratio, cfg.optim.grad_clip) == (0.1, 1.0)
    assert cfg.data.seq_len == 8192 == cfg.model.max_seq_len
    assert check(cfg, world) * cfg.data.seq_len == 4 * 2**20  # 4M tokens per step
    dims = ParallelDims.from_config(cfg.parallel, world)
    assert (cfg.parallel.strategy, dims.dp_replicate, dims.dp_shard, dims.tp) == layout
    assert cfg.train.run_dir == f"runs/{experiment}"
    # On another number of GPUs the pinned global batch says what to change.
    with pytest.raises(ConfigError, match="train.global_batch_size=512 does not equal"):
        check(cfg, world * 2)


@pytest.mark.parametrize(("experiment", "world"), [(r[0], r[1]) for r in RECIPES])
def test_gpu_recipe_fits_an_80gb_h100(experiment, world):
    """The memory plan (what megalite-plan prints and the trainer logs) with the backends and
    precision a CUDA run resolves, against the usable share of an H100's 80 GB."""
    import dataclasses

    from megalite.devices import resolve_precision
    from megalite.memory import estimate_memory
    from megalite.model.transformer import resolve_backends
    from megalite.plan import USABLE_FRACTION, device_memory_gb

    cfg = compose([f"experiment={experiment}"])
    model, loss = resolve_backends(cfg.model, cfg.train.loss, "cuda", cfg.parallel.tp)
    precision, _ = resolve_precision(cfg.train.precision, "cuda")
    train = dataclasses.replace(cfg.train, loss=loss, precision=precision)
    cfg = dataclasses.replace(cfg, model=model, train=train)
    plan = estimate_memory(cfg, ParallelDims.from_config(cfg.parallel, world))
    usable = USABLE_FRACTION * device_memory_gb("NVIDIA H100 80GB HBM3")
    assert plan.total_gb() <= usable, plan.summary()


@pytest.mark.parametrize("experiment", [r[0] for r in RECIPES])
def test_gpu_recipe_resolves_with_cfg_job(experiment):
    out = run_cli([str(BIN / "megalite-train"), "--cfg", "job", f"experiment={experiment}"])
    assert out.returncode == 0, out.stderr
    assert f"name: {experiment}" in out.stdout and "seq_len: 8192" in out.stdout


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
        check(compose(override), world)
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
        check(compose(["parallel=zero2"]), 2)
