"""The FSDP units megalite shards a model into (megalite/parallel/fsdp.py), on a real 2-rank
gloo group: which modules form each unit, which keep their parameters whole after forward
(reshard_after_forward=False), and that each layout trains like one process.

Parity tolerance: fp32, 3 AdamW steps on the same global batch; the layouts differ from one
process only in the order of floating-point sums (~1e-7 relative), so 1e-5 is loose for
correct code and far below what a dropped or doubled gradient does to the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL, run_torchrun

FP32_RTOL = 1e-5
BASE = [*TINY_MODEL, "data.seq_len=32", "parallel=fsdp", "train.precision=fp32"]

UNTIED_UNITS = {
    "": [""],
    "tok_embeddings": ["tok_embeddings"],
    "layers.0": ["layers.0"],
    "layers.1": ["layers.1"],
    "norm": ["norm", "output"],
}
CASES = {
    # name: (overrides, torch completes partly-run grouped units, expected units, whole after fwd)
    "untied": (["train.loss=torch"], True, UNTIED_UNITS, ["layers.1", "norm"]),
    # The fused loss reads output.weight without calling `output`: only `norm` of the head
    # unit runs forward.
    "fused": (["train.loss=fused_linear"], True, UNTIED_UNITS, ["layers.1", "norm"]),
    # torch < 2.12 cannot complete that half-run unit: the head stays in the root there.
    "fused_old_torch": (
        ["train.loss=fused_linear"],
        False,
        {k: v for k, v in UNTIED_UNITS.items() if k != "norm"},
        ["layers.1"],
    ),
    # The tied matrix (and the final norm) stay in the root; the root reshards after forward.
    "tied": (
        ["train.loss=torch", "model.tie_embeddings=true"],
        True,
        {k: v for k, v in UNTIED_UNITS.items() if k not in ("norm", "tok_embeddings")},
        ["layers.1"],
    ),
    # reshard_after_forward=false keeps every unit whole from forward to backward.
    "no_reshard": (
        ["train.loss=torch", "parallel.reshard_after_forward=false"],
        True,
        UNTIED_UNITS,
        ["tok_embeddings", "layers.0", "layers.1", "norm"],
    ),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fsdp_units")
    spec, out = tmp / "cases.json", tmp / "out.json"
    spec.write_text(
        json.dumps(
            [
                {"name": name, "overrides": [*BASE, *extra], "partial_group_forward": partial}
                for name, (extra, partial, _, _) in CASES.items()
            ]
        )
    )
    driver = REPO / "tests/parallel/fsdp_units_driver.py"
    res = run_torchrun(
        2, [str(driver), str(spec), str(out)], env={"TRITON_INTERPRET": "1"}, timeout=900
    )
    (tmp / "torchrun.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(Path(out).read_text())


@pytest.mark.world_size(2)
@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_units_and_reshard_after_forward(layouts, name):
    _, _, want_units, want_whole = CASES[name]
    got = layouts[name]
    assert got["units"] == want_units
    assert got["whole_after_forward"] == want_whole


@pytest.mark.world_size(2)
@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_layout_trains_like_one_process(layouts, name):
    got, ref = layouts[name]["losses"], layouts[name]["single_losses"]
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, rel=FP32_RTOL)
    assert ref[-1] < ref[0]  # the steps did train
