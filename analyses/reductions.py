"""Gate reductions: vision-layer x LLM-layer matrices from one trace or a whole trace set (no plotting).

A cell (LLM layer i, vision layer k) holds the mean gate weight that layer i gave vision layer k
over a set of token positions: the answer steps, one role, one position, or every position. Rows
sum to 1 (gates are a softmax over vision layers), so a row reads as "where layer i looked".

**Content tokens.** "answer" means the answer steps that emitted a content token: a step whose
token is special (`<eos>`, `</s>`, `<|im_end|>`, `[UNK]`... see `is_special_token`) is left out by
default, because the end-of-sequence step is a different decision from the answer's words and on a
one-word answer it is half of the mean. `include_special=True` keeps them; `SELECTION_NOTE`
says which on every table, page and figure.

Trace-set level (vectorised over Arrow tables, no per-trace Python loop): `gate_rows` gathers the
selected gate vectors of every trace once; `mean_gate_matrix`, `grouped_gate_matrices` and
`gate_difference` reduce them. By default every trace weighs the same (`weight="trace"`: the mean
of the per-trace `gate_matrix`es); `weight="token"` pools all selected rows instead. Axis labels
carry the model's real layer indices, so traces whose layer lists differ are refused with a
`CLIVizError`. Traces without gates (`projector` fusion) are skipped.

A set too large to hold (`TraceSet.read` of a big folder) is reduced batch by batch: `summarize`
streams over its row groups once and keeps per-trace means and running sums only, so memory
depends on the shapes (L, K), never on the number of traces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import TOKEN_SETS, Trace
from cliviz.tracing.traceset import TraceSet

SET_SELECTIONS = TOKEN_SETS  # the name this module used before the set had one home
# <eos>, </s>, <s>, <pad>, <unk>, <|im_end|>, <|endoftext|>, <0x0A>; [UNK], [PAD], [SEP], [CLS]; empty text
SPECIAL_TOKEN = re.compile(r"^(<\|?/?[A-Za-z0-9_][\w.:-]*\|?>|\[[A-Z_]+\]|\s*)$")


def is_special_token(text: str) -> bool:
    """True for a special token's text (end of sequence, padding, unknown, chat markers) or no text."""
    return bool(SPECIAL_TOKEN.match(str(text)))


def selection_note(select: str | int = "answer", include_special: bool = False) -> str:
    """What a mean over `select` averages, in words, for tables, pages and figures."""
    if select == "answer":
        if include_special:
            return "mean over every answer step (special tokens such as <eos> included)"
        return "mean over answer steps with content tokens (<eos> and other special tokens left out)"
    if isinstance(select, (int, np.integer)):
        return f"gates at position {int(select)}"
    return f"mean over {select} tokens"


def content_steps(trace: Trace, include_special: bool = False) -> np.ndarray:
    """Indices of the answer steps that count: those that emitted a content token (all with
    `include_special`)."""
    steps = np.arange(len(trace.answer_texts))
    if include_special:
        return steps
    return steps[[not is_special_token(t) for t in trace.answer_texts]] if len(steps) else steps


def positions_for(trace: Trace, select: str | int = "answer", include_special: bool = False) -> np.ndarray:
    """Token positions for a selection: `answer` (the steps that produced the answer's content
    tokens; every step with `include_special`), `image` / `prompt` (a role), `all`, or one position."""
    if isinstance(select, (int, np.integer)):
        if not 0 <= select < trace.n_tokens:
            raise ValueError(f"position {select} outside 0..{trace.n_tokens - 1}")
        return np.array([select])
    if select == "answer":
        return np.asarray(trace.answer_positions)[content_steps(trace, include_special)]
    if select == "all":
        return np.arange(trace.n_tokens)
    if select in ("image", "prompt"):
        return np.flatnonzero(trace.role_mask(select))
    raise ValueError(f"unknown selection {select!r}; use answer, image, prompt, all or a position")


def gate_matrix(trace: Trace, select: str | int = "answer", include_special: bool = False) -> np.ndarray:
    """Mean gates over the selected positions: `[n_injection_layers, K]`. An answer of special tokens
    only (e.g. just `<eos>`) falls back to every answer step rather than to nothing."""
    pos = positions_for(trace, select, include_special)
    if select == "answer" and len(pos) == 0:
        pos = np.asarray(trace.answer_positions)
    if not trace.has_gates or len(pos) == 0:
        return np.zeros((trace.gates.shape[0], trace.gates.shape[2]), dtype=np.float32)
    return trace.gates[:, trace.gate_columns(pos)].mean(axis=1)  # [L, K]


def gate_entropy(gates: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each gate row, averaged over tokens: `[L, T, K] -> [L]`."""
    p = np.clip(gates, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1).mean(-1)


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


def gate_rows(traces: TracesLike | GateRows, select: str = "answer", include_special: bool = False) -> GateRows:
    """Gather the gate vectors at the selected positions of every trace, vectorised.

    `select`: `answer` (the positions whose output is an answer token), `image` / `prompt`
    (token roles) or `all`. Answer steps that emitted a special token are left out unless
    `include_special`. Traces without gates are skipped; the rest must share their vision and LLM
    layer lists (CLIVizError otherwise, or when no trace has gates). Compact traces give the
    positions they kept (CLIVizError when the selection asks for positions they dropped)."""
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
    n_tokens = pc.fill_null(pc.list_value_length(t.column("token_ids")), 0).to_numpy().astype(np.int64)
    trace_of, position, step = _selected_positions(t, select, gated, n_tokens, include_special)
    Tr = T[trace_of]
    n_tok = pc.fill_null(pc.list_value_length(t.column("token_ids")), 0).to_numpy().astype(np.int64)
    if np.any(position < 0) or np.any(position >= n_tok[trace_of]):
        raise CLIVizError("trace set is corrupt: a selected position lies outside its trace's tokens")
    column = _stored_columns(t, trace_of, position)  # where each position's gates are stored
    g_v, g_o = _list_values(t.column("gates"), np.float32)
    n_v, n_o = _list_values(t.column("injection_norm"), np.float32)
    lay = np.arange(Lc, dtype=np.int64)
    base = g_o[trace_of] + column * Kc  # [R]
    idx = base[:, None, None] + (lay[None, :] * (Tr * Kc)[:, None])[:, :, None] + np.arange(Kc)[None, None, :]
    gates = g_v[idx] if len(base) else np.empty((0, Lc, Kc), np.float32)  # [R, L, K]
    nidx = n_o[trace_of][:, None] + lay[None, :] * Tr[:, None] + column[:, None]
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


def _stored_columns(t: pa.Table, trace_of: np.ndarray, position: np.ndarray) -> np.ndarray:
    """For each selected (trace, token position), the gates column that holds it: the position itself,
    or its index in the trace's `gate_positions` for a compact trace."""
    kept = t.column("gate_positions")
    if kept.null_count == len(kept):
        return position
    gp_v, gp_o = _list_values(kept, np.int64)
    compact = np.asarray(pc.is_valid(kept).to_numpy(zero_copy_only=False), dtype=bool)
    owner = np.repeat(np.arange(t.num_rows, dtype=np.int64), np.diff(gp_o))
    big = int(max(gp_v.max(initial=0), position.max(initial=0))) + 1
    keys = owner * big + gp_v  # increasing: rows in order, positions increasing within a row
    want = trace_of * big + position
    at = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
    on = compact[trace_of]
    if on.any() and (len(keys) == 0 or np.any(keys[at[on]] != want[on])):
        raise CLIVizError(
            "these traces are compact (only some positions' gates were kept): the selection asks for "
            "positions they dropped; select answer steps, or trace again with every position"
        )
    return np.where(on, at - gp_o[trace_of], position)


def _selected_positions(
    t: pa.Table, select: str, gated: np.ndarray, T: np.ndarray, include_special: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(trace, position, step)` of every selected row, traces with gates only, in trace order."""
    n = t.num_rows
    if select == "answer":
        pos_v, pos_o = _list_values(t.column("answer_positions"), np.int64)
        keep = np.repeat(gated, np.diff(pos_o))
        if not include_special and len(pos_v):
            texts = pc.list_flatten(t.column("answer_texts")).to_pylist()
            content = np.array([not is_special_token(x) for x in texts], dtype=bool)
            owner = np.repeat(np.arange(n), np.diff(pos_o))
            has_content = np.bincount(owner[content], minlength=n) > 0
            keep &= content | ~has_content[owner]  # an answer of special tokens only keeps them all
        counts = np.bincount(np.repeat(np.arange(n), np.diff(pos_o))[keep], minlength=n)
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


def mean_gate_matrix(
    traces: TracesLike | GateRows, select: str = "answer", weight: str = "trace", include_special: bool = False
) -> np.ndarray:
    """Mean gates over a trace set: `[n_injection_layers, K]` (float64).

    `weight="trace"`: mean of the per-trace means (each trace counts once; one trace gives
    `gate_matrix(trace, select)`); `weight="token"`: mean over every selected position."""
    return _reduce(gate_rows(traces, select, include_special), None, weight)


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
