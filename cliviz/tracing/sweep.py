"""Sweeps: trace a whole data set into one trace set — batched, chunked, resumable, sharded.

`run_sweep(data, out, ...)` is the whole job (`cliviz sweep` parses its options and prints what it
returns). A sweep walks the usable rows of a ShapesVQA-style JSONL file in file order. Every
sample has a stable id, ``line<n>:<image path>`` (the JSONL line number and the image path as
written in the file, e.g. ``line12:images/x.png``; not ``L12``, which reads as LLM layer 12), stored
as ``meta.sample_id`` together with the row's question type and reference answer.

Work is done in chunks of ``chunk_size`` samples, each split into batches of ``batch_size`` that go
through ONE traced generate (`trace_batch`); every chunk becomes one part file of the set
(`append_traces`), so a kill loses at most the chunk in flight and an append costs the same at the
millionth trace as at the first. Resuming skips the sample ids already in the set.

Several processes (``torchrun``, joined through `cliviz.train.distributed`): rank ``r`` of ``w``
takes every w-th pending sample starting at ``r`` and writes its own parts
(``part-<chunk>-r<r>.parquet``) into the same folder: no merge, nothing rewritten. Rows of a
single-process sweep follow the data file; a sharded set is ordered by (chunk, rank) — sort by
``sample_id``'s line number when the data order matters.

Locks: the process of rank 0 holds the set's lock for the whole run (a second sweep into the same
set is refused at once), every rank the lock of its own parts.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliviz.data.samples import DataSet, Record
from cliviz.errors import CLIVizError, Interrupted
from cliviz.launch import Dist
from cliviz.tracing import store
from cliviz.tracing.compact import Compact
from cliviz.tracing.traceset import append_traces

__all__ = [
    "SweepItem",
    "SweepStats",
    "SweepResult",
    "plan_sweep",
    "sample_id",
    "done_rows",
    "check_resumable",
    "check_same_model",
    "trace_items",
    "run_sweep",
]

BAD_QUESTION = "question empty, too long or outside the model's vocabulary"


@dataclass(frozen=True)
class SweepItem:
    index: int  # position among the data set's usable rows
    sample_id: str
    record: Record


@dataclass
class SweepStats:
    written: int = 0  # traces appended by this process
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (samples not traced)


@dataclass
class SweepResult:
    """What a sweep did: what `cliviz sweep` prints."""

    out: Path
    total: int  # traces in the set now
    usable: int  # usable samples in the data set
    traced: int  # traced by this run (all ranks)
    already: int  # in the set before this run (resume)
    world: int  # processes
    skipped: dict[str, int]  # reason -> samples not traced (malformed lines, missing images...)
    compact: Compact


def sample_id(record: Record, data_dir: Path) -> str:
    """``line<n>:<image path>``, the path relative to the JSONL's folder when it lies inside it."""
    path = record.image_path
    try:
        shown = path.relative_to(data_dir).as_posix()
    except ValueError:
        shown = path.as_posix()
    return f"line{record.line}:{shown}"


def plan_sweep(dataset: DataSet, data: str | os.PathLike) -> list[SweepItem]:
    """The data set's usable rows as `SweepItem`s, in file order."""
    path = Path(data)
    data_dir = path if path.is_dir() else path.parent
    return [SweepItem(i, sample_id(r, data_dir), r) for i, r in enumerate(dataset.records)]


def done_rows(out: Path) -> tuple[list[str | None], list[str]]:
    """(sample ids, config hashes) of the traces already in the set at `out` — two columns read,
    every part's footer checked; CLIVizError on a corrupt or foreign file."""
    parts = store.open_parts(out, "resumes")
    cols = store.read_columns(parts, ["sample_id", "config_hash"])
    return cols["sample_id"], cols["config_hash"]


def check_resumable(done_ids: Sequence[str | None], items: Sequence[SweepItem], out: Path) -> None:
    """Refuse to resume into a set whose rows are not samples of this data set."""
    known = {item.sample_id for item in items}
    foreign = [s for s in done_ids if s not in known]
    if foreign:
        example = next((s for s in foreign if s is not None), None)
        what = f"e.g. {example!r}" if example else "without a sample id"
        raise CLIVizError(
            f"--resume: {out} holds {len(foreign)} trace(s) that are not samples of this data set ({what}); "
            "resume with the same --data, or choose another --out"
        )


def check_same_model(done_hashes: Sequence[str], out: Path, config_hash: str) -> None:
    """Refuse to resume with a model other than the one that wrote the rows on disk."""
    others = sorted(set(done_hashes) - {config_hash})
    if others:
        raise CLIVizError(
            f"--resume: {out} was swept with another model (config hash {others[0]}, this model "
            f"{config_hash}); resume with the same --model, or choose another --out"
        )


def trace_items(
    model,
    tokenizer,
    items: Sequence[SweepItem],
    target: str | os.PathLike,
    *,
    batch_size: int = 32,
    chunk_size: int = 256,
    max_new_tokens: int | None = None,
    top_k: int = 5,
    compact: Compact | None = None,
    rank: int | None = None,
    on_advance: Callable[[int], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> SweepStats:
    """Trace `items` in chunks of `chunk_size` (batches of `batch_size` per traced generate) and
    append each chunk to the set `target` as one part. `on_advance(n)` after every batch;
    `on_chunk(total)` after every chunk is on disk (total = traces written so far by this call).

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
            append_traces(target, traces, compact=compact, rank=rank)
            stats.written += len(traces)
        if on_chunk:
            on_chunk(stats.written)
    stats.skipped = dict(skipped)
    return stats


def _check_out(out: Path) -> None:
    """Before any data or model is read: `out` must be writable where it will be."""
    if out.suffix.lower() in (".jsonl", ".json"):
        raise CLIVizError(f"--out {out} looks like a data file; give a trace set path (e.g. traces.parquet)")
    parent = out.absolute().parent
    blocker = next((a for a in (parent, *parent.parents) if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CLIVizError(f"cannot write trace set {out}: {blocker} is a file, not a folder")
    if not parent.is_dir():
        raise CLIVizError(f"cannot write trace set {out}: folder {parent} does not exist")
    if out.is_dir() and not (out / store.MANIFEST).exists() and not any(out.glob("part-*.parquet")):
        raise CLIVizError(f"--out {out} is a folder that is not a trace set; choose a new path for the set")
    if not os.access(parent, os.W_OK):
        raise CLIVizError(f"cannot write trace set {out}: permission denied in {parent}")


def run_sweep(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    chunk_size: int = 256,
    max_new_tokens: int | None = None,
    resume: bool = False,
    compact: Compact | None = None,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> SweepResult:
    """Trace every usable sample of the data set `data` (a folder with samples.jsonl, or a .jsonl)
    into the trace set `out` (a folder of part files). An existing `out` is refused unless `resume`,
    which skips the samples already there (same data, same model). Under `torchrun` every rank
    calls this; rank 0's result counts the whole set. `on_start(n)` gives this rank's sample count,
    `on_advance(k)` follows its progress. Ctrl-C raises `Interrupted` saying what was kept."""
    from cliviz.data.samples import read_jsonl

    out = Path(out)
    world = Dist.from_env()
    _check_out(out)
    if batch_size < 1 or chunk_size < 1:
        raise CLIVizError("batch size and chunk size must be at least 1")
    dataset = read_jsonl(data)
    items = plan_sweep(dataset, data)
    with _locks(world, out):
        if out.exists() and not resume:
            raise CLIVizError(
                f"{out} already exists: pass --resume to finish that sweep, or choose another --out "
                "(a sweep never overwrites or appends to a set on its own)"
            )
        done_ids, done_hashes = done_rows(out) if out.exists() else ([], [])
        check_resumable(done_ids, items, out)
        done = set(done_ids)
        pending = [item for item in items if item.sample_id not in done]
        skipped = dict(dataset.skipped)
        traced = 0
        try:
            if pending:
                traced, more = _trace_pending(
                    world, model, device, dtype, pending, done_hashes, out, batch_size, chunk_size,
                    max_new_tokens, compact, on_start, on_advance,
                )  # fmt: skip
                for reason, n in more.items():
                    skipped[reason] = skipped.get(reason, 0) + n
        except KeyboardInterrupt:
            try:
                kept = store.count_rows(store.open_parts(out)) if out.exists() else 0
            except CLIVizError:  # a count for the message only
                kept = 0
            raise Interrupted(f"the {kept} trace(s) already written stay in {out}; finish with --resume") from None
        if world.main and not out.exists():  # nothing to trace (every sample skipped): an empty set, so --resume works
            store.append_table(out, _empty(), compact=compact)
        parts = store.open_parts(out)
    return SweepResult(
        out=out,
        total=store.count_rows(parts),
        usable=len(items),
        traced=traced,
        already=len(done & {item.sample_id for item in items}),
        world=world.world_size,
        skipped=skipped,
        compact=parts[0].compact if parts else (compact or Compact()),
    )


def _empty():
    from cliviz.tracing.codec import ARROW_SCHEMA

    return ARROW_SCHEMA.empty_table()


@contextlib.contextmanager
def _locks(world: Dist, out: Path):
    """Rank 0 holds the lock of the set for the whole run, every rank the lock of its own parts; with
    them held, rank 0 removes the temporaries a kill mid-append left behind."""
    from cliviz.atomic import exclusive_writer, remove_stale_temporaries

    with contextlib.ExitStack() as stack:
        if world.main:
            stack.enter_context(exclusive_writer(out, "trace set"))
            remove_stale_temporaries(out)
            store.remove_stale_parts(out)
        yield  # each rank takes the lock of its own parts at every append (`append_traces(rank=...)`)


def _trace_pending(
    world: Dist,
    model_dir,
    device: str,
    dtype: str,
    pending: list[SweepItem],
    done_hashes: list[str],
    out: Path,
    batch_size: int,
    chunk_size: int,
    max_new_tokens: int | None,
    compact: Compact | None,
    on_start: Callable[[int], None] | None,
    on_advance: Callable[[int], None] | None,
) -> tuple[int, dict[str, int]]:
    """Join the torchrun world, load the model, drop unusable questions, trace this rank's share;
    every rank's totals back."""
    import torch.distributed as dist

    from cliviz.inputs import check_model_question
    from cliviz.model.loading import config_hash, load_model
    from cliviz.runtime import resolve_device
    from cliviz.train.distributed import barrier, device_for, init_distributed, shutdown

    dev, _ = resolve_device(device, "auto")
    where = init_distributed(dev)
    try:
        dev = device_for(dev, where)
        net, tok = load_model(model_dir, device=str(dev), dtype=dtype)
        check_same_model(done_hashes, out, config_hash(net))
        usable, bad_questions = [], 0
        for item in pending:
            try:
                check_model_question(item.record.question, tok)
                usable.append(item)
            except CLIVizError:
                bad_questions += 1
        mine = usable[where.rank :: where.world_size]
        barrier(where)  # every rank has read the set above before any rank writes
        if on_start:
            on_start(len(mine))
        stats = trace_items(
            net, tok, mine, out, batch_size=batch_size, chunk_size=chunk_size, max_new_tokens=max_new_tokens,
            compact=compact, rank=where.rank if where.enabled else None, on_advance=on_advance,
        )  # fmt: skip
        results: list[tuple[int, dict[str, int]]] = [(stats.written, stats.skipped)]
        if where.enabled:
            gathered: list[Any] = [None] * where.world_size
            dist.all_gather_object(gathered, (stats.written, stats.skipped))
            results = gathered  # also the barrier before counting
    finally:
        shutdown(where)
    skipped: dict[str, int] = {BAD_QUESTION: bad_questions} if bad_questions else {}
    for _, rank_skipped in results:
        for reason, n in rank_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return sum(w for w, _ in results), skipped
