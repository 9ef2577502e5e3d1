"""`cliviz figures`: the paper figure set (PDF / SVG / PNG + the numbers as CSV) from a trace set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def figures_cmd(
    traces: Annotated[
        Path, typer.Argument(help="Trace set (a Parquet folder or file), e.g. from `cliviz sweep --out`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")],
    formats: Annotated[
        str, typer.Option("--format", "-f", help="Comma-separated formats: pdf, svg, png.")
    ] = "pdf,svg,png",
    ablations: Annotated[
        Path | None,
        typer.Option(
            "--ablations",
            help="Tidy ablation table (Parquet/CSV/JSON: llm_layer, vision_layer, effect) -> ablation grid.",
        ),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option("--compare", help="Comparison table (CSV/JSON: model, qtype, accuracy) -> grouped bars."),
    ] = None,
    example: Annotated[
        int | None,
        typer.Option(
            "--example", help="Trace row for the token-trajectory figure (default: first with the longest answer)."
        ),
    ] = None,
    width: Annotated[
        str, typer.Option("--width", help="single (3.5 in, 336 px) or double (7 in, 672 px) column.")
    ] = "single",
    titles: Annotated[
        bool, typer.Option("--titles/--no-titles", help="Put a title on each figure (off for papers).")
    ] = False,
    png_scale: Annotated[float, typer.Option("--png-scale", help="PNG pixels per layout pixel (3 = ~288 dpi).")] = 3.0,
    pool: Annotated[
        bool, typer.Option("--pool", help="Draw a set that holds several models as one (refused otherwise).")
    ] = False,
    include_special: Annotated[
        bool,
        typer.Option("--include-special", help="Average <eos> and other special-token answer steps in too."),
    ] = False,
) -> None:
    """Write the standard figure set: mean and per-question-type gate heatmaps, entropy, gate
    variance, token trajectories, probe confusion, PCA, plus comparison bars and the ablation grid
    when their tables are given. Each figure comes with a CSV of the numbers behind it.

    Answer-step means are over content tokens (<eos> left out) unless --include-special; the model(s)
    and trace count are in manifest.json's caption (and under each title with --titles). The set is
    read one row group at a time: memory depends on the model's shapes, not on the number of traces."""
    from cliviz.cli.options import check_browser_env
    from cliviz.errors import CLIVizError

    # cheap checks first, before plotly, pyarrow and kaleido are imported (seconds)
    if not traces.exists():
        raise CLIVizError(f"trace file {traces} does not exist")
    check_browser_env()  # every format is drawn by kaleido's Chromium

    import logging

    from rich.console import Console

    from cliviz.analyses.figures import make_figures

    for name in ("choreographer", "kaleido", "logistro"):  # browser chatter; failures surface as one CLIVizError
        logging.getLogger(name).setLevel(logging.CRITICAL)

    report = make_figures(
        traces,
        out,
        formats=formats,
        ablations=ablations,
        compare=compare,
        example=example,
        width=width,
        titles=titles,
        png_scale=png_scale,
        include_special=include_special,
        pool=pool,
    )
    console = Console()
    for name in report.figures:
        files = sorted(p.name for p in report.files if p.name.startswith(name + ".") or p.name.startswith(name + "_"))
        console.print(f"[bold]{name}[/]: {', '.join(files)}")
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped {name}[/]: {why}")
    if report.caption:
        console.print(f"[dim]{report.caption}[/]")
    t = report.timings
    console.print(
        f"[dim]{len(report.figures)} figures, {len(report.files)} files in {report.out} "
        f"(read {t['read']:.1f}s, compute {t['compute']:.1f}s, export {t['export']:.1f}s)[/]"
    )
