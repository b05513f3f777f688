"""megalite-bench: the grid from its Hydra config, the cpu_smoke grid end to end (CSV, markdown,
PNG; skipped cells with their reason), and a multi-rank cell under torchrun (slow).

Speeds are never asserted: the checks are on the bookkeeping (every column present and
consistent with the others), not on how fast this machine is."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest

from megalite.bench import _worker_error, main, percentile, run_cell
from megalite.bench_grid import Cell, compose_bench, expand, skip_reason
from megalite.config import ConfigError
from megalite.plan import load_presets
from megalite.shapes import flops_per_token, hardware_flops_per_token


def tiny_data_overrides(tiny_corpus, tmp_path) -> list[str]:
    """Prepare the bench's datasets from four plays with a 512-token vocabulary (seconds)."""
    return [f"data.inputs=[{tiny_corpus}]", "data.vocab_size=512", f"data.cache_dir={tmp_path}"]


def read_rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_cpu_smoke_grid_end_to_end(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--config", "cpu_smoke", f"out_dir={out}", *tiny_data_overrides(tiny_corpus, tmp_path)]
    assert main(argv) == 0
    rows = read_rows(out / "results.csv")
    bench = compose_bench("cpu_smoke", [])
    assert len(rows) == len(expand(bench.grid)) == 8
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["attention"] for r in ok} == {"sdpa"} and len(ok) == 4
    assert {r["attention"] for r in skipped} == {"triton"} and len(skipped) == 4
    assert all("model.attention=triton" in r["reason"] and "CUDA" in r["reason"] for r in skipped)
    debug = load_presets()["debug"]
    for r in rows:
        assert r["git_sha"] and r["timestamp"] and r["device"].startswith("CPU")
        assert r["world_size"] == "1" and r["model"] == "debug" and r["parallel"] == "single"
    for r in ok:
        f = {k: float(v) for k, v in r.items() if k not in ("reason",) and _is_number(v)}
        assert 0 < f["step_time_p20_s"] <= f["step_time_median_s"] <= f["step_time_p80_s"]
        tokens = f["global_batch"] * f["seq_len"]
        assert f["global_batch"] == 2
        assert f["tokens_per_s_per_device"] == pytest.approx(tokens / f["step_time_median_s"])
        fpt = flops_per_token(debug, int(f["seq_len"]))
        assert f["tflops_per_device"] == pytest.approx(fpt * f["tokens_per_s_per_device"] / 1e12)
        assert f["mfu"] == pytest.approx(f["tflops_per_device"] / f["peak_tflops"])
        hfpt = hardware_flops_per_token(debug, int(f["seq_len"]), r["activation_checkpointing"])
        assert f["hfu"] / f["mfu"] == pytest.approx(hfpt / fpt)
        if r["activation_checkpointing"] == "full":
            assert f["hfu"] > f["mfu"]
        assert f["peak_mem_gb"] > 0 and f["mem_growth_gb"] >= 0 and f["plan_mem_gb"] > 0
        assert math.isfinite(f["final_loss"])
        assert r["peak_source"] == "measured"
        assert r["norm"] == "auto (torch)"  # what `auto` resolved to on this device
    md = (out / "results.md").read_text()
    assert md.count("\n| debug | single | 1 |") == 8 and "MFU | HFU" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "skipped (model.attention=triton" in printed and "results.csv" in printed


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def test_grid_is_the_product_of_its_axes_and_cells_become_train_overrides():
    bench = compose_bench(
        "cpu_smoke",
        [
            "grid.seq_len=[32,64,96]",
            'grid.parallel=[single,"fsdp_tp parallel.tp=2"]',
            'grid.model=["debug model.n_layers=2"]',
            'overrides=["optim.lr=1e-4"]',
        ],
    )
    cells = expand(bench.grid)
    assert len(cells) == 3 * 2 * 2 * 2  # seq x parallel x attention x checkpointing
    cell = next(c for c in cells if c.parallel.startswith("fsdp_tp") and c.seq_len == 96)
    ov = cell.overrides(bench, data_dir="/d", run_dir="/r")
    for expected in (
        "model=debug",
        "model.n_layers=2",
        "parallel=fsdp_tp",
        "parallel.tp=2",
        "data.seq_len=96",
        "train.micro_batch_size=2",
        f"train.max_steps={bench.warmup_steps + bench.measure_steps}",
        "optim.lr=1e-4",
    ):
        assert expected in ov
    assert cell.multi_rank and not cells[0].multi_rank
    assert "=" not in cell.id and " " not in cell.id


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grid.attention=[sdpa,foo]"], "grid.attention has 'foo'"),
        (["measure_steps=0"], "measure_steps=0 must be >= 1"),
        (["grid.seq_len=[]"], "grid.seq_len is empty"),
        (["measure_step=3"], "Key 'measure_step' not in 'BenchConfig'"),
    ],
)
def test_bad_bench_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        compose_bench("cpu_smoke", overrides)


def test_unknown_config_name_lists_the_known_ones(capsys):
    assert main(["--config", "nope"]) == 2
    assert "pick one of cpu_smoke, gpu_node" in capsys.readouterr().err


def test_backends_that_need_a_gpu_are_skipped_on_cpu():
    base = dict(model="debug", parallel="single", seq_len=64, micro_batch=4, compile=False)
    cell = Cell(
        **base, attention="sdpa", norm="torch", loss="torch", activation_checkpointing="none"
    )
    assert skip_reason(cell, "cpu") is None
    for key, value in (("norm", "triton"), ("loss", "fused_linear"), ("attention", "flash_attn")):
        bad = Cell(**{**vars(cell), key: value})
        reason = skip_reason(bad, "cpu")
        assert f"={value}" in reason and "CUDA" in reason
        assert skip_reason(bad, "cuda") is None  # a missing package is found when building


def test_an_invalid_cell_is_skipped_with_the_config_error(tmp_path):
    bench = compose_bench("cpu_smoke", [])
    cell = Cell(
        model="debug model.n_kv_heads=3",
        parallel="single",
        seq_len=64,
        micro_batch=4,
        attention="sdpa",
        norm="torch",
        loss="torch",
        compile=False,
        activation_checkpointing="none",
    )
    peak = {"tflops": 1.0, "source": "config", "device": "cpu", "type": "cpu"}
    result = run_cell(cell, bench, tmp_path / "no-data", tmp_path / "run", peak)
    assert result["status"] == "skipped"
    assert "model.n_kv_heads=3" in result["reason"]


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 5, 10):
        xs = [rng.random() for _ in range(n)]
        for q in (20, 50, 80):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_worker_error_is_the_ranks_exception():
    stderr = (
        "[rank1]:   File 'x.py', line 3\n"
        "[rank1]: ValueError: parallel.tp=3 does not divide 8\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n"
    )
    assert _worker_error(stderr) == "ValueError: parallel.tp=3 does not divide 8"


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_multi_rank_cells_run_under_torchrun(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    argv = [
        f"out_dir={out}",
        *tiny_data_overrides(tiny_corpus, tmp_path),
        'grid.parallel=[ddp,"fsdp_tp parallel.tp=2"]',
        "grid.seq_len=[64]",
        "grid.attention=[sdpa]",
        "grid.activation_checkpointing=[none]",
        "nproc=2",
        "measure_steps=2",
    ]
    assert main(argv) == 0
    rows = read_rows(out / "results.csv")
    assert [(r["parallel"], r["status"], r["world_size"]) for r in rows] == [
        ("ddp", "ok", "2"),
        ("fsdp_tp parallel.tp=2", "ok", "2"),
    ]
    # The ranks share the CPU: each one's peak is half the measured machine peak, and global
    # batch counts data-parallel ranks only (tp ranks share a micro-batch).
    assert [int(r["global_batch"]) for r in rows] == [4, 2]
