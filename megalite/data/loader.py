"""Training-side data: check the dataset against the model, stream training batches per rank with
exactly resumable state, and read the held-out split for evaluation.

The training stream is a mosaicml-streaming `StreamingDataset` over the streams of `data.dir` /
`data.streams` (`streams.py`), mixed by `proportion`, shuffled from the seed and partitioned over
ranks, with a `StreamingDataLoader` on top. Its global sample order depends only on the data, the
seed and `num_canonical_nodes` (recorded in the state), not on the number of ranks: each micro-step
consumes the next micro_batch_size x ranks samples of that order, rank r taking every ranks-th one.
The state in a checkpoint is the position in that order (samples consumed this epoch), so

- a resume continues with the very next batch: the sample sequence equals an uninterrupted run's;
- a resume on another world size continues the epoch from the same position, every remaining
  sample once; with the same global batch size each optimizer step gets the same samples as in
  the uninterrupted run (tested with real multi-rank loading in tests/data/test_world_size.py).

Evaluation reads the validation shards by index (no shuffling, no stream state), so every
evaluation sees the same tokens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megalite.config import DataConfig, ModelConfig
from megalite.data import shm
from megalite.data.common import (
    INDEX,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    DataError,
    file_sha256,
    read_manifest,
)
from megalite.data.streams import (
    Source,
    check_index,
    check_shards,
    fetch_manifest,
    hash_problems,
    index_shards,
    resolve,
    split_by_bytes,
)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# -------------------------------------------------------------------------------- preflight
def check_dataset(cfg: DataConfig, model: ModelConfig) -> dict:
    """Checks every stream of `cfg` before any work starts: a prepared dataset is there (remote
    manifests and indexes are fetched into the local cache), shards read in place are intact,
    seq_len matches, one tokenizer for all streams (and `data.tokenizer_sha256` if pinned), and
    the vocabulary fits the model. Returns the manifest (of the only stream, or the first one
    with a `streams` summary for a mixture)."""
    manifests = []
    for source in resolve(cfg):
        m = fetch_manifest(source, cfg.download_timeout, cfg.prepare_hint)
        _check_stream(cfg, model, source, m)
        manifests.append((source, m))
    first_source, first = manifests[0]
    for source, m in manifests[1:]:
        if m["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise DataError(
                f"{source.key} was tokenized with another tokenizer than {first_source.key} "
                f"(tokenizer_sha256 {m['tokenizer_sha256'][:12]}... vs "
                f"{first['tokenizer_sha256'][:12]}...); prepare it again with --tokenizer "
                f"<{first_source.name}>/tokenizer.json"
            )
    if cfg.tokenizer_sha256 and first["tokenizer_sha256"] != cfg.tokenizer_sha256:
        raise DataError(
            f"{first_source.key} was tokenized with tokenizer_sha256="
            f"{first['tokenizer_sha256']} but data.tokenizer_sha256={cfg.tokenizer_sha256}; "
            "prepare the data with the model's tokenizer (--tokenizer), or update the pin"
        )
    if len(manifests) == 1:
        return first
    summary = dict(first)
    # A unigram baseline of the mixed validation set is not any one stream's.
    summary["unigram_val_loss"] = None
    summary["streams"] = [
        {"name": s.name, "proportion": s.proportion, "samples": m["samples"]} for s, m in manifests
    ]
    return summary


def _check_stream(cfg: DataConfig, model: ModelConfig, source: Source, m: dict) -> None:
    hint = cfg.prepare_hint
    root = Path(source.local)
    tok_path = root / TOKENIZER
    if not tok_path.is_file():
        raise DataError(f"{str(tok_path)!r} is missing; re-run `{hint}`")
    if file_sha256(tok_path) != m.get("tokenizer_sha256"):
        raise DataError(
            f"{str(tok_path)!r} does not match the tokenizer_sha256 recorded in manifest.json: "
            "the shards were tokenized with another tokenizer; re-run megalite-data prepare"
        )
    if m["seq_len"] != cfg.seq_len:
        raise DataError(
            f"data.seq_len={cfg.seq_len} but the shards of {source.key} were packed at seq_len="
            f"{m['seq_len']}; set data.seq_len={m['seq_len']} or re-prepare"
        )
    if m["vocab_size"] > model.vocab_size:
        raise DataError(
            f"the tokenizer of {source.key} has {m['vocab_size']} tokens but "
            f"model.vocab_size={model.vocab_size}; set model.vocab_size>={m['vocab_size']}"
        )
    splits = ["train"] + (["val"] if m["samples"].get("val") else [])
    for split in splits:
        check_index(source, split, m, cfg.download_timeout, hint)
        # Sizes and headers only: this runs before the process group exists, so it must stay
        # far inside the rendezvous timeout; hashes come later (`verify_shard_hashes`).
        if source.remote is None and cfg.verify_shards != "none" and _local_rank() == 0:
            check_shards(root / split, source.key)


def verify_shard_hashes(cfg: DataConfig, rank: int, world_size: int) -> list[str]:
    """With `data.verify_shards=hash`, this rank's share of the sha1 checks of the shards read in
    place (remote shards are hashed by mosaicml-streaming as they download): the shards of all
    streams and splits are dealt over the ranks by size, so each is hashed once per job and the
    ranks finish together. Returns the problems this rank found, one message per bad file;
    empty with any other setting. Call it on every rank once the process group exists (hashing
    a large dataset takes far longer than a rendezvous may wait), then gather the problems and
    raise one error. Assumes check_dataset has passed (indexes present)."""
    if cfg.verify_shards != "hash":
        return []
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    shards = []
    for source in resolve(cfg):
        if source.remote is not None:
            continue
        for split in SPLITS:
            if (Path(source.local) / split / INDEX).is_file():
                shards += index_shards(Path(source.local) / split, source.key)
    return hash_problems(split_by_bytes(shards, world_size)[rank])


# ------------------------------------------------------------------------------- datasets
def _dataset_class():
    """StreamingDataset that turns a failed shard download or hash check into a DataError
    naming the shard and the stream (streaming itself only logs it from a background thread
    and ends the epoch early), and registers its shared memory safely (`shm.py`)."""
    from streaming import StreamingDataset

    class MegaliteDataset(StreamingDataset):
        def __init__(self, *, sources: list[Source], **kwargs) -> None:
            with shm.megalite_registration():
                super().__init__(**kwargs)
            self.sources = sources
            self._failure: str | None = None
            self._download_lock = threading.Lock()

        def _explain(self, shard_id: int, error: BaseException) -> str:
            stream_id = int(self.stream_per_shard[shard_id])
            source, stream = self.sources[stream_id], self.streams[stream_id]
            basenames = [info.basename for info, _ in self.shards[shard_id].file_pairs]
            where = source.remote_path(stream.split) if source.remote else source.local
            return (
                f"{source.key}: shard {stream.split}/{basenames[0]} from {where} could not be "
                f"used ({type(error).__name__}: {error}); a sha1 mismatch means the file is "
                "corrupted: upload it again from the prepared dataset (or re-run megalite-data "
                "prepare); a missing file means the upload is incomplete"
            )

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            # Streaming frees cache space for a download before it starts but counts the bytes
            # only when it ends, so two downloads of one process at once could both fit in the
            # same free space and overshoot cache_limit; one at a time per process, they cannot.
            with self._download_lock:
                try:
                    super().prepare_shard(shard_id, blocking)
                except Exception as e:
                    self._failure = self._explain(shard_id, e)
                    raise

        def __getstate__(self) -> dict:
            state = self.__dict__.copy()
            state.pop("_download_lock", None)  # locks do not pickle (spawned loader workers)
            return state

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)
            self._download_lock = threading.Lock()

        def get_item(self, sample_id: int, retry: int = 7):
            try:
                return super().get_item(sample_id, retry)
            except DataError:
                raise
            except Exception as e:
                if self._failure is not None:
                    raise DataError(self._failure) from e
                raise

        def __iter__(self):
            yield from super().__iter__()
            if hasattr(self, "_event") and self._event.is_set():
                raise DataError(self._failure or "a background download thread failed")

    return MegaliteDataset


def _has_split(cfg: DataConfig, source: Source, split: str) -> bool:
    if source.remote is None:
        return (Path(source.local) / split / INDEX).is_file()
    local_manifest = Path(source.local) / MANIFEST
    if local_manifest.is_file():
        m = read_manifest(source.local)
    else:
        m = fetch_manifest(source, cfg.download_timeout, cfg.prepare_hint)
    return bool(m["samples"].get(split))


def _open(cfg: DataConfig, split: str, **kwargs):
    """A dataset over `split` of every stream that has it; None when none has it."""
    from streaming import Stream

    sources = resolve(cfg)
    if split != "train":
        sources = [s for s in sources if _has_split(cfg, s, split)]
        if not sources:
            return None
    streams = [
        Stream(
            remote=s.remote,
            local=s.local,
            split=split,
            proportion=s.proportion,
        )
        for s in sources
    ]
    return _dataset_class()(
        sources=sources,
        streams=streams,
        validate_hash="sha1",
        download_timeout=cfg.download_timeout,
        cache_limit=cfg.cache_limit,
        **kwargs,
    )


def collate(samples: list[dict]) -> torch.Tensor:
    """int64 (B, seq_len + 1) tokens (a copy: the shard arrays are read-only views). A
    `doc_starts` column, when the shards have one, is not read: no model consumes it yet."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def _fingerprint(dataset) -> dict:
    """What the loader state is a position in: each stream's train index and the mixture."""
    return {
        "index_sha256": [file_sha256(Path(s.local) / "train" / INDEX) for s in dataset.sources],
        "proportions": [s.proportion for s in dataset.sources],
        "epoch_size": int(dataset.epoch_size),
    }


class TrainStream:
    """Endless iterator of (inputs, targets) micro-batches for this rank, resumable exactly.

    `replication` > 1 gives each group of that many consecutive ranks the same batches (tensor
    parallelism); the world size must be a multiple of it."""

    def __init__(
        self, cfg: DataConfig, micro_batch_size: int, seed: int, replication: int = 1
    ) -> None:
        from streaming import StreamingDataLoader

        self.dataset = _open(
            cfg,
            "train",
            shuffle=cfg.shuffle,
            shuffle_seed=seed,
            shuffle_algo=cfg.shuffle_algo,
            shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes,
            epoch_size=cfg.epoch_size,
            predownload=cfg.predownload,
            batch_size=micro_batch_size,
            replication=replication if replication > 1 else None,
        )
        self.loader = StreamingDataLoader(
            self.dataset,
            batch_size=micro_batch_size,
            num_workers=cfg.num_workers,
            drop_last=True,
            collate_fn=collate,
        )
        self.fingerprint = _fingerprint(self.dataset)
        self.epoch = 0
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        """Plain ints / strings / lists only (checkpoints load it with weights_only=True)."""
        return {"loader": self.loader.state_dict(), "epoch": self.epoch, "data": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("data")
        if saved is not None and saved != self.fingerprint:
            diff = [k for k in self.fingerprint if saved.get(k) != self.fingerprint[k]]
            raise DataError(
                f"the checkpoint's data position is for other training data (differs in: "
                f"{', '.join(diff)}; checkpoint {[saved.get(k) for k in diff]}, now "
                f"{[self.fingerprint[k] for k in diff]}); resume with the same data.dir / "
                "data.streams and their shards, or start a fresh run"
            )
        # Drop a live iterator first, and rewind streaming's epoch counter: a dataset that has
        # already started an epoch ignores a resume state of that epoch as stale (an in-process
        # rollback loads a position after iterating).
        self._it = None
        self.dataset.next_epoch = state["loader"]["epoch"]
        self.loader.load_state_dict(state["loader"])
        self.epoch = state["epoch"]

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, seq_len) int64, targets the inputs shifted by one."""
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                tokens = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                continue
            return tokens[:, :-1], tokens[:, 1:]

    def close(self) -> None:
        """Stops streaming's download threads of an unfinished epoch (they would otherwise poll
        for the life of the process) and releases the dataset."""
        self._it = None
        iterator = getattr(self.dataset, "_iterator", None)
        if iterator is not None:
            iterator.exit()
        executor = getattr(self.dataset, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        shm.release(self.dataset)
        del self.loader, self.dataset


class ValSet:
    """The held-out split of every stream that has one, read by index. The samples used are
    spread evenly over the whole split (all streams), and rank r takes every world_size-th."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int) -> None:
        self.dataset = _open(cfg, "val", shuffle=False, batch_size=1)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.dataset.num_samples if self.dataset is not None else 0

    def batches(
        self, micro_batch_size: int, max_batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """At most max_batches full batches per rank, the same on every call. Every rank gets
        the same number of batches so collectives stay matched."""
        per_rank = len(self) // self.world_size
        n_batches = min(max_batches, per_rank // micro_batch_size) if max_batches else 0
        picked = n_batches * micro_batch_size * self.world_size
        for b in range(n_batches):
            idx = [
                ((b * micro_batch_size + i) * self.world_size + self.rank) * len(self) // picked
                for i in range(micro_batch_size)
            ]
            tokens = collate([self.dataset.get_item(i) for i in idx])
            yield tokens[:, :-1], tokens[:, 1:]

    def close(self) -> None:
        if self.dataset is not None:
            shm.release(self.dataset)
        del self.dataset
