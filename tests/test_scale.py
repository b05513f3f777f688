"""megalite-scale: the fit recovers a known law (both approaches, with bootstrap intervals), the
plan spends each budget and writes configs megalite-train composes, the SLURM array script, and
one clear error (or a warning in the report) for each bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from megalite.errors import LaunchError
from megalite.scale import fit as fitmod
from megalite.scale.cli import main
from megalite.scale.fit import FitError, fit_all, read_points
from megalite.scale.grid import read_grid, run_overrides
from megalite.scale.runner import SlurmOptions, collect, submit_array, train_command
from tests.conftest import compose, data_overrides, run_cli

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3).
LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = LAW["beta"] / (LAW["alpha"] + LAW["beta"])


def law_points(budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes=7, noise=0.002, seed=0):
    """IsoFLOP sets around the law's own optimum (N x 1/4 .. 4), losses with lognormal noise."""
    E, A, B, al, be = (LAW[k] for k in ("E", "A", "B", "alpha", "beta"))
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        g = (al * A / (be * B)) ** (1 / (al + be))
        n_opt = g * (c / 6) ** (be / (al + be))
        for f in np.geomspace(0.25, 4, sizes):
            n = n_opt * f
            d = c / (6 * n)
            loss = (E + A / n**al + B / d**be) * np.exp(rng.normal(0, noise))
            rows.append({"params": n, "tokens": d, "loss": loss})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------- fit
def test_fit_recovers_a_known_law_with_intervals_plots_and_summary(tmp_path, capsys):
    results = write_csv(tmp_path / "results.csv", law_points())
    assert main(["fit", str(results), "--out", str(tmp_path / "fit"), "--bootstrap", "60"]) == 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    p = fit["parametric"]
    assert abs(p["alpha"] - LAW["alpha"]) <= 0.02 and abs(p["beta"] - LAW["beta"]) <= 0.02
    assert abs(p["E"] / LAW["E"] - 1) <= 0.02
    assert p["converged"] and fit["warnings"] == []
    for k in ("E", "alpha", "beta", "a"):
        lo, hi = p["ci"][k]
        assert lo < p[k] < hi and hi - lo < 0.2 * abs(p[k]), (k, p[k], lo, hi)
    iso = fit["isoflop"]
    assert len(iso["sets"]) == 5 and all(s["vertex_inside"] for s in iso["sets"])
    assert abs(iso["n_opt"]["exponent"] - A_TRUE) <= 0.03
    assert abs(iso["d_opt"]["exponent"] - (1 - A_TRUE)) <= 0.03
    lo, hi = iso["n_opt"]["ci"]["exponent"]
    assert lo < iso["n_opt"]["exponent"] < hi
    for name in ("isoflop.png", "optimal.png", "contours.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 10_000
    summary = (tmp_path / "fit" / "summary.md").read_text()
    assert f"{p['alpha']:.3f}" in summary and "## Warnings" in summary
    assert "alpha" in capsys.readouterr().out


def test_fit_reads_published_style_csv_without_flops_or_budget(tmp_path):
    """Only params,tokens,loss: FLOPs are 6ND and the IsoFLOP sets are found from them."""
    rows = law_points(budgets=(1e18, 1e19, 1e20), noise=0.0)
    pts = read_points(write_csv(tmp_path / "r.csv", rows, ["params", "tokens", "loss"]))
    assert len(pts.set_flops) == 3
    np.testing.assert_allclose(pts.set_flops, [1e18, 1e19, 1e20], rtol=1e-9)
    fit = fit_all(pts, n_boot=0)
    assert abs(fit["isoflop"]["n_opt"]["exponent"] - A_TRUE) <= 0.03
    assert abs(fit["parametric"]["alpha"] - LAW["alpha"]) <= 0.02


@pytest.mark.parametrize(
    "content, message",
    [
        ("params,loss\n1e6,3.0\n", "has no column tokens"),
        ("params,tokens,loss\n1e6,2e7,3.0\n-5,2e7,3.1\n", "line 3: params=-5 must be"),
        ("params,tokens,loss\n1e6,0,3.0\n", "line 2: tokens=0 must be"),
        ("params,tokens,loss\n1e6,2e7,abc\n", "line 2: loss='abc' is not a number"),
        ("params,tokens,loss,flops\n1e6,2e7,3.0,nan\n", "flops=nan must be a finite"),
        ("params,tokens,loss\n", "no rows"),
    ],
)
def test_fit_refuses_a_bad_csv_naming_the_line_and_column(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["fit", str(path), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megalite-scale: error: ") and message in err, err
    assert str(path) in err and not (tmp_path / "fit").exists()


def test_fit_refuses_a_budget_with_too_few_sizes_for_a_parabola(tmp_path):
    rows = law_points(budgets=(1e18, 1e19), sizes=5)
    rows = [r for i, r in enumerate(rows) if i < 5 or i in (5, 6)]  # the second set: 2 sizes
    path = write_csv(tmp_path / "r.csv", rows)
    with pytest.raises(FitError, match=r"C=1e\+19 has 2 distinct model sizes; a parabola needs"):
        fit_all(read_points(path), n_boot=0)


def test_a_non_convex_set_and_an_unconstrained_fit_are_warnings_in_the_report(tmp_path):
    """Losses that do not depend on N or D: no IsoFLOP minimum, no exponent. The fit says so in
    fit.json and summary.md instead of printing numbers as if they meant something."""
    rows = law_points(budgets=(1e18, 1e19, 1e20), sizes=5)
    rng = np.random.default_rng(1)
    for r in rows:
        r["loss"] = 3.0 + 0.05 * rng.standard_normal()
    path = write_csv(tmp_path / "noise.csv", rows)
    assert main(["fit", str(path), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    text = " ".join(fit["warnings"])
    assert "is not convex" in text or "outside the sampled sizes" in text, text
    assert "at the edge of plausible values" in text or "did not converge" in text, text
    summary = (tmp_path / "fit" / "summary.md").read_text()
    assert fit["warnings"][0] in summary


def test_a_fit_that_does_not_converge_is_reported(tmp_path, monkeypatch):
    real = fitmod._lbfgs

    def stopped_early(*args):
        res = real(*args)
        res.success = False  # what L-BFGS reports when it hits maxiter or a line-search failure
        return res

    monkeypatch.setattr(fitmod, "_lbfgs", stopped_early)
    fit = fit_all(read_points(write_csv(tmp_path / "r.csv", law_points())), n_boot=0)
    assert fit["parametric"]["converged"] is False
    assert any("did not converge" in w for w in fit["warnings"])


def test_fit_needs_five_points_for_five_parameters(tmp_path):
    rows = law_points(budgets=(1e18,), sizes=4)
    with pytest.raises(FitError, match="4 points cannot determine 5 parameters"):
        fit_all(read_points(write_csv(tmp_path / "r.csv", rows)), n_boot=0)


# ------------------------------------------------------------------------------------ plan
def plan_args(tiny_data: Path, out: Path, budgets: str = "3e8,6e8") -> list[str]:
    return [
        "plan", "--budgets", budgets, "--sizes", "3", "--min-steps", "3", "--out", str(out),
        *data_overrides(tiny_data), "parallel=single", "train.precision=fp32",
        "train.micro_batch_size=4", "train.eval_batches=2", "train.plot=false",
    ]  # fmt: skip


def test_plan_spends_each_budget_and_writes_configs_megalite_train_composes(
    tiny_data, tmp_path, capsys
):
    from megalite.shapes import flops_per_token, param_count

    out = tmp_path / "grid"
    assert main(plan_args(tiny_data, out)) == 0
    grid_dir, rows = read_grid(out)
    assert len(rows) == 6
    for budget in ("3e+08", "6e+08"):
        sizes = [r for r in rows if r["budget"] == budget]
        params = [int(r["params"]) for r in sizes]
        assert len(sizes) == 3 and params == sorted(set(params))
    for r in rows:
        cfg = compose(run_overrides(grid_dir, r["run"]))
        assert cfg.model.vocab_size == 512  # the dataset's vocabulary, from its manifest
        assert param_count(cfg.model) == int(r["params"])
        assert cfg.train.max_steps == int(r["steps"]) and cfg.train.resume == "auto"
        assert cfg.train.run_dir == str((out / "runs" / r["run"]).resolve())
        tokens = int(r["steps"]) * 4 * 32
        assert int(r["tokens"]) == tokens
        flops = flops_per_token(cfg.model, 32) * tokens
        assert float(r["flops"]) == pytest.approx(flops, rel=1e-5)
        # One step more or less would move the count away from the budget.
        per_step = flops / int(r["steps"])
        assert abs(flops - float(r["budget"])) <= 0.5 * per_step + 1
        assert float(r["flops_6nd"]) == pytest.approx(6 * int(r["params"]) * tokens, rel=1e-5)
        assert cfg.model.dim % cfg.model.n_heads == 0 and cfg.model.n_layers >= 2
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budgets"] == [3e8, 6e8] and plan["family"] == "llama"
    # Planning into the same dir again would change the grid under its results.
    capsys.readouterr()
    assert main(plan_args(tiny_data, out)) == 2
    assert "grid.csv exists; plan into a new --out dir" in capsys.readouterr().err


def test_plan_refuses_a_budget_too_small_for_the_smallest_shape(tiny_data, tmp_path, capsys):
    assert main(plan_args(tiny_data, tmp_path / "g", budgets="1e6,6e8")) == 2
    err = capsys.readouterr().err
    assert "budget 1e+06 FLOPs is too small for the smallest llama shape (dim 32" in err, err
    assert "give budgets of at least" in err and "--min-steps=3" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budgets", "1e9,-1"], "every budget must be a FLOP count > 0"),
        (["--budgets", "1e9,1e9"], "repeats a budget"),
        (["--budgets", "1e9", "--sizes", "2"], "needs at least 3 sizes"),
        (["--budgets", "1e9", "model.dim=64"], "sets model.dim, which megalite-scale plan sets"),
        (["--budgets", "1e9", "--family", "gpt9"], "--family='gpt9' is not one of llama"),
    ],
)
def test_plan_refuses_bad_options(tmp_path, capsys, args, message):
    assert main(["plan", "--out", str(tmp_path / "g"), *args]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------- SLURM
def test_slurm_array_script_runs_one_grid_row_per_task(tiny_data, tmp_path):
    out = tmp_path / "grid"
    assert main(plan_args(tiny_data, out)) == 0
    (out / "runs" / "c3e8_s1").mkdir(parents=True)  # a finished run is not resubmitted
    (out / "runs" / "c3e8_s1" / "summary.json").write_text(
        json.dumps({"val_loss": 5.0, "tokens": 1, "n_params": 1})
    )
    opts = SlurmOptions(gpus_per_node=0, cpus_per_task=1, partition="debug", dry_run=True)
    script = submit_array(out, opts)
    assert "#SBATCH --array=0-4\n" in script
    assert "#SBATCH --job-name=scale-grid\n" in script
    grid = out.resolve()
    assert f'SCALE_RUN=$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" {grid}/slurm/tasks.txt)' in script
    assert f"RUN_DIR={grid}/runs/$SCALE_RUN" in script
    assert f"hydra.searchpath=[file://{grid}/configs]" in script
    # The task's lines come before the template reads RUN_DIR and the overrides.
    assert script.index("SCALE_RUN=") < script.index("RUN_DIR=${RUN_DIR:-")
    with pytest.raises(LaunchError, match="planned for --world-size=1"):
        submit_array(out, SlurmOptions(gpus_per_node=0, nproc_per_node=2, dry_run=True))


# ------------------------------------------------------------------------------------- run
def test_collect_reports_each_state_and_keeps_diverged_runs_out_of_results(tiny_data, tmp_path):
    out = tmp_path / "grid"
    assert main(plan_args(tiny_data, out)) == 0
    _, rows = read_grid(out)
    for run, loss in (("c3e8_s0", 4.5), ("c3e8_s1", float("nan"))):
        (out / "runs" / run).mkdir(parents=True)
        planned = next(r for r in rows if r["run"] == run)
        summary = {"val_loss": loss, "tokens": int(planned["tokens"]), "n_params": 123}
        (out / "runs" / run / "summary.json").write_text(json.dumps(summary))
    report = collect(out)
    states = {s.run: s.state for s in report.statuses}
    assert states["c3e8_s0"] == "done" and states["c3e8_s1"] == "diverged"
    assert sum(v == "pending" for v in states.values()) == 4
    assert "6 runs: 1 done, 0 failed, 1 diverged, 4 pending" in report.summary()
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["c3e8_s0"]
    assert table[0]["loss"] == "4.500000" and table[0]["params"] == "123"


def test_a_grid_run_passes_megalite_launchs_checks_under_torchrun(tiny_data, tmp_path):
    out = tmp_path / "grid"
    assert main(plan_args(tiny_data, out)) == 0
    cmd = train_command(out, "c3e8_s0", world_size=1, torchrun=True)
    assert cmd[1:4] == ["local", "--nproc=1", "--max-restarts=0"]
    res = run_cli([*cmd[:2], "--dry-run", *cmd[2:]])
    assert res.returncode == 0, res.stderr
    assert "megalite.train train.resume=auto 'hydra.searchpath=[file://" in res.stdout
    assert res.stdout.rstrip().endswith(" experiment=c3e8_s0")


# ------------------------------------------------------------------------------- recommend
def test_recommend_gives_the_law_optimum_a_shape_a_config_and_megalites_plan(
    tiny_data, tmp_path, capsys
):
    from megalite.compose import compose_config
    from megalite.scale.fit import parametric_optimum
    from megalite.shapes import param_count

    fit_dir = tmp_path / "fit"
    fit = fit_all(read_points(write_csv(tmp_path / "r.csv", law_points())), n_boot=0)
    fit_dir.mkdir()
    (fit_dir / "fit.json").write_text(json.dumps(fit))
    args = ["recommend", str(fit_dir), "--budget", "1e21", "--gpus", "64", "--gpu", "h100"]
    assert main([*args, *data_overrides(tiny_data)]) == 0
    out = capsys.readouterr().out
    n_law = float(parametric_optimum(LAW, np.array([1e21]))[0][0])
    n_opt = fit["isoflop"]["n_opt"]["k"] * 1e21 ** fit["isoflop"]["n_opt"]["exponent"]
    assert abs(np.log(n_opt / n_law)) < 0.1  # the known law's optimum, within 10 %
    assert f"N_opt = {n_opt:.4g} params" in out
    assert "memory per rank" in out and "on 64 x H100" in out  # megalite-plan's own report
    cfg = compose_config([f"hydra.searchpath=[file://{fit_dir}]", "experiment=recommended"])
    assert abs(np.log(param_count(cfg.model) / n_opt)) < np.log(2)
    assert cfg.model.vocab_size == 512 and cfg.parallel.strategy == "fsdp"
    assert f"{cfg.train.max_steps:,} steps x {cfg.train.global_batch_size} sequences" in out
    assert main(["recommend", str(tmp_path / "nofit"), "--budget", "1e21"]) == 2
    assert "fit.json does not exist" in capsys.readouterr().err
    assert main([*args[:3], "-5"]) == 2
    assert "--budget=-5.0 must be a FLOP count > 0" in capsys.readouterr().err
