"""`cliviz ablate`: intervene on the gates / injections and measure what the answer loses.

    cliviz ablate IMAGE QUESTION --kind knockout --llm-layers 2 --vision-layers 3 --out a.parquet
    cliviz ablate --data shapes/ --grid --limit 200 --out grid.parquet   # + grid.html, grid.faithfulness.csv

The tidy effects frame (condition, llm_layer, vision_layer, qtype, metric, value, ci_low, ci_high,
n) is written as Parquet, atomically. Without a reference answer (IMAGE QUESTION, or data rows
with no `answer`), the model's own unablated answer is the reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt
from cliviz.cli.preflight import check_writable
from cliviz.errors import CLIVizError

CLI_KINDS = ("knockout", "zero", "uniform", "onehot", "mean", "injection_off", "patch")


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIVizError(f"{option} must be comma-separated integers, e.g. 1,2") from None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except PermissionError:
        raise CLIVizError(f"cannot write {path}: permission denied") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _inputs(image: Path | None, question: str | None, data: Path | None, limit: int | None, reference: str | None):
    """(images, questions, references, qtypes) from IMAGE QUESTION or --data."""
    from cliviz.inputs import check_question, load_image

    if data is not None and (image is not None or question is not None):
        raise CLIVizError("give either --data or IMAGE QUESTION, not both")
    if data is None:
        if image is None:
            raise CLIVizError("no data: give IMAGE QUESTION or --data DIR|JSONL")
        if question is None:
            raise CLIVizError("missing QUESTION after IMAGE")
        img = load_image(image)
        return [img], [check_question(question)], [reference], None
    if reference is not None:
        raise CLIVizError("--reference is for IMAGE QUESTION; --data rows carry their own answers")
    from cliviz.evaluation import read_jsonl

    records = read_jsonl(data).records
    if limit is not None:
        records = records[:limit]
    if not records:
        raise CLIVizError(f"no samples to ablate in {data}")
    images = [load_image(r.image_path) for r in records]
    qtypes = [r.qtype for r in records] if any(r.qtype for r in records) else None
    return images, [r.question for r in records], [r.answer for r in records], qtypes


def _num(x: float, signed: bool = True) -> str:
    """3 decimals, or 2 significant digits in scientific notation for tiny non-zero numbers."""
    if x != x:
        return "n/a"
    if x != 0 and abs(x) < 5e-4:
        return f"{x:+.1e}" if signed else f"{x:.1e}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _effects_table(frame, title: str, top: int) -> Table:
    table = Table(title=title, pad_edge=False)
    for col in ("condition", "Δ logp ref", "95% CI", "Δ logp own", "flips", "acc"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    from cliviz.analyses.ablations import REFERENCE

    overall = frame[(frame["qtype"] == "all") & (frame["condition"] != REFERENCE)]
    wide = overall.pivot_table(index="condition", columns="metric", values="value", aggfunc="first", sort=False)
    ci = overall[overall["metric"] == "delta_logprob_ref"].set_index("condition")[["ci_low", "ci_high"]]
    wide = wide.reindex(wide["delta_logprob_ref"].abs().sort_values(ascending=False).index)
    for cond, row in wide.head(top).iterrows():
        lo, hi = ci.loc[cond, "ci_low"], ci.loc[cond, "ci_high"]
        d = row["delta_logprob_ref"]
        style = "red" if d < 0 and hi < 0 else ("green" if d > 0 and lo > 0 else "default")
        table.add_row(escape(str(cond)), f"[{style}]{_num(d)}[/]", f"[dim]{_num(lo)}..{_num(hi)}[/]",
                      _num(row["delta_logprob_own"]), f"{row['flip_rate']:.2f}", f"{row['accuracy']:.2f}")
    return table


def _grid_figure(frame, config):
    """The grid as one heatmap (Δ log-prob of the reference answer), a dropdown over the other effects."""
    import numpy as np

    from cliviz.analyses.ablations import grid_matrix
    from cliviz.analyses.heatmaps import DIVERGING, heatmap_figure

    labels = {"delta_logprob_ref": "Δ log-prob (reference answer)", "delta_logprob_own": "Δ log-prob (own answer)",
              "flip_rate": "flip rate", "delta_accuracy": "Δ accuracy", "gate_mass": "gate mass (unablated)"}
    mats = {m: grid_matrix(frame, config.vision_layers, config.injection_layers, metric=m)
            for m in labels if (frame["metric"] == m).any()}

    def bound(m):
        b = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        return b if b > 0 else 1e-6

    first = mats["delta_logprob_ref"]
    fig = heatmap_figure(first, config.vision_layers, config.injection_layers, zmid=0.0, zmin=-bound(first),
                         zmax=bound(first), colorscale=DIVERGING, colorbar_title="effect",
                         title="knockout of (LLM layer, vision layer): change vs the unablated run")
    fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>value %{z:.4f}<extra></extra>")
    fig.update_layout(
        updatemenus=[{
            "buttons": [{"label": labels[m], "method": "restyle",
                         "args": [{"z": [mat.tolist()], "zmin": [-bound(mat)], "zmax": [bound(mat)]}]}
                        for m, mat in mats.items()],
            "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top",
        }],
        margin={"t": 90},
    )
    return fig


def ablate_cmd(
    image: Annotated[Optional[Path], typer.Argument(help="Image file (or use --data).")] = None,
    question: Annotated[Optional[str], typer.Argument(help="Question in the model's vocabulary.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Parquet file for the tidy effects frame.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help=f"{' | '.join(CLI_KINDS)} (default knockout).")] = None,
    llm_layers: Annotated[Optional[str], typer.Option("--llm-layers", help="Comma-separated injection layers (real indices). Default: all.")] = None,
    vision_layers: Annotated[Optional[str], typer.Option("--vision-layers", help="Comma-separated vision layers (hidden_states indices).")] = None,
    tokens: Annotated[str, typer.Option("--tokens", help="all | prompt | image | answer: positions to ablate.")] = "all",
    value: Annotated[Optional[int], typer.Option("--value", help="onehot: vision layer to force; patch: donor sample index.")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Reference answer for IMAGE QUESTION (default: the model's own).")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Knock out every (LLM layer, vision layer) cell; also writes a heatmap page and a faithfulness report.")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Rows (samples x conditions) per forward.")] = 256,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use the first N samples of --data.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Ablate gates or injections (batched, teacher-forced) and report the change in the answer."""
    from cliviz.analyses import ablations as A

    if out is None:
        raise CLIVizError("--out FILE.parquet is required")
    check_writable(out, "output file")
    if kind is not None and kind not in CLI_KINDS:
        raise CLIVizError(f"unknown --kind {kind!r}; use one of {', '.join(CLI_KINDS)}")
    if grid and kind not in (None, "knockout"):
        raise CLIVizError("--grid runs knockouts; drop --kind or use it without --grid")
    if grid and (llm_layers or vision_layers or value is not None):
        raise CLIVizError("--grid covers every layer; drop --llm-layers / --vision-layers / --value")
    kind = kind or "knockout"
    llm = _int_list(llm_layers, "--llm-layers")
    vis = _int_list(vision_layers, "--vision-layers")
    html = out.with_suffix(".html") if grid else None
    report = out.with_name(out.stem + ".faithfulness.csv") if grid else None
    for extra in (html, report):
        check_writable(extra, "output file")
    if data is None and image is None:
        raise CLIVizError("no data: give IMAGE QUESTION or --data DIR|JSONL")
    ablation = None if grid else A.Ablation(kind, llm, vis, tokens=tokens, value=value)  # validates kind/tokens/args
    if grid and tokens not in A.TOKEN_SETS:
        raise CLIVizError(f"unknown --tokens {tokens!r}; use one of {', '.join(A.TOKEN_SETS)}")
    images, questions, references, qtypes = _inputs(image, question, data, limit, reference)

    from cliviz.cli.preflight import checked_question, load_checked

    net, tok = load_checked(model, device, dtype)
    if data is None:
        questions = [checked_question(questions[0], tok)]
    conditions = A.grid_conditions(net, "knockout", tokens) if grid else [None, ablation]
    A.check_conditions(net, conditions)  # layers not in this model -> one-line error before any work

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(questions) * len(conditions)
    with Progress(TextColumn("ablating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=as_json or total < 512) as progress:
        task = progress.add_task("ablating", total=total)
        scores, gate_mass = A.score_with_gate_mass(net, tok, images, questions, references, conditions, qtypes=qtypes,
                                                   max_batch=max_batch, progress=lambda n: progress.advance(task, n))
    cfg = net.config
    frame = A.effects_frame(scores, conditions, gate_mass=gate_mass, injection_layers=cfg.injection_layers,
                            vision_layers=cfg.vision_layers, seed=seed)
    _atomic_write(out, lambda p: frame.to_parquet(p, index=False))
    faith = None
    if grid:
        fig = _grid_figure(frame, cfg)
        _atomic_write(html, lambda p: fig.write_html(str(p), include_plotlyjs=True, full_html=True))
        faith = A.faithfulness(frame)
        _atomic_write(report, lambda p: faith.to_csv(p, index=False))

    overall = frame[(frame["qtype"] == "all") & (frame["condition"] != A.REFERENCE)]
    if as_json:
        wide = overall.pivot_table(index="condition", columns="metric", values="value", aggfunc="first", sort=False)
        wide = wide.reindex(wide["delta_logprob_ref"].abs().sort_values(ascending=False).index)
        base = scores[scores["condition"] == A.REFERENCE]
        payload = {
            "out": str(out), "html": str(html) if html else None, "faithfulness_report": str(report) if report else None,
            "model": str(net.name_or_path), "n_samples": len(questions), "n_conditions": len(conditions),
            "reference_accuracy": float(base["correct"].mean()),
            "answers": base["answer"].tolist() if data is None else None,
            "largest_effects": [{"condition": c, **{k: (None if v != v else float(v)) for k, v in row.items()}}
                                for c, row in wide.head(10).iterrows()],
            "faithfulness": faith.to_dict(orient="records") if faith is not None else None,
        }
        typer.echo(json.dumps(payload, default=str))
        return
    console = Console()
    base = scores[scores["condition"] == A.REFERENCE]
    if data is None:
        row = scores.iloc[-1] if not grid else None
        console.print(f"[dim]question:[/] {escape(questions[0])}   [dim]reference:[/] {escape(str(base['reference'].iloc[0]))}"
                      f"   [dim]answer:[/] [bold]{escape(str(base['answer'].iloc[0]))}[/] ({base['prob'].iloc[0]:.3f})")
        if row is not None:
            console.print(f"[dim]under[/] {escape(row['condition'])}: [bold]{escape(str(row['answer']))}[/] ({row['prob']:.3f})"
                          f"{'  [red]flipped[/]' if row['flipped'] else ''}")
    else:
        console.print(f"{len(questions)} samples, reference accuracy {base['correct'].mean():.3f}")
    console.print(_effects_table(frame, "largest effects (all samples, vs the unablated run)", 10))
    if faith is not None:
        table = Table(title="faithfulness: Spearman(gate mass at answer positions, knockout harm) over cells")
        for col in ("qtype", "effect", "rho", "p", "cells"):
            table.add_column(col, justify="left" if col in ("qtype", "effect") else "right")
        for r in faith.itertuples():
            table.add_row(escape(str(r.qtype)), r.effect, "n/a" if r.rho != r.rho else f"{r.rho:+.2f}",
                          "n/a" if r.p_value != r.p_value else f"{r.p_value:.3f}", str(r.n_cells))
        console.print(table)
    console.print(f"[dim]effects written to {escape(str(out))}[/]")
    if html is not None:
        console.print(f"[dim]grid heatmap page: {escape(str(html))}; faithfulness report: {escape(str(report))}[/]")
