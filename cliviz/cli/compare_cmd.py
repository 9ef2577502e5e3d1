"""`cliviz compare`: several models on one held-out set, plus gate-map stability across seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt
from cliviz.errors import CLIVizError


def compare_cmd(
    models: Annotated[list[Path], typer.Option("--models", help="Model folders (repeat --models, or bundled names).")],
    data: Annotated[Path, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for compare.csv, stability.csv, compare.html.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    stability_samples: Annotated[int, typer.Option("--stability-samples", min=7)] = 140,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy overall and per question type for each model; seed stability of gate maps."""
    from cliviz.analyses.compare import accuracy_table, gate_profiles, seed_stability, stability_summary, write_comparison
    from cliviz.evaluation import read_jsonl
    from cliviz.model.loading import load_model
    from cliviz.training import recorded_seed

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
    table = accuracy_table(loaded, dataset)
    profiles = {label: gate_profiles(m, t, dataset, limit=stability_samples) for label, (m, t) in loaded.items() if m.config.fusion == "cli"}
    seeds = {label: recorded_seed(m.name_or_path) for label, (m, _) in loaded.items()}
    stability = seed_stability(profiles, {label: m.config.fusion for label, (m, _) in loaded.items()}, seeds)
    if out is not None:
        write_comparison(out, table, stability)
    if as_json:
        typer.echo(json.dumps({"accuracy": table.to_dict("records"), "stability": stability.to_dict("records")}))
        return
    console = Console()
    pivot = table.pivot(index="qtype", columns="model", values="accuracy")
    grid = Table(title=f"accuracy on {data}")
    grid.add_column("question type")
    for label in pivot.columns:
        grid.add_column(label, justify="right")
    for qtype, row in pivot.iterrows():
        grid.add_row(qtype, *(f"{v:.3f}" for v in row))
    console.print(grid)
    if len(stability):
        summary = stability_summary(stability)
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
            st.add_row(qtype, *(f"{v:.2f}" for v in cells))
        console.print(st)
    if out is not None:
        console.print(f"[dim]wrote {out}/compare.csv, stability.csv, compare.html[/]")
