"""`cliviz compare`: several models on one held-out set, plus gate-map stability across seeds.

The command loads the models, calls `cliviz.analyses.compare.run_comparison` under a progress bar
and prints the accuracy table, the stability per question type with its mean row, and the
stability per pair of models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, check_model_path
from cliviz.errors import CLIVizError


def _accuracy_table(accuracy, data: Path) -> Table:
    """Accuracy with its 95% Wilson interval per question type and model; `overall` last."""
    order = list(dict.fromkeys(q for q in accuracy["qtype"] if q != "overall")) + ["overall"]
    cell = accuracy.assign(
        text=[f"{a:.3f} ({lo:.2f}–{hi:.2f})" for a, lo, hi in zip(accuracy.accuracy, accuracy.ci_low, accuracy.ci_high)]
    )
    pivot = cell.pivot(index="qtype", columns="model", values="text").reindex(order)
    pivot = pivot[list(dict.fromkeys(accuracy["model"]))]
    grid = Table(title=f"accuracy on {data}", caption="accuracy (95% Wilson interval)")
    grid.add_column("question type")
    for label in pivot.columns:
        grid.add_column(label, justify="right")
    for qtype, row in pivot.iterrows():
        if qtype == "overall":
            grid.add_section()
        grid.add_row(qtype, *row, style="bold" if qtype == "overall" else None)
    return grid


def _stability_table(summary) -> Table:
    """Per question type and, last, the mean over question types (`ALL_TYPES`)."""
    from cliviz.analyses.compare import ALL_TYPES

    st = Table(title="gate-map stability across cli seeds (mean over pairs of different seeds)")
    st.add_column("question type")
    st.add_column("profile Spearman", justify="right")
    st.add_column("top-layer agreement", justify="right")
    within = "same_seed_profile_spearman" in summary
    if within:
        st.add_column("same seed: Spearman", justify="right")
        st.add_column("same seed: top layer", justify="right")
    for qtype, row in summary.iterrows():
        cells = [row.profile_spearman, row.top_layer_agreement]
        if within:
            cells += [row.same_seed_profile_spearman, row.same_seed_top_layer_agreement]
        if qtype == ALL_TYPES:
            st.add_section()
        st.add_row(qtype, *(f"{v:.2f}" for v in cells), style="bold" if qtype == ALL_TYPES else None)
    return st


def _pairs_table(pairs) -> Table:
    table = Table(title="gate-map stability per pair of cli models (mean over question types)")
    for col in ("model A", "model B", "seeds", "profile Spearman", "top-layer agreement"):
        table.add_column(col, justify="right" if col[0] in "pt" else "left")
    for r in pairs.itertuples():
        seeds = "same" if r.same_seed is True else ("different" if r.same_seed is False else "unknown")
        table.add_row(r.model_a, r.model_b, seeds, f"{r.profile_spearman:.2f}", f"{r.top_layer_agreement:.2f}")
    return table


def compare_cmd(
    models: Annotated[list[Path], typer.Option("--models", help="Model folders (repeat --models, or bundled names).")],
    data: Annotated[Path, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for compare.csv, stability.csv, compare.html.")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    stability_samples: Annotated[
        int,
        typer.Option(
            "--stability-samples",
            min=7,
            help="Questions per model whose gate maps are compared across cli seeds (at least one per question type).",
        ),
    ] = 140,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy overall and per question type for each model; seed stability of gate maps."""
    if len(models) < 1:
        raise CLIVizError("give at least one --models folder")
    for path in models:  # before torch is imported: a typo answers at once
        check_model_path(path)
    if not data.exists():
        raise CLIVizError(f"data not found: {data} (give a folder holding samples.jsonl, or a .jsonl file)")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cliviz.analyses.compare import comparison_work, run_comparison, write_comparison
    from cliviz.data.samples import read_jsonl
    from cliviz.model.loading import load_model

    if len(models) < 1:
        raise CLIVizError("give at least one --models folder")
    if out is not None and out.exists() and not out.is_dir():
        raise CLIVizError(f"--out {out} exists and is not a folder")
    from cliviz.cli.preflight import check_output_folder

    check_output_folder(out, "--out folder")  # before any model is loaded
    dataset = read_jsonl(data)
    loaded = {}
    for path in models:
        label = path.name
        if label in loaded:
            label = str(path)
        loaded[label] = load_model(path, device=device, dtype=dtype)
    with Progress(
        TextColumn("comparing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=as_json,
    ) as progress:
        task = progress.add_task("comparing", total=comparison_work(loaded, dataset, stability_samples))
        result = run_comparison(
            loaded, dataset, stability_samples=stability_samples, progress=lambda n: progress.advance(task, n)
        )
    if out is not None:
        write_comparison(out, result.accuracy, result.stability, str(data))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "accuracy": result.accuracy.to_dict("records"),
                    "stability": result.stability.to_dict("records"),
                    "stability_summary": result.summary.reset_index().to_dict("records"),
                    "stability_pairs": result.pairs.to_dict("records"),
                }
            )
        )
        return
    from cliviz.cli.render import keep_words_whole

    console = Console()
    console.print(keep_words_whole(_accuracy_table(result.accuracy, data)))
    if len(result.stability):
        console.print(_stability_table(result.summary))
        console.print(_pairs_table(result.pairs))
    if out is not None:
        console.print(f"[dim]wrote {out}/compare.csv, stability.csv, compare.html[/]")
