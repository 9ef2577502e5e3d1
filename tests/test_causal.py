"""The causal check that every gate map carries: injection off for the very question traced, computed
by the batched ablation engine and checked here against plain forwards with the injection zeroed by
hand; what it says on screen (terminal, JSON, HTML page, Jupyter) for each kind of model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cliviz.data import scene_with_questions
from cliviz.inference import prepare_inputs, suppressed_tokens
from cliviz.tracing import trace, trace_batch
from cliviz.tracing.causal import NEGLIGIBLE_NATS, CausalCheck, map_kind_note
from cliviz.tracing.traceset import TraceSet

from conftest import EXAMPLES, build_tiny, run_main

torch.set_num_threads(1)


def _sample(i: int = 0):
    scene, qas = scene_with_questions(99, i)
    return scene.image, qas[0].question


@torch.no_grad()
def _answer_logprobs(model, tok, image, question, answer: list[int], injection_off: bool) -> torch.Tensor:
    """log p `[n, V]` at the positions that predict each token of `answer`, teacher-forced through the
    CLI model's own forward (the injection zeroed by hand when `injection_off`)."""
    hooks = (
        [layer.injection.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for layer in model.agf]
        if injection_off
        else []
    )
    inputs = prepare_inputs(model, tok, [image], [question])
    width = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer[:-1]], dtype=torch.long)], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    try:
        out = model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(out.logits[0, width - 1 : width - 1 + len(answer)].float(), -1)


@pytest.mark.parametrize("fusion, seed", [("cli", 0), ("cli", 3), ("shallow", 0), ("deepstack", 0)])
def test_causal_check_equals_injection_zeroed_by_hand(fusion, seed):
    """The check scores the answer the trace shows (every token, eos dropped), teacher-forced."""
    model, tok = build_tiny(fusion, seed=seed, open_alpha=2.0)
    image, question = _sample(seed)
    t = trace(model, tok, image, question, max_new_tokens=3)
    shown = [int(i) for i in t.answer_ids if int(i) != tok.eos_token_id] or [int(t.answer_ids[0])]
    on = _answer_logprobs(model, tok, image, question, shown, injection_off=False)
    off = _answer_logprobs(model, tok, image, question, shown, injection_off=True)
    index = torch.tensor(shown)[:, None]
    masked = off[0].clone()
    masked[suppressed_tokens(tok)] = -torch.inf
    check = t.causal
    assert isinstance(check, CausalCheck)
    want = float(off.gather(-1, index).sum() - on.gather(-1, index).sum())
    assert check.delta_logprob == pytest.approx(want, abs=1e-4)
    assert check.changed == (int(masked.argmax()) != shown[0])
    assert check.answer_off == (
        "" if int(masked.argmax()) == tok.eos_token_id else tok.convert_ids_to_tokens(int(masked.argmax()))
    )
    assert abs(check.delta_logprob) > 1e-4  # alpha is open: the injection does something here


def test_batched_checks_equal_single_ones(tiny_cli):
    model, tok = tiny_cli
    samples = [_sample(i) for i in range(4)]
    batch = trace_batch(
        model, tok, [s[0] for s in samples], [s[1] for s in samples], max_new_tokens=2, causal_check=True
    )
    for (image, question), got in zip(samples, batch):
        want = trace(model, tok, image, question, max_new_tokens=2).causal
        assert got.causal.changed == want.changed and got.causal.answer_off == want.answer_off
        assert got.causal.delta_logprob == pytest.approx(want.delta_logprob, abs=1e-4)
    assert all(t.causal is None for t in trace_batch(model, tok, [samples[0][0]], [samples[0][1]], max_new_tokens=2))


def test_an_injection_that_does_not_matter_says_so():
    model, tok = build_tiny("cli", open_alpha=0.0)  # tanh(0) = 0: nothing is injected
    image, question = _sample(5)
    t = trace(model, tok, image, question, max_new_tokens=2)
    # on: the log-probs recorded while generating (KV cache); off: one teacher-forced forward: equal up to
    # float rounding when nothing is injected
    assert abs(t.causal.delta_logprob) < 1e-5 and not t.causal.changed and not t.causal.matters
    note = t.map_notes()[-1]
    assert "does not matter" in note and "routing, not importance" in note and f"{NEGLIGIBLE_NATS}" in note
    matters = CausalCheck("red", True, -3.0)
    assert matters.matters and "matters for this answer" in matters.summary("blue")
    assert "from 'blue' to 'red'" in matters.summary("blue")


def test_static_and_projector_maps_say_what_they_are():
    assert "static one-to-one wiring" in map_kind_note("shallow")
    assert "ungated" in map_kind_note("deepstack", [1, 2], [6])
    assert "vision layer 6" in map_kind_note("deepstack", [1], [6])
    assert "no gates" in map_kind_note("projector") and map_kind_note("cli") is None
    for fusion in ("shallow", "deepstack"):
        model, tok = build_tiny(fusion)
        t = trace(model, tok, *_sample(), max_new_tokens=2)
        notes = t.map_notes()
        assert notes[0] == map_kind_note(fusion, t.meta.injection_layers, t.meta.vision_layers)
        assert notes[1].startswith("injection off (all layers)")
        assert notes[0] in str(t.heatmap().layout.title.subtitle.text).replace("<br>", " ")
    model, tok = build_tiny("projector")
    t = trace(model, tok, *_sample(), max_new_tokens=2)
    assert t.causal is None and t.map_notes() == [map_kind_note("projector")]
    assert "no gates" in t._repr_html_()


def test_trace_file_and_displays_carry_the_check(tiny_cli, tmp_path):
    model, tok = tiny_cli
    t = trace(model, tok, *_sample(2), max_new_tokens=2)
    TraceSet.append(tmp_path / "t.parquet", [t])
    back = TraceSet.read(tmp_path / "t.parquet")[0]
    assert back.causal == t.causal
    html = t._repr_html_()
    assert t.map_notes()[-1].split(" — ")[0].replace("'", "&#x27;") in html and "Plotly.newPlot" in html
    assert t.meta.question in html and "image tokens" in html
    ts_html = TraceSet.read(tmp_path / "t.parquet")._repr_html_()
    assert "answer changes with injection off" in ts_html and "Plotly.newPlot" in ts_html


def test_command_line_shows_the_check_everywhere(random_model_dir, tmp_path):
    args = (
        "trace",
        str(EXAMPLES / "color.png"),
        "what color is the triangle ?",
        "--model",
        str(random_model_dir),
        "--max-new-tokens",
        "2",
    )
    proc = run_main(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    check = out["causal_check"]
    assert set(check) == {"answer_off", "changed", "delta_logprob", "matters"}
    assert out["meta"]["injection_off_delta_logprob"] == check["delta_logprob"]
    assert out["map_notes"][-1].startswith("injection off (all layers)")
    skipped = json.loads(run_main(*args, "--json", "--no-causal-check").stdout)
    assert skipped["causal_check"] is None and "not recorded" in skipped["map_notes"][-1]
    page = tmp_path / "t.html"
    proc = run_main(*args, "--html", str(page), "--out", str(tmp_path / "t.parquet"))
    assert proc.returncode == 0, proc.stderr
    assert "injection off (all layers)" in " ".join(proc.stdout.split())
    assert "injection off (all layers)" in page.read_text()
    assert TraceSet.read(tmp_path / "t.parquet")[0].causal is not None
    assert np.isclose(TraceSet.read(tmp_path / "t.parquet")[0].causal.delta_logprob, check["delta_logprob"], atol=1e-4)
