"""`cliviz attribute`: which gate cells, image patches and prompt tokens made each answer token."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliviz.analyses.attribution_settings import DEFAULT_TARGET, check_options
from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, check_image_path, check_model_path
from cliviz.errors import CLIVizError


def _signed_style(value: float, scale: float) -> str:
    """Red for positive, blue for negative, stronger with |value| / scale (RdBu-like)."""
    v = 0.0 if scale <= 0 or not math.isfinite(value) else max(-1.0, min(1.0, value / scale))
    if v >= 0:
        r, g, b = 255, int(255 - 180 * v), int(255 - 200 * v)
    else:
        r, g, b = int(255 + 200 * v), int(255 + 120 * v), 255
    return f"bold black on rgb({r},{g},{b})"


def print_attribution(result, console: Console) -> None:
    """What was attributed (method, target), saturation warnings, answer tokens coloured by their total
    gate-cell attribution, the top cells / patch / prompt token per token, and IG completeness."""
    import numpy as np

    meta = result.trace.meta
    console.print(f"[dim]question:[/] {meta.question}")
    console.print(Text(result.description(), style="dim"))
    for warning in result.warnings():
        console.print(Text(f"warning: {warning}", style="bold yellow"))
    totals = result.totals()
    scale = float(np.nanmax(np.abs(totals))) if totals.size else 0.0
    line = Text("answer: ", style="bold")
    for word, total, lp in zip(result.answer_tokens, totals, result.trace.answer_logprobs):
        line.append(f" {word} ", style=_signed_style(float(total), scale))
        line.append(f" p={math.exp(lp):.4f} sum={total:+.3g}  ", style="dim")
    console.print(line)
    table = Table(
        title=f"attribution of the {result.target} per answer token (red > 0 > blue; the values "
        "are printed, colours only rank them)",
        pad_edge=False,
    )
    table.add_column("step", justify="right")
    table.add_column("token")
    table.add_column("top gate cells (LLM layer x vision layer)")
    table.add_column("top patch (row, col)")
    table.add_column("top prompt token")
    rows, cols = result.patch_grid
    for s, word in enumerate(result.answer_tokens):
        cells = Text()
        cell_scale = float(np.abs(result.gate_cells[s]).max()) if result.gate_cells[s].size else 0.0
        for i, k, v in result.top_cells(s, 3):
            cells.append(f"L{i}xV{k} {v:+.2g}", style=_signed_style(v, cell_scale))
            cells.append("  ")
        comb = result.combined[s]
        if np.isfinite(comb).any():
            p = int(np.nanargmax(np.abs(comb)))
            patch = f"({p // cols}, {p % cols}) {comb[p]:+.2g}"
        else:
            patch = "n/a (no AMP memory)"
        prompt = result.prompt_scores[s]
        if prompt.size:
            q = int(np.argmax(np.abs(prompt)))
            top_prompt = f"{result.prompt_tokens[q]!r} {prompt[q]:+.2g}"
        else:
            top_prompt = "-"
        table.add_row(str(s), word, cells, patch, top_prompt)
    console.print(table)
    if result.method == "ig":
        first, *rest = result.completeness_lines()
        console.print(Text(f"IG {first}", style="bold"))
        for line in rest:
            console.print(Text(f"  {line}"))
    else:
        console.print(
            "[dim]gradient × input (gxi) has no completeness property; use --method ig for an exact accounting[/]"
        )


def attribute_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    question: Annotated[str, typer.Argument(help="Question in the model's vocabulary.")],
    method: Annotated[
        str, typer.Option("--method", help="ig (integrated gradients) | gxi (gradient × input), for the gate cells.")
    ] = "ig",
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="What to attribute: margin (default: logit minus the runner-up's logit; does not "
            "saturate) | logit | logprob (flat when p ≈ 1: gradient × input maps become noise).",
        ),
    ] = DEFAULT_TARGET,
    steps: Annotated[int, typer.Option("--steps", help="Integration steps for ig (1..4096).")] = 64,
    baseline: Annotated[
        str, typer.Option("--baseline", help="ig baseline gates: uniform (1/K) | injection_off (0).")
    ] = "uniform",
    answer: Annotated[
        str | None, typer.Option("--answer", help="Attribute this answer instead of the model's own.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Interpolation steps per forward (ig).")] = 16,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Append the trace with its attribution arrays to this Parquet trace set."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained page: token strip, cell heatmaps, patch overlays."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Attribute each answer token to (LLM layer, vision layer) gate cells, image patches and prompt tokens."""
    check_options(method, baseline, steps, batch_size, target)  # before torch is imported: answers at once
    check_image_path(image)
    check_model_path(model)

    from cliviz.analyses.attributions import attribute, write_attribution_html
    from cliviz.cli.preflight import prepare_question
    from cliviz.tracing.traceset import TraceSet

    img, net, tok, q = prepare_question(image, question, model, device, dtype, trace_out=out, html=html)
    if net.config.fusion == "projector":
        raise CLIVizError(
            "this model has no gates (fusion=projector): nothing is injected, so there is nothing to attribute"
        )
    result = attribute(
        net,
        tok,
        img,
        q,
        method=method,
        steps=steps,
        baseline=baseline,
        answer=answer,
        internal_batch_size=batch_size,
        target=target,
    )
    if out is not None:
        TraceSet.append(out, [result.to_trace()])
    if html is not None:
        write_attribution_html(result, img, html)
    if as_json:
        for warning in result.warnings():
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(json.dumps(result.to_dict()))
        return
    console = Console()
    print_attribution(result, console)
    if out is not None:
        console.print(f"[dim]trace with attributions appended to {out}[/]")
    if html is not None:
        console.print(f"[dim]attribution page written to {html}[/]")
