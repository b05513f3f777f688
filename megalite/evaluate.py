"""`megalite-eval`: the perplexity of a checkpoint on a validation split or a text file; and what
every inference tool (eval, generate, export) shares beside the weights, which
`checkpoint.load_for_inference` loads: the run's data config, the tokenizer, EOS ids, the device.

megalite-eval runs/cpu_demo                           # newest checkpoint, the run's val split
megalite-eval runs/cpu_demo/checkpoints/step_00000400 --text notes.txt --json ppl.json
megalite-eval converted/ --data-dir data/shakespeare  # a megalite-convert output
megalite-eval harness runs/cpu_demo --tasks hellaswag  # lm-evaluation-harness (harness.py)
megalite-eval watch runs/cpu_demo                     # evaluate each new checkpoint (eval_watch.py)

A checkpoint of any parallel layout loads here: DCP reshards on load, in one process with no
process group. The loss is the mean next-token cross-entropy over every target token (nats);
perplexity is exp(loss). Bits per byte (bpb.py) divides the summed loss by ln 2 and the UTF-8
bytes the target tokens spell: a --text file's own bytes, or the tokenizer's byte count of each
target token of a prepared split.

Shape legend: B batch, T sequence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from megalite import cli_args
from megalite.bpb import bits_per_byte, token_bytes
from megalite.checkpoint import inference_config, load_for_inference, resolve_checkpoint
from megalite.config import ConfigError, DataConfig, ModelConfig
from megalite.data.common import EOS, MANIFEST, TOKENIZER, DataError, read_manifest
from megalite.errors import MegaliteError, cli_error
from megalite.model.transformer import Transformer
from megalite.rundir import RunDir, read_meta


# ---------------------------------------------------------------- what inference shares
def run_data_config(ckpt: Path) -> DataConfig | None:
    """The typed data config of the run that wrote `ckpt` (its run dir's config.yaml), or None
    when `ckpt` is not a step_N dir of a run dir."""
    run = RunDir.of_checkpoint(ckpt)
    if run is None:
        return None
    path = run.config
    if not path.is_file():
        return None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.load(path)
        if "data" not in raw:
            return None
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw.data))
    except (OmegaConfBaseException, ConfigError) as e:
        raise DataError(
            f"the data section of {str(path)!r} cannot be read ({str(e).splitlines()[0]}); "
            "pass --data-dir DIR or --text FILE (and --tokenizer)"
        ) from e


def find_tokenizer(ckpt: Path, override: str | None, data: DataConfig | None) -> Path:
    """--tokenizer, else the checkpoint dir's tokenizer.json (megalite-convert copies it), else
    the run's `<data.dir>/tokenizer.json` (a relative data.dir counts from the current dir, as
    when training)."""
    if override:
        if not Path(override).is_file():
            raise DataError(f"--tokenizer={override!r} does not exist")
        return Path(override)
    if (ckpt / TOKENIZER).is_file():
        return ckpt / TOKENIZER
    data_dir = Path(data.dir) if data is not None and data.dir else None
    if data_dir is not None and (data_dir / TOKENIZER).is_file():
        return data_dir / TOKENIZER
    where = f"nor in the run's data.dir={str(data_dir)!r}" if data_dir else "and no run data.dir"
    raise DataError(
        f"no tokenizer for checkpoint {str(ckpt)!r}: none in the checkpoint dir {where}; "
        "pass --tokenizer PATH/tokenizer.json"
    )


def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{str(path)!r} is not a valid HF tokenizers JSON file ({e})") from e


def eos_ids(meta: dict[str, Any], tokenizer, data: DataConfig | None = None) -> list[int]:
    """End-of-sequence ids: an imported model's own (meta.json), else the one the run's data was
    packed with (its manifest), else megalite's default EOS token, else none."""
    if meta.get("eos_token_ids"):
        return [int(i) for i in meta["eos_token_ids"]]
    if data is not None and data.dir and (Path(data.dir) / MANIFEST).is_file():
        eos = read_manifest(data.dir).get("eos_id")
        if eos is not None:
            return [int(eos)]
    eos = tokenizer.token_to_id(EOS)
    return [] if eos is None else [eos]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision={precision!r} is not one of fp32, bf16")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# -------------------------------------------------------------------------- perplexity
@dataclasses.dataclass
class EvalResult:
    checkpoint: str
    step: int | None
    source: str
    seq_len: int
    samples: int
    tokens: int
    loss: float
    ppl: float
    # UTF-8 bytes the target tokens spell, and the loss in bits per byte (bpb.py).
    bytes: int = 0
    bpb: float = float("nan")


@torch.no_grad()
def mean_loss(
    model: Transformer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    byte_table: torch.Tensor | None = None,
) -> tuple[float, int, int, int]:
    """(mean cross-entropy over every target token, target tokens, samples, bytes the targets
    spell by `byte_table`, or 0 without one). Batches may differ in size and length: each
    batch's mean is weighted by its token count."""
    total, tokens, samples, nbytes = 0.0, 0, 0, 0
    for x_BT, y_BT in batches:
        with autocast_for(precision, device):
            loss = model(x_BT.to(device), y_BT.to(device))
        total += loss.double().item() * y_BT.numel()
        tokens += y_BT.numel()
        samples += x_BT.shape[0]
        if byte_table is not None:
            nbytes += int(byte_table[y_BT.clamp(min=0)].sum())
    if tokens == 0:
        raise DataError("nothing to evaluate: the input has no complete sample")
    return total / tokens, tokens, samples, nbytes


def _group(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Single samples -> batches of equal-length samples (a shorter tail window goes alone)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    n = 0
    for x, y in pairs:
        if xs and (len(xs) == batch_size or x.shape[-1] != xs[0].shape[-1]):
            yield torch.cat(xs), torch.cat(ys)
            xs, ys, n = [], [], n + 1
        if max_batches and n >= max_batches:
            return
        xs.append(x)
        ys.append(y)
    if xs:
        yield torch.cat(xs), torch.cat(ys)


def text_windows(ids: list[int], seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of seq_len + 1 tokens with stride seq_len, as the data pipeline packs them: every
    token after the first is a target exactly once. The tail is a shorter last window, so a
    short file is evaluated in full."""
    for start in range(0, len(ids) - 1, seq_len):
        w = torch.tensor(ids[start : start + seq_len + 1])[None]
        yield w[:, :-1], w[:, 1:]


def open_val(data: DataConfig, model_cfg: ModelConfig):
    """The val split of `data` (a prepared dir or a mixture of streams), checked against the
    model as the trainer checks it."""
    from megalite.data.loader import ValSet, check_dataset

    check_dataset(data, model_cfg)
    if data.seq_len > model_cfg.max_seq_len:
        raise DataError(
            f"the data is packed at seq_len={data.seq_len}, beyond the checkpoint's "
            f"model.max_seq_len={model_cfg.max_seq_len}; prepare it with a shorter --seq-len"
        )
    val = ValSet(data, rank=0, world_size=1)
    if len(val) == 0:
        val.close()
        raise DataError(
            f"{data.dir or 'the run data'} has no validation samples (prepared with "
            "--val-fraction 0?); pass --text FILE or another --data-dir"
        )
    return val


def evaluate(
    ckpt_path: str | Path,
    *,
    text: str | Path | None = None,
    data_dir: str | Path | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int = 0,
    tokenizer: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> EvalResult:
    """Perplexity of a checkpoint on a text file, a prepared dataset's val split, or (default)
    the val split of the run that wrote it."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be >= 1")
    if max_batches < 0:
        raise ConfigError(f"--max-batches={max_batches} must be >= 0 (0: all)")
    ckpt = resolve_checkpoint(ckpt_path)
    dev = resolve_device(device)
    meta = read_meta(ckpt)
    cfg = inference_config(meta, ckpt)
    run = run_data_config(ckpt)
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise DataError(f"--text={str(path)!r} does not exist")
        seq_len = seq_len or (run.seq_len if run is not None else cfg.max_seq_len)
        if not 1 <= seq_len <= cfg.max_seq_len:
            raise ConfigError(
                f"--seq-len={seq_len} must be in [1, model.max_seq_len={cfg.max_seq_len}]"
            )
        tok = load_tokenizer(find_tokenizer(ckpt, tokenizer, run))
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--text={str(path)!r} is not valid UTF-8 ({e})") from e
        # As prepared data: the document followed by EOS (the separator training saw).
        ids = tok.encode(content).ids + eos_ids(meta, tok, run)[:1]
        pairs, source, close = text_windows(ids, seq_len), str(path), None
        # The file's own bytes, unless only part of it is evaluated.
        text_bytes = len(content.encode("utf-8")) if not max_batches else None
    else:
        if seq_len is not None:
            raise ConfigError("--seq-len applies to --text only; a prepared split is pre-packed")
        if data_dir is not None:
            data = DataConfig(dir=str(data_dir), seq_len=read_manifest(data_dir)["seq_len"])
        elif run is not None:
            data = run
        else:
            raise DataError(
                f"checkpoint {str(ckpt)!r} has no run config.yaml naming its data; pass "
                "--data-dir DIR (a prepared dataset) or --text FILE"
            )
        val = open_val(data, cfg)
        seq_len, close, text_bytes = data.seq_len, val.close, None
        tok = _split_tokenizer(data, ckpt, tokenizer)
        source = f"val split of {data.dir or 'the run data streams'}"
        pairs = val.batches(1, len(val))
    table = token_bytes(tok, cfg.vocab_size) if tok is not None and text_bytes is None else None
    model, _ = load_for_inference(ckpt, dev)
    try:
        loss, tokens, samples, nbytes = mean_loss(
            model, _group(pairs, batch_size, max_batches), dev, precision, table
        )
    finally:
        if close is not None:
            close()
    nbytes = text_bytes if text_bytes is not None else nbytes
    return EvalResult(
        checkpoint=str(ckpt),
        step=meta.get("step"),
        source=source,
        seq_len=seq_len,
        samples=samples,
        tokens=tokens,
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),  # capped as the trainer's val_ppl, to stay finite
        bytes=nbytes,
        bpb=bits_per_byte(loss, tokens, nbytes),
    )


def _split_tokenizer(data: DataConfig, ckpt: Path, override: str | None):
    """The tokenizer a prepared split was tokenized with (for its byte counts), or None when it
    cannot be found (bits per byte is then not reported)."""
    try:
        return load_tokenizer(find_tokenizer(ckpt, override, data))
    except DataError:
        return None


# --------------------------------------------------------------------------------- CLI
# Subcommands, each in its own module (lm_eval is imported only when one runs).
SUBCOMMANDS = {"harness": "megalite.harness", "watch": "megalite.eval_watch"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = cli_args.evaluate().parse_args(argv)
    try:
        res = evaluate(
            args.checkpoint,
            text=args.text,
            data_dir=args.data_dir,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            tokenizer=args.tokenizer,
            device=args.device,
            precision=args.precision,
        )
    except MegaliteError as e:
        return cli_error("megalite-eval", e)
    bpb = f", {res.bpb:.4f} bits/byte" if math.isfinite(res.bpb) else ""
    print(
        f"megalite-eval: {res.checkpoint} (step {res.step}) on {res.source}: loss "
        f"{res.loss:.4f} nats/token, perplexity {res.ppl:.2f}{bpb} over {res.tokens:,} tokens "
        f"({res.samples} windows of <= {res.seq_len})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(res), indent=2) + "\n")
    if not math.isfinite(res.loss):
        print("megalite-eval: warning: the loss is not finite", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
