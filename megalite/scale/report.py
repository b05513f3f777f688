"""What `megalite-scale fit` writes: fit.json, three plots and a markdown summary.

DIR/fit.json        {"parametric": {E, A, B, alpha, beta, a, b, ci: {...}, ...},
                     "isoflop": {sets: [...], n_opt: {k, exponent, ci}, d_opt: {...}},
                     "warnings": [...], ...}
DIR/isoflop.png     loss against N per budget, with each set's parabola and its minimum
DIR/optimal.png     N_opt and D_opt against C: the sets' minima, approach 2's power laws with
                    their 95 % bootstrap bands, approach 3's frontier
DIR/contours.png    approach 3's L(N, D) contours, the budgets' IsoFLOP lines (C = 6ND), the
                    efficient frontier and the data
DIR/summary.md      the fitted laws with their intervals, and every warning
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megalite.scale.fit import Points, parametric_optimum, predict


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _ci(ci: dict, key: str, fmt: str = ".3f") -> str:
    v = ci.get(key)
    return f" [{v[0]:{fmt}}, {v[1]:{fmt}}]" if v else ""


def summary_markdown(fit: dict) -> str:
    p, iso = fit["parametric"], fit["isoflop"]
    level = f"{100 * fit['ci_level']:.0f} %"
    lines = [
        "# Scaling-law fit",
        "",
        f"{fit['points']} runs at {len(fit['budgets'])} budgets from `{fit['source']}`; "
        f"intervals: {level} bootstrap ({fit['bootstrap']} resamples).",
        "",
        "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta",
        "",
        "| | value | " + level + " CI |",
        "|---|---|---|",
    ]
    for k, fmt in (("E", ".4g"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".3f"), ("beta", ".3f")):
        ci = p["ci"].get(k)
        lines.append(f"| {k} | {p[k]:{fmt}} | {f'{ci[0]:{fmt}} - {ci[1]:{fmt}}' if ci else '-'} |")
    a_ci = p["ci"].get("a")
    lines += [
        "",
        f"Compute-optimal N ∝ C^{p['a']:.3f}{_ci(p['ci'], 'a')}, D ∝ C^{p['b']:.3f} "
        f"(a = beta / (alpha + beta)); Huber delta {p['huber_delta']:g}, "
        f"{'converged' if p['converged'] else 'NOT converged'}.",
        "",
        "## Approach 2: IsoFLOP minima",
        "",
        "| budget C | N_opt | D_opt | loss at N_opt | vertex inside the sizes |",
        "|---|---|---|---|---|",
    ]
    del a_ci
    for s in iso["sets"]:
        lines.append(
            f"| {s['flops']:.3g} | {s['n_opt']:.3g} | {s['d_opt']:.3g} | {s['loss_opt']:.4f} | "
            f"{'yes' if s['vertex_inside'] else 'no'} |"
        )
    if "n_opt" in iso:
        n, d = iso["n_opt"], iso["d_opt"]
        lines += [
            "",
            f"N_opt = {n['k']:.3g} C^{n['exponent']:.3f}{_ci(n['ci'], 'exponent')}, "
            f"D_opt = {d['k']:.3g} C^{d['exponent']:.3f}{_ci(d['ci'], 'exponent')}.",
        ]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in fit["warnings"]] or ["none"]
    lines += ["", "Plots: isoflop.png, optimal.png, contours.png.", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_isoflop(fit: dict, pts: Points, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(pts.set_flops)))
    fitted = {round(s["flops"], 6): s for s in fit["isoflop"]["sets"]}
    for k, c in enumerate(pts.set_flops):
        m = pts.sets == k
        ax.scatter(pts.n[m], pts.loss[m], color=colors[k], label=f"C = {c:.2g}", zorder=3)
        s = fitted.get(round(float(c), 6))
        if s is None:
            continue
        x = np.linspace(np.log(pts.n[m].min()) - 0.2, np.log(pts.n[m].max()) + 0.2, 100)
        c0, c1, c2 = s["coeffs_ln_n"]
        ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, color=colors[k], lw=1)
        if s["vertex_inside"]:  # an unbracketed vertex can lie decades away
            ax.scatter([s["n_opt"]], [s["loss_opt"]], marker="*", s=140, color=colors[k],
                       edgecolor="k", zorder=4)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (approach 2), ★ = parabola minimum")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    plt.close(fig)


def plot_optimal(fit: dict, pts: Points, path: Path) -> None:
    plt = _plt()
    iso, p = fit["isoflop"], fit["parametric"]
    cs = np.geomspace(pts.set_flops.min() / 3, pts.set_flops.max() * 3, 50)
    n3, d3 = parametric_optimum(p, cs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    bands = fit.get("isoflop_bootstrap", {})
    for ax, key, par3, label in ((axes[0], "n", n3, "N_opt"), (axes[1], "d", d3, "D_opt")):
        sets = [s for s in iso["sets"] if s["vertex_inside"]]
        ax.scatter([s["flops"] for s in sets], [s[f"{key}_opt"] for s in sets], color="k",
                   zorder=3, label="IsoFLOP minima")  # fmt: skip
        law = iso.get(f"{key}_opt")
        if law:
            fitted = f"approach 2: C^{law['exponent']:.3f}{_ci(law['ci'], 'exponent')}"
            ax.plot(cs, law["k"] * cs ** law["exponent"], color="C0", label=fitted)
            ks, es = bands.get(f"{key}_k", []), bands.get(f"{key}_exponent", [])
            if len(ks) >= 2:
                preds = np.array(ks)[:, None] * cs[None, :] ** np.array(es)[:, None]
                lo, hi = np.quantile(preds, [0.025, 0.975], axis=0)
                ax.fill_between(cs, lo, hi, color="C0", alpha=0.2, label="95 % bootstrap band")
        exp3 = p["a"] if key == "n" else p["b"]
        ax.plot(cs, par3, "--", color="C3", label=f"approach 3: C^{exp3:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    plt.close(fig)


def plot_contours(fit: dict, pts: Points, path: Path) -> None:
    plt = _plt()
    p = fit["parametric"]
    ln_n = np.linspace(np.log(pts.n.min()) - 1, np.log(pts.n.max()) + 1, 120)
    ln_d = np.linspace(np.log(pts.d.min()) - 1, np.log(pts.d.max()) + 1, 120)
    nn, dd = np.meshgrid(np.exp(ln_n), np.exp(ln_d))
    fig, ax = plt.subplots(figsize=(7, 5))
    cf = ax.contourf(nn, dd, predict(p, nn, dd), levels=20, cmap="viridis_r")
    fig.colorbar(cf, ax=ax, label="predicted loss L(N, D)")
    for c in pts.set_flops:
        ax.plot(nn[0], c / (6 * nn[0]), ":", color="w", lw=1)
    cs = np.geomspace(6 * nn.min() * dd.min(), 6 * nn.max() * dd.max(), 200)
    nf, df = parametric_optimum(p, cs)
    ax.plot(nf, df, color="r", lw=2, label="efficient frontier (C = 6ND)")
    ax.scatter(pts.n, pts.d, c="k", s=12, label="runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(nn.min(), nn.max())
    ax.set_ylim(dd.min(), dd.max())
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title(
        f"approach 3: E={p['E']:.3g}, alpha={p['alpha']:.3f}, beta={p['beta']:.3f} "
        "(dotted: the budgets)"
    )
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    plt.close(fig)


def write_fit(fit: dict, pts: Points, out: Path) -> dict[str, Path]:
    """Writes fit.json, the three plots and summary.md into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "fit": out / "fit.json",
        "isoflop": out / "isoflop.png",
        "optimal": out / "optimal.png",
        "contours": out / "contours.png",
        "summary": out / "summary.md",
    }
    _atomic_json(paths["fit"], fit)
    plot_isoflop(fit, pts, paths["isoflop"])
    plot_optimal(fit, pts, paths["optimal"])
    plot_contours(fit, pts, paths["contours"])
    paths["summary"].write_text(summary_markdown(fit))
    return paths
