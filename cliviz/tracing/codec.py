"""The trace file's Arrow schema and the conversion between `Trace`s and Arrow tables (one row per trace).

Columns (one row = one (image, question) run):

Meta (one value per trace, as in `TraceMeta`):
    question, answer, model, config_hash, fusion, image_sha256, device, dtype, created_at,
    cliviz_version: string; qtype, reference_answer, sample_id: string or null;
    image_width, image_height, schema_version: int64;
    vision_layers, injection_layers: list<int64> (real layer indices; K = len(vision_layers)).
    injection_off_answer: string, injection_off_changed: bool, injection_off_delta_logprob: float64
    (schema 2: the map's causal check, see `cliviz.tracing.causal`; null when not measured).

Tensors are stored flat (C order) with their shape in a companion ``<name>_shape`` list<int32>
column; reshape with ``np.asarray(row.gates, np.float32).reshape(row.gates_shape)``:
    token_ids: list<int64>            [n_tokens]
    token_texts, token_roles: list<string>  [n_tokens]; role in {"image", "prompt", "answer"}
    gates: list<float32> (list<float16> in a set written with float16 gates)
                                      shape gates_shape = [n_injection_layers, n_kept, K]
    injection_norm: list<float32>     shape injection_norm_shape = [n_injection_layers, n_kept]
    gate_positions: list<int64> or null   (schema 3) the token positions gates hold, in order, when a
                                      compact set kept only some; null: every position (n_kept = n_tokens)
    answer_ids, answer_positions: list<int64>  [n_answer]
    answer_texts: list<string>        [n_answer]
    answer_logprobs: list<float32>    [n_answer]
    topk_ids: list<int64>             shape topk_ids_shape = [n_answer, k]
    topk_logprobs: list<float32>      shape topk_logprobs_shape = [n_answer, k]
    topk_texts: list<list<string>>    [n_answer][k]
    attributions: list<struct<name: string, shape: list<int32>, values: list<float32>>>
        any number of named arrays (stored as float32), in insertion order.

File key-value metadata: ``cliviz.schema_version`` (an integer, see `schema.SCHEMA_VERSION`),
``cliviz.version`` (the cliviz that wrote the file) and ``cliviz.compact`` (JSON: the compaction the
rows were written with, see `cliviz.tracing.compact`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cliviz import __version__
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import ARRAY_FIELDS, SCHEMA_VERSION, Trace, TraceMeta

SCHEMA_VERSION_KEY = "cliviz.schema_version"
VERSION_KEY = "cliviz.version"
_MAX_LIST_CHUNK = 2**31 - 1  # list<...> uses int32 offsets: keep each chunk below this

_INT_LIST = pa.list_(pa.int64())
_SHAPE = pa.list_(pa.int32())
_FLOAT_LIST = pa.list_(pa.float32())
_STR_LIST = pa.list_(pa.string())
_ATTRIBUTION = pa.struct([("name", pa.string()), ("shape", _SHAPE), ("values", _FLOAT_LIST)])

META_TYPES: dict[str, pa.DataType] = {
    "question": pa.string(),
    "answer": pa.string(),
    "model": pa.string(),
    "config_hash": pa.string(),
    "fusion": pa.string(),
    "vision_layers": _INT_LIST,
    "injection_layers": _INT_LIST,
    "image_sha256": pa.string(),
    "image_width": pa.int64(),
    "image_height": pa.int64(),
    "device": pa.string(),
    "dtype": pa.string(),
    "created_at": pa.string(),
    "cliviz_version": pa.string(),
    "schema_version": pa.int64(),
    "qtype": pa.string(),
    "reference_answer": pa.string(),
    "sample_id": pa.string(),
    "injection_off_answer": pa.string(),
    "injection_off_changed": pa.bool_(),
    "injection_off_delta_logprob": pa.float64(),
}
ADDED_IN_2 = ("injection_off_answer", "injection_off_changed", "injection_off_delta_logprob")
COMPACT_KEY = "cliviz.compact"
META_FIELDS = tuple(f.name for f in fields(TraceMeta))
if set(META_FIELDS) != set(META_TYPES):  # pragma: no cover - guards against TraceMeta drifting
    raise RuntimeError(f"codec.META_TYPES is out of date with TraceMeta: {sorted(set(META_FIELDS) ^ set(META_TYPES))}")

# name -> (numpy dtype, arrow list type, ndim or None for 1-D without a shape column): the one table of
# a trace's numeric arrays, for the Parquet columns here and for traces sent as JSON (the app's store)
NUMERIC_ARRAYS: dict[str, tuple[type, pa.DataType, int | None]] = {
    "token_ids": (np.int64, _INT_LIST, None),
    "gates": (np.float32, _FLOAT_LIST, 3),
    "injection_norm": (np.float32, _FLOAT_LIST, 2),
    "answer_ids": (np.int64, _INT_LIST, None),
    "answer_positions": (np.int64, _INT_LIST, None),
    "answer_logprobs": (np.float32, _FLOAT_LIST, None),
    "topk_ids": (np.int64, _INT_LIST, 2),
    "topk_logprobs": (np.float32, _FLOAT_LIST, 2),
}
_STRINGS = ("token_texts", "token_roles", "answer_texts")


def _schema_fields() -> list[pa.Field]:
    out = [pa.field(name, META_TYPES[name]) for name in META_FIELDS]
    for name in ARRAY_FIELDS:
        if name in NUMERIC_ARRAYS:
            out.append(pa.field(name, NUMERIC_ARRAYS[name][1]))
            if NUMERIC_ARRAYS[name][2] is not None:
                out.append(pa.field(f"{name}_shape", _SHAPE))
        elif name == "topk_texts":
            out.append(pa.field(name, pa.list_(_STR_LIST)))
        else:
            out.append(pa.field(name, _STR_LIST))
    out.append(pa.field("attributions", pa.list_(_ATTRIBUTION)))
    out.append(pa.field("gate_positions", _INT_LIST))
    return out


ARROW_SCHEMA = pa.schema(_schema_fields(), metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), VERSION_KEY: __version__})


# ----------------------------------------------------------------------------------------- encoding


def _chunk_bounds(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Split rows into runs whose total length fits int32 list offsets."""
    if lengths.sum() <= _MAX_LIST_CHUNK:
        return [(0, len(lengths))]
    bounds, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total + n > _MAX_LIST_CHUNK and i > start:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    bounds.append((start, len(lengths)))
    return bounds


def _numeric_list(arrays: list[np.ndarray], dtype: type, pa_type: pa.DataType) -> pa.ChunkedArray:
    flat: list[np.ndarray] = [np.ascontiguousarray(a, dtype=dtype).ravel() for a in arrays]
    lengths = np.array([a.size for a in flat], dtype=np.int64)
    chunks = []
    for lo, hi in _chunk_bounds(lengths):
        offsets = np.zeros(hi - lo + 1, dtype=np.int32)
        np.cumsum(lengths[lo:hi], out=offsets[1:])
        values = np.concatenate(flat[lo:hi]) if hi > lo else np.empty(0, dtype=dtype)
        chunks.append(
            pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=pa_type.value_type))
        )
    return pa.chunked_array(chunks, type=pa_type)


def _attributions_column(traces: list[Trace]) -> pa.ChunkedArray:
    names, shapes, values, counts = [], [], [], []
    for t in traces:
        counts.append(len(t.attributions))
        for name, arr in t.attributions.items():
            arr = np.asarray(arr)
            names.append(str(name))
            shapes.append(np.array(arr.shape, dtype=np.int32))
            values.append(arr)
    shape_col = _numeric_list(shapes, np.int32, _SHAPE).combine_chunks()
    value_col = _numeric_list(values, np.float32, _FLOAT_LIST)
    if value_col.num_chunks != 1:
        raise CLIVizError(
            "attributions too large for one trace file batch (over 2**31 values); write fewer traces at once"
        )
    structs = pa.StructArray.from_arrays(
        [pa.array(names, pa.string()), shape_col, value_col.chunk(0)], fields=list(_ATTRIBUTION)
    )
    offsets = np.zeros(len(traces) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.chunked_array(
        [pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs)], type=pa.list_(_ATTRIBUTION)
    )


def traces_to_table(traces: list[Trace]) -> pa.Table:
    for i, t in enumerate(traces):
        if not isinstance(t, Trace):
            raise CLIVizError(f"item {i} to write is a {type(t).__name__}, not a Trace")
        try:
            t.validate()
        except ValueError as e:
            raise CLIVizError(f"trace {i} ({t.meta.sample_id or t.meta.question!r}) is malformed: {e}") from None
    cols: dict[str, Any] = {}
    for name in META_FIELDS:
        vals = [getattr(t.meta, name) for t in traces]
        if META_TYPES[name] == _INT_LIST:
            vals = [[int(v) for v in x] for x in vals]
        cols[name] = pa.array(vals, type=META_TYPES[name])
    for name, (dtype, pa_type, ndim) in NUMERIC_ARRAYS.items():
        arrays = [np.asarray(getattr(t, name)) for t in traces]
        if ndim is not None:
            # shape per trace; a [n_answer, k] table with no answer rows keeps its 2-D shape
            shapes = [
                np.array(a.shape if a.ndim == ndim else (len(a),) + (0,) * (ndim - 1), dtype=np.int32) for a in arrays
            ]
            cols[f"{name}_shape"] = _numeric_list(shapes, np.int32, _SHAPE)
        cols[name] = _numeric_list(arrays, dtype, pa_type)
    for name in _STRINGS:
        cols[name] = pa.array([[str(s) for s in getattr(t, name)] for t in traces], type=_STR_LIST)
    cols["topk_texts"] = pa.array(
        [[[str(s) for s in row] for row in t.topk_texts] for t in traces], type=pa.list_(_STR_LIST)
    )
    cols["attributions"] = _attributions_column(traces)
    cols["gate_positions"] = pa.array(
        [None if t.gate_positions is None else np.asarray(t.gate_positions, np.int64) for t in traces], _INT_LIST
    )
    return pa.table([cols[f.name] for f in ARROW_SCHEMA], schema=ARROW_SCHEMA)


# ----------------------------------------------------------------------------------------- decoding


def flat_list(col: pa.ChunkedArray | pa.Array, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets[n+1]) of a list column, values as a writable numpy array."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(col)
    if dtype is None:
        values = np.array(flat.to_pylist(), dtype=object)
    else:
        values = np.array(flat.to_numpy(), dtype=dtype, copy=True) if len(flat) else np.empty(0, dtype=dtype)
    return values, offsets


def shape_rows(table: pa.Table, name: str, ndim: int, path: str) -> np.ndarray:
    values, offsets = flat_list(table.column(f"{name}_shape"), np.int64)
    if np.any(np.diff(offsets) != ndim):
        raise CLIVizError(f"trace file {path} is corrupt: {name}_shape must have {ndim} entries in every row")
    return values.reshape(-1, ndim)


def table_to_traces(table: pa.Table) -> list[Trace]:
    n = table.num_rows
    meta = {name: table.column(name).to_pylist() for name in META_FIELDS}
    num = {name: flat_list(table.column(name), dtype) for name, (dtype, _, _) in NUMERIC_ARRAYS.items()}
    shapes = {
        name: flat_list(table.column(f"{name}_shape"), np.int64)[0].reshape(-1, ndim)
        for name, (_, _, ndim) in NUMERIC_ARRAYS.items()
        if ndim is not None
    }
    strs = {name: flat_list(table.column(name)) for name in _STRINGS}
    topk_texts = table.column("topk_texts").to_pylist()
    kept = table.column("gate_positions").to_pylist()

    attr_col = table.column("attributions")
    attr_counts = pc.fill_null(pc.list_value_length(attr_col), 0).to_numpy()
    attr_structs = pc.list_flatten(attr_col)
    attr_names = pc.struct_field(attr_structs, "name").to_pylist()
    attr_shapes_v, attr_shapes_o = flat_list(pc.struct_field(attr_structs, "shape"), np.int64)
    attr_vals_v, attr_vals_o = flat_list(pc.struct_field(attr_structs, "values"), np.float32)

    def tensor(name: str, i: int) -> np.ndarray:
        values, offsets = num[name]
        arr = values[offsets[i] : offsets[i + 1]]
        return arr.reshape(tuple(shapes[name][i])) if name in shapes else arr

    out, a = [], 0
    for i in range(n):
        attributions = {}
        for j in range(a, a + int(attr_counts[i])):
            shape = tuple(attr_shapes_v[attr_shapes_o[j] : attr_shapes_o[j + 1]].tolist())
            attributions[attr_names[j]] = attr_vals_v[attr_vals_o[j] : attr_vals_o[j + 1]].reshape(shape)
        a += int(attr_counts[i])
        s = {name: v[o[i] : o[i + 1]].tolist() for name, (v, o) in strs.items()}
        out.append(
            Trace(
                meta=TraceMeta(**{name: meta[name][i] for name in META_FIELDS}),
                token_ids=tensor("token_ids", i),
                token_texts=s["token_texts"],
                token_roles=s["token_roles"],
                gates=tensor("gates", i),
                injection_norm=tensor("injection_norm", i),
                answer_ids=tensor("answer_ids", i),
                answer_texts=s["answer_texts"],
                answer_positions=tensor("answer_positions", i),
                answer_logprobs=tensor("answer_logprobs", i),
                topk_ids=tensor("topk_ids", i),
                topk_texts=topk_texts[i],
                topk_logprobs=tensor("topk_logprobs", i),
                attributions=attributions,
                gate_positions=None if kept[i] is None else np.asarray(kept[i], dtype=np.int64),
            )
        )
    return out
