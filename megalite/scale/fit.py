"""`megalite-scale fit`: scaling laws from (params, tokens, loss) points, two ways (Hoffmann et
al. 2022, "Chinchilla", approaches 2 and 3).

Input: any CSV with columns params, tokens, loss (flops optional, else 6 x params x tokens; a
`budget` column, as megalite-scale writes, names each point's IsoFLOP set, else points whose
FLOPs are within a factor 1.25 of the smallest of a set are one set, at their geometric mean).

Approach 2 (IsoFLOP profiles): per set, a parabola of loss in x = ln N; its vertex is N_opt(C)
(a vertex outside the sampled N, or a parabola opening downwards, is a warning). D_opt(C) is read
off the set's own N-D relation (ln D linear in ln N over its points: exactly C / 6N for 6ND
FLOPs, megalite's count otherwise). Then N_opt = k_N C^a and D_opt = k_D C^b, least squares in
log-log space over the sets.

Approach 3 (parametric): L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla did:
minimise the Huber loss (delta = 1e-3) of ln L_hat - ln L, with L_hat written as
LSE(a - alpha ln N, b - beta ln D, e) (A = e^a, B = e^b, E = e^e), by L-BFGS from every start of
a grid, keeping the best. Its compute-optimal frontier under C = 6ND:
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G,
G = (alpha A / (beta B))^(1/(alpha+beta)).

Confidence intervals: 95 % percentile bootstrap (points resampled with replacement; approach 2
within each set). Bootstrap fits start from the full fit's optimum.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from megalite.errors import DataError

HUBER_DELTA = 1e-3
SET_TOLERANCE = 1.25  # FLOPs within this factor of a set's smallest point belong to the set
# Chinchilla's grid of starts, thinned (their alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5,
# a, b in 0..25 by 5).
START_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, 0.0, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
CI_LEVEL = 0.95
# L-BFGS runs from this many of the grid's starts, those with the lowest objective.
LBFGS_STARTS = 24


class FitError(DataError):
    """Input the scaling fit cannot use (the message names the file / column / set)."""


class NotConvex(FitError):
    """An IsoFLOP set whose parabola opens downwards: no minimum to read off."""


# ---------------------------------------------------------------------------------- points
@dataclass
class Points:
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    sets: np.ndarray  # IsoFLOP set index of each point
    set_flops: np.ndarray  # each set's budget C
    source: str = ""

    def __len__(self) -> int:
        return len(self.n)

    def take(self, idx: np.ndarray) -> Points:
        return Points(
            self.n[idx], self.d[idx], self.loss[idx], self.flops[idx], self.sets[idx],
            self.set_flops, self.source,
        )  # fmt: skip


def read_points(path: Path) -> Points:
    """Points from a results CSV; a missing column, an unparsable or non-positive value is one
    FitError naming the file, the row and the column."""
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path} does not exist; give a CSV with columns params,tokens,loss")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in ("params", "tokens", "loss") if c not in header]
    if missing:
        raise FitError(
            f"{path} has no column {', '.join(missing)} (columns: {', '.join(header) or 'none'}); "
            "it needs params,tokens,loss (flops optional)"
        )
    if not rows:
        raise FitError(f"{path} has a header but no rows")
    cols = ["params", "tokens", "loss"] + [c for c in ("flops", "budget") if c in header]
    values: dict[str, list[float]] = {c: [] for c in cols}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        for c in cols:
            raw = (row.get(c) or "").strip()
            try:
                v = float(raw)
            except ValueError:
                raise FitError(f"{path} line {i}: {c}={raw!r} is not a number") from None
            if not (math.isfinite(v) and v > 0):
                raise FitError(f"{path} line {i}: {c}={raw} must be a finite number > 0")
            values[c].append(v)
    n, d, loss = (np.array(values[c]) for c in ("params", "tokens", "loss"))
    flops = np.array(values["flops"]) if "flops" in values else 6.0 * n * d
    key = np.array(values["budget"]) if "budget" in values else flops
    sets, set_flops = group_sets(key, flops)
    return Points(n, d, loss, flops, sets, set_flops, str(path))


def group_sets(key: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IsoFLOP set of each point (rule in the module docstring), and each set's C."""
    order = np.argsort(key)
    sets = np.empty(len(key), dtype=int)
    start, k = None, -1
    for i in order:
        if start is None or key[i] > start * SET_TOLERANCE:
            start, k = key[i], k + 1
        sets[i] = k
    set_flops = np.array([math.exp(np.mean(np.log(flops[sets == s]))) for s in range(k + 1)])
    return sets, set_flops


# ------------------------------------------------------------------------------ approach 3
def _objective(theta: np.ndarray, ln_n, ln_d, ln_l, delta):
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - ln_l
    w /= s
    absr = np.abs(r)
    loss = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta)
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * ln_n).sum(),
            -(g * w[1] * ln_d).sum(),
        ]
    )
    return loss, grad


def _lbfgs(start, ln_n, ln_d, ln_l, delta):
    return minimize(
        _objective,
        np.asarray(start, dtype=float),
        args=(ln_n, ln_d, ln_l, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15},
    )


def _params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def fit_parametric(pts: Points, delta: float = HUBER_DELTA, starts=None) -> tuple[dict, bool]:
    """(E, A, B, alpha, beta and the objective, converged) from the best of the grid starts."""
    if len(pts) < 5:
        raise FitError(f"{pts.source}: {len(pts)} points cannot determine 5 parameters (E, A, "
                       "B, alpha, beta); give at least 5, better 15 or more")  # fmt: skip
    ln_n, ln_d, ln_l = np.log(pts.n), np.log(pts.d), np.log(pts.loss)
    if starts is None:
        g = START_GRID
        starts = [(a, b, e, al, be) for al, be, e, a, b in
                  itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])]  # fmt: skip
    starts = np.asarray(starts, dtype=float)
    if len(starts) > LBFGS_STARTS:
        # Every start's objective at once; L-BFGS only from the most promising ones.
        values = np.array([_objective(s, ln_n, ln_d, ln_l, delta)[0] for s in starts])
        starts = starts[np.argsort(values)[:LBFGS_STARTS]]
    best = None
    for s in starts:
        res = _lbfgs(s, ln_n, ln_d, ln_l, delta)
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise FitError(f"{pts.source}: the parametric fit failed from every start")
    out = _params(best.x)
    out["objective"] = float(best.fun)
    out["theta"] = [float(x) for x in best.x]
    return out, bool(best.success)


def parametric_optimum(p: dict, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approach 3's compute-optimal N and D at C = 6ND (module docstring)."""
    al, be = p["alpha"], p["beta"]
    g = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
    c6 = np.asarray(flops, dtype=float) / 6.0
    return g * c6 ** (be / (al + be)), c6 ** (al / (al + be)) / g


def predict(p: dict, n, d):
    return (
        p["E"]
        + p["A"] / np.asarray(n, float) ** p["alpha"]
        + p["B"] / np.asarray(d, float) ** p["beta"]
    )  # noqa: E501


# ------------------------------------------------------------------------------ approach 2
@dataclass
class IsoSet:
    flops: float
    coeffs: tuple[float, float, float]  # loss = c0 + c1 x + c2 x^2, x = ln N
    n_opt: float
    d_opt: float
    loss_opt: float
    points: int
    inside: bool  # the vertex lies within the sampled N
    index: int = -1  # the set's index in Points.set_flops


def fit_isoflop_set(ln_n, ln_d, loss, flops: float, where: str) -> IsoSet:
    if len(np.unique(ln_n)) < 3:
        raise FitError(
            f"{where}: the IsoFLOP set at C={flops:.3g} has {len(np.unique(ln_n))} distinct "
            "model sizes; a parabola needs at least 3 (plan more --sizes, or drop the set)"
        )
    c2, c1, c0 = np.polyfit(ln_n, loss, 2)
    if not c2 > 0:
        raise NotConvex(
            f"{where}: the IsoFLOP set at C={flops:.3g} is not convex in ln N (parabola "
            f"curvature {c2:.3g} <= 0): its loss has no minimum among these sizes; widen the "
            "sizes around the optimum or check the runs"
        )
    x = -c1 / (2 * c2)
    k1, k0 = np.polyfit(ln_n, ln_d, 1) if len(np.unique(ln_n)) > 1 else (0.0, ln_d.mean())
    inside = bool(ln_n.min() <= x <= ln_n.max())
    return IsoSet(
        float(flops), (float(c0), float(c1), float(c2)), math.exp(x), math.exp(k0 + k1 * x),
        float(c0 + c1 * x + c2 * x * x), len(ln_n), inside,
    )  # fmt: skip


def power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(coefficient k, exponent) of y = k C^exponent, least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return float(math.exp(intercept)), float(slope)


def fit_isoflop(pts: Points, warnings: list[str] | None = None) -> tuple[list[IsoSet], dict | None]:
    """Every set's parabola and the power laws over the sets. A set that is not convex is left
    out of the power laws with a warning (in `warnings`; an error when that is None)."""
    sets = []
    for s, c in enumerate(pts.set_flops):
        m = pts.sets == s
        try:
            iso = fit_isoflop_set(np.log(pts.n[m]), np.log(pts.d[m]), pts.loss[m], c, pts.source)
        except NotConvex as e:
            if warnings is None:
                raise
            warnings.append(str(e) + "; left out of approach 2")
            continue
        iso.index = s
        sets.append(iso)
        if not iso.inside:
            # A minimum the sizes do not bracket is the parabola's guess, often far off.
            msg = (
                f"{pts.source}: the IsoFLOP set at C={c:.3g} has its parabola's minimum at "
                f"N={iso.n_opt:.3g}, outside the sampled sizes ({pts.n[m].min():.3g}-"
                f"{pts.n[m].max():.3g}): not bracketed, so left out of approach 2's power laws; "
                "plan sizes around it"
            )
            if warnings is None:
                raise FitError(msg)
            warnings.append(msg)
    used = [iso for iso in sets if iso.inside]
    if len(used) < 2:
        if warnings is not None:
            warnings.append(
                f"approach 2 needs IsoFLOP sets at 2 or more budgets with a bracketed minimum "
                f"for its power laws; {len(used)} usable: no N_opt(C), D_opt(C) laws"
            )
        return sets, None
    cs = np.array([s.flops for s in used])
    kn, an = power_law(cs, np.array([s.n_opt for s in used]))
    kd, bd = power_law(cs, np.array([s.d_opt for s in used]))
    return sets, {"n_opt": {"k": kn, "exponent": an}, "d_opt": {"k": kd, "exponent": bd}}


# ------------------------------------------------------------------------------- bootstrap
def _interval(samples: list[float]) -> list[float]:
    lo = (1 - CI_LEVEL) / 2
    return [float(np.quantile(samples, lo)), float(np.quantile(samples, 1 - lo))]


@dataclass
class Bootstrap:
    parametric: dict[str, list[float]] = field(default_factory=dict)
    isoflop: dict[str, list[float]] = field(default_factory=dict)
    parametric_used: int = 0
    isoflop_used: int = 0


def bootstrap(
    pts: Points, best: dict, n_boot: int, seed: int, delta: float, iso_sets: list[int]
) -> Bootstrap:
    """Resampled refits (module docstring); resamples a fit cannot use are left out and counted.
    Approach 2 resamples only the sets its full fit used (`iso_sets`)."""
    rng = np.random.default_rng(seed)
    out = Bootstrap()
    keys = ("E", "A", "B", "alpha", "beta", "a")
    par: dict[str, list[float]] = {k: [] for k in keys}
    iso: dict[str, list[float]] = {k: [] for k in ("n_exponent", "d_exponent", "n_k", "d_k")}
    for _ in range(n_boot):
        idx = rng.integers(0, len(pts), len(pts))
        sample = pts.take(idx)
        if len(np.unique(idx)) >= 5:
            p, _ok = fit_parametric(sample, delta, starts=[best["theta"]])
            for k in keys[:5]:
                par[k].append(p[k])
            par["a"].append(p["beta"] / (p["alpha"] + p["beta"]))
        if len(iso_sets) < 2:
            continue
        within = [rng.choice(np.flatnonzero(pts.sets == s), (pts.sets == s).sum())
                  for s in iso_sets]  # fmt: skip
        resampled = pts.take(np.concatenate(within))
        resampled.sets = np.repeat(np.arange(len(iso_sets)), [len(w) for w in within])
        resampled.set_flops = pts.set_flops[iso_sets]
        try:
            _sets, laws = fit_isoflop(resampled)
        except FitError:
            continue
        if laws is not None:
            iso["n_exponent"].append(laws["n_opt"]["exponent"])
            iso["d_exponent"].append(laws["d_opt"]["exponent"])
            iso["n_k"].append(laws["n_opt"]["k"])
            iso["d_k"].append(laws["d_opt"]["k"])
    out.parametric_used = len(par["E"])
    out.isoflop_used = len(iso["n_exponent"])
    out.parametric = par
    out.isoflop = iso
    return out


def intervals(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: _interval(v) for k, v in samples.items() if len(v) >= 2}


# ------------------------------------------------------------------------------------- all
def fit_all(pts: Points, n_boot: int = 200, seed: int = 0, delta: float = HUBER_DELTA) -> dict:
    """Both approaches, their bootstrap intervals and the warnings: the content of fit.json."""
    with one_blas_thread():
        return _fit_all(pts, n_boot, seed, delta)


def one_blas_thread():
    """L-BFGS on 5 parameters makes tiny BLAS calls; OpenBLAS threads waking up for each made
    the fit ~25x slower on a busy 2-core machine. threadpoolctl (when installed) pins BLAS to
    one thread for the fit."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fit_all(pts: Points, n_boot: int, seed: int, delta: float) -> dict:
    if n_boot < 0:
        raise FitError(f"--bootstrap={n_boot} must be >= 0 (0: no confidence intervals)")
    warnings: list[str] = []
    sets, laws = fit_isoflop(pts, warnings)
    best, converged = fit_parametric(pts, delta)
    if not converged:
        warnings.append(
            "the parametric fit (L-BFGS) did not converge from its best start; its numbers are "
            "unreliable: add points or sizes, or check for outliers"
        )
    if best["E"] < 1e-3 * float(pts.loss.min()):
        warnings.append(
            f"parametric E={best['E']:.3g} collapsed to 0: the data show no irreducible loss, "
            "typically because every run is far from converged (sizes or budgets too small)"
        )
    for k in ("alpha", "beta"):
        if not 0.01 < best[k] < 2.5:
            warnings.append(
                f"parametric {k}={best[k]:.3g} is at the edge of plausible values (0.01-2.5): "
                "the data do not pin it down"
            )
    used = [s.index for s in sets if s.inside]
    boot = bootstrap(pts, best, n_boot, seed, delta, used) if n_boot else Bootstrap()
    if n_boot and boot.parametric_used < 0.9 * n_boot:
        warnings.append(f"only {boot.parametric_used} of {n_boot} bootstrap resamples could be "
                        "fitted by approach 3")  # fmt: skip
    if n_boot and laws is not None and boot.isoflop_used < 0.9 * n_boot:
        warnings.append(
            f"only {boot.isoflop_used} of {n_boot} bootstrap resamples gave approach 2 fits (the "
            "others had a set that was not convex): its intervals are optimistic"
        )
    a = best["beta"] / (best["alpha"] + best["beta"])
    parametric = {k: best[k] for k in ("E", "A", "B", "alpha", "beta")}
    parametric.update(
        {
            "a": a,
            "b": 1.0 - a,
            "huber_delta": delta,
            "objective": best["objective"],
            "converged": converged,
            "ci": intervals(boot.parametric),
            "bootstrap_fits": boot.parametric_used,
        }
    )
    isoflop: dict = {
        "sets": [
            {
                "flops": s.flops,
                "n_opt": s.n_opt,
                "d_opt": s.d_opt,
                "loss_opt": s.loss_opt,
                "points": s.points,
                "vertex_inside": s.inside,
                "coeffs_ln_n": list(s.coeffs),
            }
            for s in sets
        ],  # fmt: skip
    }
    if laws is not None:
        ci = intervals(boot.isoflop)
        isoflop["n_opt"] = {**laws["n_opt"], "ci": {"exponent": ci.get("n_exponent")}}
        isoflop["d_opt"] = {**laws["d_opt"], "ci": {"exponent": ci.get("d_exponent")}}
        isoflop["bootstrap_fits"] = boot.isoflop_used
    return {
        "source": pts.source,
        "points": len(pts),
        "budgets": [float(c) for c in pts.set_flops],
        "ci_level": CI_LEVEL,
        "bootstrap": n_boot,
        "parametric": parametric,
        "isoflop": isoflop,
        "warnings": warnings,
        # Every bootstrap resample's approach-2 law (the bands of optimal.png).
        "isoflop_bootstrap": {k: v for k, v in boot.isoflop.items()},
    }
