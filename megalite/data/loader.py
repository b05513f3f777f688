"""Training-side data: stream MDS shards per rank with exactly resumable state, read the
held-out split for evaluation, and check the dataset against the model before any work starts.

The training stream is a mosaicml-streaming `StreamingDataset` + `StreamingDataLoader`: it shards
samples across ranks (from RANK / WORLD_SIZE set by torchrun), shuffles deterministically from
the seed, and its `state_dict()` records the position in the epoch, so a resumed run continues
with the very next batch. Evaluation reads the validation shards by index (no shuffling, no
stream state), so every evaluation sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megalite.config import DataConfig, ModelConfig
from megalite.data.prepare import TOKENIZER, DataError, file_sha256, read_manifest


def check_dataset(cfg: DataConfig, model: ModelConfig) -> dict:
    """Checks that `data.dir` is a prepared dataset matching the model; returns its manifest."""
    root = Path(cfg.dir)
    if not root.is_dir():
        raise DataError(
            f"data.dir={cfg.dir!r} does not exist; prepare it first: `{cfg.prepare_hint}`"
        )
    manifest = read_manifest(root)
    for split in ("train", "val"):
        if not (root / split / "index.json").is_file():
            raise DataError(
                f"data.dir={cfg.dir!r} has no {split}/index.json; re-run `{cfg.prepare_hint}`"
            )
    tok_path = root / TOKENIZER
    if not tok_path.is_file():
        raise DataError(f"{str(tok_path)!r} is missing; re-run `{cfg.prepare_hint}`")
    if file_sha256(tok_path) != manifest.get("tokenizer_sha256"):
        raise DataError(
            f"{str(tok_path)!r} does not match the tokenizer_sha256 recorded in manifest.json: "
            "the shards were tokenized with another tokenizer; re-run megalite-data prepare"
        )
    if manifest["seq_len"] != cfg.seq_len:
        raise DataError(
            f"data.seq_len={cfg.seq_len} but the shards in {cfg.dir!r} were packed at seq_len="
            f"{manifest['seq_len']}; set data.seq_len={manifest['seq_len']} or re-prepare"
        )
    if manifest["vocab_size"] > model.vocab_size:
        raise DataError(
            f"the tokenizer of {cfg.dir!r} has {manifest['vocab_size']} tokens but "
            f"model.vocab_size={model.vocab_size}; set model.vocab_size>={manifest['vocab_size']}"
        )
    return manifest


def collate_tokens(samples: list[dict]) -> torch.Tensor:
    """Stacks samples' token arrays into one int64 (B, seq_len + 1) tensor (a copy: the shard
    arrays are read-only views)."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


class TrainStream:
    """Endless iterator of (inputs, targets) micro-batches for this rank, resumable exactly."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, seed: int) -> None:
        from streaming import StreamingDataLoader, StreamingDataset

        self.dataset = StreamingDataset(
            local=str(Path(cfg.dir) / "train"),
            shuffle=cfg.shuffle,
            shuffle_seed=seed,
            batch_size=micro_batch_size,
            validate_hash="sha1",
        )
        self.loader = StreamingDataLoader(
            self.dataset,
            batch_size=micro_batch_size,
            num_workers=cfg.num_workers,
            drop_last=True,
            collate_fn=collate_tokens,
        )
        self.epoch = 0
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.epoch = state["epoch"]
        self._it = None

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                tokens = next(self._it)
                return tokens[:, :-1], tokens[:, 1:]
            except StopIteration:
                self._it = None
                self.epoch += 1

    def close(self) -> None:
        self._it = None
        del self.loader, self.dataset


class ValSet:
    """The held-out split, read by index: rank r takes samples r, r + world, r + 2 world, ..."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int) -> None:
        from streaming import StreamingDataset

        self.dataset = StreamingDataset(
            local=str(Path(cfg.dir) / "val"), shuffle=False, batch_size=1
        )
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.dataset.num_samples

    def batches(
        self, micro_batch_size: int, max_batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """At most max_batches full batches per rank, the same on every call. Every rank gets
        the same number of batches so collectives stay matched."""
        per_rank = len(self) // self.world_size
        n_batches = min(max_batches, per_rank // micro_batch_size) if max_batches else 0
        for b in range(n_batches):
            idx = [
                (b * micro_batch_size + i) * self.world_size + self.rank
                for i in range(micro_batch_size)
            ]
            tokens = collate_tokens([self.dataset.get_item(i) for i in idx])
            yield tokens[:, :-1], tokens[:, 1:]

    def close(self) -> None:
        del self.dataset
