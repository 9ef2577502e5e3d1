"""The bundled models load offline, hold their measured accuracy, and their gates matter.

`cli-tiny` (the default, CLI trained from scratch) clears the project's bar: >= 0.95 overall and
>= 0.90 on every question type (measured 1.000 on 1,750 held-out samples). Its injection is barely
causal (switching it off flips 1% of answers), so the injection-is-used check runs on
`cli-v1-tiny`, the earlier default kept for that reason (see the model card).
"""

from __future__ import annotations

import pytest

from cliviz.data import iter_samples, write_dataset
from cliviz.data.samples import read_jsonl
from cliviz.evaluation import evaluate
from cliviz.model.loading import load_model

HELD_OUT_SEED = 4242  # training draws its scenes from stream 17 (seed 0); this stream is never seen


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held-out")
    write_dataset(path, 350, seed=HELD_OUT_SEED)  # 50 per question type
    return read_jsonl(path)


def test_cli_tiny_meets_the_bar(held_out):
    model, tok = load_model(device="cpu")
    assert model.config.fusion == "cli" and model.num_parameters() < 5_000_000
    result = evaluate(model, tok, held_out)
    assert result["overall"] >= 0.97, result  # measured 1.000 (and 1.000 on 1,400 samples, seed 4243)
    assert min(result["per_type"].values()) >= 0.94, result  # the bar is 0.90 per type; measured 1.00


def test_cli_v1_tiny_injection_is_used():
    """Injection off at every layer must cost accuracy or flip answers (the gates are causal)."""
    from cliviz.analyses.ablations import Ablation, score_conditions

    model, tok = load_model("cli-v1-tiny", device="cpu")
    samples = list(iter_samples(70, seed=HELD_OUT_SEED + 1))
    frame = score_conditions(
        model,
        tok,
        [s.image for s in samples],
        [s.question for s in samples],
        [s.answer for s in samples],
        [None, Ablation("injection_off")],
    )
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
        traces += trace_batch(
            model,
            tok,
            [s.image for s in chunk],
            [s.question for s in chunk],
            max_new_tokens=2,
            qtypes=[s.qtype for s in chunk],
        )
    result = probe_qtype(traces, n_splits=5, seed=0)
    assert result.baseline == pytest.approx(1 / 7)
    assert result.accuracy > result.baseline + 0.4, (result.accuracy, result.baseline)


@pytest.mark.slow  # held-out accuracy of several bundled models
def test_baselines_and_siblings(held_out):
    """Measured on this 350-sample set: projector 0.969, deepstack 0.966, shallow 0.969, attached 0.946, v1 0.974,
    seed 1 1.000, seed 2 0.960 (colour 0.72: one seed of the same recipe misses colour)."""
    expected = {
        "projector-tiny": ("projector", 0.95),
        "deepstack-tiny": ("deepstack", 0.95),
        "shallow-tiny": ("shallow", 0.95),
        "cli-attached-tiny": ("cli", 0.94),
        "cli-v1-tiny": ("cli", 0.95),
        "cli-tiny-seed1": ("cli", 0.97),
        "cli-tiny-seed2": ("cli", 0.93),
    }
    for name, (fusion, floor) in expected.items():
        model, tok = load_model(name, device="cpu")
        assert model.config.fusion == fusion, name
        assert evaluate(model, tok, held_out)["overall"] >= floor, name
    projector, _ = load_model("projector-tiny", device="cpu")
    assert len(projector.agf) == 0
    shallow, _ = load_model("shallow-tiny", device="cpu")  # the wiring the README names: V1 -> L1, V3 -> L2, V6 -> L3
    assert [shallow.config.vision_layers[i] for i in shallow.config.shallow_map()] == [1, 3, 6]
    assert shallow.config.injection_layers == [1, 2, 3]


@pytest.mark.slow  # held-out accuracy of several bundled models
def test_seed_models_show_which_gate_maps_are_one_seeds_accident(held_out):
    """Three seeds of cli-tiny (same recipe, 6,000 steps each) agree less with each other on the
    vision-layer profile than each seed's map does with its own step-2,745 checkpoint — read the way
    `cliviz compare` reads it: seeds from each folder's training summary, then `stability_summary`."""
    from cliviz.analyses.compare import gate_profiles, seed_stability, stability_summary
    from cliviz.train import recorded_seed

    final = {0: "cli-tiny", 1: "cli-tiny-seed1", 2: "cli-tiny-seed2"}
    early = {seed: f"cli-seed{seed}-step2745" for seed in final}
    profiles, fusions, seeds = {}, {}, {}
    for name in [*final.values(), *early.values()]:
        model, tok = load_model(name, device="cpu", dtype="float32")
        assert model.config.fusion == "cli"
        profiles[name], fusions[name] = gate_profiles(model, tok, held_out, limit=140), "cli"
        seeds[name] = recorded_seed(model.name_or_path)  # as `cliviz compare` reads it
    assert seeds == {**{v: k for k, v in final.items()}, **{v: k for k, v in early.items()}}
    table = seed_stability(profiles, fusions, seeds)
    assert len(table) == 15 * 7 and table.profile_spearman.between(-1, 1).all()
    assert table.same_seed.sum() == 3 * 7  # only final-vs-own-checkpoint pairs share a seed

    within = table[table.same_seed].groupby("model_a").profile_spearman.mean()
    # measured on this set: within seeds 0.93 / 0.94 / 0.83 (mean 0.90), across seeds 0.55
    # (4243: 0.95 / 0.89 / 0.85 vs 0.56)
    assert len(within) == 3 and within.min() >= 0.7, within
    summary = stability_summary(table)
    assert len(summary) == 7 and summary.notna().all().all()
    across, same = summary.profile_spearman.mean(), summary.same_seed_profile_spearman.mean()
    assert across < within.min() - 0.1 and across < same - 0.2, summary


def test_staged_cli_injection_carries_the_detail_its_tower_lost():
    """cli-staged-tiny (the staged recipe: a frozen tower that lost local detail at the layer the
    projector reads): switching the injection off must take the glyph and size answers away.
    Measured on 1,400 held-out samples (seed 4243): glyph 0.84 -> 0.10 (89% of answers flip), size
    0.985 -> 0.635 (38%); colour, count and shape do not move."""
    from cliviz.analyses.ablations import Ablation, score_conditions

    model, tok = load_model("cli-staged-tiny", device="cpu")
    samples = list(iter_samples(140, seed=HELD_OUT_SEED + 1))
    frame = score_conditions(
        model,
        tok,
        [s.image for s in samples],
        [s.question for s in samples],
        [s.answer for s in samples],
        [None, Ablation("injection_off")],
        qtypes=[s.qtype for s in samples],
    )
    off = frame[frame["kind"].astype(str) == "injection_off"]
    flips = off.groupby("qtype")["flipped"].mean()
    assert flips["glyph"] >= 0.5 and flips["size"] >= 0.15, flips  # measured 0.885 / 0.38 (seed 4243)
    assert max(flips["color"], flips["count"], flips["shape"]) <= 0.1, flips  # measured <= 0.005
    assert off["flipped"].mean() >= 0.1, flips  # measured 0.18 over all types


@pytest.mark.slow  # held-out accuracy of several bundled models
def test_staged_cli_beats_its_projector_baseline_on_the_detail_types(held_out):
    """Same stages 1-2 and the same number of stage-3 steps: the projector baseline cannot read what
    its frozen tower dropped at layer 5; CLI reads it from layer 1 (model card, held-out 4243)."""
    cli, tok = load_model("cli-staged-tiny", device="cpu")
    base, _ = load_model("projector-staged-tiny", device="cpu")
    assert len(base.agf) == 0 and cli.config.agf_read == "light"
    a, b = evaluate(cli, tok, held_out)["per_type"], evaluate(base, tok, held_out)["per_type"]
    assert a["glyph"] >= b["glyph"] + 0.4, (a, b)  # measured on this set: 0.84 vs 0.18
    assert a["size"] >= b["size"] + 0.2, (a, b)  # 0.96 vs 0.68
    assert min(a["color"], a["count"], a["shape"]) >= 0.9, a


def test_staged_cli_glyph_example_as_the_readme_shows():
    """README: the glyph example answers 7, gates on V1 at every LLM layer, and injection off turns it to 0."""
    from PIL import Image

    from cliviz.tracing import trace

    from conftest import EXAMPLES

    model, tok = load_model("cli-staged-tiny", device="cpu")
    t = trace(model, tok, Image.open(EXAMPLES / "glyph.png"), "what digit is in the corner ?", causal_check=True)
    assert t.meta.answer == "7"
    mean_gates = t.answer_gates().mean(axis=1)  # [L, K] over answer steps
    assert (mean_gates[:, 0] >= 0.9).all(), mean_gates  # V1; measured 0.96 / 0.93 / 0.98
    assert t.meta.injection_off_changed and t.meta.injection_off_answer == "0"
    assert t.meta.injection_off_delta_logprob < -5  # measured -11.07
