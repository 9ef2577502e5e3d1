"""Training that fits a GPU: mixed precision (bf16/fp16 autocast over fp32 trained weights, a loss
scaler for fp16) runs on the CPU; logits only where there are labels; gradient checkpointing that
covers the injection; gradient accumulation equal to the larger batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from factories import attached_llava15_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return attached_llava15_run(tmp_path_factory.mktemp("train-memory"))


def settings(setup, **extra):
    from cliviz.train import TrainSettings

    values = dict(
        init_from=str(setup["cli"]),
        data=str(setup["data"]),
        image_folder=str(setup["images"]),
        steps=3,
        batch_size=4,
        lr=3e-3,
        warmup=1,
        log_every=1,
    )
    return TrainSettings(**(values | extra))


def log_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_trains_on_the_cpu(setup, dtype, tmp_path):
    """The float16 base with fp32 CLI weights ran into "expected m1 and m2 to have the same dtype":
    autocast now covers the CPU, and float16 steps go through a loss scaler."""
    from cliviz.train import Trainer

    trainer = Trainer(settings(setup, dtype=dtype), tmp_path, torch.device("cpu"))
    assert trainer.precision.compute == getattr(torch, dtype)
    assert (trainer.precision.scaler is not None) == (dtype == "float16")
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert {p.dtype for p in trained} == {torch.float32} and {p.dtype for p in frozen} == {getattr(torch, dtype)}
    alphas_before = [p.detach().clone() for n, p in trainer.model.named_parameters() if n.endswith("alpha")]
    trainer.run()
    rows = log_rows(tmp_path)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["step_loss"])) for r in rows)
    alphas_after = [p for n, p in trainer.model.named_parameters() if n.endswith("alpha")]
    assert any(not torch.equal(a, b) for a, b in zip(alphas_before, alphas_after))  # steps were taken
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in saved.values())


def test_float16_train_command_runs(setup, tmp_path):
    from conftest import run_main

    proc = run_main(
        "train",
        "--init-from",
        str(setup["cli"]),
        "--data",
        str(setup["data"]),
        "--image-folder",
        str(setup["images"]),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "float16",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_logits_only_at_labelled_positions_give_the_full_loss(setup):
    """The loss from logits at the labelled positions only (chunked cross-entropy) equals the loss of
    full-sequence logits, and the LM head sees only those positions."""
    from cliviz.data.collate import IGNORE, collator_for_model
    from cliviz.data.sources import open_source
    from cliviz.model.loading import load_model
    from cliviz.train import loop

    model, tok = load_model(setup["cli"], device="cpu", dtype="float32")
    source = open_source(setup["data"], setup["images"])
    rows = [row for row, _ in zip(source, range(4))]
    inputs = collator_for_model(model.config, tok)(rows).inputs
    with torch.no_grad():
        full = model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits  # [B, T, V]
        expected = torch.nn.functional.cross_entropy(
            full[:, :-1].reshape(-1, full.shape[-1]),
            inputs["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        trainee = loop.Trainee(model, None, -1)
        out = trainee(inputs)
    labels = inputs["labels"][:, 1:][out["scored"][:, :-1]]
    assert out["logits"].shape == (int((inputs["labels"] != IGNORE).sum()), full.shape[-1])
    assert out["logits"].shape[0] < full.shape[0] * full.shape[1] / 4  # the image and prompt are not projected
    old_chunk = loop.CE_CHUNK_ELEMENTS
    try:
        loop.CE_CHUNK_ELEMENTS = 3 * full.shape[-1]  # three positions per chunk
        got = loop.chunked_cross_entropy(out["logits"], labels)
    finally:
        loop.CE_CHUNK_ELEMENTS = old_chunk
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_chunked_cross_entropy_gradient_equals_the_plain_one(monkeypatch):
    from cliviz.train import loop

    monkeypatch.setattr(loop, "CE_CHUNK_ELEMENTS", 14)  # two positions of 7 logits per chunk
    logits = torch.randn(50, 7, requires_grad=True)
    labels = torch.randint(0, 7, (50,))
    loop.chunked_cross_entropy(logits, labels).backward()
    grad, logits.grad = logits.grad, None
    torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    torch.testing.assert_close(grad, logits.grad)


def kept_bytes(model, inputs) -> int:
    """Bytes autograd keeps for backward after one forward (tensors saved outside checkpoints)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        )
    out.logits.float().sum().backward()
    return sum(seen.values())


def test_gradient_checkpointing_covers_the_injection(setup):
    """With checkpointing, the injection's activations are recomputed too: what a CLI model keeps is
    about what its base alone keeps with checkpointing, and far below the unchecked run."""
    from cliviz.data.collate import collator_for_model
    from cliviz.data.sources import open_source
    from cliviz.model.loading import load_model
    from cliviz.train.setup import select_trainable

    model, tok = load_model(setup["cli"], device="cpu", dtype="float32")
    select_trainable(model, "cli")
    for agf in model.agf:  # open the injection so that it takes part
        torch.nn.init.constant_(agf.injection.alpha, 0.5)
    source = open_source(setup["data"], setup["images"])
    rows = [row for row, _ in zip(source, range(4))]
    inputs = collator_for_model(model.config, tok)(rows).inputs
    model.train()
    plain = kept_bytes(model, inputs)
    grads_plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    checkpointed = kept_bytes(model, inputs)
    grads_ckpt = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the base alone, checkpointed: no injection context, so no AGF activations at all
    import cliviz.model.modeling as modeling

    token = modeling._CURRENT.set(None)
    try:
        base_only = kept_bytes(model.base, inputs)
    finally:
        modeling._CURRENT.reset(token)
    b, t = inputs["input_ids"].shape
    hidden = b * t * model.config.base_config.text_config.hidden_size * 4  # one fp32 hidden state
    assert checkpointed < plain / 2
    assert checkpointed - base_only < 2 * hidden, (checkpointed, base_only, hidden)
    per_layer_before = (plain - checkpointed) / len(model.agf)
    assert per_layer_before > hidden  # what the unchecked injections kept, per layer


def test_gradient_accumulation_equals_the_larger_batch(setup, tmp_path):
    """2 micro-batches of 16 accumulated give the step of one batch of 32."""
    from cliviz.train import Trainer

    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(settings(setup, steps=2, batch_size=32), one, torch.device("cpu")).run()
    Trainer(settings(setup, steps=2, batch_size=16, grad_accum=2), two, torch.device("cpu")).run()
    a, b = log_rows(one), log_rows(two)
    assert [r["step_loss"] for r in a] == pytest.approx([r["step_loss"] for r in b], abs=1e-5)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-3
    summary = json.loads((two / "training_summary.json").read_text())
    assert summary["data"]["samples"] == json.loads((one / "training_summary.json").read_text())["data"]["samples"]


def test_the_vision_cache_is_bounded_and_exact(setup):
    """States come back exactly as the tower computes them; past `max_bytes` the least recently used
    samples are dropped (and recomputed when they return)."""
    from cliviz.data.collate import collator_for_model
    from cliviz.data.sources import open_source
    from cliviz.model.loading import load_model
    from cliviz.train.vision_cache import VisionCache

    model, tok = load_model(setup["cli"], device="cpu", dtype="bfloat16")
    rows = [row for row, _ in zip(open_source(setup["data"], setup["images"]), range(6))]
    pixels = collator_for_model(model.config, tok)(rows).inputs["pixel_values"]
    ids = [str(i) for i in range(6)]
    probe = VisionCache(model, max_bytes=1 << 40)
    probe.states(ids[:1], pixels[:1])
    one = probe.bytes  # one sample's states
    cache = VisionCache(model, max_bytes=int(2.5 * one))
    with torch.no_grad():
        want = model.base.model.vision_tower(pixels.to(torch.bfloat16), output_hidden_states=True).hidden_states
    for start in (0, 2, 4, 0):
        got = cache.states(ids[start : start + 2], pixels[start : start + 2])
        for k in cache.layers:
            assert torch.equal(got[k], want[k][start : start + 2])
        assert cache.bytes <= cache.max_bytes and len(cache.store) == 2
    assert cache.evicted == 6 and cache.misses == 8 and cache.hits == 0  # samples 0, 1 were dropped, then recomputed
    again = cache.states(ids[:2], pixels[:2])
    assert cache.hits == 2 and torch.equal(again[cache.layers[0]], want[cache.layers[0]][:2])
