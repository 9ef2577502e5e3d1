"""`cliviz sweep`: trace a whole data set into one trace set (batched, resumable, torchrun-aware).

The command parses and prints; the sweep is `cliviz.tracing.sweep.run_sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cliviz.cli.options import DeviceOpt, DtypeOpt, MaxNewTokensOpt, ModelOpt

# the values of `cliviz.tracing.compact` (checked there); spelled here so that `--help` imports no torch
# (importing anything under cliviz.tracing loads the recorder)
GATE_DTYPES = ("float32", "float16")
POSITION_SETS = ("all", "answer+prompt", "answer")
GatesOpt = Annotated[
    str | None,
    typer.Option(
        "--gates", metavar="|".join(GATE_DTYPES), help="Store gates as float32 (lossless, default) or float16."
    ),
]
PositionsOpt = Annotated[
    str | None,
    typer.Option(
        "--positions",
        metavar="|".join(POSITION_SETS),
        help="Token positions whose gates are kept: all (lossless), answer+prompt, or answer steps only.",
    ),
]


def sweep_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")],
    out: Annotated[
        Path, typer.Option("--out", help="Trace set to write: a folder of Parquet parts (never overwritten).")
    ],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per traced generate.")] = 32,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", min=1, help="Traces per part file of --out: a kill loses at most one chunk."),
    ] = 256,
    max_new_tokens: MaxNewTokensOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Finish an interrupted sweep: skip the samples already in --out."),
    ] = False,
    gates: GatesOpt = None,
    positions: PositionsOpt = None,
) -> None:
    """Trace every sample of a data set (gates, injection norms, answers) into one trace set.

    Each row has sample_id "L<line>:<image path>", qtype and reference answer; one part file per chunk.

    Malformed JSONL lines, missing or unreadable images and out-of-vocabulary questions are skipped and counted.

    An existing --out is refused unless --resume is given; --resume skips the sample ids already written.

    Many processes or GPUs: torchrun --nproc-per-node N -m cliviz sweep ... (gloo on CPU, nccl on CUDA);
    every rank writes its own parts into --out, nothing is merged.

    One sweep writes an --out at a time (a lock; a second sweep into it is refused). Ctrl-C exits 130
    and keeps every chunk already written.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cliviz.launch import Dist
    from cliviz.tracing.compact import Compact
    from cliviz.tracing.sweep import run_sweep

    # a bad value is one line before anything is read; None: lossless, or the set's own choice on --resume
    compact = Compact(gates or "float32", positions or "all") if (gates or positions) else None
    world = Dist.from_env()
    err = Console(stderr=True)
    label = f"sweeping (rank 0 of {world.world_size})" if world.enabled else "sweeping"
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not world.main,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)
        result = run_sweep(
            data,
            out,
            model=model,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            chunk_size=chunk_size,
            max_new_tokens=max_new_tokens,
            resume=resume,
            compact=compact,
            on_start=lambda n: progress.update(task, total=n),
            on_advance=lambda n: progress.advance(task, n),
        )
    if not world.main:
        return
    for reason, n in result.skipped.items():
        err.print(f"[yellow]skipped {n} sample(s): {escape(reason)}[/]", highlight=False)
    typer.echo(
        f"{result.out}: {result.total} traces of {result.usable} usable samples ({result.traced} traced now"
        + (f", {result.already} already there" if resume else "")
        + (f", {result.world} processes" if result.world > 1 else "")
        + ")"
        + ("" if result.compact.lossless else f"; {result.compact.describe()}")
    )
