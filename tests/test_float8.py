"""Float8 training (train.float8, megalite/parallel/float8.py): the numerics of each recipe, which
layers are converted, the checks before start, training against bf16, and FSDP2 against one
process.

The 100-step run of the demo recipe against bf16 is a benchmark (benchmarks/bench_float8_loss.py,
results in benchmarks/results/float8_loss.csv); here the same comparison runs on the tiny model.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from megalite.errors import ConfigError
from megalite.metrics import read_metrics
from megalite.parallel.float8 import (
    convert,
    fp8_tensor_cores,
    gpu_problems,
    recipe_config,
)
from tests.conftest import REPO, compose, run_torchrun, tiny_train_overrides

RECIPES = ["tensorwise", "rowwise"]
LOSS_RTOL = 0.03  # the bar: float8's final loss within 3 % of bf16's


# ------------------------------------------------------------------------------ numerics
# How far torchao's emulation may be from the real float8 GEMM (relative norm of the
# difference). Tensorwise: both accumulate in fp32 (rounding only). Rowwise: torchao asks
# _scaled_mm for a bf16 output (the rowwise kernels' dtype) and casts it, so one bf16 rounding
# (2^-9 relative) separates them — still 10x below the float8 error checked next.
GEMM_GAP = {"tensorwise": 1e-5, "rowwise": 4e-3}


def _linear_pass(recipe: str, emulate: bool | None, x: torch.Tensor, w: torch.Tensor):
    """(output, grad of input, grad of weight) of one Linear: float8 with torchao's recipe
    (emulate None: plain fp32, the reference)."""
    from torchao.float8 import convert_to_float8_training

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    if emulate is not None:
        config = recipe_config(recipe, emulate=emulate, fsdp=False)
        lin = convert_to_float8_training(lin, config=config)  # a root Linear is replaced
    xi = x.clone().requires_grad_(True)
    out = lin(xi)
    # A fixed, uneven upstream gradient: the backward GEMMs quantize it too.
    g = torch.linspace(-1.0, 2.0, out.numel()).view_as(out)
    out.backward(g)
    return out.detach(), xi.grad, lin.weight.grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_numerics_real_float8_gemm_emulation_and_fp32(recipe):
    """Per recipe, on odd-sized shapes (multiples of 16, as float8 GEMMs need):
    - torch._scaled_mm (the real float8 GEMM, which runs on a CPU, slowly) and torchao's
      emulation (used for CPU training) agree to the rounding of the GEMM's output dtype in the
      output and both gradients: the emulated runs compute what the GPU kernels compute;
    - both are within float8's error of the fp32 layer (e4m3 keeps 3 mantissa bits: ~3 %
      relative per element, less after a dot product averages it), and measurably not equal
      to it, so the layer really ran in float8."""
    torch.manual_seed(0)
    x, w = torch.randn(48, 80), torch.randn(112, 80) * 0.05
    ref = _linear_pass(recipe, None, x, w)
    real = _linear_pass(recipe, False, x, w)
    emu = _linear_pass(recipe, True, x, w)
    for name, r, e, f in zip(("output", "grad input", "grad weight"), real, emu, ref, strict=True):
        gap = ((e - r).norm() / r.norm()).item()
        assert gap < GEMM_GAP[recipe], f"{recipe} {name}: emulation {gap:.2e} off the float8 GEMM"
        err = ((r - f).norm() / f.norm()).item()
        assert 1e-3 < err < 0.06, f"{recipe} {name}: relative error {err:.4f} against fp32"


def test_rowwise_is_more_accurate_than_tensorwise_on_rows_of_different_scale():
    """Rows (tokens) of very different magnitude: one scale per tensor loses the small rows,
    one scale per row keeps them — the reason rowwise exists."""
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.logspace(-5, 1, 32).unsqueeze(1)
    w = torch.randn(48, 64) * 0.05
    ref = _linear_pass("tensorwise", None, x, w)[0]

    def small_rows_error(recipe: str) -> float:
        out = _linear_pass(recipe, True, x, w)[0]
        return ((out[:8] - ref[:8]).norm() / ref[:8].norm()).item()

    assert small_rows_error("rowwise") < 0.5 * small_rows_error("tensorwise")


# ------------------------------------------------------------------------------ conversion
def _meta_model(tiny_data, tmp_path, *extra: str):
    from megalite.model.transformer import Transformer

    cfg = compose([*tiny_train_overrides(tiny_data, tmp_path / "run"), "model.n_layers=3", *extra])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return cfg, model


@pytest.mark.parametrize(
    ("first", "last", "blocks"),
    [(True, True, {0, 1, 2}), (False, True, {1, 2}), (True, False, {0, 1})],
)
def test_convert_takes_the_chosen_blocks_and_never_the_head(
    tiny_data, tmp_path, first, last, blocks
):
    from torchao.float8.float8_linear import Float8Linear

    cfg, model = _meta_model(
        tiny_data,
        tmp_path,
        "train.float8=tensorwise",
        f"train.float8_first_block={str(first).lower()}",
        f"train.float8_last_block={str(last).lower()}",
    )
    names = convert(model, cfg, device_type="cpu", fsdp=False)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert fp8 == set(names)
    assert {int(n.split(".")[1]) for n in fp8} == blocks
    assert len(fp8) == 7 * len(blocks)  # wq wk wv wo w1 w2 w3
    assert type(model.output) is nn.Linear


def test_convert_is_a_no_op_without_float8(tiny_data, tmp_path):
    cfg, model = _meta_model(tiny_data, tmp_path)
    assert convert(model, cfg, device_type="cpu", fsdp=False) == []
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_fsdp_all_gathers_tensorwise_weights_in_float8_only():
    assert recipe_config("tensorwise", emulate=False, fsdp=True).enable_fsdp_float8_all_gather
    assert not recipe_config("tensorwise", emulate=False, fsdp=False).enable_fsdp_float8_all_gather
    assert not recipe_config("rowwise", emulate=False, fsdp=True).enable_fsdp_float8_all_gather


# ------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(
    ("capability", "hip", "has"),
    [
        ((8, 0), None, False),  # A100
        ((8, 6), None, False),  # A10 / RTX 30
        ((8, 9), None, True),  # L4 / L40S (Ada)
        ((9, 0), None, True),  # H100 / H200
        ((10, 0), None, True),  # B200
        ((9, 0), "gfx90a:sramecc+:xnack-", False),  # MI250X
        ((9, 4), "gfx942:sramecc+:xnack-", True),  # MI300X
    ],
)
def test_fp8_tensor_core_rule(capability, hip, has):
    assert fp8_tensor_cores(capability, hip) is has


def test_preflight_message_for_a_gpu_without_fp8_names_the_key_and_the_fix():
    (msg,) = gpu_problems("rowwise", "NVIDIA A100-SXM4-80GB", (8, 0), None)
    assert "train.float8=rowwise" in msg and "A100" in msg and "capability 8.0" in msg
    assert "train.float8=none" in msg
    assert gpu_problems("rowwise", "NVIDIA H100 80GB HBM3", (9, 0), None) == []


def test_unknown_recipe_fails_at_compose(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.float8='fp8' is not one of none, tensorwise"):
        compose([*tiny_train_overrides(tiny_data, tmp_path / "run"), "train.float8=fp8"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["model.ffn_dim=120"], r"model.ffn_dim=120"),
        (["parallel=zero2"], r"not by DeepSpeed"),
        (
            [
                "model.n_layers=1",
                "train.float8_first_block=false",
                "train.float8_last_block=false",
            ],
            "converts no block",
        ),
    ],
)
def test_preflight_refuses_what_float8_cannot_run(tiny_data, tmp_path, extra, match):
    from megalite.preflight import PreflightError, preflight

    cfg = compose(
        [*tiny_train_overrides(tiny_data, tmp_path / "run"), "train.float8=tensorwise", *extra]
    )
    with pytest.raises(PreflightError, match=match):
        preflight(cfg, world_size=1)


# ------------------------------------------------------------------------------ training
def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _train(tiny_data, run: Path, *extra: str, **train) -> list[float]:
    from megalite.trainer import Trainer

    base = dict(max_steps=STEPS, eval_every=0, ckpt_every=0, precision="bf16")
    Trainer(
        compose([*tiny_train_overrides(tiny_data, run, **{**base, **train}), *COMMON, *extra])
    ).fit()
    gc.collect()
    return _losses(run)


STEPS = 12
# The tiny model (its dims are multiples of 16, as float8 GEMMs need) with a larger lr, so the
# loss moves far from its start in 12 steps and a broken float8 path would show.
COMMON = ["parallel=single", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def single_runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("float8")
    return {
        recipe: _train(tiny_data, tmp / recipe, f"train.float8={recipe}")
        for recipe in ("none", *RECIPES)
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_float8_trains_like_bf16(single_runs, recipe):
    """The same data and seed: each float8 recipe's final loss within 3 % of bf16's, and the
    runs differ (the float8 layers were in the graph)."""
    ref, got = single_runs["none"], single_runs[recipe]
    assert len(got) == len(ref) == STEPS
    assert ref[-1] < ref[0] - 0.3  # the reference learned something
    assert abs(got[-1] / ref[-1] - 1) < LOSS_RTOL, (got[-1], ref[-1])
    assert got != ref


def test_start_up_says_what_runs_in_float8_and_which_peak_mfu_uses(tiny_data, tmp_path, capsys):
    _train(tiny_data, tmp_path / "run", "train.float8=rowwise", max_steps=1)
    out = capsys.readouterr().out
    assert "float8 rowwise: 14 Linear layers of the blocks (emulated" in out
    assert "MFU stays against the bf16 peak" in out
    # The checkpoint holds plain weights under the usual names: inference loads it as it is.
    from megalite import checkpoint

    model, meta = checkpoint.load_for_inference(tmp_path / "run")
    assert meta["step"] == 1 and type(model.layers["0"].attention.wq) is nn.Linear


@pytest.mark.slow
def test_fsdp2_float8_matches_one_process(tiny_data, tmp_path, single_runs):
    """2 gloo ranks, FSDP2 (tensorwise: float8 all-gather of the weights, scales precomputed
    after each step; rowwise: bf16 all-gather) against the one-process float8 run of the same
    global batch: final loss within the same 3 %, and the tensorwise weights really are
    float8-gathered tensors (checked inside the job)."""
    cases, runs = [], {}
    for recipe in RECIPES:
        runs[recipe] = tmp_path / recipe
        cases.append(
            [
                *tiny_train_overrides(
                    tiny_data,
                    runs[recipe],
                    max_steps=STEPS,
                    eval_every=0,
                    ckpt_every=0,
                    precision="bf16",
                    micro_batch_size=2,
                ),
                "parallel=fsdp",
                "optim.lr=3e-3",
                f"train.float8={recipe}",
            ]
        )
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    res = run_torchrun(2, [str(REPO / "tests/parallel/float8_driver.py"), str(spec)], timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    weights = json.loads((runs["tensorwise"] / "float8_weights.json").read_text())
    assert weights["tensorwise"] == ["WeightWithDynamicFloat8CastTensor"]
    for recipe in RECIPES:
        got, ref = _losses(runs[recipe]), single_runs[recipe]
        assert len(got) == STEPS
        assert abs(got[-1] / ref[-1] - 1) < LOSS_RTOL, (recipe, got[-1], ref[-1])


@pytest.mark.slow
def test_float8_composes_with_torch_compile(tiny_data, tmp_path):
    """train.compile=true compiles each block with its float8 Linear layers inside (float8 is
    converted first, as torchtitan orders it): the compiled run reproduces the eager float8
    losses step by step (measured: within 3e-4 relative; the tolerance leaves room for
    inductor's fused bf16 rounding)."""
    eager = _train(tiny_data, tmp_path / "eager", "train.float8=tensorwise", max_steps=4)
    compiled = _train(
        tiny_data, tmp_path / "compiled", "train.float8=tensorwise", "train.compile=true",
        max_steps=4,
    )  # fmt: skip
    assert len(compiled) == len(eager) == 4
    assert compiled != eager  # a different program ran, not the eager one twice
    for got, ref in zip(compiled, eager, strict=True):
        assert abs(got / ref - 1) < 2e-3, (compiled, eager)
