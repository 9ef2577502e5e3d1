"""Trace sets at research scale: the Parquet dataset store (appends write only new rows, ranks write
their own parts, one model per set, compaction recorded), streaming reductions equal to the in-memory
ones, the DuckDB route, content-token means, and every output at real LLaVA shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliviz.errors import CLIVizError
from cliviz.tracing.compact import Compact
from cliviz.tracing.synthetic import real_shape_trace
from cliviz.tracing.traceset import TraceSet, append_traces, write_traces


def small(seed: int, **kw):
    """A LLaVA-1.5-7B layer layout (31 x 25) with few image tokens: real depth, fast tests."""
    kw.setdefault("n_image_tokens", 12)
    kw.setdefault("n_answer", 4)
    return real_shape_trace("llava-1.5-7b", seed=seed, sample_id=f"s{seed}", **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ store


def test_append_writes_only_new_parts_and_leaves_old_ones_untouched(tmp_path):
    path = tmp_path / "set.parquet"
    TraceSet.append(path, [small(i) for i in range(3)])
    before = _files(path)
    TraceSet.append(path, [small(i) for i in range(3, 5)])
    after = _files(path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten
    assert sorted(set(after) - set(before)) == ["part-00000002.parquet"]
    assert [t.meta.sample_id for t in TraceSet.read(path)] == [f"s{i}" for i in range(5)]
    manifest = json.loads((path / "_cliviz.json").read_text())
    assert manifest["config_hash"] == "synthetic-llava-1.5-7b" and manifest["pooled"] is False
    # plain readers see one table of 5 rows (the manifest and hidden files are not data)
    assert pq.read_table(path).num_rows == 5


def test_ranks_write_their_own_parts_read_in_chunk_then_rank_order(tmp_path):
    path = tmp_path / "set"
    append_traces(path, [small(0)], rank=0)
    append_traces(path, [small(1)], rank=1)
    append_traces(path, [small(2)], rank=1)
    append_traces(path, [small(3)], rank=0)
    names = sorted(p.name for p in path.glob("*.parquet"))
    assert names == ["part-00000001-r0.parquet", "part-00000001-r1.parquet"] + [
        "part-00000002-r0.parquet",
        "part-00000002-r1.parquet",
    ]
    assert [t.meta.sample_id for t in TraceSet.read(path)] == ["s0", "s1", "s3", "s2"]


def test_ranks_creating_the_set_at_once_never_see_a_half_made_folder(tmp_path):
    """torchrun's ranks append their first parts at the same moment: whichever creates the set, the
    other appends to it (a regression: a rank's lock file used to create the folder before its
    manifest, and the other rank refused it as 'not a trace set')."""
    import threading

    for trial in range(12):
        path = tmp_path / f"set{trial}"
        start, errors = threading.Barrier(2), []

        def rank_appends(rank: int, path=path, start=start, errors=errors) -> None:
            start.wait()
            try:
                for i in range(3):
                    append_traces(path, [small(10 * rank + i)], rank=rank)
            except Exception as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

        threads = [threading.Thread(target=rank_appends, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(t.meta.sample_id for t in TraceSet.read(path)) == sorted(f"s{s}" for s in (0, 1, 2, 10, 11, 12))
        assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == []  # no lock left


def test_a_folder_holding_only_hidden_files_takes_a_rank_append(tmp_path):
    path = tmp_path / "set"
    path.mkdir()
    (path / ".part-00000001-r0.parquet.0a1b.tmp").write_bytes(b"half written by another rank")
    append_traces(path, [small(1)], rank=1)
    assert [t.meta.sample_id for t in TraceSet.read(path)] == ["s1"]


def test_one_model_per_set_unless_pooled(tmp_path):
    path = tmp_path / "set"
    TraceSet.append(path, [small(0)])
    other = small(1)
    other.meta.model, other.meta.config_hash = "other/model", "other-hash"
    with pytest.raises(CLIVizError, match="2 models") as err:
        TraceSet.append(path, [other])
    assert "pool" in str(err.value) and "\n" not in str(err.value)
    assert len(TraceSet.read(path)) == 1
    with pytest.raises(CLIVizError, match="2 models"):
        TraceSet([small(2), other]).write(tmp_path / "mixed.parquet")
    pooled = tmp_path / "pooled"
    TraceSet.append(pooled, [small(0)], pool=True)
    TraceSet.append(pooled, [other])
    assert TraceSet.read(pooled).models() == ["synthetic/llava-1.5-7b", "other/model"]


def test_lazy_read_streams_and_pushes_selections_down(tmp_path):
    path = tmp_path / "set"
    for start in range(0, 12, 4):
        TraceSet.append(path, [small(i, qtype="color" if i % 3 else "count") for i in range(start, start + 4)])
    eager, lazy = TraceSet.read(path), TraceSet.read(path, lazy=True)
    assert not eager.on_disk and lazy.on_disk and len(lazy) == 12
    assert [len(b) for b in lazy.batches()] == [4, 4, 4]
    assert lazy[7].meta.sample_id == "s7" and lazy[-1].meta.sample_id == "s11"
    assert [t.meta.sample_id for t in lazy[2:9:3]] == ["s2", "s5", "s8"]
    np.testing.assert_array_equal(lazy[5].gates, eager[5].gates)
    count = TraceSet.read(path, qtype="count", lazy=True)
    assert [t.meta.sample_id for t in count] == ["s0", "s3", "s6", "s9"] and len(count) == 4
    picked = TraceSet.read(path, sample_ids=["s10", "s1"], model="synthetic/llava-1.5-7b")
    assert [t.meta.sample_id for t in picked] == ["s1", "s10"]
    assert len(TraceSet.read(path, model="someone-else")) == 0
    assert eager.select(qtype="count").column("sample_id") == count.column("sample_id")
    assert lazy.meta_frame().equals(eager.meta_frame())


def test_compaction_is_recorded_and_followed(tmp_path):
    path = tmp_path / "set"
    full = [small(i) for i in range(3)]
    TraceSet.append(path, full[:2], compact=Compact("float16", "answer"))
    TraceSet.append(path, full[2:])  # no choice given: the set's own
    with pytest.raises(CLIVizError, match="would mix them"):
        TraceSet.append(path, full, compact=Compact())
    ts = TraceSet.read(path)
    assert ts.compaction == Compact("float16", "answer")
    for got, want in zip(ts, full):
        np.testing.assert_array_equal(got.gate_positions, want.answer_positions)
        assert got.gates.shape == (31, len(want.answer_positions), 25) and got.gates.dtype == np.float32
        np.testing.assert_allclose(got.answer_gates(), want.answer_gates(), atol=1e-3)
        np.testing.assert_allclose(got.answer_gates().sum(-1), 1.0, atol=2e-3)
        assert got.token_texts == want.token_texts  # tokens are always kept whole
        with pytest.raises(CLIVizError, match="compact trace"):
            got.heatmap(role="image")
    recorded = pq.read_schema(path / "part-00000001.parquet").metadata[b"cliviz.compact"]
    assert json.loads(recorded) == {"gates": "float16", "positions": "answer"}
    assert ts.heatmap().data[0].z is not None  # the answer map reads a compact set
    with pytest.raises(CLIVizError, match="unknown position set"):
        Compact("float32", "images")


def test_footer_sizes_bounded_and_new_checks_on_read(tmp_path):
    bomb = small(0)
    bomb.meta.question = "x" * (2**20 + 10)  # a question over 1 MiB is refused before it is decoded
    path = write_traces(tmp_path / "bomb.parquet", [bomb])
    with pytest.raises(CLIVizError, match="at most"):
        TraceSet.read(path)
    nan = small(1)
    nan.meta.injection_off_answer, nan.meta.injection_off_changed = "x", False
    table = TraceSet([nan]).table
    i = table.schema.get_field_index("injection_off_delta_logprob")
    table = table.set_column(i, table.schema.field(i), pa.array([math.nan], pa.float64()))
    pq.write_table(table, tmp_path / "nan.parquet")
    with pytest.raises(CLIVizError, match="injection_off_delta_logprob holds a NaN"):
        TraceSet.read(tmp_path / "nan.parquet")
    attr = small(2, n_answer=2)
    attr.attributions = {"ig": np.ones((2, 3), np.float32)}
    table = TraceSet([attr]).table
    col = table.column("attributions").to_pylist()
    col[0][0]["shape"] = [2**20, 2**20]  # declared far larger than the stored values
    i = table.schema.get_field_index("attributions")
    table = table.set_column(i, table.schema.field(i), pa.array(col, table.schema.field(i).type))
    pq.write_table(table, tmp_path / "attr.parquet")
    with pytest.raises(CLIVizError, match="attributions: a shape does not match"):
        TraceSet.read(tmp_path / "attr.parquet")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CLIVizError, match="not a file, nor a trace set folder"):
        TraceSet.read(tmp_path / "empty-folder")


def test_duckdb_reads_the_set_as_written(tmp_path):
    path = tmp_path / "set.parquet"
    traces = [small(i, qtype=("color", "count")[i % 2]) for i in range(6)]
    for start in (0, 3):
        TraceSet.append(path, traces[start : start + 3])
    con = duckdb.connect()
    counts = dict(
        con.sql(
            f"SELECT qtype, count(*) FROM read_parquet('{path}/*.parquet') GROUP BY qtype ORDER BY qtype"
        ).fetchall()
    )
    assert counts == {"color": 3, "count": 3}
    # the first LLM layer's gate on vision layer 0 at answer step 0, through SQL list indexing
    rows = con.sql(
        f"SELECT sample_id, gates[1 + answer_positions[1] * gates_shape[3]] AS g "
        f"FROM read_parquet('{path}/*.parquet') ORDER BY sample_id"
    ).fetchall()
    want = {t.meta.sample_id: float(t.gates[0, t.answer_positions[0], 0]) for t in traces}
    assert {s: pytest.approx(g, abs=1e-6) for s, g in rows} == want


# -------------------------------------------------------------------------------- reductions


def test_streaming_summary_equals_in_memory_reductions(tmp_path):
    from cliviz.analyses.heatmaps import grouped_gate_matrices, mean_gate_matrix
    from cliviz.analyses.stats import entropy_per_layer, gate_variance_decomposition
    from cliviz.analyses.summary import summarize

    traces = [small(i, n_answer=3 + i % 3) for i in range(9)]
    path = tmp_path / "set"
    for start in range(0, 9, 3):
        TraceSet.append(path, traces[start : start + 3])
    mem, disk = TraceSet(traces), TraceSet.read(path, lazy=True)
    s = summarize(disk)
    np.testing.assert_allclose(mean_gate_matrix(s.rows), mean_gate_matrix(mem), atol=1e-6)
    for g, m in grouped_gate_matrices(mem).items():
        np.testing.assert_allclose(grouped_gate_matrices(s.rows)[g], m, atol=1e-6)
    ref = entropy_per_layer(mem)
    for col in ("entropy", "entropy_sd", "pooled_entropy"):
        np.testing.assert_allclose(s.entropy[col], ref[col], atol=1e-9)
    var = gate_variance_decomposition(mem, select="all")
    for col in ("within_sample", "across_sample", "total"):
        np.testing.assert_allclose(s.variance[col], var[col], atol=1e-12)
    assert s.n_gated == 9 and s.models == ["synthetic/llava-1.5-7b"] and "9 traces" in s.note


def test_answer_means_leave_special_tokens_out_and_say_so():
    from cliviz.analyses.heatmaps import gate_matrix, mean_gate_matrix, trace_heatmap_figure

    t = small(0, n_answer=3)  # w0, w1, <eos>
    assert t.answer_texts[-1] == "<eos>"
    content = t.gates[:, t.answer_positions[:2]].mean(axis=1)
    every = t.gates[:, t.answer_positions].mean(axis=1)
    np.testing.assert_allclose(gate_matrix(t), content, atol=1e-7)
    np.testing.assert_allclose(gate_matrix(t, include_special=True), every, atol=1e-7)
    np.testing.assert_allclose(mean_gate_matrix([t]), content, atol=1e-7)
    np.testing.assert_allclose(mean_gate_matrix([t], include_special=True), every, atol=1e-7)
    title = trace_heatmap_figure(t).layout.title.text.replace("<br>", " ")
    assert "<eos> and other special tokens left out" in title and "2 of 3 steps" in title
    only_eos = small(1, n_answer=1)  # an answer of <eos> alone still has a map (its only step)
    np.testing.assert_allclose(gate_matrix(only_eos), only_eos.gates[:, only_eos.answer_positions].mean(1))


# --------------------------------------------------------------------------- real-shape outputs


@pytest.mark.parametrize("shape", ["llava-1.5-7b", "onevision-7b"])
def test_outputs_build_at_real_shapes(shape, tmp_path):
    """31 x 25 and 27 x 27 layers, real image-token counts, a 256-token answer: every builder runs,
    the trajectory keeps its panels readable, and a trace's notebook display stays under 1 MB."""
    from cliviz.analyses import display
    from cliviz.analyses.figures import build_figure_set
    from cliviz.analyses.heatmaps import MAX_LAYER_PANELS, token_heatmap_figure, write_trace_html

    long = real_shape_trace(shape, seed=0, n_answer=256)
    traces = [long] + [real_shape_trace(shape, seed=i, n_image_tokens=64) for i in range(1, 12)]
    items, skipped = build_figure_set(TraceSet(traces))
    names = [it.name for it in items]
    assert names[:5] == ["gate_mean", "gate_by_qtype", "gate_entropy", "gate_variance", "gate_trajectory"]
    traj = next(it for it in items if it.name == "gate_trajectory")
    assert len(traj.fig.data) == MAX_LAYER_PANELS and "evenly spaced" in traj.description
    assert len(traj.data.llm_layer.unique()) == len(long.meta.injection_layers)  # the CSV keeps every layer
    assert "model synthetic/" + shape in items[0].description and "12 traces" in items[0].description
    fig = token_heatmap_figure(long)
    assert len(fig.layout.sliders[0].steps) == 256
    write_trace_html(long, tmp_path / "t.html")
    display.reset_plotlyjs()
    long._repr_html_()
    second = long._repr_html_()
    assert len(second.encode()) < 1_000_000 and "Plotly.newPlot" in second


def test_figures_refuse_a_pooled_set_unless_asked_and_name_both_models(tmp_path):
    from cliviz.analyses.figures import build_figure_set

    other = [small(i) for i in range(4, 8)]
    for t in other:
        t.meta.model, t.meta.config_hash = "other/model", "other-hash"
    path = tmp_path / "pooled"
    TraceSet.append(path, [small(i) for i in range(4)], pool=True)
    TraceSet.append(path, other)
    with pytest.raises(CLIVizError, match="2 models"):
        build_figure_set(TraceSet.read(path))
    items, _ = build_figure_set(TraceSet.read(path), pool=True)
    assert "models synthetic/llava-1.5-7b, other/model; 8 traces" in items[0].caption


def test_command_option_values_are_the_library_s():
    """The command spells the compaction choices without importing the recorder (fast --help)."""
    from cliviz.cli import sweep_cmd
    from cliviz.tracing import compact

    assert sweep_cmd.GATE_DTYPES == compact.GATE_DTYPES and sweep_cmd.POSITION_SETS == compact.POSITION_SETS
