"""`megalite-scale recommend`: from a fit, the compute-optimal model for a target budget.

N_opt and D_opt come from approach 2's power laws (or approach 3's frontier with --approach
parametric, or when the fit has no approach 2); the predicted loss is approach 3's L(N, D) at
that point. The budget is in the FLOP convention of the fitted data (megalite's count for
megalite-scale results, 6ND for a CSV without a flops column). The nearest shape is the family's
(megalite/scale/family.py) closest in log N; its steps spend D tokens at the base config's
global batch on --gpus ranks. The config is written as an experiment file (every key), and
`megalite-plan` prints the memory per rank for --layout and the wall time on --gpus x --gpu.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from megalite.errors import ConfigError
from megalite.launch_slurm import last_override
from megalite.scale.fit import parametric_optimum, predict
from megalite.scale.grid import data_vocab
from megalite.shapes import flops_per_token, param_count


def optimum(fit: dict, budget: float, approach: str | None) -> tuple[float, float, str]:
    """(N_opt, D_opt, which law) at `budget`."""
    iso = fit.get("isoflop", {})
    if approach is None:
        approach = "isoflop" if "n_opt" in iso else "parametric"
    if approach == "isoflop":
        if "n_opt" not in iso:
            raise ConfigError(
                "--approach isoflop: this fit has no approach-2 power laws (fewer than 2 usable "
                "budgets); use --approach parametric"
            )
        n = iso["n_opt"]["k"] * budget ** iso["n_opt"]["exponent"]
        d = iso["d_opt"]["k"] * budget ** iso["d_opt"]["exponent"]
        return float(n), float(d), "approach 2 (IsoFLOP power laws)"
    n3, d3 = parametric_optimum(fit["parametric"], np.array([budget]))
    return float(n3[0]), float(d3[0]), "approach 3 (parametric frontier, C = 6ND)"


def recommend(fit: dict, args: argparse.Namespace, out: Path) -> int:
    from megalite.compose import compose_config
    from megalite.parallel.dims import ParallelDims, check_world_size
    from megalite.scale.family import family_shapes
    from megalite.scale.grid import check_base_overrides

    if not (math.isfinite(args.budget) and args.budget > 0):
        raise ConfigError(f"--budget={args.budget} must be a FLOP count > 0")
    n_opt, d_opt, how = optimum(fit, args.budget, args.approach)
    loss = float(predict(fit["parametric"], n_opt, d_opt))
    top = max(fit["budgets"])
    print(f"budget C = {args.budget:.3g} FLOPs -> {how}:")
    print(f"  N_opt = {n_opt:.4g} params, D_opt = {d_opt:.4g} tokens ({d_opt / n_opt:.3g}/param)")
    print(f"  predicted loss {loss:.4f} (approach 3's L(N, D))")
    for w in fit.get("warnings", []):  # the numbers above inherit every doubt about the fit
        print(f"  warning (from the fit): {w}")
    if args.budget > 100 * top:
        print(f"  note: {args.budget / top:.3g}x beyond the largest fitted budget ({top:.3g}): "
              "an extrapolation")  # fmt: skip

    check_base_overrides(args.overrides)
    gpus = args.gpus or 1
    seq_len = args.seq_len or last_override(args.overrides, "data.seq_len")
    # The base config's model is replaced by the family's shape; only its max_seq_len must
    # already admit the sequence length.
    seq = [f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}"] if seq_len else []
    base = compose_config([f"parallel={args.layout}", *args.overrides, *seq])
    seq = base.data.seq_len
    shapes = family_shapes(args.family, data_vocab(base), seq, base.model)
    model = min(shapes, key=lambda m: abs(math.log(param_count(m) / n_opt)))
    n_model = param_count(model)
    cfg = dataclasses.replace(base, model=model, name=f"scale_{model.name}")
    batch = check_world_size(cfg, ParallelDims.from_config(cfg.parallel, gpus))
    steps = max(1, round(d_opt / (batch * seq)))
    train = dataclasses.replace(cfg.train, max_steps=steps, global_batch_size=batch)
    optim = dataclasses.replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps))
    cfg = dataclasses.replace(cfg, train=train, optim=optim)
    tokens = steps * batch * seq
    print(
        f"nearest {args.family} shape: dim {model.dim}, {model.n_layers} layers, {model.n_heads} "
        f"heads, ffn {model.ffn_dim}, vocab {model.vocab_size}: {n_model:,} params "
        f"({n_model / n_opt:.2f}x N_opt)"
    )
    print(
        f"  {steps:,} steps x {batch} sequences x {seq} tokens = {tokens:.4g} tokens, "
        f"{flops_per_token(model, seq) * tokens:.3g} FLOPs by megalite's count "
        f"(6ND {6 * n_model * tokens:.3g}); predicted loss {float(predict(fit['parametric'], n_model, tokens)):.4f}"  # noqa: E501
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    root = out.parent.parent if out.parent.name == "experiment" else Path("DIR")
    header = (
        "# @package _global_\n"
        f"# megalite-scale recommend: C={args.budget:.3g} FLOPs, {how}\n"
        f"#   megalite-train hydra.searchpath=[file://{root.resolve()}] experiment={out.stem}\n"
        "# (an experiment file: Hydra finds it as DIR/experiment/<name>.yaml)\n"
    )
    out.write_text(header + OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    print(f"config: {out}")
    if args.gpus is None:
        print("(give --gpus N --gpu TYPE for megalite-plan's memory per rank and wall time)")
        return 0
    return plan_cluster(cfg, args, tokens)


def plan_cluster(cfg, args: argparse.Namespace, tokens: int) -> int:
    """megalite-plan for the recommended shape on --gpus x --gpu: the hours that spend the
    budget, the memory per rank of the layout, and the wall time of `tokens`."""
    from megalite import plan
    from megalite.devices import lookup_peak_tflops

    peak = lookup_peak_tflops(args.gpu)
    if peak is None:
        raise ConfigError(f"--gpu={args.gpu!r} has no bf16 peak in megalite/devices.py; name a "
                          "known GPU (h100, a100, ...)")  # fmt: skip
    hours = args.budget / plan.compute_budget(args.gpus, peak, 1.0, args.mfu)
    presets = plan.load_presets()
    preset = plan.closest_preset(param_count(cfg.model), presets)[0]
    m = cfg.model
    shape = [
        f"model.{k}={getattr(m, k)}"
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "multiple_of")
    ]
    kv = "null" if m.n_kv_heads is None else m.n_kv_heads
    shape += [f"model.n_kv_heads={kv}", f"model.max_seq_len={m.max_seq_len}"]
    argv = [
        f"--gpus={args.gpus}", f"--gpu={args.gpu}", f"--hours={hours:.6g}", f"--mfu={args.mfu}",
        f"--model={preset}", f"--layout={args.layout}", f"--seq-len={cfg.data.seq_len}",
        f"--micro-batch={cfg.train.micro_batch_size}", f"--tokens={tokens}", *shape,
    ]  # fmt: skip
    print(f"\nmegalite-plan {' '.join(argv)}   (preset {preset} reshaped to the recommendation)\n")
    return plan.main(argv)
