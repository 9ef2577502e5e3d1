"""Checks of a trace-file table on read: shapes that fit together, and values a real run can produce.

A trace file is data from anywhere (a hand edit, another tool, a disk error), and every consumer
(`cliviz figures`, the dashboard, analyses) assumes what `Trace.validate` promises. So reading
refuses, naming the file, the trace row and the field:
- a `<name>_shape` whose entries are negative or huge, or whose product is not the stored length
  (computed in float64: an int64 product can wrap around to the right length);
- tensors that do not fit together: `gates [len(injection_layers), n_tokens, len(vision_layers)]`,
  `injection_norm [layers, n_tokens]`, one entry per answer token in every answer column,
  `answer_positions` inside the tokens, roles from `ROLES`;
- NaN or infinite values, gates outside [0, 1] or whose rows do not sum to 1 (`GATE_SUM_ATOL`:
  bf16 rounding stays below 0.004), negative injection norms, positive log-probabilities, a NaN or
  infinite causal-check score (`injection_off_delta_logprob`);
- attributions whose shape does not match their values (checked before anything is reshaped);
- `gate_positions` (compact traces) that are not increasing token positions, one per gate column.

Readers check one row group at a time; `offset` is the row group's first row in the set, so
messages name the trace's row in the whole set.

Everything is vectorised over the whole table: one pass, no per-trace Python loop.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import ROLES

GATE_SUM_ATOL = 1e-2
MAX_DIM = 2**31 - 1  # a list column cannot hold more values than this in one row
SHAPED = {"gates": 3, "injection_norm": 2, "topk_ids": 2, "topk_logprobs": 2}
NULLABLE = (
    "qtype",
    "reference_answer",
    "sample_id",
    "attributions",
    # schema 2: the map's causal check, None when the trace was recorded without it
    "injection_off_answer",
    "injection_off_changed",
    "injection_off_delta_logprob",
    "gate_positions",
)


def check_table(table: pa.Table, path: str, offset: int = 0) -> None:
    """CLIVizError naming `path`, the first bad trace row and field; silent for a sound table."""
    if table.num_rows == 0:
        return
    labels = _labels(table)

    def fail(rows: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(rows)
        if bad.size:
            i = int(bad[0])
            more = f" (and {bad.size - 1} more trace(s))" if bad.size > 1 else ""
            raise CLIVizError(f"trace file {path} is corrupt: trace {offset + i} ({labels[i]}): {what}{more}")

    _check_nulls(table, fail)
    shapes = {name: _shapes(table, name, ndim, fail) for name, ndim in SHAPED.items()}
    for name, shape in shapes.items():
        fail(np.any(shape < 0, axis=1) | np.any(shape > MAX_DIM, axis=1), f"{name}_shape holds an impossible size")
        product = shape.astype(np.float64).prod(axis=1)  # float: a wrapped int64 product cannot sneak through
        fail(product != _lengths(table, name), f"{name} does not match {name}_shape")
    _check_attributions(table, fail)
    _check_fit(table, shapes, fail)
    _check_values(table, shapes, fail)
    delta = table.column("injection_off_delta_logprob")
    if delta.null_count < len(delta):
        values = np.asarray(pc.fill_null(delta, 0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
        fail(~np.isfinite(values), "injection_off_delta_logprob holds a NaN or infinite score")


def _check_attributions(table: pa.Table, fail) -> None:
    """Every named attribution array: a shape of sane sizes whose product is its number of values."""
    column = table.column("attributions")
    structs = pc.list_flatten(column)
    if len(structs) == 0:
        return
    owner = np.repeat(np.arange(table.num_rows), _lengths(table, "attributions"))
    for part in ("name", "shape", "values"):
        nulls = np.asarray(pc.is_null(pc.struct_field(structs, part)).to_numpy(zero_copy_only=False), dtype=bool)
        fail(np.bincount(owner[nulls], minlength=table.num_rows) > 0, f"attributions hold a null {part}")
    shape_col = pc.struct_field(structs, "shape")
    shape_len = np.asarray(pc.fill_null(pc.list_value_length(shape_col), 0).to_numpy(), dtype=np.int64)
    dims = pc.list_flatten(shape_col)
    dims = np.asarray(pc.fill_null(dims, -1).to_numpy(), dtype=np.float64) if len(dims) else np.empty(0)
    dim_owner = np.repeat(np.arange(len(structs)), shape_len)
    bad_dim = np.bincount(dim_owner[(dims < 0) | (dims > MAX_DIM)], minlength=len(structs)) > 0
    product = np.ones(len(structs), dtype=np.float64)
    np.multiply.at(product, dim_owner, np.clip(dims, 0, None))  # float: no wrap-around
    n_values = np.asarray(
        pc.fill_null(pc.list_value_length(pc.struct_field(structs, "values")), 0).to_numpy(), dtype=np.float64
    )
    wrong = bad_dim | (product != n_values)
    fail(np.bincount(owner[wrong], minlength=table.num_rows) > 0, "attributions: a shape does not match its values")
    values = pc.list_flatten(pc.struct_field(structs, "values"))
    if len(values):
        v = np.asarray(pc.fill_null(values, np.nan).to_numpy(), dtype=np.float64)
        v_owner = owner[np.repeat(np.arange(len(structs)), n_values.astype(np.int64))]
        fail(
            np.bincount(v_owner[~np.isfinite(v)], minlength=table.num_rows) > 0,
            "attributions hold NaN or infinite values",
        )


def _check_nulls(table: pa.Table, fail) -> None:
    """Nulls only where the schema allows them (`NULLABLE`)."""
    for name in table.column_names:
        if name in NULLABLE:
            continue
        column = table.column(name)
        fail(np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool), f"{name} is null")
        rows = np.arange(table.num_rows)
        while pa.types.is_list(column.type):  # a null anywhere inside, down to the last nesting level
            lengths = np.asarray(pc.fill_null(pc.list_value_length(column), 0).to_numpy(), dtype=np.int64)
            rows = np.repeat(rows, lengths)
            column = pc.list_flatten(column)
            inner = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)
            fail(np.bincount(rows[inner], minlength=table.num_rows) > 0, f"{name} holds a null")


def _check_fit(table: pa.Table, shapes: dict[str, np.ndarray], fail) -> None:
    n_tokens = _lengths(table, "token_ids")
    fail(_lengths(table, "token_texts") != n_tokens, "token_texts and token_ids differ in length")
    fail(_lengths(table, "token_roles") != n_tokens, "token_roles and token_ids differ in length")
    gates = shapes["gates"]
    fail(
        gates[:, 0] != _lengths(table, "injection_layers"),
        "gates has a first dimension other than len(injection_layers)",
    )
    kept = _lengths(table, "gate_positions")
    compact = np.asarray(pc.is_valid(table.column("gate_positions")).to_numpy(zero_copy_only=False), dtype=bool)
    n_kept = np.where(compact, kept, n_tokens)
    fail(gates[:, 1] != n_kept, "gates has a second dimension other than the number of tokens (or gate_positions)")
    if compact.any():
        gp = _values(table, "gate_positions", np.int64)
        gp_owner = _owner(table, "gate_positions")
        outside = (gp < 0) | (gp >= n_tokens[gp_owner])
        same_row = gp_owner[1:] == gp_owner[:-1]
        not_increasing = np.zeros(len(gp), dtype=bool)
        not_increasing[1:] = same_row & (np.diff(gp) <= 0)
        fail(
            np.bincount(gp_owner[outside | not_increasing], minlength=table.num_rows) > 0,
            "gate_positions are not increasing token positions",
        )
    fail(gates[:, 2] != _lengths(table, "vision_layers"), "gates has a last dimension other than len(vision_layers)")
    fail((gates[:, 2] == 0) & (gates[:, 0] > 0), "gates has injection layers but no vision layers to gate over")
    fail(
        np.any(shapes["injection_norm"] != gates[:, :2], axis=1),
        "injection_norm_shape is not the first two entries of gates_shape",
    )
    n_answer = _lengths(table, "answer_ids")
    for name in ("answer_texts", "answer_positions", "answer_logprobs", "topk_texts"):
        fail(_lengths(table, name) != n_answer, f"{name} and answer_ids differ in length")
    fail(shapes["topk_ids"][:, 0] != n_answer, "topk_ids does not have one row per answer token")
    fail(np.any(shapes["topk_logprobs"] != shapes["topk_ids"], axis=1), "topk_logprobs and topk_ids differ in shape")
    positions = _values(table, "answer_positions", np.int64)
    owner = _owner(table, "answer_positions")
    fail(
        np.bincount(owner[(positions < 0) | (positions >= n_tokens[owner])], minlength=table.num_rows) > 0,
        "answer_positions points outside the tokens",
    )
    roles = pc.list_flatten(table.column("token_roles"))
    known = pc.fill_null(pc.is_in(roles, value_set=pa.array(ROLES)), False)
    bad_role = ~np.asarray(known.to_numpy(zero_copy_only=False), dtype=bool)
    fail(
        np.bincount(_owner(table, "token_roles")[bad_role], minlength=table.num_rows) > 0,
        f"token_roles holds a role outside {ROLES}",
    )


def _check_values(table: pa.Table, shapes: dict[str, np.ndarray], fail) -> None:
    for name, what in (
        ("gates", "gates"),
        ("injection_norm", "injection norms"),
        ("answer_logprobs", "answer log-probabilities"),
        ("topk_logprobs", "top-k log-probabilities"),
    ):
        values = _values(table, name, np.float32)
        fail(_any_per_row(table, name, ~np.isfinite(values)), f"{name} holds NaN or infinite {what}")
    norms = _values(table, "injection_norm", np.float32)
    fail(_any_per_row(table, "injection_norm", norms < 0), "injection_norm holds negative norms")
    for name in ("answer_logprobs", "topk_logprobs"):
        fail(
            _any_per_row(table, name, _values(table, name, np.float32) > 1e-3),
            f"{name} holds log-probabilities above 0",
        )
    gates = _values(table, "gates", np.float64)
    outside = (gates < -GATE_SUM_ATOL) | (gates > 1 + GATE_SUM_ATOL)
    fail(_any_per_row(table, "gates", outside), "gates holds values outside [0, 1]")
    fail(
        _gate_rows_off(table, shapes["gates"], gates),
        f"gates has rows that do not sum to 1 (tolerance {GATE_SUM_ATOL})",
    )


def _gate_rows_off(table: pa.Table, shape: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per trace: does any [layer, token] row of K gates sum to something other than 1?"""
    rows = (shape[:, 0] * shape[:, 1]).astype(np.int64)  # rows per trace
    rows[shape[:, 2] == 0] = 0
    total = int(rows.sum())
    if total == 0:
        return np.zeros(table.num_rows, dtype=bool)
    offsets = _offsets(table, "gates")
    trace = np.repeat(np.arange(table.num_rows), rows)
    first_row = np.repeat(np.cumsum(rows) - rows, rows)
    starts = offsets[:-1][trace] + (np.arange(total) - first_row) * shape[trace, 2]
    sums = np.add.reduceat(values, starts)
    off = np.abs(sums - 1.0) > GATE_SUM_ATOL
    return np.bincount(trace[off], minlength=table.num_rows) > 0


# ----------------------------------------------------------------------------------------- helpers


def _labels(table: pa.Table) -> list[str]:
    ids = table.column("sample_id").to_pylist()
    questions = table.column("question").to_pylist()
    return [f"sample {s}" if s else f"question {str(q)[:60]!r}" for s, q in zip(ids, questions)]


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.list_value_length(table.column(name)), 0).to_numpy(), dtype=np.int64)


def _offsets(table: pa.Table, name: str) -> np.ndarray:
    lengths = _lengths(table, name)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _owner(table: pa.Table, name: str) -> np.ndarray:
    """For every flattened value of list column `name`, the row it belongs to."""
    return np.repeat(np.arange(table.num_rows), _lengths(table, name))


def _values(table: pa.Table, name: str, dtype) -> np.ndarray:
    flat = pc.list_flatten(table.column(name))
    if len(flat) == 0:
        return np.empty(0, dtype=dtype)
    return np.asarray(pc.fill_null(flat, np.nan if np.dtype(dtype).kind == "f" else 0).to_numpy(), dtype=dtype)


def _any_per_row(table: pa.Table, name: str, flags: np.ndarray) -> np.ndarray:
    return np.bincount(_owner(table, name)[flags], minlength=table.num_rows) > 0


def _shapes(table: pa.Table, name: str, ndim: int, fail) -> np.ndarray:
    lengths = _lengths(table, f"{name}_shape")
    fail(lengths != ndim, f"{name}_shape does not have {ndim} entries")
    return _values(table, f"{name}_shape", np.int64).reshape(-1, ndim)
