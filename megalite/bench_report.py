"""megalite-bench's outputs: results.csv, the markdown table and the PNG plot, with the git SHA
that every benchmark row carries."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COLUMNS = [
    "git_sha", "timestamp", "device", "world_size", "bench", "model", "parallel", "seq_len",
    "micro_batch", "global_batch", "attention", "norm", "loss", "compile",
    "activation_checkpointing", "precision", "warmup_steps", "measure_steps", "n_params",
    "status", "step_time_median_s", "step_time_p20_s", "step_time_p80_s",
    "tokens_per_s_per_device", "tflops_per_device", "mfu", "hfu", "peak_tflops", "peak_source",
    "peak_mem_gb", "mem_growth_gb", "plan_mem_gb", "final_loss", "reason",
]  # fmt: skip


def git_sha() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return out.stdout.strip() if out.returncode == 0 else ""

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    head = rows[0] if rows else {}
    lines = [
        f"megalite-bench `{head.get('bench', '')}` | {head.get('device', '')} | git "
        f"{head.get('git_sha', '')} | {head.get('timestamp', '')} | peak "
        f"{float(head.get('peak_tflops', 0) or 0):.4g} TFLOP/s ({head.get('peak_source', '')})",
        "",
        "| model | parallel | world | seq | mbs | attention | norm | loss | compile | AC | "
        "step ms median (p20-p80) | tok/s/dev | TFLOP/s/dev | MFU | HFU | peak mem GB | "
        "growth / plan GB | status |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        common = (
            f"| {r['model']} | {r['parallel']} | {r.get('world_size', '')} | {r['seq_len']} | "
            f"{r['micro_batch']} | {r['attention']} | {r['norm']} | {r['loss']} | "
            f"{'on' if r['compile'] else 'off'} | {r['activation_checkpointing']} | "
        )
        if r["status"] == "ok":
            lines.append(
                common + f"{1e3 * r['step_time_median_s']:.1f} ({1e3 * r['step_time_p20_s']:.1f}-"
                f"{1e3 * r['step_time_p80_s']:.1f}) | {r['tokens_per_s_per_device']:,.0f} | "
                f"{r['tflops_per_device']:.3g} | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | "
                f"{r['peak_mem_gb']:.2f} | {r['mem_growth_gb']:.2f} / {r['plan_mem_gb']:.2f} | "
                f"ok {r['reason']} |"
            )
        else:
            lines.append(common + "| | | | | | | " + f"{r['status']}: {r['reason']} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict]):
    """Tokens/s per device and MFU / HFU per cell, as horizontal bars, with a line at 100 % of
    the peak (an MFU past it means a wrong peak or FLOP count) and the legend beside the axes,
    never over a bar. A skipped cell keeps its row, labelled with the reason. None when no cell
    ran."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['label']} x{r['world_size']}" for r in rows]
    y = list(range(len(rows)))

    def value(r: dict, key: str, scale: float = 1.0) -> float:
        return scale * float(r[key]) if r["status"] == "ok" else 0.0

    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 1.8 + 0.45 * len(rows)), sharey=True, layout="constrained"
    )
    ax1.barh(y, [value(r, "tokens_per_s_per_device") for r in rows], color="tab:blue")
    ax1.set_xlabel("tokens/s per device")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax2.barh([i - 0.2 for i in y], [value(r, "mfu", 100) for r in rows], 0.4, label="MFU")
    ax2.barh([i + 0.2 for i in y], [value(r, "hfu", 100) for r in rows], 0.4, label="HFU")
    ax2.axvline(100, color="tab:red", linestyle="--", linewidth=1, label="100 % of peak")
    ax2.set_xlim(0, max(110.0, *(value(r, "hfu", 105) for r in rows)))
    ax2.set_xlabel(f"% of peak ({ok[0]['peak_source']} {float(ok[0]['peak_tflops']):.3g} TFLOP/s)")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            reason = f"{r['status']}: {r['reason']}"
            for ax in (ax1, ax2):
                ax.text(0.01, i, reason[:90], transform=ax.get_yaxis_transform(), va="center",
                        fontsize=7, color="dimgray", style="italic")  # fmt: skip
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"megalite-bench {ok[0]['bench']} | {ok[0]['device']} | {ok[0]['git_sha']}",
                 fontsize=9)  # fmt: skip
    return fig


def plot(rows: list[dict], path: Path) -> bool:
    fig = figure(rows)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out: Path) -> None:
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_table(rows))
    plot(rows, out / "results.png")
