"""Trace-set heatmaps and gate statistics, checked against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cliviz.analyses import heatmaps as H
from cliviz.analyses import stats as S
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace
from cliviz.tracing.traceset import TraceSet, write_traces

from factories import LLM, VISION, hand_trace, onehot, synthetic_traces

# --------------------------------------------------------------------------------------- heatmaps

A = np.array(
    [  # trace a: L=2, T=3, K=3
        [onehot(0), [0.5, 0.5, 0.0], onehot(2)],
        [onehot(1), onehot(1), [0.2, 0.3, 0.5]],
    ]
)
B = np.array(
    [  # trace b: L=2, T=2, K=3
        [[0.2, 0.2, 0.6], onehot(0)],
        [onehot(2), [0.1, 0.8, 0.1]],
    ]
)


@pytest.fixture
def two() -> list[Trace]:
    a = hand_trace(A, [1, 2], qtype="colour", sample_id="a", roles=["image", "prompt", "answer"])
    b = hand_trace(B, [1], qtype="count", sample_id="b", roles=["image", "prompt"])
    return [a, b]


def test_mean_matrix_by_hand(two: list[Trace]) -> None:
    a_ans = np.array([[0.25, 0.25, 0.5], [0.1, 0.65, 0.25]])  # mean of positions 1 and 2 of A
    b_ans = np.array([onehot(0), [0.1, 0.8, 0.1]])  # position 1 of B
    np.testing.assert_allclose(H.mean_gate_matrix(two), (a_ans + b_ans) / 2, atol=1e-6)
    # token weighting: 3 rows (two from a, one from b)
    np.testing.assert_allclose(H.mean_gate_matrix(two, weight="token"), (2 * a_ans + b_ans) / 3, atol=1e-6)
    # a one-trace set equals the single-trace builder, for every selection
    for sel in ("answer", "all", "image", "prompt"):
        np.testing.assert_allclose(H.mean_gate_matrix([two[0]], sel), H.gate_matrix(two[0], sel), atol=1e-6)
    np.testing.assert_allclose(H.mean_gate_matrix(two, "image"), (A[:, 0] + B[:, 0]) / 2, atol=1e-6)
    rows = H.gate_rows(two)
    assert rows.vision_layers == VISION and rows.injection_layers == LLM
    assert rows.trace.tolist() == [0, 0, 1] and rows.step.tolist() == [0, 1, 0] and rows.position.tolist() == [1, 2, 1]


def test_grouped_and_difference_by_hand(two: list[Trace], tmp_path) -> None:
    groups = H.grouped_gate_matrices(two)
    assert list(groups) == ["colour", "count"]
    np.testing.assert_allclose(groups["colour"], [[0.25, 0.25, 0.5], [0.1, 0.65, 0.25]], atol=1e-6)
    np.testing.assert_allclose(groups["count"], [onehot(0), [0.1, 0.8, 0.1]], atol=1e-6)
    assert H.group_counts(two) == {"colour": 1, "count": 1}
    diff = H.gate_difference(two, groups=("colour", "count"))
    np.testing.assert_allclose(diff, [[-0.75, 0.25, 0.5], [0.0, -0.15, 0.15]], atol=1e-6)
    # two trace sets, one from a file
    path = write_traces(tmp_path / "b.parquet", [two[1]])
    np.testing.assert_allclose(H.gate_difference([two[0]], TraceSet.read(path)), diff, atol=1e-6)
    frame = H.gate_matrix_frame(diff, VISION, LLM, value="delta")
    assert list(frame.columns) == ["llm_layer", "vision_layer", "delta"]
    assert frame.loc[(frame.llm_layer == 1) & (frame.vision_layer == 2), "delta"].item() == pytest.approx(-0.75)
    with pytest.raises(CLIVizError, match="no traces with qtype 'glyph'"):
        H.gate_difference(two, groups=("colour", "glyph"))


def test_mixed_layer_lists_refused(two: list[Trace]) -> None:
    other = hand_trace(B, [0], vision=[1, 2, 3], sample_id="o")
    with pytest.raises(CLIVizError, match="mix layer lists"):
        H.mean_gate_matrix(two + [other])
    with pytest.raises(CLIVizError, match="different layers"):
        H.gate_difference(two, [other])
    deeper = hand_trace(np.concatenate([B, B[:1]]), [0], llm=[1, 3, 5], sample_id="d")
    with pytest.raises(CLIVizError, match="mix layer lists"):
        H.grouped_gate_matrices([deeper] + two)


def test_gateless_traces_skipped_and_all_gateless_refused(two: list[Trace]) -> None:
    proj = hand_trace(np.zeros((0, 3, 1)), [1], vision=[4], llm=[], sample_id="p")
    np.testing.assert_allclose(H.mean_gate_matrix(two + [proj]), H.mean_gate_matrix(two), atol=1e-7)
    with pytest.raises(CLIVizError, match="no trace in the set has gates"):
        H.mean_gate_matrix([proj])
    with pytest.raises(CLIVizError, match="unknown selection"):
        H.gate_rows(two, "nonsense")


def test_trace_set_figures_use_real_layers(two: list[Trace]) -> None:
    groups = H.grouped_gate_matrices(two)
    fig = H.grouped_heatmap_figure(groups, VISION, LLM, counts=H.group_counts(two))
    assert len(fig.data) == 2 and all(t.coloraxis == "coloraxis" for t in fig.data)
    assert list(fig.data[0].x) == ["V2", "V5", "V8"] and list(fig.data[0].y) == ["L1", "L3"]
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == pytest.approx(1.0)
    diff = H.gate_difference(two, groups=("colour", "count"))
    d = H.difference_figure(diff, VISION, LLM)
    assert d.data[0].zmin == pytest.approx(-0.75) and d.data[0].zmax == pytest.approx(0.75) and d.data[0].zmid == 0
    tr = H.trajectory_figure(two[0], llm_layer=3)
    assert [t.name for t in tr.data] == ["V2", "V5", "V8"]
    np.testing.assert_allclose(tr.data[1].y, [1.0, 0.3])  # layer 3, vision layer 5, steps 0 and 1
    assert list(tr.layout.xaxis.ticktext) == ["0:a0", "1:a1"]
    frame = H.trajectory_frame(two[0])
    assert len(frame) == 2 * 2 * 3 and set(frame.llm_layer) == {1, 3}
    with pytest.raises(CLIVizError, match="takes no injection"):
        H.trajectory_figure(two[0], llm_layer=2)


# ------------------------------------------------------------------------------------------ stats


def test_entropy_uniform_is_log_k_and_k_effective_layers() -> None:
    K = 4
    uni = np.full((2, 5, K), 1 / K)
    t = hand_trace(uni, [3, 4], vision=[0, 3, 6, 9])
    df = S.entropy_per_layer([t])
    np.testing.assert_allclose(df.entropy, np.log(K), rtol=1e-6)
    np.testing.assert_allclose(df.effective_layers, K, rtol=1e-5)
    np.testing.assert_allclose(df.pooled_effective_layers, K, rtol=1e-5)
    np.testing.assert_allclose(df.normalized_entropy, 1.0, rtol=1e-6)
    assert df.llm_layer.tolist() == LLM
    np.testing.assert_allclose(df.max_entropy, np.log(K))


def test_entropy_one_hot_and_pooled_by_hand() -> None:
    # layer 1: one-hot per token but different vision layers -> 0 per token, log 2 pooled
    g = np.array([[onehot(0), onehot(1)], [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    t = hand_trace(g, [0, 1])
    df = S.entropy_per_layer([t]).set_index("llm_layer")
    assert df.loc[1, "entropy"] == pytest.approx(0.0, abs=1e-9)
    assert df.loc[1, "effective_layers"] == pytest.approx(1.0)
    assert df.loc[1, "pooled_entropy"] == pytest.approx(np.log(2))
    assert df.loc[3, "entropy"] == pytest.approx(np.log(2))
    assert df.loc[3, "effective_layers"] == pytest.approx(2.0)
    np.testing.assert_allclose(
        S.row_entropy([[1.0, 0.0], [0.25, 0.75]]), [0.0, -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))]
    )


def test_variance_decomposition_static_within_samples() -> None:
    # gates constant across the tokens of each sample, different between samples -> within = 0
    s1 = hand_trace(np.broadcast_to(np.array([onehot(0), onehot(1)])[:, None], (2, 4, 3)), [3], sample_id="1")
    s2 = hand_trace(np.broadcast_to(np.array([onehot(2), onehot(1)])[:, None], (2, 4, 3)), [3], sample_id="2")
    df = S.gate_variance_decomposition([s1, s2]).set_index("llm_layer")
    np.testing.assert_allclose(df.within_sample, 0.0, atol=1e-12)
    # layer 1: means (1,0,0) and (0,0,1), grand (0.5,0,0.5): |d|^2 = 0.5 for every token
    assert df.loc[1, "across_sample"] == pytest.approx(0.5)
    assert df.loc[1, "total"] == pytest.approx(0.5) and df.loc[1, "within_share"] == pytest.approx(0.0)
    # layer 3 is the same everywhere: no variance at all, share undefined
    assert df.loc[3, "total"] == pytest.approx(0.0) and np.isnan(df.loc[3, "within_share"])
    assert (df.n_samples == 2).all() and (df.n_tokens == 8).all()


def test_variance_decomposition_dynamic_and_identity() -> None:
    # one sample alternating between two one-hot gates: all variance is within (0.5 per token)
    g = np.array([[onehot(0), onehot(1), onehot(0), onehot(1)]] * 2)
    df = S.gate_variance_decomposition([hand_trace(g, [3])])
    np.testing.assert_allclose(df.within_sample, 0.5)
    np.testing.assert_allclose(df.across_sample, 0.0, atol=1e-12)
    ts = synthetic_traces(20, seed=3)
    d = S.gate_variance_decomposition(ts)
    np.testing.assert_allclose(d.within_sample + d.across_sample, d.total, rtol=1e-9)


def test_injection_norm_profile_by_role() -> None:
    norms = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    t = hand_trace(np.full((2, 4, 3), 1 / 3), [2, 3], roles=["image", "image", "prompt", "answer"], norms=norms)
    df = S.injection_norm_profile([t]).set_index(["role", "llm_layer"])
    assert df.loc[("image", 1), "mean"] == pytest.approx(1.5)
    assert df.loc[("image", 3), "median"] == pytest.approx(15.0)
    assert df.loc[("prompt", 3), "mean"] == pytest.approx(30.0) and df.loc[("prompt", 3), "n_tokens"] == 1
    assert df.loc[("answer_step", 1), "mean"] == pytest.approx(3.5)
    assert df.loc[("answer_step", 1), "sd"] == pytest.approx(0.5)


def test_probe_beats_majority_baseline() -> None:
    traces = synthetic_traces(160, seed=1, noise=0.5)
    # unbalanced classes: drop half of one type so the baseline is not simply 1/4
    traces = [t for i, t in enumerate(traces) if not (t.meta.qtype == "glyph" and (i // 4) % 2)]
    res = S.probe_qtype(traces, n_splits=5, seed=0)
    assert res.classes == ["colour", "count", "glyph", "position"]
    assert res.n_samples == len(traces) and res.n_features == 3 * 4 and res.n_splits == 5
    assert len(traces) == 140 and res.baseline == pytest.approx(40 / 140)
    assert res.accuracy > res.baseline + 0.3, (res.accuracy, res.baseline)
    assert isinstance(res.confusion, pd.DataFrame) and res.confusion.to_numpy().sum() == len(traces)
    assert np.trace(res.confusion.to_numpy()) == round(res.accuracy * len(traces))
    long = res.confusion_long()
    assert set(long.columns) == {"true_qtype", "predicted_qtype", "count", "row_share"}
    np.testing.assert_allclose(long.groupby("true_qtype").row_share.sum(), 1.0)
    assert res.summary().accuracy.item() == pytest.approx(res.accuracy)


def test_probe_at_chance_on_pure_noise_and_errors() -> None:
    traces = synthetic_traces(80, seed=2)
    rng = np.random.default_rng(0)
    for t in traces:  # labels unrelated to the gates
        t.meta.qtype = str(rng.choice(["x", "y"]))
    res = S.probe_qtype(traces)
    assert res.accuracy < res.baseline + 0.2
    with pytest.raises(CLIVizError, match="at least 2 question types"):
        S.probe_qtype(synthetic_traces(8, qtypes=("colour",)))
    few = synthetic_traces(12)
    few[1].meta.qtype = "rare"
    with pytest.raises(CLIVizError, match="'rare' has only 1"):
        S.probe_qtype(few)


def test_pca_frame() -> None:
    traces = synthetic_traces(40, seed=4)
    df = S.gate_pca(traces)
    assert list(df.columns) == ["trace", "sample_id", "qtype", "PC1", "PC2"]
    assert len(df) == 40 and set(df.qtype) == {"colour", "count", "glyph", "position"}
    ratio = df.attrs["explained_variance_ratio"]
    assert len(ratio) == 2 and 0 < ratio[1] <= ratio[0] <= 1
    # components separate the types: type centroids are far apart relative to within-type spread
    cent = df.groupby("qtype")[["PC1", "PC2"]].mean()
    spread = df.groupby("qtype")[["PC1", "PC2"]].std().to_numpy().mean()
    dists = [np.linalg.norm(cent.iloc[i] - cent.iloc[j]) for i in range(4) for j in range(i + 1, 4)]
    assert min(dists) > 2 * spread
    X, meta = S.trace_gate_vectors(traces)
    np.testing.assert_allclose(X[0].reshape(3, 4), H.gate_matrix(traces[0]), atol=1e-6)
    assert meta.attrs["X_columns"][:2] == ["L2_V1", "L2_V4"]


def test_whole_pipeline_on_2000_traces() -> None:
    """Scale check (its time is measured in benchmarks/bench_figures.py, not asserted here)."""
    ts = TraceSet(synthetic_traces(2000, seed=5, n_tokens=40))
    rows = H.gate_rows(ts, "all")
    groups = H.grouped_gate_matrices(ts)
    entropy = S.entropy_per_layer(ts)
    S.gate_variance_decomposition(rows)
    assert len(rows) == 2000 * 40
    assert len(groups) >= 1 and np.isfinite(np.asarray(entropy.select_dtypes("number"))).all()
