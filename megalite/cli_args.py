"""The command lines of the CLIs that need torch, in a module that does not import it.

Each console script below enters here: `--help` (or `-h`) is answered from these parsers before
the command's module, and torch with it, is imported (importing torch took 1-7 s of every
`--help` on a loaded machine); any other command line runs the module's `main`, which parses it
with the same parser. The parsers live here, not in their modules, so the two cannot drift.
(megalite-train answers its own --help before Hydra and torch: train.help_text.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# Checked against the modules that use them by tests/test_first_hour.py.
PEAK_PRECISIONS = ("bf16", "fp8")  # devices.PEAK_PRECISIONS
EXPORT_DTYPES = ("bfloat16", "float16", "float32")  # interop.llama_hf.DTYPES
GPU_CHECK_SECTIONS = ("kernels", "train", "compile", "perf")
INFERENCE_TOKENS_PER_PARAM = 200.0

CKPT_HELP = "step_N dir, run dir (newest checkpoint) or converted dir"
TOKENIZER_HELP = "tokenizer.json (default: the checkpoint's / run's)"


def _inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")


# ------------------------------------------------------------------------------ megalite-eval
def evaluate() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-eval",
        description="The perplexity of a checkpoint: mean next-token cross-entropy (nats) and "
        "its exp, on the run's validation split, another prepared dataset (--data-dir) or a "
        "text file (--text).",
        epilog="subcommands: `megalite-eval harness CKPT --tasks ...` (lm-evaluation-harness "
        "tasks), `megalite-eval watch RUN_DIR` (evaluate each new checkpoint of a run); each "
        "has its own --help",
    )
    p.add_argument("checkpoint", help=CKPT_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file, tokenized with the run's tokenizer")
    src.add_argument("--data-dir", help="a prepared dataset whose val split to use")
    p.add_argument("--seq-len", type=int, help="window for --text (default: the run's seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (8)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0: all)")
    _inference_options(p)
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def harness() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-eval harness",
        description="megalite-eval harness: lm-evaluation-harness (lm_eval 0.4) tasks on a "
        "megalite checkpoint, read directly (any layout megalite saves; no conversion to Hugging "
        "Face format).",
    )
    p.add_argument("checkpoint", help=CKPT_HELP)
    p.add_argument("--tasks", required=True, help="comma-separated task / group / tag names")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=_limit, help="examples per task (a fraction if < 1)")
    p.add_argument("--include-path", help="a directory of local task YAMLs")
    p.add_argument(
        "--no-default-tasks", action="store_true",
        help="look only in --include-path (skips indexing lm_eval's ~15k tasks, ~10 s)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    _inference_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="directory for results.json and results.md")
    p.add_argument("--log-samples", action="store_true", help="keep every request's scores")
    return p


def watch() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-eval watch",
        description="megalite-eval watch RUN_DIR: lm-evaluation-harness on each new checkpoint "
        "of a run, beside training, in a process of its own, so training never waits for an eval "
        "and never dies from one.",
    )
    p.add_argument("run_dir", help="the run dir whose checkpoints to evaluate")
    p.add_argument("--tasks", help="comma-separated tasks (default: the run's eval.harness.tasks)")
    p.add_argument("--every", type=int, help="steps between evals (0: every checkpoint)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--include-path", help="a directory of local task YAMLs")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="auto, cpu or cuda (default: the run's, else cpu)")
    p.add_argument("--precision", help="fp32 or bf16")
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between scans")
    p.add_argument("--once", action="store_true", help="evaluate what is there, then exit")
    p.add_argument(
        "--until-stdin-closes", action="store_true",
        help="stop when stdin closes (how the trainer runs it), not when the run finishes",
    )  # fmt: skip
    return p


# -------------------------------------------------------------------------- megalite-generate
def generate() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-generate", description="Sample text from a checkpoint with a KV cache."
    )
    p.add_argument("checkpoint", help=CKPT_HELP)
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of mass p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    _inference_options(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")
    p.add_argument("--json", help="also write prompts and completions to this JSON file")
    return p


# --------------------------------------------------------------------------- megalite-convert
def convert() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-convert",
        description="Checkpoints into and out of megalite (Llama HF / Meta, DeepSpeed ZeRO).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("from-hf", help="Hugging Face Llama dir -> megalite checkpoint dir")
    hf.add_argument("src", help="dir with config.json and *.safetensors (sharded index too)")
    hf.add_argument("out", help="output checkpoint dir (train.init_from)")
    hf.add_argument("--name", help="model preset name (default: the source dir's name)")
    hf.add_argument("--max-seq-len", type=int, help="default: max_position_embeddings")
    hf.add_argument("--overwrite", action="store_true")
    meta = sub.add_parser("from-meta", help="Meta Llama dir (params.json) -> megalite checkpoint")
    meta.add_argument("src", help="dir with params.json and consolidated.00.pth")
    meta.add_argument("out")
    meta.add_argument("--name")
    meta.add_argument(
        "--max-seq-len", type=int, default=4096, help="params.json does not record it"
    )
    meta.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("to-hf", help="megalite checkpoint -> Hugging Face Llama dir")
    exp.add_argument("checkpoint", help=CKPT_HELP)
    exp.add_argument("out")
    exp.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES)
    exp.add_argument("--tokenizer", help=TOKENIZER_HELP)
    exp.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    exp.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest weights file (default 5GB, as save_pretrained); a bigger model is written "
        "as numbered shards with model.safetensors.index.json",
    )
    exp.add_argument("--overwrite", action="store_true")
    ds = sub.add_parser(
        "from-deepspeed", help="DeepSpeed ZeRO checkpoint (zero1/2/3 run) -> megalite DCP weights"
    )
    ds.add_argument("checkpoint", help="a step_N dir written by a zero1/2/3 run")
    ds.add_argument("out", help="new directory for the DCP checkpoint (train.init_from)")
    return p


# ----------------------------------------------------------------------------- megalite-bench
def bench() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-bench",
        description="MFU benchmark grid. Trailing KEY=VALUE arguments are Hydra overrides of the "
        "bench config (grid.seq_len=[128,256], measure_steps=20, 'overrides=[\"optim.lr=1e-4\"]').",
    )
    p.add_argument("--config", default="cpu_smoke", help="conf/bench/<name>.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("overrides", nargs="*")
    return p


# ------------------------------------------------------------------------------ megalite-plan
def plan() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-plan",
        description="Compute budget -> compute-optimal model and tokens, closest preset, memory "
        "per rank for a layout, and wall time. Trailing KEY=VALUE arguments are megalite-train "
        "overrides for the memory plan (parallel.tp=4, train.micro_batch_size=2, ...).",
    )
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", default="h100", help="GPU type, e.g. h100, 'h100 pcie', a100, mi300x")
    p.add_argument("--hours", type=float, required=True, help="wall-clock hours of training")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU, 0-1 (default 0.4)")
    p.add_argument("--precision", choices=PEAK_PRECISIONS, default="bf16", help="peak to use")
    p.add_argument("--peak-tflops", type=float, help="dense peak per GPU, overrides the table")
    p.add_argument("--gpu-mem-gb", type=float, help="memory per GPU, overrides the table")
    p.add_argument(
        "--inference-tokens-per-param",
        type=float,
        default=INFERENCE_TOKENS_PER_PARAM,
        help=f"tokens per parameter of the inference-heavy plan (default "
        f"{INFERENCE_TOKENS_PER_PARAM:g})",
    )
    p.add_argument(
        "--model",
        help="preset for the memory plan and wall time (default: the "
        "preset closest to the compute-optimal size)",
    )
    p.add_argument("--layout", default="fsdp", help="conf/parallel preset (default fsdp)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-batch")
    p.add_argument("--seq-len", type=int, help="default: min(8192, the model's max_seq_len)")
    p.add_argument(
        "--tokens",
        type=float,
        help="tokens to train on for the wall time (default: 20 per parameter of the model)",
    )
    p.add_argument(
        "--recommend-layout",
        action="store_true",
        help="search pp x dp x tp x micro-batches x AC layouts that fit, best first "
        "(parallel/pp_plan.py)",
    )
    p.add_argument(
        "--global-batch",
        type=int,
        help="sequences per optimizer step for --recommend-layout (default: 4M tokens, "
        "Llama 3's starting batch)",
    )
    p.add_argument("overrides", nargs="*", help="megalite-train overrides (KEY=VALUE)")
    return p


# ------------------------------------------------------------------------- megalite-gpu-check
def gpu_check() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-gpu-check",
        description="GPU acceptance check: kernels vs reference, training on a world-size-1 "
        "NCCL group, compile recompiles, throughput. Prints markdown tables, writes CSV.",
    )
    p.add_argument("--out", default="gpu-check", help="output dir (default: gpu-check)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter, gloo)"
    )
    p.add_argument(
        "--only",
        default=",".join(GPU_CHECK_SECTIONS),
        help=f"comma-separated subset of {GPU_CHECK_SECTIONS}",
    )
    return p


# ------------------------------------------------------------------------------ entry points
def _wants_help(argv: list[str]) -> bool:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return any(a in ("-h", "--help") for a in head)


def _entry(module: str, parser: Callable[[], argparse.ArgumentParser], subcommands=None):
    """A console script: `--help` from `parser` (or a subcommand's) here; else `module.main`."""

    def main() -> int:
        argv = sys.argv[1:]
        if _wants_help(argv):
            if subcommands and argv[0] in subcommands:
                subcommands[argv[0]]().parse_args(argv[1:])
            parser().parse_args(argv)  # prints the help and exits
        return importlib.import_module(module).main(argv)

    return main


eval_main = _entry("megalite.evaluate", evaluate, {"harness": harness, "watch": watch})
generate_main = _entry("megalite.generate", generate)
convert_main = _entry("megalite.interop.cli", convert)
bench_main = _entry("megalite.bench", bench)
plan_main = _entry("megalite.plan", plan)
gpu_check_main = _entry("megalite.gpu_check", gpu_check)
