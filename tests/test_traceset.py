"""Trace files: Parquet round trip, append/merge, tidy frame, errors, atomicity."""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import ROLES, SCHEMA_VERSION, Trace, TraceMeta
from cliviz.tracing.traceset import TraceSet, merge_traces, write_traces


def make_trace(
    rng: np.random.Generator,
    *,
    n_layers: int = 2,
    n_tokens: int = 7,
    k: int = 3,
    n_answer: int = 2,
    top_k: int = 3,
    question: str = "what colour is the square?",
    texts: list[str] | None = None,
    sample_id: str | None = "s0",
    qtype: str | None = "colour",
    attributions: dict[str, np.ndarray] | None = None,
) -> Trace:
    gates = rng.random((n_layers, n_tokens, k), dtype=np.float32) + np.float32(0.01)
    gates /= gates.sum(axis=-1, keepdims=True)
    texts = texts if texts is not None else [f"tok{i}" for i in range(n_tokens)]
    meta = TraceMeta(
        question=question,
        answer="red",
        model="assets/models/tiny",
        config_hash="abc123",
        fusion="projector" if n_layers == 0 else "cli",
        vision_layers=list(range(2, 2 + 2 * k, 2)),
        injection_layers=[int(x) for x in rng.choice(40, size=n_layers, replace=False)] if n_layers else [],
        image_sha256="f" * 64,
        image_width=64,
        image_height=48,
        device="cpu",
        dtype="float32",
        created_at="2025-01-01T00:00:00+00:00",
        cliviz_version="0.1.0",
        qtype=qtype,
        reference_answer="red",
        sample_id=sample_id,
    )
    return Trace(
        meta=meta,
        token_ids=rng.integers(0, 2**40, size=n_tokens, dtype=np.int64),
        token_texts=texts,
        token_roles=[ROLES[i % 3] for i in range(n_tokens)],
        gates=gates,
        injection_norm=rng.random((n_layers, n_tokens), dtype=np.float32),
        answer_ids=rng.integers(0, 1000, size=n_answer, dtype=np.int64),
        answer_texts=[f"ans{i}" for i in range(n_answer)],
        answer_positions=rng.integers(0, n_tokens, size=n_answer, dtype=np.int64),
        answer_logprobs=-rng.random(n_answer, dtype=np.float32),
        topk_ids=rng.integers(0, 1000, size=(n_answer, top_k), dtype=np.int64),
        topk_texts=[[f"alt{i}_{j}" for j in range(top_k)] for i in range(n_answer)],
        topk_logprobs=-rng.random((n_answer, top_k), dtype=np.float32),
        attributions=attributions or {},
    )


ARRAYS = (
    "token_ids",
    "gates",
    "injection_norm",
    "answer_ids",
    "answer_positions",
    "answer_logprobs",
    "topk_ids",
    "topk_logprobs",
)
LISTS = ("token_texts", "token_roles", "answer_texts", "topk_texts")


def assert_trace_equal(got: Trace, want: Trace) -> None:
    assert got.meta == want.meta
    for name in ARRAYS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in LISTS:
        assert getattr(got, name) == getattr(want, name), name
    assert list(got.attributions) == list(want.attributions)
    for name, arr in want.attributions.items():
        assert got.attributions[name].dtype == np.float32
        assert got.attributions[name].shape == arr.shape
        np.testing.assert_array_equal(got.attributions[name], arr.astype(np.float32))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_round_trip_every_field(tmp_path: Path, rng: np.random.Generator) -> None:
    traces = [
        make_trace(rng, sample_id="a"),
        make_trace(rng, n_layers=0, k=1, sample_id=None, qtype=None),
        make_trace(rng, n_layers=3, n_tokens=11, k=5, n_answer=4, top_k=1, sample_id="c"),
    ]
    assert traces[1].gates.shape == (0, 7, 1)
    path = write_traces(tmp_path / "t.parquet", traces)
    ts = TraceSet.read(path)
    assert len(ts) == 3
    for got, want in zip(ts, traces):
        assert_trace_equal(got, want)
    assert_trace_equal(ts[-1], traces[-1])
    assert ts[1].gates.dtype == np.float32 and ts[0].token_ids.dtype == np.int64
    assert ts[0].gates.flags.writeable  # callers may edit (e.g. renormalise) decoded arrays
    assert ts.sample_ids() == {"a", "c"}
    assert [t.meta.sample_id for t in ts[1:]] == [None, "c"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_attributions_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    attr = {
        "gate_ig": rng.standard_normal((2, 2, 3)).astype(np.float32),
        "patch_gxi": rng.standard_normal((2, 16)).astype(np.float32),
    }
    traces = [make_trace(rng, attributions=attr), make_trace(rng)]
    write_traces(tmp_path / "a.parquet", traces)
    ts = TraceSet.read(tmp_path / "a.parquet")
    assert_trace_equal(ts[0], traces[0])
    assert ts[1].attributions == {}


def test_append_two_batches_in_order(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "sweep" / "traces.parquet"
    first = [make_trace(rng, sample_id=f"s{i}") for i in range(3)]
    second = [make_trace(rng, sample_id=f"s{i}", n_layers=0, k=1) for i in range(3, 5)]
    TraceSet.append(path, first)  # a missing file is created (folder too)
    TraceSet.append(path, second)
    ts = TraceSet.read(path)
    assert [t.meta.sample_id for t in ts] == [f"s{i}" for i in range(5)]
    for got, want in zip(ts, first + second):
        assert_trace_equal(got, want)
    write_traces(path, [first[0]], append=True)
    assert len(TraceSet.read(path)) == 6
    assert path.is_dir() and len(list(path.glob("part-*.parquet"))) == 3  # one part per append
    with pytest.raises(CLIVizError, match="trace set folder"):
        write_traces(path, [first[0]])  # a set folder is never replaced by a plain write
    assert len(TraceSet.read(path)) == 6
    single = write_traces(tmp_path / "one.parquet", [first[0]])
    write_traces(single, [first[1]])  # a single file is replaced
    assert single.is_file() and [t.meta.sample_id for t in TraceSet.read(single)] == ["s1"]


def test_merge_shards_in_given_order(tmp_path: Path, rng: np.random.Generator) -> None:
    shards = []
    for r in range(3):
        shards.append(
            write_traces(tmp_path / f"rank{r}.parquet", [make_trace(rng, sample_id=f"r{r}_{i}") for i in range(2)])
        )
    out = merge_traces(tmp_path / "all.parquet", [shards[2], shards[0], shards[1]])
    assert [t.meta.sample_id for t in TraceSet.read(out)] == ["r2_0", "r2_1", "r0_0", "r0_1", "r1_0", "r1_1"]
    bad = tmp_path / "bad.parquet"
    _rewrite_with_version(shards[0], bad, "0")
    with pytest.raises(CLIVizError, match="schema version 0"):
        merge_traces(tmp_path / "all.parquet", [shards[1], bad])
    assert len(TraceSet.read(out)) == 6


def test_to_long_matches_arrays(tmp_path: Path, rng: np.random.Generator) -> None:
    a = make_trace(rng, n_layers=2, n_tokens=5, k=3, sample_id="a", qtype="colour")
    b = make_trace(rng, n_layers=3, n_tokens=4, k=2, sample_id="b", qtype="count", question="how many?")
    p = make_trace(rng, n_layers=0, k=1, sample_id="p")  # projector: no gate rows
    write_traces(tmp_path / "t.parquet", [a, p, b])
    df = TraceSet.read(tmp_path / "t.parquet").to_long()
    assert list(df.columns) == [
        "trace",
        "sample_id",
        "qtype",
        "question",
        "answer",
        "llm_layer",
        "vision_layer",
        "position",
        "token",
        "role",
        "gate",
        "injection_norm",
    ]
    assert len(df) == 2 * 5 * 3 + 3 * 4 * 2
    assert df.gate.dtype == np.float32 and df.llm_layer.dtype == np.int64
    assert set(df.trace) == {0, 2}
    for ti, t in ((0, a), (2, b)):
        rows = df[df.trace == ti]
        assert len(rows) == t.gates.size
        np.testing.assert_array_equal(rows.gate.to_numpy(), t.gates.ravel())
        assert set(rows.sample_id.astype(str)) == {t.meta.sample_id}
        assert set(rows.question.astype(str)) == {t.meta.question}
    # one hand-picked cell per trace, looked up by real layer indices
    for ti, t, (li, pos, ki) in ((0, a, (1, 3, 2)), (2, b, (2, 1, 0))):
        cell = df[
            (df.trace == ti)
            & (df.llm_layer == t.meta.injection_layers[li])
            & (df.vision_layer == t.meta.vision_layers[ki])
            & (df.position == pos)
        ]
        assert len(cell) == 1
        row = cell.iloc[0]
        assert row.gate == t.gates[li, pos, ki]
        assert row.injection_norm == t.injection_norm[li, pos]
        assert row.token == t.token_texts[pos] and row.role == t.token_roles[pos]
        assert row.qtype == t.meta.qtype and row.answer == t.meta.answer
    # gates are distributions over vision layers
    sums = df.groupby(["trace", "llm_layer", "position"]).gate.sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=1e-5)
    plain = TraceSet([a, b]).to_long(categorical=False)
    assert len(plain) == len(df) and list(plain.token[:3]) == [a.token_texts[0]] * 3


def test_to_long_and_meta_frame_of_empty_set(tmp_path: Path) -> None:
    write_traces(tmp_path / "e.parquet", [])
    ts = TraceSet.read(tmp_path / "e.parquet")
    assert len(ts) == 0 and list(ts) == [] and ts.sample_ids() == set()
    assert len(ts.to_long()) == 0 and len(ts.meta_frame()) == 0


def test_meta_frame(rng: np.random.Generator) -> None:
    traces = [make_trace(rng, sample_id="a"), make_trace(rng, sample_id=None, qtype=None)]
    df = TraceSet(traces).meta_frame()
    assert list(df.columns) == [f.name for f in fields(TraceMeta)]
    assert df.index.name == "trace" and len(df) == 2
    assert df.loc[0, "sample_id"] == "a" and pd.isna(df.loc[1, "qtype"])
    assert df.loc[0, "injection_layers"] == traces[0].meta.injection_layers
    assert df.image_width.dtype == np.int64


def test_plain_pandas_and_pyarrow_can_read(tmp_path: Path, rng: np.random.Generator) -> None:
    traces = [make_trace(rng, sample_id="a"), make_trace(rng, n_layers=0, k=1, sample_id="b")]
    path = write_traces(tmp_path / "t.parquet", traces)
    df = pd.read_parquet(path)
    assert len(df) == 2
    for name in (
        "question",
        "answer",
        "model",
        "fusion",
        "qtype",
        "sample_id",
        "vision_layers",
        "gates",
        "gates_shape",
        "token_texts",
        "topk_texts",
        "attributions",
    ):
        assert name in df.columns
    assert list(df.sample_id) == ["a", "b"]
    row = df.iloc[0]
    np.testing.assert_array_equal(np.asarray(row.gates, np.float32).reshape(row.gates_shape), traces[0].gates)
    md = pq.read_metadata(path).metadata
    assert md[b"cliviz.schema_version"] == str(SCHEMA_VERSION).encode()
    assert b"cliviz.version" in md
    table = pq.read_table(path)
    assert table.schema.field("gates").type == pa.list_(pa.float32())
    assert table.schema.field("gates_shape").type == pa.list_(pa.int32())
    assert table.schema.field("topk_texts").type == pa.list_(pa.list_(pa.string()))
    assert table.column("gates_shape").to_pylist()[1] == [0, 7, 1]


def _rewrite_with_version(src: Path, dst: Path, version: str) -> None:
    table = pq.read_table(src)
    md = dict(table.schema.metadata)
    md[b"cliviz.schema_version"] = version.encode()
    pq.write_table(table.replace_schema_metadata(md), dst)


def test_append_to_other_schema_version_refused_and_untouched(tmp_path: Path, rng: np.random.Generator) -> None:
    good = write_traces(tmp_path / "good.parquet", [make_trace(rng)])
    old = tmp_path / "old.parquet"
    _rewrite_with_version(good, old, "0")
    before = old.read_bytes()
    with pytest.raises(CLIVizError, match=rf"old\.parquet has schema version 0, this cliviz writes {SCHEMA_VERSION}"):
        TraceSet.append(old, [make_trace(rng)])
    assert old.read_bytes() == before
    with pytest.raises(CLIVizError, match="schema version 0"):
        TraceSet.read(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.parquet", "old.parquet"]


def test_corrupt_file_refused_and_untouched(tmp_path: Path, rng: np.random.Generator) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    before = bad.read_bytes()
    with pytest.raises(CLIVizError, match="not a readable Parquet file"):
        TraceSet.append(bad, [make_trace(rng)])
    with pytest.raises(CLIVizError, match="not a readable Parquet file"):
        TraceSet.read(bad)
    assert bad.read_bytes() == before
    # a Parquet file that is not a cliviz trace file
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    with pytest.raises(CLIVizError, match="not a cliviz trace file"):
        TraceSet.read(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "other.parquet"]


def test_missing_file_and_unwritable_folder(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(CLIVizError, match="does not exist"):
        TraceSet.read(tmp_path / "nope.parquet")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CLIVizError, match="cannot create output folder"):
        write_traces(blocker / "sub" / "t.parquet", [make_trace(rng)])
    if os.geteuid() != 0:  # root ignores folder permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(CLIVizError, match="cannot write"):
                write_traces(ro / "t.parquet", [make_trace(rng)])
        finally:
            ro.chmod(0o700)


def test_malformed_trace_refused_before_writing(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_traces(tmp_path / "t.parquet", [make_trace(rng)])
    before = path.read_bytes()
    broken = make_trace(rng)
    broken.gates = broken.gates[:, :3]
    with pytest.raises(CLIVizError, match="malformed"):
        TraceSet.append(path, [make_trace(rng), broken])
    assert path.read_bytes() == before


def test_shape_column_mismatch_is_reported(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_traces(tmp_path / "t.parquet", [make_trace(rng)])
    table = pq.read_table(path)
    i = table.schema.get_field_index("gates_shape")
    table = table.set_column(i, table.schema.field(i), pa.array([[2, 7, 4]], pa.list_(pa.int32())))
    pq.write_table(table, path)
    with pytest.raises(CLIVizError, match="gates does not match gates_shape"):
        TraceSet.read(path)


texts = st.text(max_size=12)


@st.composite
def traces_strategy(draw: st.DrawFn) -> Trace:
    n_layers = draw(st.integers(0, 3))
    n_tokens = draw(st.integers(1, 20))
    k = draw(st.integers(1, 6))
    n_answer = draw(st.integers(1, 4))
    top_k = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = make_trace(
        rng,
        n_layers=n_layers,
        n_tokens=n_tokens,
        k=k,
        n_answer=n_answer,
        top_k=top_k,
        question=draw(texts),
        texts=draw(st.lists(texts, min_size=n_tokens, max_size=n_tokens)),
        sample_id=draw(st.none() | texts),
        qtype=draw(st.none() | texts),
    )
    t.meta.answer = draw(texts)
    t.answer_texts = draw(st.lists(texts, min_size=n_answer, max_size=n_answer))
    t.topk_texts = draw(st.lists(st.lists(texts, min_size=top_k, max_size=top_k), min_size=n_answer, max_size=n_answer))
    if draw(st.booleans()):
        t.attributions = {draw(texts): rng.standard_normal((n_answer, max(n_layers, 1), k)).astype(np.float32)}
    return t


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(traces_strategy(), min_size=0, max_size=3), min_size=1, max_size=2))
def test_property_round_trip(batches: list[list[Trace]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        for batch in batches:
            TraceSet.append(path, batch)
        ts = TraceSet.read(path)
        want = [t for batch in batches for t in batch]
        assert len(ts) == len(want)
        for got, t in zip(ts, want):
            assert_trace_equal(got, t)
        df = ts.to_long()
        assert len(df) == sum(t.gates.size for t in want)
        if len(df):
            np.testing.assert_array_equal(df.gate.to_numpy(), np.concatenate([t.gates.ravel() for t in want]))
            tokens = np.concatenate(
                [
                    np.broadcast_to(np.array(t.token_texts, dtype=object)[None, :, None], t.gates.shape).ravel()
                    for t in want
                    if t.gates.size
                ]
            )
            assert list(df.token.astype(object)) == list(tokens)


def _as_schema_1(src: Path, dst: Path) -> None:
    """What a cliviz before the causal check wrote: no injection_off_* columns, schema version 1."""
    table = pq.read_table(src)
    table = table.drop_columns(["injection_off_answer", "injection_off_changed", "injection_off_delta_logprob"])
    md = dict(table.schema.metadata)
    md[b"cliviz.schema_version"] = b"1"
    pq.write_table(table.replace_schema_metadata(md), dst)


def test_schema_1_files_read_without_causal_check_and_upgrade_on_append(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    old_trace = make_trace(rng)
    _as_schema_1(write_traces(tmp_path / "new.parquet", [old_trace]), tmp_path / "old.parquet")
    back = TraceSet.read(tmp_path / "old.parquet")[0]
    assert back.causal is None and back.meta.injection_off_changed is None
    assert_trace_equal(back, old_trace)  # everything else intact
    checked = make_trace(rng, sample_id="s1")
    checked.meta.injection_off_answer, checked.meta.injection_off_changed = "blue", True
    checked.meta.injection_off_delta_logprob = -2.5
    TraceSet.append(tmp_path / "old.parquet", [checked])
    assert pq.read_metadata(tmp_path / "old.parquet").metadata[b"cliviz.schema_version"] == str(SCHEMA_VERSION).encode()
    both = TraceSet.read(tmp_path / "old.parquet")
    assert both[0].causal is None and both[1].causal.changed and both[1].causal.delta_logprob == -2.5
    frame = pd.read_parquet(tmp_path / "old.parquet")  # plain pandas sees the new columns
    assert frame["injection_off_changed"].isna().tolist() == [True, False]
