"""`megalite-train`: the Hydra entry point. compose -> typed Config -> Trainer(cfg).fit().

megalite-train experiment=cpu_demo                # the README's demo (no experiment: no recipe)
megalite-train model=llama_125m data=shakespeare train.max_steps=200
torchrun --nproc_per_node=4 -m megalite.train parallel=ddp
megalite-train --cfg job                         # print the resolved config and exit
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from megalite.compose import CONF_DIR, to_config
from megalite.errors import MegaliteError


def fail(msg: str) -> None:
    """One clear message (rank 0 only: every rank finds the same problems) and exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print("megalite-train: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def run(raw: DictConfig) -> None:
    try:
        cfg = to_config(raw)
        from megalite.trainer import Trainer

        trainer = Trainer(cfg)
    except MegaliteError as e:
        fail(str(e))
    try:
        trainer.fit()
    except MegaliteError as e:
        fail(str(e))


# What each training config group holds, for --help (conf/bench configures megalite-bench,
# not a run, and base_* are the schemas the YAMLs start from: neither is listed).
GROUPS = {
    "experiment": "a whole recipe, applied last (cpu_demo: the demo)",
    "model": "the architecture (published shapes)",
    "parallel": "the parallel layout (strategy and degrees)",
    "data": "the prepared dataset (data.dir) and sequence length",
    "optim": "AdamW and the learning-rate schedule",
    "train": "steps, batch, precision, run dir, checkpoints, resume",
    "logging": "console, metrics.jsonl, wandb",
}
COMMON_OVERRIDES = [
    ("experiment=cpu_demo", "a whole recipe (make demo runs this one)"),
    ("model=llama_125m", "another model; model.dim=512 changes one field"),
    ("train.max_steps=200", "how long to train (the lr schedule spans it)"),
    ("train.run_dir=runs/a", "where this run writes; runs/latest links the newest"),
    ("train.resume=auto", "continue from the newest good checkpoint in train.run_dir"),
]


def help_text() -> str:
    """megalite-train --help: what it does, the groups and their options, the usual overrides."""
    conf = Path(CONF_DIR)
    lines = [
        "usage: megalite-train [--help] [--cfg job] [KEY=VALUE ...]",
        "       torchrun --nproc_per_node=N -m megalite.train [KEY=VALUE ...]",
        "",
        "Trains a Llama-style language model: composes the config from conf/ and the KEY=VALUE",
        "overrides, checks all of it before start (one line per problem), then runs the loop",
        "and writes train.run_dir: config.yaml, metrics.jsonl, DCP checkpoints, loss.png.",
        "",
        "config groups (GROUP=OPTION picks one; KEY=VALUE sets one field, e.g. optim.lr=1e-3):",
    ]
    for group, what in GROUPS.items():
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        lines.append(f"  {group:<11} {', '.join(options) or '(one file)'}")
        lines.append(f"  {'':<11} {what}")
    lines += ["", "most used overrides:"]
    lines += [f"  {override:<22} {what}" for override, what in COMMON_OVERRIDES]
    lines += [
        "",
        "print the resolved config and exit (any overrides before it):",
        "  megalite-train experiment=llama3_8b --cfg job",
        "",
        "Several runs: -m optim.lr=1e-3,3e-3 ... (Hydra multirun). Hydra's own options:",
        '--hydra-help. More in README.md, "Configuration".',
    ]
    return "\n".join(lines)


def main() -> None:
    # Answered before Hydra (whose --help dumps the whole default config) and before torch.
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_text())
        return
    run()


if __name__ == "__main__":
    main()
