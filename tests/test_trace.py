"""Recording through nnsight: shapes, agreement with a plain forward, every fusion, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliviz.data import scene_with_questions
from cliviz.inference import answer
from cliviz.tracing import trace, trace_batch

from conftest import build_tiny


def _sample(i: int = 0):
    scene, qas = scene_with_questions(99, i)
    return scene.image, qas[0].question


def test_trace_shapes_and_roles(tiny_cli):
    model, tok = tiny_cli
    image, question = _sample()
    t = trace(model, tok, image, question, max_new_tokens=3)
    n_img = sum(r == "image" for r in t.token_roles)
    assert n_img == 64
    L, K = len(model.config.injection_layers), len(model.config.vision_layers)
    assert t.gates.shape == (L, t.n_tokens, K) and t.gates.dtype == np.float32
    np.testing.assert_allclose(t.gates.sum(-1), 1.0, atol=1e-5)
    assert t.injection_norm.shape == (L, t.n_tokens) and (t.injection_norm > 0).all()
    n_prompt = sum(r != "answer" for r in t.token_roles)
    assert t.answer_positions.tolist() == list(range(n_prompt - 1, n_prompt - 1 + len(t.answer_ids)))
    assert t.meta.vision_layers == model.config.vision_layers and t.meta.fusion == "cli"
    assert len(t.meta.image_sha256) == 64


def test_recorded_gates_equal_a_plain_teacher_forced_forward(tiny_cli):
    """The nnsight recording (prefill + cached decode steps) matches hooks on one full forward."""
    model, tok = tiny_cli
    image, question = _sample(1)
    t = trace(model, tok, image, question, max_new_tokens=4)
    captured = {}
    handles = [
        layer.gate.register_forward_hook(lambda m, i, o, j=j: captured.__setitem__(j, o))
        for j, layer in enumerate(model.agf)
    ]
    from cliviz.model.processing import pixel_values

    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([t.token_ids.tolist()]), pixel_values=pixel_values([image], model.config)
            )
    finally:
        for h in handles:
            h.remove()
    plain = torch.stack([captured[j][0] for j in range(len(model.agf))]).numpy()  # [L, T, K]
    np.testing.assert_allclose(t.gates, plain, atol=1e-5)
    logprobs = torch.log_softmax(out.logits[0], -1)
    for s, pos in enumerate(t.answer_positions[:-1]):  # the last answer token is never fed back
        assert abs(logprobs[pos, t.answer_ids[s]].item() - t.answer_logprobs[s]) < 1e-4
    assert t.topk_ids[0, 0] == t.answer_ids[0] or tok.convert_ids_to_tokens(int(t.topk_ids[0, 0])) in (
        "[PAD]",
        "<image>",
        "<bos>",
    )


def test_answer_matches_plain_generation(tiny_cli):
    model, tok = tiny_cli
    image, question = _sample(2)
    t = trace(model, tok, image, question, max_new_tokens=4)
    plain = answer(model, tok, [image], [question], max_new_tokens=4)[0]
    assert t.answer_ids.tolist() == plain.token_ids
    np.testing.assert_allclose(t.answer_logprobs, plain.logprobs, atol=1e-5)


def test_batched_traces_equal_single_traces(tiny_cli):
    model, tok = tiny_cli
    samples = [_sample(i) for i in range(3)]
    batch = trace_batch(model, tok, [s[0] for s in samples], [s[1] for s in samples], max_new_tokens=3)
    for (image, question), tb in zip(samples, batch):
        ts = trace(model, tok, image, question, max_new_tokens=3)
        assert tb.token_ids.tolist() == ts.token_ids.tolist()
        np.testing.assert_allclose(tb.gates, ts.gates, atol=1e-4)
        assert tb.answer_ids.tolist() == ts.answer_ids.tolist()


def test_early_eos_keeps_what_was_recorded(tiny_cli):
    model, tok = tiny_cli
    image, question = _sample(3)
    eos_bias = torch.zeros(len(tok))
    eos_bias[tok.eos_token_id] = 1e4
    lm_head = model.base.lm_head
    original = lm_head.bias
    lm_head.bias = torch.nn.Parameter(eos_bias)  # force <eos> as the very first token
    try:
        t = trace(model, tok, image, question, max_new_tokens=5)
    finally:
        lm_head.bias = original
    assert t.answer_texts == ["<eos>"] and t.meta.answer == ""
    assert t.gates.shape[1] == t.n_tokens == t.answer_positions[0] + 1


@pytest.mark.parametrize("fusion", ["projector", "shallow", "deepstack"])
def test_other_fusions(fusion):
    model, tok = build_tiny(fusion)
    image, question = _sample()
    t = trace(model, tok, image, question, max_new_tokens=2)
    if fusion == "projector":
        assert t.gates.shape[0] == 0 and not t.has_gates
    elif fusion == "shallow":
        assert set(np.unique(t.gates).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(t.gates.sum(-1), 1.0)
    else:
        assert t.gates.shape[2] == 1
        # deepstack injects at image positions only (prefill)
        image_pos = np.array(t.token_roles) == "image"
        assert (t.injection_norm[:, image_pos] > 0).all() and (t.injection_norm[:, ~image_pos] == 0).all()
