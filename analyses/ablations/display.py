"""How an `AblationReport` shows itself: terminal tables (rich), the grid page (plotly) and Jupyter HTML.

Every grid view carries the knockout note (`report.KNOCKOUT_NOTE`: a knockout renormalises the other
gates, so a cell is not a layer's importance) and, per cell, the share of its harm that switching
that LLM layer's injection off explains; faithfulness p-values are shown Holm-corrected.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cliviz.analyses.ablations.effects import METRIC_LABELS, grid_matrix


def num(x: float, signed: bool = True, scientific: bool | None = None) -> str:
    """3 decimals, or scientific notation (`+1.2e-05`) for tiny numbers. Pass `scientific` from
    `column_style` so that one column never mixes the two (a `+1.2e-05` beside a `+0.000`)."""
    if x != x:
        return "n/a"
    sci = (x != 0 and abs(x) < 5e-4) if scientific is None else scientific
    if sci:
        return f"{x:+.1e}" if signed else f"{x:.1e}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def column_style(values) -> bool:
    """Whether a column is shown in scientific notation: only when all its finite values are tiny."""
    v = np.abs(np.asarray(list(values), dtype=float))
    v = v[np.isfinite(v)]
    return bool(v.size) and bool((v < 5e-4).all()) and bool((v > 0).any())


def per_type_table(report, top_conditions: Sequence[str] | None = None):
    """Flip rate and Δ log-prob per condition and question type (rich)."""
    from rich.markup import escape
    from rich.table import Table

    frame = report.per_type()
    if top_conditions is not None:
        frame = frame[frame["condition"].isin(list(top_conditions))]
    table = Table(title="per question type: flips and Δ log-prob of the reference answer", pad_edge=False)
    for col in ("condition", "qtype", "n", "flips", "Δ logp ref", "acc"):
        table.add_column(col, justify="left" if col in ("condition", "qtype") else "right")
    sci = column_style(frame["delta_logprob_ref"])
    for r in frame.itertuples():
        table.add_row(
            escape(str(r.condition)),
            escape(str(r.qtype)),
            str(int(r.n)),
            f"{r.flip_rate:.2f}",
            num(r.delta_logprob_ref, scientific=sci),
            f"{r.accuracy:.2f}" if hasattr(r, "accuracy") else "",
        )
    return table


def grid_table(report):
    """The knockout cells with Δ log-prob and the share the injection-off row explains (rich)."""
    from rich.table import Table

    from cliviz.analyses.ablations.report import KNOCKOUT_NOTE

    cells = grid_matrix(report.effects, report.vision_layers, report.injection_layers, "delta_logprob_ref")
    share = report.off_explains()
    off = report.off_rows()
    table = Table(title="knockout grid: Δ log-prob of the reference answer [share explained by injection off]")
    table.add_column("LLM layer", justify="right")
    for k in report.vision_layers:
        table.add_column(f"V{k}", justify="right")
    table.add_column("injection off", justify="right")
    sci = column_style([*cells.ravel(), *off.to_numpy()])
    for i, layer in enumerate(report.injection_layers):
        row = []
        for k in range(len(report.vision_layers)):
            s = "" if share is None or share[i, k] != share[i, k] else f" [{share[i, k]:.0%}]"
            row.append(num(cells[i, k], scientific=sci) + s)
        row.append(num(float(off.get(layer, np.nan)), scientific=sci))
        table.add_row(f"L{layer}", *row)
    table.caption = KNOCKOUT_NOTE
    return table


def faithfulness_table(faith):
    from rich.markup import escape
    from rich.table import Table

    from cliviz.analyses.ablations.faithfulness import CORRECTION

    table = Table(title="faithfulness: Spearman(gate mass at answer positions, knockout harm) over cells")
    for col in ("qtype", "effect", "rho", "p", "p (Holm)", "cells"):
        table.add_column(col, justify="left" if col in ("qtype", "effect") else "right")
    for r in faith.itertuples():
        table.add_row(
            escape(str(r.qtype)),
            r.effect,
            "n/a" if r.rho != r.rho else f"{r.rho:+.2f}",
            "n/a" if r.p_value != r.p_value else f"{r.p_value:.3f}",
            "n/a" if r.p_holm != r.p_holm else f"{r.p_holm:.3f}",
            str(r.n_cells),
        )
    table.caption = f"p (Holm): {CORRECTION}; read it, not p, as significant below 0.05"
    return table


def report_renderables(report, top: int = 10) -> list:
    """Largest effects are printed by the command; this gives per-type flips, the grid and faithfulness."""
    out = [per_type_table(report, list(report.largest_effects(top).index))]
    if report.is_grid:
        if report.off_explains() is not None:
            out.append(grid_table(report))
        out.append(faithfulness_table(report.faithfulness))
    return out


def grid_figure(
    effects: pd.DataFrame, vision_layers: Sequence[int], injection_layers: Sequence[int], title: str | None = None
):
    """The grid as one heatmap (Δ log-prob of the reference answer) with a menu over the other effects,
    placed left of the plot so that it never covers plotly's toolbar."""
    from cliviz.analyses.heatmaps import DIVERGING, heatmap_figure

    mats = {
        m: grid_matrix(effects, vision_layers, injection_layers, metric=m)
        for m in METRIC_LABELS
        if m != "accuracy" and (effects["metric"] == m).any()
    }

    def bound(m):
        b = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        return b if b > 0 else 1e-6

    first = mats["delta_logprob_ref"]
    fig = heatmap_figure(
        first,
        vision_layers,
        injection_layers,
        zmid=0.0,
        zmin=-bound(first),
        zmax=bound(first),
        colorscale=DIVERGING,
        colorbar_title="effect",
        title=title or "knockout of (LLM layer, vision layer): change vs the unablated run",
    )
    fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>value %{z:.4f}<extra></extra>")
    fig.update_layout(
        updatemenus=[
            {
                "buttons": [
                    {
                        "label": METRIC_LABELS[m],
                        "method": "restyle",
                        "args": [{"z": [mat.tolist()], "zmin": [-bound(mat)], "zmax": [bound(mat)]}],
                    }
                    for m, mat in mats.items()
                ],
                "direction": "down",
                "x": 0.0,
                "xanchor": "left",
                "y": 1.02,
                "yanchor": "bottom",
            }
        ],
        margin={"t": 130},
        title={"y": 0.97, "yanchor": "top"},
    )
    return fig


def share_figure(report):
    """Per cell: the share of the knockout harm that switching the LLM layer's injection off explains."""
    from cliviz.analyses.heatmaps import heatmap_figure

    share = report.off_explains()
    fig = heatmap_figure(
        np.nan_to_num(share, nan=np.nan),
        report.vision_layers,
        report.injection_layers,
        zmin=0.0,
        zmax=1.0,
        colorbar_title="share",
        title="share of each knockout's harm that injection off explains (blank: no harm)",
    )
    fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>explained %{z:.0%}<extra></extra>")
    return fig


def grid_page(report, title: str | None = None) -> str:
    """Self-contained page: title (model, question or sample count), the knockout note, the grid, the share."""
    from cliviz.analyses.ablations.report import KNOCKOUT_NOTE

    head = title or f"Knockout grid — {report.subject}"
    figs = [grid_figure(report.effects, report.vision_layers, report.injection_layers, head)]
    if report.off_explains() is not None:
        figs.append(share_figure(report))
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(head)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>{html_lib.escape(head)}</h2>"
        f"<p>{html_lib.escape(KNOCKOUT_NOTE)}</p>" + "".join(parts) + "</body></html>"
    )


def grid_headline(report) -> str:
    """One line on a grid: its size, the most harmful cell (Δ log-prob of the reference answer) and
    the largest flip rate."""
    m = report.matrix("delta_logprob_ref")
    head = (
        f"Knockout grid: {len(report.injection_layers)} LLM x {len(report.vision_layers)} vision layers, "
        f"{report.n_samples} samples."
    )
    if not np.isfinite(m).any():
        return head
    i, k = np.unravel_index(int(np.nanargmin(m)), m.shape)
    flips = report.matrix("flip_rate")
    return (
        f"{head} Most harmful cell: L{report.injection_layers[i]} × V{report.vision_layers[k]} "
        f"(Δ log-prob of the reference answer {m[i, k]:+.4f}); largest flip rate {np.nanmax(flips):.0%}."
    )


def report_html(report) -> str:
    """Jupyter: per-type table, and for a grid its headline, the page's figures and the Holm-corrected
    faithfulness."""
    from cliviz.analyses.ablations.faithfulness import CORRECTION
    from cliviz.analyses.ablations.report import KNOCKOUT_NOTE
    from cliviz.analyses.display import figure_html

    parts = [f"<h4>Ablation study — {html_lib.escape(report.subject)}</h4>", report.per_type().to_html(index=False)]
    if report.is_grid:
        parts.append(f"<p>{html_lib.escape(grid_headline(report))}</p>")
        parts.append(f"<p>{html_lib.escape(KNOCKOUT_NOTE)}</p>")
        parts.append(figure_html(grid_figure(report.effects, report.vision_layers, report.injection_layers)))
        parts.append(f"<p>faithfulness, p_holm: {html_lib.escape(CORRECTION)}</p>")
        parts.append(report.faithfulness.to_html(index=False))
    return "".join(parts)
