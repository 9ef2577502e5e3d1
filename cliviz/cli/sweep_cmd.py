"""`cliviz sweep`: trace a whole data set into one Parquet trace file (batched, resumable, torchrun-aware)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cliviz.cli.options import DeviceOpt, DtypeOpt, MaxNewTokensOpt, ModelOpt
from cliviz.cli.preflight import check_writable
from cliviz.errors import CLIVizError, Interrupted


@dataclass(frozen=True)
class _Dist:
    """Where this process sits in a `torchrun` launch (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise CLIVizError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise CLIVizError(f"inconsistent launch: RANK={rank}, WORLD_SIZE={world}")
    return _Dist(rank, world, local)


def _rank_device(ctx: _Dist, device: str) -> str:
    """Under torchrun, `auto`/`cuda` mean this rank's own GPU (LOCAL_RANK)."""
    import torch

    if ctx.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return device


def _init_group(ctx: _Dist, device: str):
    """Join the torchrun process group: gloo on CPU, nccl on CUDA."""
    import torch
    import torch.distributed as dist

    from cliviz.runtime import resolve_device

    dev, _ = resolve_device(device, "auto")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world)
    return dist


def sweep_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")],
    out: Annotated[Path, typer.Option("--out", help="Parquet trace file to write (never overwritten; see --resume).")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per traced generate.")] = 32,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", min=1, help="Traces per atomic append to --out: a kill loses at most one chunk."),
    ] = 256,
    max_new_tokens: MaxNewTokensOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Finish an interrupted sweep: skip the samples already in --out (and its shards)."
        ),
    ] = False,
) -> None:
    """Trace every sample of a data set (gates, injection norms, answers) into one trace file.

    Rows follow the data file's order; each has sample_id "L<line>:<image path>", qtype and reference answer.

    Malformed JSONL lines, missing or unreadable images and out-of-vocabulary questions are skipped and counted.

    An existing --out is refused unless --resume is given; --resume skips the sample ids already written.

    Many processes or GPUs: torchrun --nproc-per-node N -m cliviz sweep ... (gloo on CPU, nccl on CUDA).

    Rank r writes every N-th sample to FILE.rank<r>.parquet; rank 0 merges the shards in data order.

    One sweep writes an --out at a time (a file lock; a second sweep into it is refused). Ctrl-C exits 130
    and keeps every chunk already written.
    """
    from cliviz.data.samples import read_jsonl
    from cliviz.tracing.sweep import plan_sweep

    ctx = _dist_from_env()
    check_writable(out, "trace file")  # before any reading of data or model
    if out.suffix.lower() in (".jsonl", ".json"):
        raise CLIVizError(f"--out {out} looks like a data file; give a .parquet path for the trace file")
    dataset = read_jsonl(data)
    items = plan_sweep(dataset, data)
    with _output_locks(ctx, out):  # a second sweep into the same --out is refused, not interleaved
        _locked_sweep(ctx, dataset, items, out, model, device, dtype, batch_size, chunk_size, max_new_tokens, resume)


@contextlib.contextmanager
def _output_locks(ctx: _Dist, out: Path):
    """Rank 0 holds the lock of --out for the whole run, every rank the lock of the file it appends to;
    with the locks held, temporaries that a kill mid-write left behind are removed."""
    from cliviz.atomic import exclusive_writer, remove_stale_temporaries
    from cliviz.tracing.sweep import shard_path

    target = shard_path(out, ctx.rank) if ctx.active else out
    with contextlib.ExitStack() as stack:
        if ctx.main:
            stack.enter_context(exclusive_writer(out, "trace file"))
            remove_stale_temporaries(out)
        stack.enter_context(exclusive_writer(target, "trace file"))
        remove_stale_temporaries(target)
        yield


def _locked_sweep(
    ctx, dataset, items, out, model, device, dtype, batch_size, chunk_size, max_new_tokens, resume
) -> None:
    """The sweep proper, run while this process holds its output locks (see `_output_locks`)."""
    from cliviz.tracing.sweep import check_resumable, existing_shards, finalize, read_done, shard_path

    err = Console(stderr=True)
    shards = existing_shards(out)
    if not resume:
        if out.exists():
            raise CLIVizError(
                f"{out} already exists: pass --resume to finish that sweep, or choose another --out "
                "(a sweep never overwrites or appends to a file on its own)"
            )
        if shards:
            raise CLIVizError(
                f"shard file(s) of an interrupted multi-process sweep exist ({shards[0].name}...): "
                "pass --resume to finish it, or remove them"
            )
    done = read_done([out, *shards]) if resume else None  # refuses corrupt / other-schema files, touches nothing
    if done is not None:
        check_resumable(done, items, out)
    done_ids = set(done.column("sample_id").to_pylist()) if done is not None else set()
    pending = [item for item in items if item.sample_id not in done_ids]

    device = _rank_device(ctx, device)
    dist = _init_group(ctx, device) if ctx.active else None
    try:
        if dist is not None:
            dist.barrier()  # every rank has read the files above before any rank writes
        skipped = dict(dataset.skipped)
        written = 0
        if pending:
            written, more = _trace_pending(
                ctx,
                dist,
                model,
                device,
                dtype,
                pending,
                done,
                out,
                shard_path(out, ctx.rank) if ctx.active else out,
                batch_size,
                chunk_size,
                max_new_tokens,
                err,
            )
            for reason, n in more.items():
                skipped[reason] = skipped.get(reason, 0) + n
        if not ctx.main:
            return
        total = finalize(out, items, existing_shards(out))
        for reason, n in skipped.items():
            err.print(f"[yellow]skipped {n} sample(s): {escape(reason)}[/]", highlight=False)
        already = len(done_ids & {item.sample_id for item in items})
        typer.echo(
            f"{out}: {total} traces of {len(items)} usable samples ({written} traced now"
            + (f", {already} already there" if resume else "")
            + (f", {ctx.world} processes" if ctx.active else "")
            + ")"
        )
    except KeyboardInterrupt:
        kept = _rows_on_disk([out, *existing_shards(out)])
        where = str(out) if not ctx.active else f"{out} and its shard files"
        raise Interrupted(f"the {kept} trace(s) already written stay in {where}; finish with --resume") from None
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _rows_on_disk(paths: list[Path]) -> int:
    """Rows in the trace files that exist (Parquet footers only: cheap, nothing decoded)."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        try:
            total += pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
        except Exception:  # noqa: BLE001 - a count for a message; a file that cannot be read counts 0
            continue
    return total


def _trace_pending(
    ctx, dist, model_dir, device, dtype, pending, done, out, target, batch_size, chunk_size, max_new_tokens, err
) -> tuple[int, dict[str, int]]:
    """Load the model, drop unusable questions, trace this rank's share; all ranks' totals back."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cliviz.inputs import check_model_question
    from cliviz.model.loading import config_hash, load_model
    from cliviz.tracing.sweep import check_same_model, run_sweep

    net, tok = load_model(model_dir, device=device, dtype=dtype)
    if done is not None:
        check_same_model(done, out, config_hash(net))
    usable, bad_questions = [], 0
    for item in pending:
        try:
            check_model_question(item.record.question, tok)
            usable.append(item)
        except CLIVizError:
            bad_questions += 1
    mine = usable[ctx.rank :: ctx.world]
    label = f"sweeping (rank 0 of {ctx.world})" if ctx.active else "sweeping"
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not ctx.main,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=len(mine))
        stats = run_sweep(
            net,
            tok,
            mine,
            target,
            batch_size=batch_size,
            chunk_size=chunk_size,
            max_new_tokens=max_new_tokens,
            on_advance=lambda n: progress.advance(task, n),
        )
    results = [(stats.written, stats.skipped)]
    if dist is not None:
        results = [None] * ctx.world
        dist.all_gather_object(results, (stats.written, stats.skipped))  # also the barrier before the merge
    skipped: dict[str, int] = (
        {"question empty, too long or outside the model's vocabulary": bad_questions} if bad_questions else {}
    )
    for _, rank_skipped in results:
        for reason, n in rank_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return sum(w for w, _ in results), skipped
