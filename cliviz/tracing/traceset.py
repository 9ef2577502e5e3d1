"""Trace sets: many `Trace`s, one row per trace, in a Parquet dataset folder or one Parquet file.

Open a set without cliviz with ``pandas.read_parquet(path)``, ``pyarrow.dataset.dataset(path)``,
DuckDB ``read_parquet('path/*.parquet')`` or Polars ``pl.scan_parquet('path/*.parquet')``: the
columns are described in `cliviz.tracing.codec`, the folder layout in `cliviz.tracing.store`.

`TraceSet.append(path, traces)` adds a part file to the set at `path` (a new folder when missing):
it writes only the new rows. `TraceSet.read(path)` reads the footers and checks them; a small set
(under `EAGER_BYTES` uncompressed) is read and checked at once, a larger one stays on disk and is
streamed, one checked row group at a time (`batches()`), by every analysis that takes a set.
`table`/`traces` of a large set read all of it: use them on a `select(...)`ed part. Selections
(`TraceSet.read(path, model=..., qtype=..., sample_ids=...)`) are pushed down to the files.

Nothing is ever unpickled: reading is Parquet (and the manifest's JSON) only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cliviz.arguments import check_path, check_trace_index
from cliviz.errors import CLIVizError
from cliviz.tracing import store
from cliviz.tracing.codec import (
    ARROW_SCHEMA,
    META_FIELDS,
    META_TYPES,
    NUMERIC_ARRAYS,
    SCHEMA_VERSION_KEY,
    VERSION_KEY,
    flat_list,
    shape_rows,
    table_to_traces,
    traces_to_table,
)
from cliviz.tracing.compact import Compact, compact_trace
from cliviz.tracing.display import traceset_heatmap_figure, traceset_html
from cliviz.tracing.schema import Trace
from cliviz.tracing.store import APPEND_LOCK_WAIT_S, Filter

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
    "META_TYPES",
    "APPEND_LOCK_WAIT_S",
    "Compact",
    "recorded_compaction",
]

EAGER_BYTES = 256 * 2**20  # sets smaller than this (uncompressed) are read whole; larger ones stream


def _as_table(traces: Trace | TraceSet | Iterable[Trace], compact: Compact | None = None) -> pa.Table:
    if isinstance(traces, TraceSet):
        if compact is None or compact.positions == "all":
            return traces.table
        traces = traces.traces
    if isinstance(traces, Trace):
        traces = [traces]
    traces = list(traces)
    for i, t in enumerate(traces):
        if not isinstance(t, Trace):
            raise CLIVizError(f"item {i} to write is a {type(t).__name__}, not a Trace")
    if compact is not None and compact.positions != "all":
        traces = [compact_trace(t, compact) for t in traces]
    return traces_to_table(traces)


def recorded_compaction(path: str | os.PathLike) -> Compact | None:
    """The compaction a set at `path` already holds (None: no set there yet)."""
    path = Path(path)
    if path.is_dir():
        manifest = store.read_manifest(path)
        if manifest is not None:
            return manifest.compact
        parts = store.part_files(path) if any(store.visible_parquet(path)) else []
        return store.open_part(parts[0]).compact if parts else None
    if path.is_file():
        return store.open_part(path, "writes").compact
    return None


def write_traces(
    path: str | os.PathLike,
    traces: Trace | TraceSet | Iterable[Trace],
    *,
    append: bool = False,
    compact: Compact | None = None,
    pool: bool = False,
) -> Path:
    """Write `traces` to `path`: a single Parquet file (replaced atomically), or with `append=True`
    add them to the set at `path` (see `append_traces`)."""
    if append:
        return append_traces(path, traces, compact=compact, pool=pool)
    table = _as_table(traces, compact)  # validate before touching anything on disk
    if not pool:
        store.check_one_model(store._models(table), f"writing {path}")
    return store.write_file(path, table, compact)


def append_traces(
    path: str | os.PathLike,
    traces: Trace | TraceSet | Iterable[Trace],
    *,
    compact: Compact | None = None,
    pool: bool = False,
    rank: int | None = None,
) -> Path:
    """Append `traces` to the set at `path`, writing only the new rows (a new part file); a missing
    `path` becomes a set folder. `compact` (float16 gates, fewer positions) is fixed by the first
    append and followed by later ones; `pool=True` on the first append lets the set hold several
    models; `rank` is a torchrun rank writing its own parts."""
    p = Path(path)
    chosen = recorded_compaction(p) or compact or Compact()
    if compact is not None and compact != chosen:
        raise CLIVizError(
            f"trace set {p} holds {chosen.describe()}; appending {compact.describe()} would mix them — "
            "append with the set's own choice, or write to another set"
        )
    table = _as_table(traces, chosen)  # validate before touching anything on disk
    if not pool:
        store.check_one_model(store._models(table), f"appending to {p}")
    return store.append_table(p, table, compact=chosen, pool=pool, rank=rank)


def read_traces(path: str | os.PathLike, **where: Any) -> TraceSet:
    return TraceSet.read(path, **where)


def merge_traces(out_path: str | os.PathLike, shard_paths: Iterable[str | os.PathLike]) -> Path:
    """Concatenate trace sets, in the given order, into the single file `out_path` (atomically). Every
    input is read and checked before anything is written; `out_path` may be one of them."""
    tables = [store.read_all(p, "merges") for p in shard_paths]
    table = pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()
    return store.write_file(out_path, table)


# ----------------------------------------------------------------------------------------- TraceSet


class TraceSet:
    """An ordered collection of `Trace`s in the trace-file schema: in memory (an Arrow table), or on
    disk (a set too large to hold, streamed row group by row group).

    `len(ts)`, `ts[i]` (a `Trace`; negative indices work), `ts[a:b]` (a `TraceSet`) and iteration
    decode traces (an in-memory set decodes once and caches; an on-disk one decodes as it goes).
    `batches()` yields in-memory `TraceSet`s of at most one row group each: what analyses stream over.
    """

    def __init__(self, traces: Iterable[Trace] = (), *, path: str | os.PathLike | None = None):
        self._table: pa.Table | None = _as_table(traces)
        self._traces: list[Trace] | None = None
        self._parts: list[store.Part] | None = None
        self._where: Filter | None = None
        self._len: int | None = None
        self.path = Path(path) if path is not None else None

    @classmethod
    def from_table(cls, table: pa.Table, path: str | os.PathLike | None = None) -> TraceSet:
        ts = cls.__new__(cls)
        ts._table, ts._traces, ts._parts, ts._where, ts._len = table, None, None, None, None
        ts.path = Path(path) if path is not None else None
        return ts

    @classmethod
    def read(
        cls,
        path: str | os.PathLike,
        *,
        model: str | None = None,
        qtype: str | Iterable[str] | None = None,
        sample_ids: Iterable[str] | None = None,
        lazy: bool | None = None,
    ) -> TraceSet:
        """Open the trace set (folder or file) at `path`; CLIVizError if it is missing, not Parquet, of
        another schema version, or corrupt. `model` (a `meta.model` or config hash), `qtype` and
        `sample_ids` select rows without decoding the others. `lazy`: stream from disk (default: when
        the set is over `EAGER_BYTES` uncompressed)."""
        path = check_path(path, "path", "a trace set (folder or Parquet file)")
        if qtype is not None and not isinstance(qtype, str):
            qtype = tuple(qtype)
        parts = store.open_parts(path)
        ts = cls.__new__(cls)
        ts._table, ts._traces, ts._parts, ts._len = None, None, parts, None
        ts._where = Filter.of(model, qtype, sample_ids)
        ts.path = Path(path)
        if lazy is None:
            lazy = sum(p.uncompressed_bytes for p in parts) > EAGER_BYTES
        if not lazy:
            ts._table = ts._read_whole()
        return ts

    def _read_whole(self) -> pa.Table:
        tables = list(store.iter_tables(self._parts or [], self._where))
        return pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()

    @staticmethod
    def append(
        path: str | os.PathLike,
        traces: Trace | TraceSet | Iterable[Trace],
        *,
        compact: Compact | None = None,
        pool: bool = False,
    ) -> Path:
        """Append `traces` to the set at `path` (created if missing), writing only the new rows."""
        return append_traces(path, traces, compact=compact, pool=pool)

    def write(self, path: str | os.PathLike, *, append: bool = False, compact: Compact | None = None) -> Path:
        return write_traces(path, self, append=append, compact=compact)

    @property
    def on_disk(self) -> bool:
        """True for a set streamed from its files (too large to hold in memory)."""
        return self._table is None

    @property
    def compaction(self) -> Compact:
        """What the set keeps (see `cliviz.tracing.compact`); in memory: lossless unless traces say otherwise."""
        if self._parts:
            return self._parts[0].compact
        return Compact()

    @property
    def table(self) -> pa.Table:
        """The Arrow table of the whole set (trace-file schema, one row per trace). For a set on
        disk this reads everything: stream with `batches()` instead."""
        if self._table is None:
            self._table = self._read_whole()
        return self._table

    @property
    def traces(self) -> list[Trace]:
        if self._traces is None:
            self._traces = table_to_traces(self.table)
        return self._traces

    def batches(self, rows: int | None = None) -> Iterator[TraceSet]:
        """The set as in-memory `TraceSet`s of consecutive rows: one row group each for a set on disk,
        `rows` (default 64) each in memory. Memory: one batch at a time."""
        if self._table is not None:
            step = rows or 64
            for start in range(0, self._table.num_rows, step):
                yield TraceSet.from_table(self._table.slice(start, step))
            return
        for table in store.iter_tables(self._parts or [], self._where):
            if rows is None or table.num_rows <= rows:
                yield TraceSet.from_table(table)
            else:
                for start in range(0, table.num_rows, rows):
                    yield TraceSet.from_table(table.slice(start, rows))

    def column(self, name: str) -> list:
        """One column (e.g. `qtype`, `sample_id`, `model`) for every trace, reading only that column."""
        if self._table is not None:
            return self._table.column(name).to_pylist()
        return store.read_column(self._parts or [], name, self._where)

    def models(self) -> list[str]:
        """The distinct `meta.model` names in the set, in first-seen order."""
        return list(dict.fromkeys(str(m) for m in self.column("model")))

    def __len__(self) -> int:
        if self._table is not None:
            return self._table.num_rows
        if self._len is None:
            if self._where is None:
                self._len = store.count_rows(self._parts or [])
            else:
                self._len = len(self.column("sample_id"))
        return self._len

    def __iter__(self) -> Iterator[Trace]:
        if self._table is not None:
            return iter(self.traces)
        return (t for batch in self.batches() for t in batch.traces)

    def __getitem__(self, index: int | slice) -> Trace | TraceSet:
        index = check_trace_index(index, len(self))  # out of range: IndexError with cliviz's message
        if isinstance(index, slice):
            rows = range(len(self))[index]
            if self._table is None:
                return self.take(list(rows))
            if rows.step == 1:
                table = self._table.slice(rows.start, len(rows))
            else:
                table = self._table.take(pa.array(list(rows), pa.int64()))
            return TraceSet.from_table(table)
        if self._table is not None:
            return self.traces[index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"trace {index} outside a set of {n}")
        return self.take([index % n]).traces[0]

    def take(self, rows: Iterable[int]) -> TraceSet:
        """The traces at row numbers `rows` (in that order), as an in-memory set; on disk, only the
        row groups that hold them are decoded."""
        rows = [int(r) for r in rows]
        if self._table is not None:
            return TraceSet.from_table(self._table.take(pa.array(rows, pa.int64())))
        wanted = sorted(set(rows))
        found: dict[int, pa.Table] = {}
        start, i = 0, 0
        for table in store.iter_tables(self._parts or [], self._where):
            end = start + table.num_rows
            while i < len(wanted) and wanted[i] < end:
                found[wanted[i]] = table.slice(wanted[i] - start, 1)
                i += 1
            start = end
            if i == len(wanted):
                break
        missing = [r for r in rows if r not in found]
        if missing:
            raise IndexError(f"trace {missing[0]} outside a set of {start}")
        return TraceSet.from_table(pa.concat_tables([found[r] for r in rows]) if rows else ARROW_SCHEMA.empty_table())

    def select(self, **where: Any) -> TraceSet:
        """The traces matching `model=`, `qtype=`, `sample_ids=` (as `TraceSet.read` takes them)."""
        f = Filter.of(**where)
        if f is None:
            return self
        if self._table is not None:
            return TraceSet.from_table(self._table.filter(pa.array(f.mask(self._table))), self.path)
        if self._where is not None:
            raise CLIVizError("this set is already a selection: read it again with every condition at once")
        ts = TraceSet.__new__(TraceSet)
        ts._table, ts._traces, ts._parts, ts._where, ts._len, ts.path = None, None, self._parts, f, None, self.path
        return ts

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"TraceSet({len(self)} traces{where})"

    def heatmap(self, select: str = "answer", by: str | None = None, *, include_special: bool = False):
        """Mean gate map (plotly `Figure`) over `select` positions (answer, image, prompt, all), one panel
        per `by` group (e.g. `qtype`) when given; with the causal checks the traces carry, as a note.
        Answer steps that emitted a special token (`<eos>`...) are left out unless `include_special`."""
        return traceset_heatmap_figure(self, select, by, include_special=include_special)

    def _repr_html_(self) -> str:
        """Jupyter display: counts, accuracy and causal checks per question type, and the mean map."""
        return traceset_html(self)

    def sample_ids(self) -> set[str]:
        """The non-null `meta.sample_id` values (used to resume sweeps)."""
        return {s for s in self.column("sample_id") if s is not None}

    def meta_frame(self) -> pd.DataFrame:
        """One row per trace (index `trace` = row number), one column per `TraceMeta` field."""
        if self._table is not None:
            data = {name: self._table.column(name).to_pylist() for name in META_FIELDS}
        else:
            data = store.read_columns(self._parts or [], META_FIELDS, self._where)
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
        t = self.table
        n = t.num_rows
        if pc.any(pc.is_valid(t.column("gate_positions"))).as_py():
            raise CLIVizError("to_long() needs every position's gates; this set is compact (see TraceSet.compaction)")
        shapes = shape_rows(t, "gates", 3, str(self.path or "in memory")).astype(np.int64)
        L, T, K = shapes[:, 0], shapes[:, 1], shapes[:, 2]
        gate_values, gate_offsets = flat_list(t.column("gates"), np.float32)
        norm_values, norm_offsets = flat_list(t.column("injection_norm"), np.float32)
        inj_values, inj_offsets = flat_list(t.column("injection_layers"), np.int64)
        vis_values, vis_offsets = flat_list(t.column("vision_layers"), np.int64)
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
