"""Vision-layer x LLM-layer gate maps and the plotly figures drawn from them.

A cell (LLM layer i, vision layer k) holds the mean gate weight that layer i gave vision layer k
over a set of token positions: the answer steps, one role, one position, or every position. Rows
sum to 1 (gates are a softmax over vision layers), so a row reads as "where layer i looked".
The same builders serve the command line, the dashboard and `cliviz figures`.

Trace-set level (vectorised over the Arrow table, no per-trace Python loop):
`gate_rows` gathers the selected gate vectors of every trace once; `mean_gate_matrix`,
`grouped_gate_matrices` and `gate_difference` reduce them. By default every trace weighs the
same (`weight="trace"`: the mean of the per-trace `gate_matrix`es, so a one-trace set gives exactly
`gate_matrix(trace)`); `weight="token"` pools all selected rows instead. Axis labels always carry
the model's real layer indices (`meta.vision_layers` / `meta.injection_layers`), so traces whose
layer lists differ cannot be averaged and are refused with a `CLIVizError`. Traces without gates
(`projector` fusion) contribute nothing and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import TOKEN_SETS, Trace
from cliviz.tracing.traceset import TraceSet

SEQUENTIAL = "Cividis"  # colour-blind-safe sequential scale
DIVERGING = "RdBu_r"  # ColorBrewer RdBu (colour-blind safe), reversed: blue < 0 < red, white at 0
# Okabe-Ito, reordered so the first colours are the most distinct on white (yellow late).
QUALITATIVE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "star", "cross")
SET_SELECTIONS = TOKEN_SETS  # the name this module used before the set had one home


def positions_for(trace: Trace, select: str | int = "answer") -> np.ndarray:
    """Token positions for a selection: `answer` (the steps that produced the answer),
    `image` / `prompt` (a role), `all`, or one integer position."""
    if isinstance(select, (int, np.integer)):
        if not 0 <= select < trace.n_tokens:
            raise ValueError(f"position {select} outside 0..{trace.n_tokens - 1}")
        return np.array([select])
    if select == "answer":
        return trace.answer_positions
    if select == "all":
        return np.arange(trace.n_tokens)
    if select in ("image", "prompt"):
        return np.flatnonzero(trace.role_mask(select))
    raise ValueError(f"unknown selection {select!r}; use answer, image, prompt, all or a position")


def gate_matrix(trace: Trace, select: str | int = "answer") -> np.ndarray:
    """Mean gates over the selected positions: `[n_injection_layers, K]`."""
    pos = positions_for(trace, select)
    if not trace.has_gates or len(pos) == 0:
        return np.zeros((trace.gates.shape[0], trace.gates.shape[2]), dtype=np.float32)
    return trace.gates[:, pos].mean(axis=1)  # [L, K]


def gate_entropy(gates: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each gate row, averaged over tokens: `[L, T, K] -> [L]`."""
    p = np.clip(gates, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1).mean(-1)


def heatmap_figure(
    matrix: np.ndarray,
    vision_layers: list[int],
    injection_layers: list[int],
    title: str | None = None,
    zmax: float | None = None,
    colorscale: str = SEQUENTIAL,
    zmid: float | None = None,
    zmin: float | None = None,
    colorbar_title: str = "gate",
) -> go.Figure:
    """Heatmap with the model's real layer indices on the axes (LLM layer rows, vision columns).
    `zmin` defaults to 0 (gates), or to the data when `zmid` is given (diverging maps)."""
    fig = go.Figure(
        go.Heatmap(
            z=np.asarray(matrix, dtype=float),
            x=[f"V{k}" for k in vision_layers],
            y=[f"L{i}" for i in injection_layers],
            colorscale=colorscale,
            zmin=zmin if zmin is not None else (None if zmid is not None else 0.0),
            zmax=zmax,
            zmid=zmid,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>gate %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="vision layer (hidden_states index)",
        yaxis_title="LLM layer",
        yaxis={"autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 40 if title else 10, "b": 50},
        template="simple_white",
    )
    return fig


def with_notes(fig: go.Figure, notes: list[str], width: int = 110) -> go.Figure:
    """Put the map's notes (its kind, its causal check) under the title, wrapped, and make room."""
    import textwrap

    if not notes:
        return fig
    lines = [part for note in notes for part in textwrap.wrap(note, width)]
    title = fig.layout.title.text or ""
    fig.update_layout(
        title={"text": title, "subtitle": {"text": "<br>".join(lines), "font": {"size": 11}}},
        margin={"t": 50 + 15 * len(lines) + (20 if title else 0)},
    )
    return fig


def trace_heatmap_figure(trace: Trace, token: int | None = None, role: str | None = None) -> go.Figure:
    """The gate map of one trace with its notes: answer step `token`, a token `role` (answer,
    image, prompt, all), or by default the mean over answer steps. What `Trace.heatmap` returns."""
    if token is not None and role is not None:
        raise CLIVizError("give an answer step (token=) or a role (role=), not both")
    if not trace.has_gates:
        raise CLIVizError(f"this trace has no gates (fusion={trace.meta.fusion}): there is no gate map to draw")
    n = len(trace.answer_texts)
    if token is not None:
        if not isinstance(token, (int, np.integer)) or not -n <= token < n:
            raise CLIVizError(f"answer step {token!r} outside 0..{n - 1}")
        step = int(token) % n
        select: str | int = int(trace.answer_positions[step])
        what = f"answer token {step} ({trace.answer_texts[step]!r})"
    else:
        select = role or "answer"
        if select not in SET_SELECTIONS:
            raise CLIVizError(f"unknown role {select!r}; use one of {', '.join(SET_SELECTIONS)}")
        what = f"mean over {n} answer steps" if select == "answer" else f"mean over {select} tokens"
    fig = heatmap_figure(
        gate_matrix(trace, select),
        trace.meta.vision_layers,
        trace.meta.injection_layers,
        title=f"{trace.meta.question} → {trace.meta.answer}: gates, {what}",
        zmax=1.0,
    )
    return with_notes(fig, trace.map_notes())


DROPDOWN_STEPS = 24  # answers up to this many steps list each step in the dropdown; longer ones get a slider


def token_heatmap_figure(trace: Trace) -> go.Figure:
    """One heatmap with a dropdown over selections: all answer steps, each step, image, prompt.

    The dropdown sits at the top left, above the plot, so that it never covers plotly's toolbar
    (top right); the map's notes (kind, causal check) are the subtitle. A long answer (a real
    checkpoint's sentences, up to 1,024 tokens) keeps the dropdown for the aggregates and moves its
    steps to a slider under the plot, which stays usable at any length."""
    steps = [(f"step {s}: -> {trace.answer_texts[s]!r}", int(pos)) for s, pos in enumerate(trace.answer_positions)]
    aggregates: list[tuple[str, str | int]] = [
        ("image tokens", "image"),
        ("prompt tokens", "prompt"),
        ("all tokens", "all"),
    ]
    long_answer = len(steps) > DROPDOWN_STEPS
    options = [("answer (mean)", "answer")] + ([] if long_answer else steps) + aggregates
    mats = [gate_matrix(trace, sel) for _, sel in options]
    fig = heatmap_figure(
        mats[0],
        trace.meta.vision_layers,
        trace.meta.injection_layers,
        zmax=1.0,
        title=f"{trace.meta.question}  ->  {trace.meta.answer}",
    )
    with_notes(fig, trace.map_notes())
    fig.update_layout(
        title={"yref": "container", "y": 1.0, "yanchor": "top", "pad": {"t": 12}},  # title and notes on top,
        updatemenus=[
            {  # then the dropdown right above the plot
                "buttons": [
                    {"label": label, "method": "restyle", "args": [{"z": [m.tolist()]}]}
                    for (label, _), m in zip(options, mats)
                ],
                "direction": "down",
                "x": 0.0,
                "xanchor": "left",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 6},
            }
        ],
        margin={"t": (fig.layout.margin.t or 40) + 40},
    )
    if long_answer:
        fig.update_layout(
            sliders=[
                {  # tick labels hidden (hundreds would overlap); the current value names the step
                    "active": 0,
                    "currentvalue": {"prefix": "answer ", "font": {"size": 12, "color": "#333"}},
                    "pad": {"t": 40},
                    "font": {"color": "rgba(0,0,0,0)"},
                    "ticklen": 0,
                    "steps": [
                        {"label": label, "method": "restyle", "args": [{"z": [gate_matrix(trace, pos).tolist()]}]}
                        for label, pos in steps
                    ],
                }
            ]
        )
    return fig


def write_trace_html(trace: Trace, path) -> None:
    """Self-contained interactive page (plotly.js inlined: opens offline)."""
    if not trace.has_gates:
        raise ValueError("this model has no gates (projector fusion): nothing to draw")
    token_heatmap_figure(trace).write_html(str(path), include_plotlyjs=True, full_html=True)


# ================================================================================ trace-set level

TracesLike = TraceSet | Trace | Iterable[Trace]


def as_traceset(traces: TracesLike) -> TraceSet:
    """A `TraceSet` from a TraceSet (itself), one Trace, or an iterable of Traces."""
    if isinstance(traces, TraceSet):
        return traces
    if isinstance(traces, Trace):
        return TraceSet([traces])
    return TraceSet(list(traces))


def _list_values(col: pa.ChunkedArray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets[n+1]) of a list column; correct for sliced tables."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(col)
    values = np.asarray(flat.to_numpy(), dtype=dtype) if len(flat) else np.empty(0, dtype=dtype)
    return values, offsets


def _layer_list(values: np.ndarray, offsets: np.ndarray, i: int) -> list[int]:
    return [int(v) for v in values[offsets[i] : offsets[i + 1]]]


@dataclass(frozen=True)
class GateRows:
    """The selected gate vectors of a whole trace set, gathered once.

    Row r is one (trace, token position): `gates[r]` is `[L, K]` (LLM layer x vision layer,
    each row a distribution), `norms[r]` the `[L]` injection norms at that position. Rows are
    ordered by trace, then by position order within the trace (`step` = rank within its trace,
    i.e. the answer step for `select="answer"`). Per-trace arrays (`qtype`, `sample_id`,
    `gated`) are indexed by the row number in the trace set.
    """

    gates: np.ndarray
    norms: np.ndarray
    trace: np.ndarray
    position: np.ndarray
    step: np.ndarray
    vision_layers: list[int]
    injection_layers: list[int]
    qtype: np.ndarray
    sample_id: np.ndarray
    gated: np.ndarray
    select: str

    def __len__(self) -> int:
        return len(self.trace)

    @property
    def K(self) -> int:
        return len(self.vision_layers)

    @property
    def L(self) -> int:
        return len(self.injection_layers)

    def per_trace(self) -> tuple[np.ndarray, np.ndarray]:
        """(trace ids `[N]`, per-trace mean gates `[N, L, K]`) over each trace's selected rows;
        traces with no selected row are absent."""
        if len(self.trace) == 0:
            return np.empty(0, np.int64), np.empty((0, self.L, self.K), np.float64)
        ids, starts, counts = np.unique(self.trace, return_index=True, return_counts=True)
        sums = np.add.reduceat(self.gates.astype(np.float64), starts, axis=0)
        return ids, sums / counts[:, None, None]

    def trace_labels(self, by: str = "qtype") -> np.ndarray:
        """Per-trace group label (`qtype` or `sample_id`, indexed by trace row); None -> "unknown"."""
        per_trace = {"qtype": self.qtype, "sample_id": self.sample_id}.get(by)
        if per_trace is None:
            raise CLIVizError(f"cannot group by {by!r}; use qtype or sample_id")
        return np.array(["unknown" if v is None else str(v) for v in per_trace], dtype=object)

    def labels(self, by: str = "qtype") -> np.ndarray:
        """Per-row group label (see `trace_labels`)."""
        return self.trace_labels(by)[self.trace]


def check_same_layers(a: GateRows, b: GateRows, what: str = "the two trace sets") -> None:
    if a.vision_layers != b.vision_layers or a.injection_layers != b.injection_layers:
        raise CLIVizError(
            f"{what} use different layers (vision {a.vision_layers} vs {b.vision_layers}, LLM "
            f"{a.injection_layers} vs {b.injection_layers}): gate maps cannot be compared cell by cell"
        )


def gate_rows(traces: TracesLike | GateRows, select: str = "answer") -> GateRows:
    """Gather the gate vectors at the selected positions of every trace, vectorised.

    `select`: `answer` (the positions whose output is an answer token), `image` / `prompt`
    (token roles) or `all`. Traces without gates are skipped; the rest must share their
    vision and LLM layer lists (CLIVizError otherwise, or when no trace has gates)."""
    if isinstance(traces, GateRows):
        if traces.select != select:
            raise CLIVizError(f"these gate rows were gathered for {traces.select!r}, not {select!r}")
        return traces
    if select not in TOKEN_SETS:
        raise CLIVizError(f"unknown selection {select!r}; use one of {', '.join(TOKEN_SETS)}")
    t = as_traceset(traces).table
    shapes, gated, vision, injection = _shared_layers(t)
    T = shapes[:, 1]
    Lc, Kc = len(injection), len(vision)
    trace_of, position, step = _selected_positions(t, select, gated, T)
    Tr = T[trace_of]
    if np.any(position < 0) or np.any(position >= Tr):
        raise CLIVizError("trace set is corrupt: a selected position lies outside its trace's tokens")
    g_v, g_o = _list_values(t.column("gates"), np.float32)
    n_v, n_o = _list_values(t.column("injection_norm"), np.float32)
    lay = np.arange(Lc, dtype=np.int64)
    base = g_o[trace_of] + position * Kc  # [R]
    idx = base[:, None, None] + (lay[None, :] * (Tr * Kc)[:, None])[:, :, None] + np.arange(Kc)[None, None, :]
    gates = g_v[idx] if len(base) else np.empty((0, Lc, Kc), np.float32)  # [R, L, K]
    nidx = n_o[trace_of][:, None] + lay[None, :] * Tr[:, None] + position[:, None]
    norms = n_v[nidx] if len(base) else np.empty((0, Lc), np.float32)  # [R, L]
    qtype = np.array(t.column("qtype").to_pylist(), dtype=object)
    sample_id = np.array(t.column("sample_id").to_pylist(), dtype=object)
    return GateRows(
        gates=gates,
        norms=norms,
        trace=trace_of,
        position=position,
        step=step,
        vision_layers=vision,
        injection_layers=injection,
        qtype=qtype,
        sample_id=sample_id,
        gated=gated,
        select=select,
    )


def _shared_layers(t: pa.Table) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """`(gates shapes [n, 3], gated [n], vision layers, injection layers)`, refusing an empty set, one
    without gates, or traces whose layer lists differ."""
    n = t.num_rows
    shape_v, shape_o = _list_values(t.column("gates_shape"), np.int64)
    if n == 0:
        raise CLIVizError("the trace set is empty: nothing to analyse")
    if np.any(np.diff(shape_o) != 3):
        raise CLIVizError("trace set is corrupt: gates_shape must have 3 entries per trace")
    shapes = shape_v.reshape(n, 3)
    L, K = shapes[:, 0], shapes[:, 2]
    gated = shapes.prod(axis=1) > 0
    if not gated.any():
        raise CLIVizError("no trace in the set has gates (projector fusion records none): nothing to analyse")
    vis_v, vis_o = _list_values(t.column("vision_layers"), np.int64)
    inj_v, inj_o = _list_values(t.column("injection_layers"), np.int64)
    if np.any(np.diff(vis_o)[gated] != K[gated]) or np.any(np.diff(inj_o)[gated] != L[gated]):
        raise CLIVizError("trace set is inconsistent: gates shape does not match vision_layers / injection_layers")
    first = int(np.flatnonzero(gated)[0])
    vision, injection = _layer_list(vis_v, vis_o, first), _layer_list(inj_v, inj_o, first)
    same = (K == len(vision)) & (L == len(injection))
    idx_g = np.flatnonzero(gated & same)
    if len(idx_g):
        same[idx_g] &= (vis_v[vis_o[idx_g, None] + np.arange(len(vision))] == np.asarray(vision)).all(1)
        same[idx_g] &= (inj_v[inj_o[idx_g, None] + np.arange(len(injection))] == np.asarray(injection)).all(1)
    bad = np.flatnonzero(gated & ~same)
    if len(bad):
        b = int(bad[0])
        raise CLIVizError(
            f"traces mix layer lists: trace {first} has vision layers {vision} / LLM layers {injection}, trace {b} "
            f"has {_layer_list(vis_v, vis_o, b)} / {_layer_list(inj_v, inj_o, b)}; analyse them separately"
        )
    return shapes, gated, vision, injection


def _selected_positions(
    t: pa.Table, select: str, gated: np.ndarray, T: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(trace, position, step)` of every selected row, traces with gates only, in trace order."""
    n = t.num_rows
    if select == "answer":
        pos_v, pos_o = _list_values(t.column("answer_positions"), np.int64)
        counts = np.diff(pos_o) * gated
        keep = np.repeat(gated, np.diff(pos_o))
        trace_of = np.repeat(np.arange(n, dtype=np.int64), counts)
        position = pos_v[keep]
    elif select == "all":
        counts = T * gated
        trace_of = np.repeat(np.arange(n, dtype=np.int64), counts)
        position = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    else:
        roles = pc.list_flatten(t.column("token_roles"))
        role_o = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(pc.fill_null(pc.list_value_length(t.column("token_roles")), 0).to_numpy(), out=role_o[1:])
        hit = (
            np.flatnonzero(pc.equal(roles, select).to_numpy(zero_copy_only=False))
            if len(roles)
            else np.empty(0, np.int64)
        )
        trace_all = np.searchsorted(role_o, hit, side="right") - 1
        ok = gated[trace_all]
        hit, trace_of = hit[ok], trace_all[ok]
        position = hit - role_o[trace_of]
        counts = np.bincount(trace_of, minlength=n)
    step = np.arange(len(trace_of), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return trace_of, position, step


def _reduce(rows: GateRows, mask: np.ndarray | None, weight: str) -> np.ndarray:
    if weight not in ("trace", "token"):
        raise CLIVizError(f"unknown weight {weight!r}; use trace or token")
    g = rows.gates if mask is None else rows.gates[mask]
    if len(g) == 0:
        raise CLIVizError(f"no gate vectors selected ({rows.select!r} positions): nothing to average")
    if weight == "token":
        return g.astype(np.float64).mean(axis=0)
    tr = rows.trace if mask is None else rows.trace[mask]
    _, starts, counts = np.unique(tr, return_index=True, return_counts=True)
    return (np.add.reduceat(g.astype(np.float64), starts, axis=0) / counts[:, None, None]).mean(axis=0)


def mean_gate_matrix(traces: TracesLike | GateRows, select: str = "answer", weight: str = "trace") -> np.ndarray:
    """Mean gates over a trace set: `[n_injection_layers, K]` (float64).

    `weight="trace"`: mean of the per-trace means (each trace counts once; one trace gives
    `gate_matrix(trace, select)`); `weight="token"`: mean over every selected position."""
    return _reduce(gate_rows(traces, select), None, weight)


def grouped_gate_matrices(
    traces: TracesLike | GateRows, select: str = "answer", by: str = "qtype", weight: str = "trace"
) -> dict[str, np.ndarray]:
    """`{group: mean gate matrix}` for each group (question type by default; "unknown" for traces
    without one), in sorted group order."""
    rows = gate_rows(traces, select)
    labels = rows.labels(by)
    return {str(g): _reduce(rows, labels == g, weight) for g in sorted(set(labels.tolist()))}


def group_counts(traces: TracesLike | GateRows, select: str = "answer", by: str = "qtype") -> dict[str, int]:
    """Number of traces that contribute selected rows to each group."""
    rows = gate_rows(traces, select)
    groups, counts = np.unique(rows.trace_labels(by)[np.unique(rows.trace)].astype(str), return_counts=True)
    return {str(g): int(c) for g, c in zip(groups, counts)}


def gate_difference(
    a: TracesLike | GateRows,
    b: TracesLike | GateRows | None = None,
    *,
    groups: tuple[str, str] | None = None,
    by: str = "qtype",
    select: str = "answer",
    weight: str = "trace",
) -> np.ndarray:
    """Difference of mean gate matrices, `[L, K]`: `mean(a) - mean(b)` for two trace sets, or
    `mean(group A) - mean(group B)` within `a` when `groups=(A, B)` (e.g. two question types)."""
    ra = gate_rows(a, select)
    if groups is not None:
        if b is not None:
            raise CLIVizError("give either a second trace set or groups=(A, B), not both")
        labels = ra.labels(by)
        present = sorted(set(labels.tolist()))
        for g in groups:
            if g not in present:
                raise CLIVizError(f"no traces with {by} {g!r}; present: {', '.join(present)}")
        return _reduce(ra, labels == groups[0], weight) - _reduce(ra, labels == groups[1], weight)
    if b is None:
        raise CLIVizError("gate_difference needs a second trace set or groups=(A, B)")
    rb = gate_rows(b, select)
    check_same_layers(ra, rb)
    return _reduce(ra, None, weight) - _reduce(rb, None, weight)


def traceset_notes(ts: TraceSet) -> list[str]:
    """The notes of a trace set's mean map: the fusion's kind of map and the causal checks it holds."""
    from cliviz.tracing.causal import NEGLIGIBLE_NATS, map_kind_note

    meta = ts.meta_frame()
    notes = []
    fusions = sorted(set(meta["fusion"]))
    if len(fusions) == 1 and map_kind_note(fusions[0]):
        notes.append(map_kind_note(fusions[0]))
    measured = meta.dropna(subset=["injection_off_changed", "injection_off_delta_logprob"])
    if len(measured):
        flips = measured["injection_off_changed"].astype(bool)
        delta = measured["injection_off_delta_logprob"].astype(float)
        line = (
            f"injection off (all layers) changes the answer in {int(flips.sum())} of {len(measured)} traces; "
            f"median Δ log-prob {delta.median():+.3f}"
        )
        if not flips.any() and (delta.abs() < NEGLIGIBLE_NATS).all():
            line += " — the injection does not matter for these answers: this map shows routing, not importance."
        notes.append(line + ".")
    else:
        notes.append("causal check not recorded in these traces (`cliviz trace` records it; sweeps do not).")
    return notes


def traceset_heatmap_figure(traces: TracesLike, select: str = "answer", by: str | None = None) -> go.Figure:
    """Mean gate map of a trace set (or one panel per `by` group, e.g. `qtype`) with its notes.
    What `TraceSet.heatmap` returns."""
    ts = as_traceset(traces)
    rows = gate_rows(ts, select)
    if by is None:
        fig = heatmap_figure(
            mean_gate_matrix(rows, select),
            rows.vision_layers,
            rows.injection_layers,
            zmax=1.0,
            title=f"mean gates at {select} positions, {len(np.unique(rows.trace))} traces",
        )
    else:
        fig = grouped_heatmap_figure(
            grouped_gate_matrices(rows, select, by),
            rows.vision_layers,
            rows.injection_layers,
            counts=group_counts(rows, select, by),
            title=f"mean gates at {select} positions, by {by}",
        )
    return with_notes(fig, traceset_notes(ts))


def gate_matrix_frame(
    matrix: np.ndarray, vision_layers: list[int], injection_layers: list[int], value: str = "gate", **columns: object
) -> pd.DataFrame:
    """Tidy `[L, K]` matrix: one row per (llm_layer, vision_layer), real layer indices."""
    m = np.asarray(matrix, dtype=float)
    if m.shape != (len(injection_layers), len(vision_layers)):
        raise CLIVizError(
            f"matrix shape {m.shape} does not match the layer lists ({len(injection_layers)} x {len(vision_layers)})"
        )
    df = pd.DataFrame(
        {
            "llm_layer": np.repeat(np.asarray(injection_layers, dtype=np.int64), len(vision_layers)),
            "vision_layer": np.tile(np.asarray(vision_layers, dtype=np.int64), len(injection_layers)),
            value: m.ravel(),
        }
    )
    for name, v in columns.items():
        df.insert(0, name, v)
    return df


# ---------------------------------------------------------------------------- trace-set figures


def grouped_heatmap_figure(
    matrices: Mapping[str, np.ndarray],
    vision_layers: list[int],
    injection_layers: list[int],
    *,
    cols: int | None = None,
    zmax: float | None = None,
    colorscale: str = SEQUENTIAL,
    counts: Mapping[str, int] | None = None,
    title: str | None = None,
    colorbar_title: str = "gate",
) -> go.Figure:
    """Small multiples, one heatmap per group, one shared colour scale (0..max over all panels)."""
    from plotly.subplots import make_subplots

    if not matrices:
        raise CLIVizError("no groups to draw")
    names = list(matrices)
    cols = cols or min(len(names), 3)
    rows = -(-len(names) // cols)
    labels = [f"{g} (n={counts[g]})" if counts and g in counts else g for g in names]
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=labels,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.04 if cols > 1 else 0.0,
        vertical_spacing=0.12 if rows > 1 else 0.0,
    )
    hi = zmax if zmax is not None else max(float(np.max(m)) for m in matrices.values())
    x = [f"V{k}" for k in vision_layers]
    y = [f"L{i}" for i in injection_layers]
    for j, g in enumerate(names):
        fig.add_trace(
            go.Heatmap(
                z=np.asarray(matrices[g], dtype=float),
                x=x,
                y=y,
                coloraxis="coloraxis",
                hovertemplate=f"{g}<br>LLM layer %{{y}}<br>vision layer %{{x}}<br>gate %{{z:.3f}}<extra></extra>",
            ),
            row=j // cols + 1,
            col=j % cols + 1,
        )
    fig.update_layout(
        coloraxis={"colorscale": colorscale, "cmin": 0.0, "cmax": hi, "colorbar": {"title": {"text": colorbar_title}}},
        template="simple_white",
        title=title,
    )
    fig.update_yaxes(autorange="reversed")
    # Every column's lowest panel carries the x tick labels (the shared axes hide them above it): with
    # a short last row, the columns it leaves empty end a row higher. A full last row gets one centred
    # "vision layer" title; a short one gets it under every column, so no column is left unlabelled.
    lowest = {c: max(r for r in range(1, rows + 1) if (r - 1) * cols + c <= len(names)) for c in range(1, cols + 1)}
    full = all(r == rows for r in lowest.values())
    for c, r in lowest.items():
        title = "vision layer" if (not full or c == (cols + 1) // 2) else None
        fig.update_xaxes(showticklabels=True, title_text=title, row=r, col=c)
    fig.update_yaxes(title_text="LLM layer", col=1)
    fig.update_annotations(font={"size": 10})
    return fig


def difference_figure(
    diff: np.ndarray,
    vision_layers: list[int],
    injection_layers: list[int],
    *,
    label: str = "Δ gate",
    title: str | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Diverging heatmap of a gate difference, centred at 0 with a symmetric range."""
    m = float(zmax if zmax is not None else np.max(np.abs(diff)))
    m = m if m > 0 else 1e-6
    return heatmap_figure(
        diff,
        vision_layers,
        injection_layers,
        title=title,
        zmax=m,
        zmin=-m,
        colorscale=DIVERGING,
        zmid=0.0,
        colorbar_title=label,
    )


def trajectory_frame(trace: Trace, llm_layer: int | None = None) -> pd.DataFrame:
    """Tidy gate trajectories of one trace: one row per (llm_layer, answer step, vision_layer);
    `token` is the answer token that step produced, `position` the input position it was read at."""
    if not trace.has_gates:
        raise CLIVizError("this trace has no gates (projector fusion): no trajectory to draw")
    layers = list(trace.meta.injection_layers)
    if llm_layer is None:
        which = list(range(len(layers)))
    elif llm_layer in layers:
        which = [layers.index(llm_layer)]
    else:
        raise CLIVizError(f"LLM layer {llm_layer} takes no injection in this model; injection layers: {layers}")
    ag = trace.answer_gates()  # [L, S, K]
    S, K = ag.shape[1], ag.shape[2]
    frames = []
    for li in which:
        frames.append(
            pd.DataFrame(
                {
                    "llm_layer": layers[li],
                    "step": np.repeat(np.arange(S), K),
                    "position": np.repeat(np.asarray(trace.answer_positions, dtype=np.int64), K),
                    "token": np.repeat(np.array(trace.answer_texts, dtype=object), K),
                    "vision_layer": np.tile(np.asarray(trace.meta.vision_layers, dtype=np.int64), S),
                    "gate": ag[li].astype(float).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def trajectory_figure(trace: Trace, llm_layer: int | None = None, *, title: str | None = None) -> go.Figure:
    """Gate per vision layer as the answer unfolds (x = answer step, labelled with the token it
    produced), for one LLM layer (real index) or, with `llm_layer=None`, one panel per layer."""
    from plotly.subplots import make_subplots

    df = trajectory_frame(trace, llm_layer)
    layers = list(dict.fromkeys(df.llm_layer.tolist()))
    S = len(trace.answer_positions)
    fig = make_subplots(rows=len(layers), cols=1, shared_xaxes=True, vertical_spacing=0.05 if len(layers) > 1 else 0.0)
    for r, li in enumerate(layers):
        sub = df[df.llm_layer == li]
        for j, k in enumerate(trace.meta.vision_layers):
            pts = sub[sub.vision_layer == k]
            fig.add_trace(
                go.Scatter(
                    x=pts.step,
                    y=pts.gate,
                    mode="lines+markers",
                    name=f"V{k}",
                    legendgroup=f"V{k}",
                    showlegend=r == 0,
                    line={"color": QUALITATIVE[j % len(QUALITATIVE)], "width": 1.5},
                    marker={"symbol": MARKERS[j % len(MARKERS)], "size": 5},
                    hovertemplate=(
                        f"LLM layer {li}<br>vision layer {k}<br>step %{{x}}<br>gate %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=r + 1,
                col=1,
            )
        fig.update_yaxes(range=[-0.02, 1.02], title_text=f"gate at L{li}", row=r + 1, col=1)
    ticks = [f"{s}:{w}" for s, w in enumerate(trace.answer_texts)]
    fig.update_xaxes(tickvals=list(range(S)), ticktext=ticks, range=[-0.3, max(S - 1, 0) + 0.3])
    fig.update_xaxes(title_text="answer step : token", row=len(layers), col=1)
    fig.update_layout(template="simple_white", title=title, legend={"title": {"text": "vision layer"}})
    return fig
