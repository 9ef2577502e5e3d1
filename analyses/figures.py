"""`cliviz figures`: the standard paper figure set from a trace file, as PDF / SVG / PNG + CSV.

What each figure shows (file stem, then what the numbers in its CSV are):

- `gate_mean` — mean answer-step gate per (LLM layer, vision layer), every trace weighing the
  same: where each LLM layer reads from on average.
- `gate_by_qtype` — the same, one panel per question type, one shared colour scale: do
  different questions make the model read different vision layers?
- `gate_entropy` — per LLM layer, mean entropy (nats) of the answer-step gates, with log K (a
  uniform gate) as a dashed line; the CSV also has the effective number of vision layers.
- `gate_variance` — per LLM layer, within-sample (across tokens) vs across-sample variance of
  the gate vectors (all positions): are the gates dynamic, or a per-question constant?
- `gate_trajectory` — one example trace (`--example N`, default: the first with gates and the
  longest answer among the first 100): each LLM layer's gate over vision layers at each answer step.
- `probe_confusion` — out-of-fold confusion matrix of a logistic-regression probe predicting
  the question type from the gates (row-normalised colours, counts as text); accuracy and the
  majority-class baseline go to `probe_confusion_summary.csv` (and the title with --titles).
- `gate_pca` — first two principal components of the per-trace gate vectors, coloured by type.
- `comparison` (with `--compare`) — accuracy per question type for each model / fusion variant.
- `ablation_grid` (with `--ablations`) — effect of knocking out vision layer k at LLM layer i.

Inputs for the optional figures, read leniently (CSV, JSON records / columns, JSON Lines or
Parquet; column names are matched case-insensitively, with the aliases below):

- `--compare`: columns `model` (aliases fusion, variant, name), `qtype` (question_type, type,
  task; optional: "all" when missing) and `accuracy` (acc, score). Values above 1 are read as
  percentages. Repeated (model, qtype) rows are averaged.
- `--ablations`: a tidy frame with `llm_layer` (layer, injection_layer), `vision_layer`
  (vision, knocked_out, knockout) and `effect` (delta_logprob, delta_accuracy, delta, change,
  value). If a `metric`/`measure` column holds several metrics, the first one mentioning
  "logprob" (else the first in sorted order) is drawn, its colour bar labelled in words
  (`delta_logprob_own` -> "Δ log-prob (own answer)"). Repeated cells (e.g. one row per sample)
  are averaged; the CSV written next to the figure holds the cell means and counts.

Each figure has its builder (`gate_mean_figure`, ..., `ablation_grid_figure`: a `FigureContext` in,
a styled `FigureItem` out, or `FigureSkipped` with the reason); `build_figure_set` is their list.

Publication defaults: plotly "simple_white", text as vector text, a Cividis sequential scale,
a reversed RdBu diverging scale centred at 0, the Okabe-Ito qualitative palette with distinct
markers; widths 336 px (one column, 3.5 in at 96 dpi) or 672 px (two columns, 7 in); no titles
unless asked. PNGs are rendered at `png_scale` x (default 3, about 288 dpi).

Export goes through kaleido and the system Chromium with ONE persistent browser session for
the whole set (`kaleido.start_sync_server(mathjax=False)` ... `stop_sync_server()`); MathJax is
off, nothing is downloaded. Every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cliviz.analyses.ablations.effects import metric_label
from cliviz.analyses.export import (  # re-exported: callers know them from here
    FORMATS,
    NOT_ON_KALEIDO_PAGE,
    RENDER_TIMEOUT_S,
    find_chromium,
    kaleido_session,
    parse_formats,
    prepare_out_dir,
)
from cliviz.analyses.heatmaps import (
    DIVERGING,
    MARKERS,
    QUALITATIVE,
    SEQUENTIAL,
    GateRows,
    gate_matrix_frame,
    group_counts,
    grouped_gate_matrices,
    grouped_heatmap_figure,
    heatmap_figure,
    layer_panels,
    mean_gate_matrix,
    trajectory_figure,
    trajectory_frame,
    wrap_html,
)
from cliviz.analyses.stats import gate_pca, probe_qtype
from cliviz.analyses.summary import GateSummary, summarize
from cliviz.atomic import atomic_write_bytes
from cliviz.errors import CLIVizError
from cliviz.tracing.traceset import TraceSet

__all__ = [
    "FORMATS",
    "NOT_ON_KALEIDO_PAGE",
    "RENDER_TIMEOUT_S",
    "WIDTHS",
    "FigureItem",
    "FigureReport",
    "parse_formats",
    "build_figure_set",
    "export_figures",
    "make_figures",
    "read_compare",
    "read_ablations",
    "find_chromium",
    "style_figure",
    "kaleido_session",
    "FigureContext",
    "FigureSkipped",
    "gate_mean_figure",
    "gate_by_qtype_figure",
    "gate_entropy_figure",
    "gate_variance_figure",
    "gate_trajectory_figure",
    "probe_confusion_figure",
    "gate_pca_figure",
    "comparison_figure",
    "ablation_grid_figure",
]

WIDTHS = {"single": 336, "double": 672}  # px at 96 dpi: 3.5 in and 7 in
FONT = {"family": "Liberation Sans, Arial, Helvetica, sans-serif", "size": 10, "color": "black"}


@dataclass
class FigureItem:
    """One figure of the set: the plotly figure, its size in px, the numbers behind it."""

    name: str
    fig: go.Figure
    data: pd.DataFrame
    width: int
    height: int
    title: str
    description: str
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)  # more CSVs: stem suffix -> frame
    caption: str = ""  # model(s), trace count, what the means average


@dataclass
class FigureReport:
    out: Path
    files: list[Path]
    figures: list[str]
    skipped: dict[str, str]  # figure -> reason
    timings: dict[str, float]  # seconds: read, compute, export
    caption: str = ""  # model(s), traces, what the means average


# ----------------------------------------------------------------------------------------- inputs


def _check_width(width: str) -> int:
    if width not in WIDTHS:
        raise CLIVizError(f"unknown width {width!r}; use single (3.5 in) or double (7 in)")
    return WIDTHS[width]


def _read_frame(path: str | os.PathLike, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise CLIVizError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise CLIVizError(f"{what} file {p} is not a file")
    suffix = p.suffix.lower()
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
        if suffix in (".parquet", ".pq") or head == b"PAR1":
            df = pd.read_parquet(p)
        elif suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(p, lines=True)
        elif suffix == ".json":
            raw = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(raw, dict) and not any(isinstance(v, (list, dict)) for v in raw.values()):
                raw = [raw]
            if isinstance(raw, dict):
                for key in ("records", "rows", "data", "results"):
                    if isinstance(raw.get(key), list):
                        raw = raw[key]
                        break
            df = pd.DataFrame(raw)
        else:
            df = pd.read_csv(p, sep=None, engine="python")
    except Exception as e:  # noqa: BLE001 - any parse problem is a user input problem here
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIVizError(f"cannot read {what} file {p}: {msg}") from None
    if len(df) == 0:
        raise CLIVizError(f"{what} file {p} has no rows")
    return df


def _pick(
    df: pd.DataFrame, names: Sequence[str], what: str, path: str | os.PathLike, required: bool = True
) -> str | None:
    lower = {str(c).strip().lower(): c for c in df.columns}
    for n in names:
        if n in lower:
            return lower[n]
    if required:
        raise CLIVizError(
            f"{what} file {path} needs a column {names[0]!r} (or one of {', '.join(names[1:])}); "
            f"it has {', '.join(map(str, df.columns))}"
        )
    return None


def read_compare(path: str | os.PathLike) -> pd.DataFrame:
    """Read a comparison table -> columns model, qtype, accuracy (0..1), one row per pair."""
    df = _read_frame(path, "comparison")
    m = _pick(df, ("model", "fusion", "variant", "name"), "comparison", path)
    q = _pick(df, ("qtype", "question_type", "type", "task"), "comparison", path, required=False)
    a = _pick(df, ("accuracy", "acc", "score"), "comparison", path)
    acc = pd.to_numeric(df[a], errors="coerce")
    if acc.isna().all():
        raise CLIVizError(f"comparison file {path}: column {a!r} holds no numbers")
    out = pd.DataFrame(
        {"model": df[m].astype(str), "qtype": df[q].astype(str) if q is not None else "all", "accuracy": acc}
    ).dropna(subset=["accuracy"])
    if out.accuracy.max() > 1.0:
        out["accuracy"] = out.accuracy / 100.0
    models = list(dict.fromkeys(out.model))
    qtypes = list(dict.fromkeys(out.qtype))
    out = out.groupby(["model", "qtype"], sort=False, as_index=False).accuracy.mean()
    out["model"] = pd.Categorical(out.model, categories=models)
    out["qtype"] = pd.Categorical(out.qtype, categories=qtypes)
    return out.sort_values(["qtype", "model"]).reset_index(drop=True).astype({"model": str, "qtype": str})


def read_ablations(path: str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """Read an ablation table -> (cell means: llm_layer, vision_layer, effect, n; the effect label)."""
    df = _read_frame(path, "ablations")
    li = _pick(df, ("llm_layer", "layer", "injection_layer"), "ablations", path)
    vi = _pick(df, ("vision_layer", "vision", "knocked_out", "knockout"), "ablations", path)
    ef = _pick(df, ("effect", "delta_logprob", "delta_accuracy", "delta", "change", "value"), "ablations", path)
    label = str(ef)
    metric = _pick(df, ("metric", "measure"), "ablations", path, required=False)
    if metric is not None and df[metric].nunique() > 1:
        names = sorted(df[metric].astype(str).unique())
        chosen = next((n for n in names if "logprob" in n.lower()), names[0])
        df = df[df[metric].astype(str) == chosen]
        label = chosen
    effect = pd.to_numeric(df[ef], errors="coerce")
    frame = pd.DataFrame({"llm_layer": df[li], "vision_layer": df[vi], "effect": effect}).dropna()
    if len(frame) == 0:
        raise CLIVizError(f"ablations file {path}: column {ef!r} holds no numbers")
    for col in ("llm_layer", "vision_layer"):
        num = pd.to_numeric(frame[col], errors="coerce")
        frame[col] = num.astype(np.int64) if num.notna().all() and (num % 1 == 0).all() else frame[col].astype(str)
    cells = frame.groupby(["llm_layer", "vision_layer"], as_index=False).agg(
        effect=("effect", "mean"), n=("effect", "size")
    )
    return cells, label


# ---------------------------------------------------------------------------------------- styling


def style_figure(
    fig: go.Figure, width: int, height: int, *, title: str | None = None, titles: bool = False, legend: bool = True
) -> go.Figure:
    """Publication layout: white template, one font, compact margins, fixed size, optional title."""
    top = 34 if titles and title else 14
    fig.update_layout(
        template="simple_white",
        font=FONT,
        width=width,
        height=height,
        title={"text": title, "x": 0.5, "xanchor": "center", "font": {"size": 11}} if titles and title else None,
        margin={"l": 52, "r": 10, "t": top, "b": 44},
        showlegend=legend,
    )
    fig.update_xaxes(ticks="outside", ticklen=3, title_font={"size": 10}, tickfont={"size": 9})
    fig.update_yaxes(ticks="outside", ticklen=3, title_font={"size": 10}, tickfont={"size": 9})
    fig.update_traces(colorbar={"thickness": 10, "tickfont": {"size": 9}}, selector={"type": "heatmap"})
    if fig.layout.coloraxis and fig.layout.coloraxis.colorscale is not None:
        fig.update_layout(coloraxis_colorbar={"thickness": 10, "tickfont": {"size": 9}})
    return fig


def _heat_height(n_rows: int, base: int) -> int:
    return int(max(170, base + 22 * n_rows))


# --------------------------------------------------------------------------------------- builders


class FigureSkipped(Exception):
    """A figure the inputs cannot support (no question types, a probe with one class...): its reason."""


@dataclass
class FigureContext:
    """What every figure builder reads: the trace set, its one-pass summary (per-trace content-answer
    gate means and running sums: `cliviz.analyses.summary`), the layout."""

    ts: TraceSet
    summary: GateSummary
    width: int  # px
    double: bool  # two-column width: more panels per row
    titles: bool

    @property
    def rows(self) -> GateRows:
        """One row per trace: its mean content-answer gate (what the mean maps, probes and PCA take)."""
        return self.summary.rows

    @property
    def n_traces(self) -> int:
        return self.summary.n_gated

    @property
    def caption(self) -> str:
        """Model(s), trace count and what the means average: stated with every figure."""
        return self.summary.note

    @property
    def layer_labels(self) -> list[str]:
        return [f"L{i}" for i in self.rows.injection_layers]

    def item(
        self,
        name: str,
        fig: go.Figure,
        data: pd.DataFrame,
        height: int,
        title: str,
        desc: str,
        *,
        legend: bool = True,
        extra: dict[str, pd.DataFrame] | None = None,
    ) -> FigureItem:
        """Style `fig` for print at this width and wrap it with the numbers behind it; the caption
        (model, traces, tokens) goes into the description and, with titles on, under the title."""
        caption, lines = wrap_html(self.caption, self.width // 6)  # ~6 px per character at 9-10 pt
        heading, head_lines = wrap_html(title, self.width // 7)
        if self.titles:
            height += 18 * head_lines + 16 * lines  # the title block grows the figure, not squeezes the plot
        shown = f"{heading}<br><sup>{caption}</sup>" if self.titles else title
        style_figure(fig, self.width, height, title=shown, titles=self.titles, legend=legend)
        if self.titles:
            fig.update_layout(margin={"t": 24 + 18 * head_lines + 16 * lines})
        return FigureItem(
            name, fig, data, self.width, height, title, f"{desc} ({self.caption})", extra or {}, self.caption
        )


BELOW_LEGEND = {"orientation": "h", "y": -0.3, "x": 0.0, "font": {"size": 9}}  # for plots without tick labels


def _default_example(summary: GateSummary) -> int:
    cand = np.unique(summary.rows.trace)[:100]  # traces with gates and content answer steps
    return int(cand[np.argmax(summary.answer_lengths[cand])])


def gate_mean_figure(ctx: FigureContext) -> FigureItem:
    """Mean answer-step gate per (LLM layer, vision layer), every trace weighing the same."""
    vis, inj = ctx.rows.vision_layers, ctx.rows.injection_layers
    mean = mean_gate_matrix(ctx.rows)
    fig = heatmap_figure(mean, vis, inj, zmax=float(max(mean.max(), 1e-6)), colorscale=SEQUENTIAL)
    fig.update_layout(xaxis_title="vision layer", yaxis_title="LLM layer")
    return ctx.item(
        "gate_mean",
        fig,
        gate_matrix_frame(mean, vis, inj, n_traces=ctx.n_traces),
        _heat_height(len(inj), 90),
        f"Mean answer-step gates ({ctx.n_traces} traces)",
        "mean answer-step gate per (LLM layer, vision layer)",
        legend=False,
    )


def gate_by_qtype_figure(ctx: FigureContext) -> FigureItem:
    """One panel per question type, one shared colour scale."""
    vis, inj = ctx.rows.vision_layers, ctx.rows.injection_layers
    groups = grouped_gate_matrices(ctx.rows)
    counts = group_counts(ctx.rows)
    if set(groups) == {"unknown"}:
        raise FigureSkipped("no trace carries a question type")
    cols = min(len(groups), 4 if ctx.double else 3)
    n_r = -(-len(groups) // cols)
    fig = grouped_heatmap_figure(groups, vis, inj, cols=cols, counts=counts)
    data = pd.concat(
        [gate_matrix_frame(m, vis, inj, qtype=g, n_traces=counts.get(g, 0)) for g, m in groups.items()],
        ignore_index=True,
    )[["qtype", "n_traces", "llm_layer", "vision_layer", "gate"]]
    return ctx.item(
        "gate_by_qtype",
        fig,
        data,
        int(60 + n_r * max(95, 16 * len(inj) + 40)),
        "Answer-step gates by question type",
        "mean answer-step gates per question type (shared colour scale)",
        legend=False,
    )


def gate_entropy_figure(ctx: FigureContext) -> FigureItem:
    """Mean gate entropy per LLM layer, the entropy of the mean gate, and log K (a uniform gate)."""
    k = len(ctx.rows.vision_layers)
    ent = ctx.summary.entropy
    x = ctx.layer_labels
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=ent.entropy,
            mode="lines+markers",
            name="mean entropy",
            error_y={"type": "data", "array": ent.entropy_sd, "thickness": 1, "width": 3},
            line={"color": QUALITATIVE[0]},
            marker={"symbol": MARKERS[0], "size": 6},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=ent.pooled_entropy,
            mode="lines+markers",
            name="entropy of mean gate",
            line={"color": QUALITATIVE[1], "dash": "dot"},
            marker={"symbol": MARKERS[1], "size": 6},
        )
    )
    fig.add_hline(
        y=float(np.log(k)),
        line={"dash": "dash", "color": "grey", "width": 1},
        annotation_text=f"log K (K={k})",
        annotation_position="bottom right",
        annotation_font_size=9,
    )
    fig.update_layout(
        xaxis_title="LLM layer",
        yaxis_title="gate entropy (nats)",
        yaxis_range=[0, float(np.log(k)) * 1.12 + 1e-6],
        legend=BELOW_LEGEND,
    )
    return ctx.item(
        "gate_entropy", fig, ent, 240, "Gate entropy per LLM layer", "per-layer gate entropy and effective layers"
    )


def gate_variance_figure(ctx: FigureContext) -> FigureItem:
    """Are the gates dynamic? Within-sample (across tokens) vs across-sample variance, all positions."""
    var = ctx.summary.variance
    if var is None:
        raise FigureSkipped(f"the set keeps {ctx.summary.compact.describe()}: the variance needs every position")
    x = ctx.layer_labels
    fig = go.Figure(
        [
            go.Bar(x=x, y=var.within_sample, name="within sample (across tokens)", marker_color=QUALITATIVE[0]),
            go.Bar(
                x=x, y=var.across_sample, name="across samples", marker_color=QUALITATIVE[1], marker_pattern_shape="/"
            ),
        ]
    )
    fig.update_layout(barmode="stack", xaxis_title="LLM layer", yaxis_title="gate variance", legend=BELOW_LEGEND)
    return ctx.item(
        "gate_variance",
        fig,
        var,
        240,
        "Gate variance: within vs across samples",
        "variance decomposition of gate vectors (all positions)",
    )


def gate_trajectory_figure(ctx: FigureContext, example: int | None = None) -> FigureItem:
    """Each LLM layer's gate over vision layers at each answer step of one trace (`example`)."""
    n = ctx.summary.n_traces
    ex = _default_example(ctx.summary) if example is None else example
    if not 0 <= ex < n:
        raise CLIVizError(f"--example {ex} is outside the trace set (0..{n - 1})")
    tr = ctx.ts.take([ex]).traces[0]  # one row group decoded, whatever the size of the set
    if not tr.has_gates:
        raise CLIVizError(f"--example {ex}: that trace has no gates (projector fusion)")
    if len(tr.answer_positions) == 0:
        raise FigureSkipped(f"example {ex} has no answer step")
    every = list(ctx.rows.injection_layers)
    shown = layer_panels(every)
    n_layers = len(shown)
    subset = (
        ""
        if n_layers == len(every)
        else f"; LLM layers {', '.join(f'L{i}' for i in shown)} of {len(every)}, evenly spaced"
    )
    fig = trajectory_figure(tr)
    data = trajectory_frame(tr).assign(trace=ex, question=tr.meta.question)
    fig.update_layout(legend={"orientation": "h", "y": -0.12 - 0.3 / max(n_layers, 1), "x": 0.0, "font": {"size": 9}})
    return ctx.item(
        "gate_trajectory",
        fig,
        data,
        int(70 + n_layers * 85),
        f"Trace {ex}: {_short(tr.meta.question, 60)} -> {_short(tr.meta.answer, 40)}",
        f"answer-step gate trajectories of trace {ex}{subset}",
    )


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def probe_confusion_figure(ctx: FigureContext) -> FigureItem:
    """Out-of-fold confusion of a question-type probe on the gates (row shares as colour, counts as text)."""
    try:
        probe = probe_qtype(ctx.rows)
    except CLIVizError as e:
        raise FigureSkipped(str(e)) from None
    conf = probe.confusion
    share = conf.div(conf.sum(axis=1).where(conf.sum(axis=1) > 0, 1), axis=0)
    fig = go.Figure(
        go.Heatmap(
            z=share.to_numpy(float),
            x=list(conf.columns),
            y=list(conf.index),
            colorscale=SEQUENTIAL,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "share"}},
            hovertemplate="true %{y}<br>predicted %{x}<br>share %{z:.2f}<extra></extra>",
        )
    )
    for i, true in enumerate(conf.index):  # counts as text, dark on light cells and light on dark
        for j, pred in enumerate(conf.columns):
            fig.add_annotation(
                x=pred,
                y=true,
                text=str(int(conf.iat[i, j])),
                showarrow=False,
                font={"size": 9, "color": "black" if share.iat[i, j] > 0.5 else "white"},
            )
    fig.update_layout(
        xaxis_title="predicted question type", yaxis_title="true question type", yaxis={"autorange": "reversed"}
    )
    fig.update_xaxes(tickangle=-35 if len(conf) > 3 else 0)
    return ctx.item(
        "probe_confusion",
        fig,
        probe.confusion_long(),
        int(max(220, 110 + 24 * len(conf))),
        f"Question-type probe: accuracy {probe.accuracy:.2f} (baseline {probe.baseline:.2f})",
        "cross-validated logistic-regression probe: question type from answer-step gates",
        legend=False,
        extra={"summary": probe.summary()},
    )


def gate_pca_figure(ctx: FigureContext) -> FigureItem:
    """The first two principal components of the per-trace gate vectors, coloured by question type."""
    try:
        pcs = gate_pca(ctx.rows)
    except CLIVizError as e:
        raise FigureSkipped(str(e)) from None
    ratio = pcs.attrs["explained_variance_ratio"]
    fig = go.Figure()
    qt = pcs.qtype.where(pcs.qtype.notna(), "unknown").astype(str)
    y_col = "PC2" if "PC2" in pcs else "PC1"
    for j, g in enumerate(sorted(qt.unique())):
        sub = pcs[qt == g]
        fig.add_trace(
            go.Scatter(
                x=sub.PC1,
                y=sub[y_col],
                mode="markers",
                name=g,
                marker={
                    "color": QUALITATIVE[j % len(QUALITATIVE)],
                    "size": 4,
                    "opacity": 0.75,
                    "symbol": MARKERS[j % len(MARKERS)],
                },
            )
        )
    fig.update_layout(
        xaxis_title=f"PC1 ({100 * ratio[0]:.0f}%)",
        yaxis_title=f"{y_col} ({100 * ratio[-1]:.0f}%)",
        legend={"title": {"text": "question type"}, "font": {"size": 9}, "itemsizing": "constant"},
    )
    data = pcs.copy()
    data.attrs = {}
    return ctx.item("gate_pca", fig, data, 260, "PCA of answer-step gate vectors", "PCA of per-trace gate vectors")


def comparison_figure(ctx: FigureContext, compare: pd.DataFrame) -> FigureItem:
    """Accuracy per question type, one bar (colour and pattern) per model. The legend sits at the top
    of the figure (it pushes the plot down by as many rows as it needs), a title between it and the
    plot: below the plot, a legend covers the x-axis title whenever the tick labels are slanted."""
    models = list(dict.fromkeys(compare.model))
    fig = go.Figure()
    for j, m in enumerate(models):
        sub = compare[compare.model == m]
        fig.add_trace(
            go.Bar(
                x=sub.qtype,
                y=sub.accuracy,
                name=m,
                marker_color=QUALITATIVE[j % len(QUALITATIVE)],
                marker_pattern_shape=["", "/", ".", "x", "\\", "+", "-", "|"][j % 8],
            )
        )
    fig.update_layout(
        barmode="group",
        xaxis_title="question type",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
        legend={
            "orientation": "h",
            "x": 0.0,
            "xanchor": "left",
            "y": 1.0,
            "yanchor": "top",
            "yref": "container",
            "font": {"size": 9},
        },
    )
    fig.update_xaxes(tickangle=-35 if compare.qtype.nunique() > 4 else 0)
    item = ctx.item(
        "comparison", fig, compare, 250, "Accuracy per question type", "accuracy per question type and model"
    )
    if ctx.titles:  # just above the plot, pushing the margin, so it never meets the legend
        fig.update_layout(title={"automargin": True, "yref": "paper", "y": 1.0, "yanchor": "bottom"})
    return item


def ablation_grid_figure(ctx: FigureContext, ablations: tuple[pd.DataFrame, str]) -> FigureItem:
    """Effect of knocking out vision layer k at LLM layer i (diverging, centred at 0)."""
    cells, metric = ablations
    label = metric_label(metric)
    lv = sorted(cells.llm_layer.unique(), key=lambda v: (isinstance(v, str), v))
    vv = sorted(cells.vision_layer.unique(), key=lambda v: (isinstance(v, str), v))
    grid = cells.pivot(index="llm_layer", columns="vision_layer", values="effect").reindex(index=lv, columns=vv)
    m = float(np.nanmax(np.abs(grid.to_numpy(float)))) if np.isfinite(grid.to_numpy(float)).any() else 1.0
    m = m if m > 0 else 1e-6
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(float),
            x=[f"V{v}" for v in vv],
            y=[f"L{v}" for v in lv],
            colorscale=DIVERGING,
            zmin=-m,
            zmax=m,
            zmid=0,
            colorbar={"title": {"text": label, "side": "right"}},
            hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>effect %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(xaxis_title="vision layer knocked out", yaxis_title="LLM layer", yaxis={"autorange": "reversed"})
    return ctx.item(
        "ablation_grid",
        fig,
        cells,
        _heat_height(len(lv), 90),
        f"Knock-out effect: {label}",
        "knock-out effect per (LLM layer, vision layer)",
        legend=False,
    )


def build_figure_set(
    ts: TraceSet,
    *,
    ablations: tuple[pd.DataFrame, str] | None = None,
    compare: pd.DataFrame | None = None,
    example: int | None = None,
    width: str = "single",
    titles: bool = False,
    include_special: bool = False,
    pool: bool = False,
) -> tuple[list[FigureItem], dict[str, str]]:
    """Compute every figure (no export): (items, skipped figure -> reason). One pass over the set
    (`summarize`: memory bounded by the shapes) plus the example trace's row group. A set of several
    models is refused unless `pool`; `include_special` keeps `<eos>` steps in the answer means."""
    w = _check_width(width)
    summary = summarize(ts, include_special=include_special, pool=pool)
    ctx = FigureContext(ts, summary, w, width == "double", titles)
    builders: list[tuple[str, Callable[[FigureContext], FigureItem]]] = [
        ("gate_mean", gate_mean_figure),
        ("gate_by_qtype", gate_by_qtype_figure),
        ("gate_entropy", gate_entropy_figure),
        ("gate_variance", gate_variance_figure),
        ("gate_trajectory", partial(gate_trajectory_figure, example=example)),
        ("probe_confusion", probe_confusion_figure),
        ("gate_pca", gate_pca_figure),
    ]
    if compare is not None:
        builders.append(("comparison", partial(comparison_figure, compare=compare)))
    if ablations is not None:
        builders.append(("ablation_grid", partial(ablation_grid_figure, ablations=ablations)))
    items: list[FigureItem] = []
    skipped: dict[str, str] = {}
    for name, build in builders:
        try:
            items.append(build(ctx))
        except FigureSkipped as e:
            skipped[name] = str(e)
    return items, skipped


# ----------------------------------------------------------------------------------------- export


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, float_format="%.6g").encode("utf-8")


def export_figures(
    items: Sequence[FigureItem], out: str | os.PathLike, formats: Sequence[str], *, png_scale: float = 3.0
) -> list[Path]:
    """Write each figure in every format plus its CSV(s), in one kaleido browser session."""
    out_dir = prepare_out_dir(out)
    formats = parse_formats(list(formats))
    written: list[Path] = []
    for it in items:  # numbers first: cheap, and useful even if the browser fails
        p = out_dir / f"{it.name}.csv"
        atomic_write_bytes(p, _csv_bytes(it.data))
        written.append(p)
        for suffix, frame in it.extra.items():
            q = out_dir / f"{it.name}_{suffix}.csv"
            atomic_write_bytes(q, _csv_bytes(frame))
            written.append(q)
    with kaleido_session() as session:
        for it in items:
            for fmt in formats:
                data = session.render(it.fig, fmt, it.width, it.height, png_scale if fmt == "png" else 1.0)
                p = out_dir / f"{it.name}.{fmt}"
                atomic_write_bytes(p, data)
                written.append(p)
    return written


def summarize_caption(items: Sequence[FigureItem]) -> str:
    """The caption every figure of the set shares (model, traces, tokens), from a built item."""
    return items[0].caption if items else ""


def make_figures(
    traces: str | os.PathLike,
    out: str | os.PathLike,
    *,
    formats: str | Sequence[str] = FORMATS,
    ablations: str | os.PathLike | None = None,
    compare: str | os.PathLike | None = None,
    example: int | None = None,
    width: str = "single",
    titles: bool = False,
    png_scale: float = 3.0,
    include_special: bool = False,
    pool: bool = False,
) -> FigureReport:
    """The whole `cliviz figures` pipeline: check inputs, compute, export, write a manifest."""
    fmts = parse_formats(formats)
    _check_width(width)
    if not (0.25 <= png_scale <= 10):
        raise CLIVizError(f"--png-scale {png_scale} is out of range (0.25..10)")
    out_dir = prepare_out_dir(out)
    find_chromium()  # fail before any work
    t0 = time.perf_counter()
    ts = TraceSet.read(traces)
    abl = read_ablations(ablations) if ablations is not None else None
    cmp = read_compare(compare) if compare is not None else None
    t1 = time.perf_counter()
    items, skipped = build_figure_set(
        ts,
        ablations=abl,
        compare=cmp,
        example=example,
        width=width,
        titles=titles,
        include_special=include_special,
        pool=pool,
    )
    caption = summarize_caption(items)
    t2 = time.perf_counter()
    files = export_figures(items, out_dir, fmts, png_scale=png_scale)
    t3 = time.perf_counter()
    manifest = {
        "traces": str(traces),
        "n_traces": len(ts),
        "models": ts.models(),
        "caption": caption,
        "answer_steps": "every step" if include_special else "content tokens only (<eos> and special tokens left out)",
        "stored": ts.compaction.describe(),
        "formats": fmts,
        "width": width,
        "png_scale": png_scale,
        "figures": [
            {
                "name": it.name,
                "description": it.description,
                "caption": it.caption,
                "title": it.title,
                "width_px": it.width,
                "height_px": it.height,
                "files": [f"{it.name}.{f}" for f in fmts]
                + [f"{it.name}.csv"]
                + [f"{it.name}_{s}.csv" for s in it.extra],
            }
            for it in items
        ],
        "skipped": skipped,
    }
    mp = out_dir / "manifest.json"
    atomic_write_bytes(mp, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    files.append(mp)
    return FigureReport(
        out=out_dir,
        files=files,
        figures=[it.name for it in items],
        skipped=skipped,
        timings={"read": t1 - t0, "compute": t2 - t1, "export": t3 - t2},
        caption=caption,
    )
