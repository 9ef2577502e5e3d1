"""The bundled models load offline, hold their measured accuracy, and their gates matter.

`cli-tiny` (trained from scratch as a CLI model) clears the project's 0.95 overall bar but not the
0.90 per-type bar: relation questions stay at 0.86 (see its model card); these tests pin the levels
it does reach. They also check what makes it a useful default for a gate tool: switching its
injection off changes answers.
"""

from __future__ import annotations

import pytest

from cliviz.data import iter_samples, write_dataset
from cliviz.evaluation import evaluate, read_jsonl
from cliviz.model.loading import load_model

HELD_OUT_SEED = 4242  # training draws its scenes from stream 17 (seed 0); this stream is never seen


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held-out")
    write_dataset(path, 350, seed=HELD_OUT_SEED)  # 50 per question type
    return read_jsonl(path)


def test_cli_tiny_holds_its_measured_accuracy(held_out):
    model, tok = load_model(device="cpu")
    assert model.config.fusion == "cli" and model.num_parameters() < 5_000_000
    result = evaluate(model, tok, held_out)
    assert result["overall"] >= 0.95, result  # measured 0.974
    assert result["per_type"]["relation"] >= 0.84, result  # measured 0.86: the one type under the 0.90 bar
    others = {t: a for t, a in result["per_type"].items() if t != "relation"}
    assert min(others.values()) >= 0.94, result  # position is the next weakest at 0.96


def test_cli_tiny_injection_is_used():
    """Injection off at every layer must cost accuracy or flip answers (the gates are causal)."""
    from cliviz.analyses.ablations import Ablation, score_conditions

    model, tok = load_model(device="cpu")
    samples = list(iter_samples(70, seed=HELD_OUT_SEED + 1))
    frame = score_conditions(model, tok, [s.image for s in samples], [s.question for s in samples],
                             [s.answer for s in samples], [None, Ablation("injection_off")])
    by = frame.groupby(frame["condition"].astype(str))
    flips = by["flipped"].mean().max()
    # measured: 0.22 of 140 samples (seed 4243) flip
    assert flips >= 0.10, frame.groupby("condition").mean(numeric_only=True)


def test_probe_reads_the_question_type_off_the_bundled_gates():
    """A cross-validated probe on the answer-step gates of cli-tiny beats the majority baseline."""
    from cliviz.analyses.stats import probe_qtype
    from cliviz.tracing import trace_batch

    model, tok = load_model(device="cpu")
    samples = list(iter_samples(140, seed=HELD_OUT_SEED + 2))
    traces = []
    for start in range(0, len(samples), 35):
        chunk = samples[start : start + 35]
        traces += trace_batch(model, tok, [s.image for s in chunk], [s.question for s in chunk],
                              max_new_tokens=2, qtypes=[s.qtype for s in chunk])
    result = probe_qtype(traces, n_splits=5, seed=0)
    assert result.baseline == pytest.approx(1 / 7)
    assert result.accuracy > result.baseline + 0.4, (result.accuracy, result.baseline)


def test_attached_cli_projector_and_shallow_baselines(held_out):
    attached, tok = load_model("cli-attached-tiny", device="cpu")
    assert attached.config.fusion == "cli" and evaluate(attached, tok, held_out)["overall"] >= 0.94  # measured 0.946
    projector, tok = load_model("projector-tiny", device="cpu")
    assert projector.config.fusion == "projector" and len(projector.agf) == 0
    assert evaluate(projector, tok, held_out)["overall"] >= 0.95  # measured 0.960
    shallow, tok = load_model("shallow-tiny", device="cpu")
    assert shallow.config.fusion == "shallow"
    assert evaluate(shallow, tok, held_out)["overall"] >= 0.92  # measured 0.929
