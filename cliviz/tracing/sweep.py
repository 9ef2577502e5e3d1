"""Sweeps: trace a whole data set into one trace file — batched, chunked, resumable, sharded.

A sweep walks the usable rows of a ShapesVQA-style JSONL file in file order. Every sample has a
stable id, ``L<line>:<image path>`` (the JSONL line number and the image path as written in the
file, e.g. ``L12:images/x.png``), stored as ``meta.sample_id`` together with the row's question
type and reference answer.

Work is done in chunks of ``chunk_size`` samples, each split into batches of ``batch_size`` that go
through ONE traced generate (`trace_batch`); after every chunk its traces are appended to the
target file atomically (`TraceSet.append`), so a kill loses at most the chunk in flight. Resuming
skips the sample ids already on disk.

Several processes (``torchrun``): rank ``r`` of ``w`` takes every w-th pending sample starting at
``r`` and appends to its own shard ``FILE.rank<r>.parquet``; once every rank is done, rank 0 merges
``FILE`` (if any) and all shards, sorted by the samples' order in the data file and without
duplicates, into ``FILE`` and removes the shards (`finalize`). The merged file has the same rows in
the same order as a single-process sweep.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cliviz.data.samples import DataSet, Record
from cliviz.errors import CLIVizError
from cliviz.tracing.traceset import ARROW_SCHEMA, TraceSet, write_traces

__all__ = [
    "SweepItem",
    "SweepStats",
    "plan_sweep",
    "sample_id",
    "shard_path",
    "existing_shards",
    "read_done",
    "check_resumable",
    "check_same_model",
    "run_sweep",
    "finalize",
]


@dataclass(frozen=True)
class SweepItem:
    index: int  # position among the data set's usable rows: the order of the final file
    sample_id: str
    record: Record


@dataclass
class SweepStats:
    written: int = 0  # traces appended by this process
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (samples not traced)


def sample_id(record: Record, data_dir: Path) -> str:
    """``L<line>:<image path>``, the path relative to the JSONL's folder when it lies inside it."""
    path = record.image_path
    try:
        shown = path.relative_to(data_dir).as_posix()
    except ValueError:
        shown = path.as_posix()
    return f"L{record.line}:{shown}"


def plan_sweep(dataset: DataSet, data: str | os.PathLike) -> list[SweepItem]:
    """The data set's usable rows as `SweepItem`s, in file order."""
    path = Path(data)
    data_dir = path if path.is_dir() else path.parent
    items = [SweepItem(i, sample_id(r, data_dir), r) for i, r in enumerate(dataset.records)]
    seen: set[str] = set()
    for item in items:  # ids hold the line number, so they are unique; guard anyway
        if item.sample_id in seen:  # pragma: no cover
            raise CLIVizError(f"duplicate sample id {item.sample_id}")
        seen.add(item.sample_id)
    return items


def shard_path(out: str | os.PathLike, rank: int) -> Path:
    """``FILE.parquet`` -> ``FILE.rank<rank>.parquet`` (same folder)."""
    out = Path(out)
    suffix = out.suffix or ".parquet"
    stem = out.stem if out.suffix else out.name
    return out.with_name(f"{stem}.rank{rank}{suffix}")


def existing_shards(out: str | os.PathLike) -> list[Path]:
    """Shard files of `out` left on disk (by any world size), sorted by rank."""
    out = Path(out)
    suffix = out.suffix or ".parquet"
    stem = out.stem if out.suffix else out.name
    pattern = re.compile(rf"^{re.escape(stem)}\.rank(\d+){re.escape(suffix)}$")
    folder = out.absolute().parent
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def read_done(paths: Sequence[Path]) -> pa.Table:
    """Rows already on disk in `paths` (missing files skipped); CLIVizError on a corrupt or foreign file."""
    tables = [TraceSet.read(p).table for p in paths if p.exists()]
    return pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()


def check_resumable(done: pa.Table, items: Sequence[SweepItem], out: Path) -> None:
    """Refuse to resume into a file whose rows are not samples of this data set."""
    known = {item.sample_id for item in items}
    foreign = [s for s in done.column("sample_id").to_pylist() if s not in known]
    if foreign:
        example = next((s for s in foreign if s is not None), None)
        what = f"e.g. {example!r}" if example else "without a sample id"
        raise CLIVizError(
            f"--resume: {out} holds {len(foreign)} trace(s) that are not samples of this data set ({what}); "
            "resume with the same --data, or choose another --out"
        )


def check_same_model(done: pa.Table, out: Path, config_hash: str) -> None:
    """Refuse to resume with a model other than the one that wrote the rows on disk."""
    others = sorted(set(done.column("config_hash").to_pylist()) - {config_hash})
    if others:
        raise CLIVizError(
            f"--resume: {out} was swept with another model (config hash {others[0]}, this model "
            f"{config_hash}); resume with the same --model, or choose another --out"
        )


def run_sweep(
    model,
    tokenizer,
    items: Sequence[SweepItem],
    target: str | os.PathLike,
    *,
    batch_size: int = 32,
    chunk_size: int = 256,
    max_new_tokens: int | None = None,
    top_k: int = 5,
    on_advance: Callable[[int], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepStats:
    """Trace `items` in chunks of `chunk_size` (batches of `batch_size` per traced generate) and
    append each chunk to `target` atomically. `on_advance(n)` after every batch; `on_chunk(total)`
    after every chunk is on disk (total = traces written so far by this call).

    Images that cannot be read are skipped and counted under ``"unreadable image"``.
    """
    from cliviz.inputs import load_image
    from cliviz.tracing.record import trace_batch

    if batch_size < 1 or chunk_size < 1:
        raise CLIVizError("batch size and chunk size must be at least 1")
    stats = SweepStats()
    skipped: dict[str, int] = defaultdict(int)
    for c0 in range(0, len(items), chunk_size):
        chunk = items[c0 : c0 + chunk_size]
        traces = []
        for b0 in range(0, len(chunk), batch_size):
            batch = chunk[b0 : b0 + batch_size]
            usable, images = [], []
            for item in batch:
                try:
                    images.append(load_image(item.record.image_path))
                    usable.append(item)
                except CLIVizError:
                    skipped["unreadable image"] += 1
            if usable:
                traces += trace_batch(
                    model,
                    tokenizer,
                    images,
                    [it.record.question for it in usable],
                    max_new_tokens=max_new_tokens,
                    top_k=top_k,
                    qtypes=[it.record.qtype for it in usable],
                    references=[it.record.answer for it in usable],
                    sample_ids=[it.sample_id for it in usable],
                )
            if on_advance:
                on_advance(len(batch))
        if traces:
            TraceSet.append(target, traces)
            stats.written += len(traces)
        if on_chunk:
            on_chunk(stats.written)
    stats.skipped = dict(skipped)
    return stats


def finalize(out: str | os.PathLike, items: Sequence[SweepItem], shards: Sequence[Path] = ()) -> int:
    """Make `out` hold every traced sample once, in data-set order; merge and remove `shards`.

    Rewrites `out` (atomically) only when needed: shards to merge, rows out of order or repeated,
    or no file yet (an empty trace file is written then). Returns the number of rows in `out`.
    """
    out = Path(out)
    shards = [Path(s) for s in shards if Path(s).exists()]
    sources = ([out] if out.exists() else []) + shards
    table = read_done(sources)
    order = {item.sample_id: item.index for item in items}
    ids = table.column("sample_id").to_pylist()
    missing = [s for s in ids if s not in order]
    if missing:
        raise CLIVizError(
            f"{out} holds {len(missing)} trace(s) that are not samples of this data set (e.g. {missing[0]!r})"
        )
    index = np.array([order[s] for s in ids], dtype=np.int64)
    sorted_rows = np.argsort(index, kind="stable")
    keep = sorted_rows[np.r_[True, np.diff(index[sorted_rows]) != 0]] if len(index) else sorted_rows
    in_place = out.exists() and not shards and len(keep) == len(index) and np.all(np.diff(index) > 0)
    if not in_place:
        write_traces(out, TraceSet.from_table(table.take(pa.array(keep, pa.int64()))))
        for shard in shards:
            if shard.resolve() != out.resolve():
                shard.unlink(missing_ok=True)
    return len(keep)
