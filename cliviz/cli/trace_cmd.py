"""`cliviz trace`: answer, record gates through nnsight, show and save them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, MaxNewTokensOpt, ModelOpt
from cliviz.cli.preflight import prepare_question
from cliviz.cli.sweep_cmd import GatesOpt, PositionsOpt
from cliviz.errors import CLIVizError


def trace_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    question: Annotated[str, typer.Argument(help="Question in the model's vocabulary.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Append the trace to this Parquet trace set.")] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained interactive heatmap page.")
    ] = None,
    causal_check: Annotated[
        bool,
        typer.Option(
            "--causal-check/--no-causal-check",
            help="Also measure the effect of switching the injection off for this question (one batched engine call).",
        ),
    ] = True,
    as_json: JsonOpt = False,
    gates: GatesOpt = None,
    positions: PositionsOpt = None,
) -> None:
    """Answer and show which vision layers each LLM layer drew on, per answer token."""
    from cliviz.analyses.heatmaps import gate_matrix, write_trace_html
    from cliviz.cli.render import CLI_CHECK_HINT, print_trace
    from cliviz.tracing import trace
    from cliviz.tracing.compact import Compact
    from cliviz.tracing.traceset import TraceSet, recorded_compaction

    compact = Compact(gates or "float32", positions or "all") if (gates or positions) else None
    if compact is not None and out is None:
        raise CLIVizError("--gates / --positions choose how --out stores traces: give --out too")
    if compact is not None and out is not None and out.exists():  # before any model work
        held = recorded_compaction(out)
        if held is not None and held != compact:
            raise CLIVizError(f"{out} holds {held.describe()}; leave out --gates/--positions to append to it")
    img, net, tok, q = prepare_question(image, question, model, device, dtype, trace_out=out, html=html)
    result = trace(net, tok, img, q, max_new_tokens=max_new_tokens, causal_check=causal_check)
    if out is not None:
        TraceSet.append(out, [result], compact=compact)
    if html is not None:
        if not result.has_gates:
            raise CLIVizError("this model has no gates (fusion=projector): no heatmap page to write")
        write_trace_html(result, html, CLI_CHECK_HINT)
    if as_json:
        payload = result.to_dict()
        check = result.causal
        causal = None if check is None else {**dataclasses.asdict(check), "matters": check.matters}
        typer.echo(
            json.dumps(
                {
                    "answer": result.meta.answer,
                    "causal_check": causal,
                    "map_notes": result.map_notes(CLI_CHECK_HINT),
                    **payload,
                }
            )
        )
        return
    console = Console()
    print_trace(result, gate_matrix(result, "answer"), console)
    if out is not None:
        console.print(f"[dim]trace appended to {out}[/]")
    if html is not None:
        console.print(f"[dim]heatmap page written to {html}[/]")
