"""`prepare` as N independent tasks over the input files, and the merge that joins them.

Task k of N scans the input files whose position in reading order is k modulo N (decode,
blocklist, heuristics, language, quality, PII, decontamination: scan.py) in `workers` processes
and writes its result, the removed documents and, for every survivor, its exact-dedup key, split
hash and MinHash signature, to `<work>/task-0000k-of-0000N.npz`, atomically (a temporary file
renamed). A task whose result is there, for the same options and unchanged input files, is done:
re-running the command skips it, so a failed task is rerun alone. The work dir is
`<out parent>/.<out name>.tasks/<hash of the plan>`: other options or inputs get another one.

The merge reads every task's result in input order, removes exact duplicates (first occurrence
kept) and near duplicates (MinHash LSH over all signatures, so duplicates in different tasks'
files are found; dedup.py), and hands prepare.py the per-document decisions; prepare.py assigns
the splits, tokenizes and writes one manifest. The result depends on the input order only: one
task and four tasks keep the same documents.

Executors: `local` runs the missing tasks as processes on this machine (up to `workers` at a
time); `slurm` submits them as a job array plus a merge job that starts after the array
succeeds (`afterok`), with sbatch (slurm_prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalite.data.common import DataError
from megalite.data.dedup import near_duplicates, stack
from megalite.data.readers import InputFile, iter_raw
from megalite.data.scan import DocScan, ScanSettings, scan_chunk
from megalite.data.workers import Bars, chunks, doc_size, ordered_map, worker_pool

TRAIN, VAL = 1, 2  # per-document decisions; 0 = removed
RESULT_FORMAT = 2  # 2: npz + JSON (1 was a pickle)


@dataclass
class Plan:
    """The tasks of one prepare: its files, task count, work dir and the scan settings."""

    files: list[InputFile]
    tasks: int
    work: Path
    settings: ScanSettings

    def task_files(self, k: int) -> list[int]:
        return [i for i in range(len(self.files)) if i % self.tasks == k]

    def result_path(self, k: int) -> Path:
        return self.work / f"task-{k:05d}-of-{self.tasks:05d}.npz"

    def stats_path(self, k: int) -> Path:
        return self.result_path(k).with_suffix(".json")

    def done(self, k: int) -> bool:
        """The task's result exists and its files have not changed since it ran. The stats
        are written after the result, so a result without matching stats is redone."""
        stats = self.stats_path(k)
        if not (self.result_path(k).is_file() and stats.is_file()):
            return False
        expected = [list(_stat(self.files[i])) for i in self.task_files(k)]
        return json.loads(stats.read_text()) == expected

    def missing(self) -> list[int]:
        return [k for k in range(self.tasks) if not self.done(k)]


def _stat(f: InputFile) -> tuple[str, int, int]:
    return (str(f.path), f.size, f.mtime_ns)


def make_plan(
    files: list[InputFile],
    tasks: int,
    out: Path,
    settings: ScanSettings,
    fingerprint: dict,
    work_dir: str | None = None,
) -> Plan:
    """`fingerprint`: every option that changes a task's result (hashed into the work dir)."""
    key = json.dumps(
        {"files": [str(f.path.resolve()) for f in files], "tasks": tasks, **fingerprint},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(work_dir) if work_dir else work_root(out)
    return Plan(files, tasks, root / digest, settings)


def work_root(out: Path) -> Path:
    return out.parent / f".{out.name}.tasks"


# --------------------------------------------------------------------------------- one task
def run_task(plan: Plan, k: int, workers: int = 1, bars: Bars | None = None) -> Path:
    """Scans task k's files and writes its result; returns the result's path."""
    if not 0 <= k < plan.tasks:
        raise DataError(
            f"--task={k} is not a task of --tasks={plan.tasks}; give 0..{plan.tasks - 1}"
        )
    bars = bars or Bars(False)
    mine = [plan.files[i] for i in plan.task_files(k)]
    task = bars.add(f"scan task {k}/{plan.tasks}", sum(f.size for f in mine))
    per_file: list[list[DocScan]] = []
    sigs: list[np.ndarray] = []
    ctx = {"scan": plan.settings}
    with worker_pool(workers, ctx) as pool:
        for f in mine:
            docs: list[DocScan] = []
            items = ((d, doc_size(d), pos) for d, pos in iter_raw([f], plan.settings.text_field))
            for (_, pos), results in ordered_map(pool, scan_chunk, chunks(items)):
                for doc, sig in results:
                    docs.append(doc)
                    if sig is not None:
                        sigs.append(sig)
                bars.update(task, pos)
            per_file.append(docs)
    stats = [_stat(f) for f in mine]
    meta = {
        "format": RESULT_FORMAT,
        "task": k,
        "docs": [[_doc_row(d) for d in docs] for docs in per_file],
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if plan.settings.near:
        arrays["signatures"] = stack(sigs, plan.settings.near.num_perm)
    plan.work.mkdir(parents=True, exist_ok=True)
    path = plan.result_path(k)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # npz + JSON, no pickle: a result file is data, never code
        np.savez(f, **arrays)
    os.replace(tmp, path)  # a task killed mid-write leaves no result: it is simply not done
    _write_atomic(plan.stats_path(k), json.dumps(stats))
    return path


def _doc_row(d: DocScan) -> list:
    key = d.key.hex() if d.key is not None else None
    return [d.where, d.nbytes, d.removed, key, d.split_hash, d.replaced, list(d.pii)]


def _doc_from_row(row: list) -> DocScan:
    where, nbytes, removed, key, split, replaced, pii = row
    return DocScan(
        where,
        nbytes,
        tuple(removed) if removed is not None else None,
        bytes.fromhex(key) if key is not None else None,
        split,
        replaced,
        tuple(pii),
    )


def _load_result(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        signatures = z["signatures"] if "signatures" in z.files else None
    if meta.get("format") != RESULT_FORMAT:
        raise DataError(
            f"{path}: task result format {meta.get('format')} is not {RESULT_FORMAT}; "
            "rerun the task"
        )
    meta["docs"] = [[_doc_from_row(r) for r in docs] for docs in meta["docs"]]
    meta["signatures"] = signatures
    return meta


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_task_process(plan: Plan, k: int) -> int:
    run_task(plan, k, workers=1)
    return k


def run_local(plan: Plan, workers: int, bars: Bars) -> list[int]:
    """Runs the tasks that are not done; returns which ran. One task runs here with `workers`
    processes; several run as up to `workers` processes of one worker each. A failed task does
    not stop the others: their results are kept, and the error names every failed task."""
    missing = plan.missing()
    if not missing:
        return []
    if plan.tasks == 1:
        run_task(plan, 0, workers, bars)
        return missing
    import multiprocessing

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bar = bars.add(f"tasks ({len(missing)} to run)", len(missing), unit="tasks")
    failed: dict[int, BaseException] = {}
    finished = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(missing)), mp_context=ctx) as ex:
        futures = {ex.submit(_run_task_process, plan, k): k for k in missing}
        for fut, k in futures.items():
            try:
                fut.result()
            except Exception as e:  # collected: every task gets its chance before we report
                failed[k] = e
            finished += 1
            bars.update(bar, finished)
    if failed:
        first = min(failed)
        raise DataError(
            f"{len(failed)} of {plan.tasks} prepare tasks failed "
            f"({', '.join(map(str, sorted(failed)))}); task {first}: {failed[first]}. The "
            f"finished tasks' results are kept in {plan.work}: fix the cause and re-run the "
            "same command, which runs only the failed tasks"
        ) from failed[first]
    return missing


# ------------------------------------------------------------------------------------ merge
@dataclass
class Merged:
    decisions: bytearray  # per input document, in reading order: 0 removed, TRAIN, VAL
    split_hashes: list[int]  # per kept document
    removed: list[dict]  # removed.jsonl records, in input order
    documents_in: int = 0
    dropped: Counter = field(default_factory=Counter)  # heuristics + read reasons
    stages: Counter = field(default_factory=Counter)  # stage -> documents
    stage_bytes: Counter = field(default_factory=Counter)
    duplicates: int = 0
    near_duplicates: int = 0
    replaced_utf8: int = 0
    pii: dict = field(default_factory=lambda: {"email": 0, "ip": 0, "phone": 0})
    bytes_kept: int = 0


def merge(plan: Plan, bars: Bars) -> Merged:
    """Joins the tasks' results: exact and near dedup across all of them, in input order."""
    missing = plan.missing()
    if missing:
        raise DataError(
            f"prepare tasks {missing} of {plan.tasks} have no result in {plan.work} (not run, "
            "failed, or their input files changed since); run them (`--task K`) before `--merge`"
        )
    by_file: dict[int, list[DocScan]] = {}
    sig_parts: dict[int, list[np.ndarray]] = {}
    for k in range(plan.tasks):
        result = _load_result(plan.result_path(k))
        row = 0
        for i, docs in zip(plan.task_files(k), result["docs"]):
            by_file[i] = docs
            n = sum(1 for d in docs if d.removed is None)
            if result["signatures"] is not None:
                sig_parts[i] = result["signatures"][row : row + n]
            row += n
    m = Merged(bytearray(), [], [])
    seen: dict[bytes, str] = {}
    candidates: list[tuple[int, DocScan]] = []
    rows: list[np.ndarray] = []  # the candidates' signatures
    for i in range(len(plan.files)):
        survivor = 0
        for doc in by_file[i]:
            idx = len(m.decisions)
            m.documents_in += 1
            for j, name in enumerate(("email", "ip", "phone")):
                m.pii[name] += doc.pii[j]
            if doc.removed is not None:
                stage, reason, match = doc.removed
                if stage in ("read", "heuristics"):
                    m.dropped[reason] += 1
                _remove(m, idx, doc, stage, reason, match)
                continue
            survivor += 1
            if doc.key is not None and doc.key in seen:
                m.duplicates += 1
                _remove(m, idx, doc, "exact_dedup", "same normalized text", seen[doc.key])
                continue
            if doc.key is not None:
                seen[doc.key] = doc.where
            m.decisions.append(TRAIN)
            candidates.append((idx, doc))
            if i in sig_parts:
                rows.append(sig_parts[i][survivor - 1])
    if plan.settings.near is not None:
        total = len(candidates)
        task = bars.add("near-dedup (LSH)", total, unit="docs")
        sigs = stack(rows, plan.settings.near.num_perm)
        dups = near_duplicates(sigs, plan.settings.near, lambda n: bars.update(task, n))
        bars.update(task, total)
        for c, kept in sorted(dups.items()):
            idx, doc = candidates[c]
            m.decisions[idx] = 0
            m.near_duplicates += 1
            _remove(m, idx, doc, "near_dedup", "MinHash LSH", candidates[kept][1].where, pos=True)
    for idx, doc in candidates:
        if m.decisions[idx]:
            m.split_hashes.append(doc.split_hash)
            m.replaced_utf8 += doc.replaced
            m.bytes_kept += doc.nbytes
    m.removed.sort(key=lambda r: r["_index"])
    for r in m.removed:
        del r["_index"]
    return m


def _remove(
    m: Merged, idx: int, doc: DocScan, stage: str, reason: str, match, pos: bool = False
) -> None:
    """Records a removed document; `pos`: its decision is already in place (set it to 0)."""
    if not pos:
        m.decisions.append(0)
    m.stages[stage] += 1
    m.stage_bytes[stage] += doc.nbytes
    record = {"source": doc.where, "stage": stage, "reason": reason, "bytes": doc.nbytes}
    if match is not None:
        record["match"] = match
    record["_index"] = idx
    m.removed.append(record)
