"""`cliviz probe-layers`: what each vision layer knows, by linear probes (see `cliviz.analyses.probes`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, check_browser_env, check_model_path, int_list
from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from rich.progress import TaskID
    from rich.text import Text


def probe_cmd(
    model: ModelOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A `cliviz data` folder (ShapesVQA images + samples.jsonl). Default: --n fresh scenes."
        ),
    ] = None,
    n: Annotated[
        int, typer.Option("--n", min=1, max=100_000, help="Scenes to generate when no --data is given.")
    ] = 600,
    seed: Annotated[int, typer.Option("--seed", help="Scene stream (without --data), folds and patch sampling.")] = 5,
    max_images: Annotated[int | None, typer.Option("--max-images", min=1, help="Use at most this many images.")] = None,
    properties: Annotated[
        str | None,
        typer.Option(
            "--properties", help="Comma-separated properties (e.g. digit,position or patch:digit). Default: all."
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Comma-separated hidden-state indices (0 = patch embedding). Default: all."),
    ] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds (images held out whole).")] = 5,
    max_patches: Annotated[int, typer.Option("--max-patches", help="Patch tokens kept per patch sample.")] = 3000,
    control: Annotated[
        bool,
        typer.Option(
            "--control",
            help="Permute the labels: a sanity check, every probe should fall to its majority baseline.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for probes.csv, probes.json, probes.html and the heatmap images."),
    ] = None,
    formats: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="Heatmap image formats with --out: pdf, svg, png (comma-separated), or none.",
        ),
    ] = "png,svg",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per vision-tower batch.")] = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Linear probes per vision layer: which scene properties (colour, shape, size, position, digit
    under each patch; count, digit, and the named object's colour / shape / side / size per image,
    from the whole image and from the object's own patches) can be read from each layer, next to the
    majority baseline, a permuted-label control and the layer the projector reads."""
    from cliviz.analyses.probe_labels import folder_scenes, generated_scenes, select_properties

    chosen_layers = int_list(layers, "--layers")
    select_properties(properties)  # fail before any work, and before torch is imported
    check_model_path(model)
    if out is not None and formats.strip().lower() not in ("", "none"):
        check_browser_env()
    if data is not None and not data.exists():
        raise CLIVizError(f"data not found: {data} (give a `cliviz data` folder)")
    fmts = _check_out(out, formats)

    from cliviz.analyses.probes import check_probe_args
    from cliviz.cli.preflight import load_checked

    if data is not None:
        named, skipped = folder_scenes(data)
        source = str(data)
    else:
        count = n if max_images is None else min(n, max_images)
        named, skipped, source = generated_scenes(count, seed), {}, f"{count} generated scenes, seed {seed}"
    named = named[:max_images] if max_images is not None else named
    net, _ = load_checked(model, device, dtype)
    check_probe_args(net, len(named), chosen_layers, folds, max_patches)  # one error line, before the progress bar
    report = _run(
        net,
        [scene for _, scene in named],
        properties,
        chosen_layers,
        folds,
        seed,
        max_patches,
        control,
        batch_size,
        quiet=as_json,
    )
    report.meta.update({"model": str(net.name_or_path), "data": source, "images_skipped": skipped})
    written = []
    if out is not None:
        from cliviz.analyses.probes import write_report

        _quiet_browser()
        title = f"{Path(str(net.name_or_path)).name}: linear probes per vision layer"
        written = write_report(report, out, fmts, title=title)
    if as_json:
        typer.echo(json.dumps(report.to_json()))
        return
    _print(report, written)


def _check_out(out: Path | None, formats: str) -> list[str]:
    """Image formats to write; the folder and the browser are checked before the model loads."""
    if out is None:
        return []
    from cliviz.analyses.export import find_chromium, parse_formats, prepare_out_dir

    fmts = [] if formats.strip().lower() in ("", "none") else parse_formats(formats)
    prepare_out_dir(out)
    if fmts:
        find_chromium()
    return fmts


def _quiet_browser() -> None:
    import logging

    for name in ("choreographer", "kaleido", "logistro"):  # browser chatter; failures surface as one CLIVizError
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run(net, scenes, properties, layers, folds, seed, max_patches, control, batch_size, quiet: bool):
    from rich.console import Console
    from rich.progress import Progress

    from cliviz.analyses.probes import probe_layers

    with Progress(console=Console(stderr=True), transient=True, disable=quiet) as progress:
        tasks: dict[str, TaskID] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        return probe_layers(
            net,
            scenes,
            properties=properties,
            layers=layers,
            folds=folds,
            seed=seed,
            max_patches=max_patches,
            control=control,
            batch_size=batch_size,
            progress=advance,
        )


def _cell(value: float, floor: float) -> Text:
    """The accuracy on a ramp from dark blue (the majority baseline or below) to yellow (1.0)."""
    from rich.text import Text

    v = 0.0 if value != value else min(max((value - floor) / max(1e-9, 1 - floor), 0.0), 1.0)
    shade = f"rgb({int(255 * v)},{int(32 + 200 * v)},{int(77 - 40 * v)})"
    return Text(f"{value:.2f}", style=f"{'black' if v > 0.55 else 'white'} on {shade}")


def _print(report, written: list[Path]) -> None:
    """One row per `feature:property`, one column per layer (the projector's marked *), then the
    majority baseline and the drop from the best layer below the projector's to the projector's."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc, maj, p, m = report.table(), report.majority(), report.projector_layer, report.meta
    drop = report.bottleneck().set_index("column")["drop"]
    crop = "; OneVision: the base crop's patch grid" if m["crop"] else ""
    title = (
        f"{Path(m['model']).name}: probe accuracy per vision layer ({m['n_images']} images, {m['folds']} folds"
        f"{', labels permuted' if m['control'] else ''}{crop})"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    table.add_column("feature:property", no_wrap=True)
    for k in acc.index:
        table.add_column(f"V{k}*" if k == p else f"V{k}", justify="center")
    table.add_column("maj.", justify="right", style="dim")
    table.add_column("ctrl", justify="right", style="dim")
    table.add_column("drop", justify="right")
    ctrl = report.table("control").max() if "control" in report.frame else None
    for col in acc.columns:
        d = drop[col]
        c = "-" if ctrl is None or ctrl[col] != ctrl[col] else f"{ctrl[col]:.2f}"
        table.add_row(
            col, *[_cell(v, maj[col]) for v in acc[col]], f"{maj[col]:.2f}", c, "-" if d != d else f"{d:+.2f}"
        )
    console.print(table)
    if m.get("folds_asked", m["folds"]) != m["folds"]:
        console.print(
            f"[yellow]{m['folds']} folds instead of {m['folds_asked']}: the smallest class counts of these "
            f"{m['n_images']} images allow no more[/]"
        )
    console.print(
        f"[dim]patch: the patch token; mean: mean of the patch tokens; cls: the CLS token; object: mean of "
        f"the named object's patch tokens. Cells are coloured by accuracy above the majority baseline. "
        f"V{p}* is the layer the LLaVA projector reads; maj.: majority baseline; ctrl: the best layer's "
        f"accuracy with permuted labels (should match maj.); drop: best layer below V{p} minus V{p}.[/]"
    )
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped {name}[/]: {why}")
    for why, count in m.get("images_skipped", {}).items():
        console.print(f"[yellow]skipped {count} images[/]: {why}")
    if written:
        console.print(f"[dim]wrote {', '.join(p.name for p in written)} to {written[0].parent}[/]")
