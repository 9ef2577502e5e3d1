"""Trace sets: many `Trace`s in ONE Parquet file, one row per trace.

The file is plain Parquet; open it without cliviz with ``pandas.read_parquet(path)`` or
``pyarrow.parquet.read_table(path)``. Columns (one row = one (image, question) run):

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
    gates: list<float32>              shape gates_shape = [n_injection_layers, n_tokens, K]
    injection_norm: list<float32>     shape injection_norm_shape = [n_injection_layers, n_tokens]
    answer_ids, answer_positions: list<int64>  [n_answer]
    answer_texts: list<string>        [n_answer]
    answer_logprobs: list<float32>    [n_answer]
    topk_ids: list<int64>             shape topk_ids_shape = [n_answer, k]
    topk_logprobs: list<float32>      shape topk_logprobs_shape = [n_answer, k]
    topk_texts: list<list<string>>    [n_answer][k]
    attributions: list<struct<name: string, shape: list<int32>, values: list<float32>>>
        any number of named arrays (stored as float32), in insertion order.

File key-value metadata: ``cliviz.schema_version`` (an integer, see `trace.SCHEMA_VERSION`) and
``cliviz.version`` (the cliviz that wrote the file). Reading checks the schema version; a schema-1
file (before the causal-check columns) reads with those columns null, and appending to it rewrites
the whole file as schema 2.

Every write (`write_traces`, `TraceSet.append`, `merge_traces`) goes to a temporary file in the
same folder and is moved into place with `os.replace`, so a reader never sees a half-written
file and a failed write leaves the old file untouched. Appending reads the existing table, adds
the new rows and rewrites the whole file, holding the file's lock (`cliviz.atomic.exclusive_writer`)
so that concurrent appends from several processes all survive. Nothing is ever unpickled: reading is Parquet only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cliviz import __version__
from cliviz.atomic import atomic_file, exclusive_writer
from cliviz.errors import CLIVizError
from cliviz.tracing.display import traceset_heatmap_figure, traceset_html
from cliviz.tracing.schema import ARRAY_FIELDS, READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, Trace, TraceMeta
from cliviz.tracing.table_checks import check_table

__all__ = [
    "TraceSet",
    "write_traces",
    "append_traces",
    "read_traces",
    "merge_traces",
    "SCHEMA_VERSION_KEY",
    "VERSION_KEY",
    "ARROW_SCHEMA",
    "NUMERIC_ARRAYS",
]

SCHEMA_VERSION_KEY = "cliviz.schema_version"
VERSION_KEY = "cliviz.version"
_ROW_GROUP_SIZE = 512
_MAX_LIST_CHUNK = 2**31 - 1  # list<...> uses int32 offsets: keep each chunk below this
APPEND_LOCK_WAIT_S = 120.0  # another process's append takes seconds; a running sweep holds its file far longer

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
_ADDED_IN_2 = ("injection_off_answer", "injection_off_changed", "injection_off_delta_logprob")
META_FIELDS = tuple(f.name for f in fields(TraceMeta))
if set(META_FIELDS) != set(META_TYPES):  # pragma: no cover - guards against TraceMeta drifting
    raise RuntimeError(
        f"traceset.META_TYPES is out of date with TraceMeta: {sorted(set(META_FIELDS) ^ set(META_TYPES))}"
    )

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
    flat = [np.ascontiguousarray(a, dtype=dtype).ravel() for a in arrays]
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


def _traces_to_table(traces: list[Trace]) -> pa.Table:
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
    return pa.table([cols[f.name] for f in ARROW_SCHEMA], schema=ARROW_SCHEMA)


# ----------------------------------------------------------------------------------------- decoding


def _flat(col: pa.ChunkedArray | pa.Array, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def _shapes(table: pa.Table, name: str, ndim: int, path: str) -> np.ndarray:
    values, offsets = _flat(table.column(f"{name}_shape"), np.int64)
    if np.any(np.diff(offsets) != ndim):
        raise CLIVizError(f"trace file {path} is corrupt: {name}_shape must have {ndim} entries in every row")
    return values.reshape(-1, ndim)


def _check_table(table: pa.Table, path: str) -> None:
    """Shapes that fit together and values a real run can produce, so a broken file fails with one line
    naming the trace and field (`cliviz.tracing.table_checks`)."""
    check_table(table, path)


def _table_to_traces(table: pa.Table) -> list[Trace]:
    n = table.num_rows
    meta = {name: table.column(name).to_pylist() for name in META_FIELDS}
    num = {name: _flat(table.column(name), dtype) for name, (dtype, _, _) in NUMERIC_ARRAYS.items()}
    shapes = {
        name: _flat(table.column(f"{name}_shape"), np.int64)[0].reshape(-1, ndim)
        for name, (_, _, ndim) in NUMERIC_ARRAYS.items()
        if ndim is not None
    }
    strs = {name: _flat(table.column(name)) for name in _STRINGS}
    topk_texts = table.column("topk_texts").to_pylist()

    attr_col = table.column("attributions")
    attr_counts = pc.fill_null(pc.list_value_length(attr_col), 0).to_numpy()
    attr_structs = pc.list_flatten(attr_col)
    attr_names = pc.struct_field(attr_structs, "name").to_pylist()
    attr_shapes_v, attr_shapes_o = _flat(pc.struct_field(attr_structs, "shape"), np.int64)
    attr_vals_v, attr_vals_o = _flat(pc.struct_field(attr_structs, "values"), np.float32)

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
            )
        )
    return out


# ----------------------------------------------------------------------------------------- file I/O


def _read_table(path: str | os.PathLike, verb: str = "reads") -> pa.Table:
    p = Path(path)
    if not p.exists():
        raise CLIVizError(f"trace file {p} does not exist")
    if not p.is_file():
        raise CLIVizError(f"trace file {p} is not a file")
    pf = None
    try:
        pf = pq.ParquetFile(p)  # a single file: no dataset / partition discovery
        metadata = pf.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError, ValueError):
        if pf is not None:
            pf.close()
        raise CLIVizError(f"trace file {p} is not a readable Parquet file") from None
    with pf:
        table = _read_checked(pf, p, metadata, verb)
    return table


def _read_checked(pf: pq.ParquetFile, p: Path, metadata: dict, verb: str) -> pa.Table:
    raw = metadata.get(SCHEMA_VERSION_KEY.encode())
    if raw is None:
        raise CLIVizError(f"{p} is not a cliviz trace file (no {SCHEMA_VERSION_KEY} in its Parquet metadata)")
    try:
        version = int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise CLIVizError(f"trace file {p} has an unreadable schema version {raw!r}") from None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CLIVizError(f"trace file {p} has schema version {version}, this cliviz {verb} {SCHEMA_VERSION}")
    try:
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError):
        raise CLIVizError(f"trace file {p} is not a readable Parquet file") from None
    if version == 1:
        table = _upgrade_from_1(table)
    missing = [f.name for f in ARROW_SCHEMA if f.name not in table.column_names]
    if missing:
        raise CLIVizError(f"trace file {p} is corrupt: missing column(s) {', '.join(missing)}")
    try:
        table = table.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise CLIVizError(
            f"trace file {p} is corrupt: a column has the wrong type ({str(e).splitlines()[0]})"
        ) from None
    _check_table(table, str(p))
    return table


def _upgrade_from_1(table: pa.Table) -> pa.Table:
    """A schema-1 table with the schema-2 causal-check columns added as nulls (never measured)."""
    for name in _ADDED_IN_2:
        if name not in table.column_names:
            table = table.append_column(pa.field(name, META_TYPES[name]), pa.nulls(table.num_rows, META_TYPES[name]))
    return table


def _atomic_write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    with atomic_file(path, "trace file") as fh:
        pq.write_table(
            table.replace_schema_metadata(ARROW_SCHEMA.metadata), fh, compression="zstd", row_group_size=_ROW_GROUP_SIZE
        )
    return Path(path)


def _as_table(traces: Trace | TraceSet | Iterable[Trace]) -> pa.Table:
    if isinstance(traces, TraceSet):
        return traces.table
    if isinstance(traces, Trace):
        traces = [traces]
    return _traces_to_table(list(traces))


def write_traces(path: str | os.PathLike, traces: Trace | TraceSet | Iterable[Trace], *, append: bool = False) -> Path:
    """Write `traces` to the Parquet trace file `path` (atomically). With `append=True` an existing
    file keeps its rows and the new ones follow; a missing file is simply created."""
    new = _as_table(traces)  # validate before touching anything on disk
    # read + extend + replace under the file's lock: two appending processes never drop each other's rows
    with exclusive_writer(path, "trace file", wait=APPEND_LOCK_WAIT_S):
        if append and Path(path).exists():
            new = pa.concat_tables([_read_table(path, verb="writes"), new])
        return _atomic_write_table(new, path)


def append_traces(path: str | os.PathLike, traces: Trace | TraceSet | Iterable[Trace]) -> Path:
    """Append `traces` to `path` (created if missing): read + concat + atomic rewrite."""
    return write_traces(path, traces, append=True)


def read_traces(path: str | os.PathLike) -> TraceSet:
    return TraceSet.read(path)


def merge_traces(out_path: str | os.PathLike, shard_paths: Iterable[str | os.PathLike]) -> Path:
    """Concatenate shard trace files, in the given order, into `out_path` (atomically). Every shard
    is read and checked before anything is written; `out_path` may be one of the shards."""
    tables = [_read_table(p, verb="merges") for p in shard_paths]
    table = pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()
    return _atomic_write_table(table, out_path)


# ----------------------------------------------------------------------------------------- TraceSet


class TraceSet:
    """An ordered collection of `Trace`s backed by an Arrow table in the trace-file schema.

    `len(ts)`, `ts[i]` (a `Trace`; negative indices work), `ts[a:b]` (a `TraceSet`) and iteration
    decode traces from the table (once, then cached).
    """

    def __init__(self, traces: Iterable[Trace] = (), *, path: str | os.PathLike | None = None):
        self._table = _as_table(traces)
        self._traces: list[Trace] | None = None
        self.path = Path(path) if path is not None else None

    @classmethod
    def from_table(cls, table: pa.Table, path: str | os.PathLike | None = None) -> TraceSet:
        ts = cls.__new__(cls)
        ts._table, ts._traces, ts.path = table, None, Path(path) if path is not None else None
        return ts

    @classmethod
    def read(cls, path: str | os.PathLike) -> TraceSet:
        """Read a trace file; CLIVizError if it is missing, not Parquet, or another schema version."""
        return cls.from_table(_read_table(path), path)

    @staticmethod
    def append(path: str | os.PathLike, traces: Trace | TraceSet | Iterable[Trace]) -> Path:
        """Append `traces` to the file at `path` (created if missing), atomically."""
        return append_traces(path, traces)

    def write(self, path: str | os.PathLike, *, append: bool = False) -> Path:
        return write_traces(path, self, append=append)

    @property
    def table(self) -> pa.Table:
        """The underlying Arrow table (trace-file schema, one row per trace)."""
        return self._table

    @property
    def traces(self) -> list[Trace]:
        if self._traces is None:
            self._traces = _table_to_traces(self._table)
        return self._traces

    def __len__(self) -> int:
        return self._table.num_rows

    def __iter__(self) -> Iterator[Trace]:
        return iter(self.traces)

    def __getitem__(self, index: int | slice) -> Trace | TraceSet:
        if isinstance(index, slice):
            rows = range(len(self))[index]
            if rows.step == 1:
                table = self._table.slice(rows.start, len(rows))
            else:
                table = self._table.take(pa.array(list(rows), pa.int64()))
            return TraceSet.from_table(table)
        return self.traces[index]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"TraceSet({len(self)} traces{where})"

    def heatmap(self, select: str = "answer", by: str | None = None):
        """Mean gate map (plotly `Figure`) over `select` positions (answer, image, prompt, all), one panel
        per `by` group (e.g. `qtype`) when given; with the causal checks the traces carry, as a note."""
        return traceset_heatmap_figure(self, select, by)

    def _repr_html_(self) -> str:
        """Jupyter display: counts, accuracy and causal checks per question type, and the mean map."""
        return traceset_html(self)

    def sample_ids(self) -> set[str]:
        """The non-null `meta.sample_id` values (used to resume sweeps)."""
        return {s for s in self._table.column("sample_id").to_pylist() if s is not None}

    def meta_frame(self) -> pd.DataFrame:
        """One row per trace (index `trace` = row number), one column per `TraceMeta` field."""
        data = {name: self._table.column(name).to_pylist() for name in META_FIELDS}
        df = pd.DataFrame(data, index=pd.RangeIndex(len(self), name="trace"))
        for name in ("image_width", "image_height", "schema_version"):
            df[name] = df[name].astype(np.int64)
        return df

    def to_long(self, *, categorical: bool = True) -> pd.DataFrame:
        """Tidy gates: one row per (trace, injection layer, token position, vision layer).

        Columns: trace (row number), sample_id, qtype, question, answer, llm_layer (real LLM layer,
        from meta.injection_layers), vision_layer (real vision layer, from meta.vision_layers),
        position, token, role, gate (float32), injection_norm (float32). Rows are ordered by trace,
        then llm_layer index, position, vision_layer index (the C order of `gates`). Text columns
        are pandas Categoricals unless `categorical=False`. Traces without gates add no rows.
        """
        t = self._table
        n = t.num_rows
        shapes = _shapes(t, "gates", 3, str(self.path or "in memory")).astype(np.int64)
        L, T, K = shapes[:, 0], shapes[:, 1], shapes[:, 2]
        gate_values, gate_offsets = _flat(t.column("gates"), np.float32)
        norm_values, norm_offsets = _flat(t.column("injection_norm"), np.float32)
        inj_values, inj_offsets = _flat(t.column("injection_layers"), np.int64)
        vis_values, vis_offsets = _flat(t.column("vision_layers"), np.int64)
        tok_lengths = pc.fill_null(pc.list_value_length(t.column("token_texts")), 0).to_numpy()
        if (
            np.any(np.diff(inj_offsets) != L)
            or np.any(np.diff(vis_offsets) != K)
            or np.any(tok_lengths != T)
            or np.any(np.diff(norm_offsets) != L * T)
        ):
            raise CLIVizError(
                "trace set is inconsistent: gates shape does not match injection_layers, "
                "vision_layers, tokens or injection_norm"
            )

        sizes = L * T * K
        total = int(sizes.sum())
        trace = np.repeat(np.arange(n, dtype=np.int64), sizes)
        j = np.arange(total, dtype=np.int64) - np.repeat(gate_offsets[:-1], sizes)
        Kr, Tr = K[trace], T[trace]
        k = j % Kr
        pos = (j // Kr) % Tr
        layer = j // (Kr * Tr)

        def per_trace(name: str) -> Any:
            vals = np.array(t.column(name).to_pylist(), dtype=object)
            return _text(vals, trace, categorical)

        tok_flat = pc.list_flatten(t.column("token_texts"))
        role_flat = pc.list_flatten(t.column("token_roles"))
        tok_index = np.repeat(np.r_[0, np.cumsum(tok_lengths)][:-1].astype(np.int64), sizes) + pos
        return pd.DataFrame(
            {
                "trace": trace,
                "sample_id": per_trace("sample_id"),
                "qtype": per_trace("qtype"),
                "question": per_trace("question"),
                "answer": per_trace("answer"),
                "llm_layer": inj_values[inj_offsets[trace] + layer],
                "vision_layer": vis_values[vis_offsets[trace] + k],
                "position": pos,
                "token": _text(np.array(tok_flat.to_pylist(), dtype=object), tok_index, categorical),
                "role": _text(np.array(role_flat.to_pylist(), dtype=object), tok_index, categorical),
                "gate": gate_values,
                "injection_norm": norm_values[norm_offsets[trace] + layer * Tr + pos],
            },
            copy=False,
        )  # the arrays are fresh: skip pandas' block consolidation copy


def _text(values: np.ndarray, index: np.ndarray, categorical: bool) -> Any:
    """values[index] as a Categorical (codes only, so cheap for millions of rows) or plain strings."""
    if categorical:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        return pd.Categorical.from_codes(codes[index], categories=pd.Index(uniques, dtype=object))
    return pd.array(values[index], dtype="str")
