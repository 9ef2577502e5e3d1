"""Real answers are sentences: answer lengths up to 1024 tokens, free-text answers scored by the
log-prob of the whole reference (eval) or the whole own answer (ablate), not by a first token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_folders import llava15_folder
from PIL import Image

from conftest import run_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    base = llava15_folder(root / "base", dtype=torch.float32)
    proc = run_main("attach", "--base", str(base), "--out", str(root / "cli"))
    assert proc.returncode == 0, proc.stderr
    from cliviz.model.loading import load_model

    model, tok = load_model(root / "cli", device="cpu", dtype="float32")
    with torch.no_grad():
        for layer in model.agf:  # injection live, so that ablations change something
            layer.injection.alpha.fill_(0.8)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    return {"folder": root / "cli", "model": model, "tok": tok, "image": image}


def test_default_answer_length_depends_on_the_model(real):
    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.inference import default_max_new_tokens

    assert default_max_new_tokens(build_tokenizer()) == 4 and default_max_new_tokens(real["tok"]) == 256


def test_a_long_trace_records_every_step(real):
    """300 generated tokens (eos suppressed by the random model's luck is not relied on: the trace
    holds one gate row per fed token whatever the length)."""
    from cliviz.tracing import trace

    t = trace(real["model"], real["tok"], real["image"], "Describe the picture.", max_new_tokens=300)
    n_answer = len(t.answer_ids)
    assert 1 <= n_answer <= 300 and t.gates.shape == (len(real["model"].agf), t.n_tokens, 3)
    assert t.n_tokens == int(t.answer_positions[0]) + n_answer  # prompt + every fed answer token
    np.testing.assert_allclose(t.gates.sum(-1), 1.0, atol=1e-5)


def test_max_new_tokens_bounds(real):
    image = str(real["folder"] / "x.png")
    real["image"].save(image)
    refused = run_main("ask", image, "hi", "--model", str(real["folder"]), "--max-new-tokens", "1025")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "1024" in refused.stderr
    proc = run_main("ask", image, "hi", "--model", str(real["folder"]), "--max-new-tokens", "1024", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def test_reference_scores_are_teacher_forced_generation_log_probs(real):
    """The whole-reference log-prob of the model's own greedy answer equals the log-probs generation
    gave its tokens (KV cache vs one teacher-forced forward), batched or alone."""
    from cliviz.inference import answer, score_references

    model, tok = real["model"], real["tok"]
    images = [real["image"], real["image"].rotate(90, expand=True)]
    questions = ["Describe the picture.", "What is it?"]
    answers = answer(model, tok, images, questions, max_new_tokens=12)
    texts = [tok.decode([t for t in a.token_ids if t != tok.eos_token_id]) for a in answers]
    scores = score_references(model, tok, images, questions, texts)
    for a, text, score in zip(answers, texts, scores):
        ids = [t for t in a.token_ids if t != tok.eos_token_id]
        if tok(text, add_special_tokens=False).input_ids != ids:
            continue  # the text does not re-tokenise to the same ids: nothing exact to compare
        np.testing.assert_allclose(score.logprobs, a.logprobs[: len(ids)], atol=1e-4)
        assert score.total == pytest.approx(sum(score.logprobs)) and score.mean == pytest.approx(score.total / len(ids))
    alone = score_references(model, tok, images[1:], questions[1:], texts[1:])
    np.testing.assert_allclose(alone[0].logprobs, scores[1].logprobs, atol=1e-5)


def test_ablate_without_reference_scores_the_whole_own_answer(real):
    from cliviz.analyses.ablations import Ablation, score_conditions
    from cliviz.inference import answer

    model, tok = real["model"], real["tok"]
    own = answer(model, tok, [real["image"]], ["Describe the picture."], max_new_tokens=256)[0]
    ids = [t for t in own.token_ids if t != tok.eos_token_id]
    frame = score_conditions(
        model, tok, [real["image"]], ["Describe the picture."], None, [None, Ablation("injection_off")]
    )
    ref = frame[frame["condition"] == "reference"].iloc[0]
    assert len(ids) > 1
    assert ref["logprob_ref_seq"] == pytest.approx(sum(own.logprobs[: len(ids)]), abs=1e-3)
    assert ref["logprob_ref_mean"] == pytest.approx(ref["logprob_ref_seq"] / len(ids))
    off = frame[frame["condition"] != "reference"].iloc[0]
    assert off["delta_logprob_ref_seq"] != 0.0


def test_eval_scores_free_text_by_the_whole_reference(real, tmp_path):
    import json

    (tmp_path / "images").mkdir()
    real["image"].save(tmp_path / "images" / "a.png")
    rows = [
        {"image": "images/a.png", "question": "What is it?", "answer": "a red square", "qtype": "caption"},
        {
            "image": "images/a.png",
            "question": "Describe it.",
            "answer": "the answer is a long sentence",
            "qtype": "caption",
        },
    ]
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_main("eval", "--data", str(tmp_path), "--model", str(real["folder"]), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 2 and out["reference_logprob"]["overall"] < 0
    # the mean per token is the per-sample sum over its tokens, averaged: it differs from the sum
    assert out["reference_logprob_mean"]["overall"] > out["reference_logprob"]["overall"]


def test_the_causal_check_scores_the_answer_shown_without_generating_again(real, monkeypatch):
    """The check of a free-text answer: the trace's own answer (within its max_new_tokens), teacher-forced
    with the injection off; one generation in all (the check's is gone)."""
    import cliviz.inference
    from cliviz.inference import prepare_inputs
    from cliviz.tracing import trace

    model, tok = real["model"], real["tok"]
    calls = []
    generate = type(model).generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counting)
    monkeypatch.setattr(cliviz.inference, "answer", lambda *a, **k: pytest.fail("the check generated an answer"))
    t = trace(model, tok, real["image"], "Describe the picture.", max_new_tokens=6)
    assert calls == [6] and 1 <= len(t.answer_ids) <= 6
    shown = [int(i) for i in t.answer_ids if int(i) != tok.eos_token_id] or [int(t.answer_ids[0])]
    inputs = prepare_inputs(model, tok, [real["image"]], ["Describe the picture."])
    width = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([shown[:-1]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    hooks = [layer.injection.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for layer in model.agf]
    try:
        with torch.no_grad():
            off = torch.log_softmax(model(**inputs, use_cache=False).logits[0, width - 1 :].float(), -1)
    finally:
        for h in hooks:
            h.remove()
    want = float(off.gather(-1, torch.tensor(shown)[:, None]).sum() - t.answer_logprobs[: len(shown)].sum())
    assert t.causal.delta_logprob == pytest.approx(want, abs=1e-3)
