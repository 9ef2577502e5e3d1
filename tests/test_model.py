"""The CLI model: AMP/AGF shapes, gate normalisation, attach identity, fusion variants, I/O."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from reference_batch import make_batch

from cliviz.data import scene_with_questions
from cliviz.data.scenes import COLORS
from cliviz.model import FUSIONS, CLIForConditionalGeneration
from cliviz.model.agf import AGFLayer, Gate
from cliviz.model.amp import AMP
from cliviz.model.attach import attach
from cliviz.model.loading import load_model
from cliviz.train import tiny_config

from conftest import BUNDLED, REPO
from factories import build_tiny, tiny_llava, tiny_onevision


def llava_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((2, 16), 3), torch.randint(5, 50, (2, 6), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def onevision_inputs(model):
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(2, 2, 3, 32, 32, generator=g)
    sizes = torch.tensor([[32, 32], [32, 32]])
    # the number of placeholders OneVision expects for this image (anyres base + crop + newlines)
    with torch.no_grad():
        n = (
            sum(
                f.shape[0]
                for f in model.model.get_image_features(
                    pv, sizes, vision_feature_layer=-1, vision_feature_select_strategy="full", return_dict=True
                ).pooler_output
            )
            // 2
        )
    ids = torch.cat([torch.full((2, n), 3), torch.randint(5, 50, (2, 6), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": pv, "image_sizes": sizes}


def test_amp_shapes_and_zero_lora():
    amp = AMP(vision_hidden=16, text_hidden=24, n_layers=3, rank=4)
    projector = torch.nn.Linear(16, 24)
    states = [torch.randn(2, 10, 16) for _ in range(3)]
    out = amp(states, projector)
    assert out.shape == (2, 3, 10, 24)  # [B, K, N, D]
    # the paper's form, B_k = 0 at init: each layer is exactly the shared projector of its raw state
    assert amp.norms is None
    torch.testing.assert_close(out[:, 1], projector(states[1]))


@pytest.mark.parametrize("builder", [tiny_llava, tiny_onevision], ids=["llava", "llava_onevision"])
def test_fresh_attach_has_b_exactly_zero_and_no_norm(builder):
    """post_init must not re-draw B_k (it once did: std 0.02), and no LayerNorm sits before P."""
    model = attach(builder())
    ups = [lora.up.weight for lora in model.amp.loras]
    assert ups and all(torch.count_nonzero(w) == 0 for w in ups)
    assert all(lora.down.weight.abs().sum() > 0 for lora in model.amp.loras)  # A_k is drawn
    assert model.amp.norms is None and not any(".norms." in name for name, _ in model.named_parameters())
    assert all(layer.injection.alpha.item() == 0 for layer in model.agf)


def test_gate_rows_are_a_distribution_and_temperature_sharpens():
    torch.manual_seed(0)
    gate = Gate(hidden=32, n_vision=5, temperature=1.0)
    h = torch.randn(3, 7, 32)
    g = gate(h)
    assert g.shape == (3, 7, 5)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))
    assert (g >= 0).all()
    gate.temperature = 0.1
    assert gate(h).max(-1).values.mean() > g.max(-1).values.mean()


def test_agf_layer_output_shape_and_zero_alpha():
    from cliviz.model.agf import MemoryKeysValues

    kv = MemoryKeysValues(hidden=32, width=16, heads=2)
    layer = AGFLayer(hidden=32, n_vision=4, width=16, heads=2, temperature=1.0, static_index=None)
    keys, values = kv(torch.randn(2, 4, 9, 32))  # [B, K*H, N, r/H]
    assert keys.shape == values.shape == (2, 8, 9, 8)
    assert layer.read(torch.randn(2, 5, 32), keys, values).shape == (2, 5, 4, 16)  # [B, T, K, r]
    update = layer(torch.randn(2, 5, 32), keys, values)
    assert update.shape == (2, 5, 32)
    assert update.abs().max() == 0  # alpha = 0 at init


def test_light_read_reads_each_vision_layer_separately():
    """Each vision layer's read attends only over that layer's memory: changing layer 2's memory
    changes only the layer-2 read, and a padded memory position (mask False) changes nothing."""
    from cliviz.model.agf import MemoryKeysValues

    torch.manual_seed(0)
    kv = MemoryKeysValues(hidden=32, width=16, heads=2)
    layer = AGFLayer(hidden=32, n_vision=3, width=16, heads=2, temperature=1.0, static_index=None)
    hidden, memory = torch.randn(1, 4, 32), torch.randn(1, 3, 6, 32)
    before = layer.read(hidden, *kv(memory))
    changed = memory.clone()
    changed[:, 2] += 1.0
    after = layer.read(hidden, *kv(changed))
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2])
    assert (after[:, :, 2] - before[:, :, 2]).abs().max() > 1e-3
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    mask[..., -1] = False
    padded = torch.cat([memory, torch.randn(1, 3, 1, 32) * 100], dim=2)  # a junk 7th position, masked
    torch.testing.assert_close(layer.read(hidden, *kv(padded), mask), before)


@pytest.mark.parametrize("builder", [tiny_llava, tiny_onevision], ids=["llava", "llava_onevision"])
def test_attach_is_identity_at_init(builder):
    base = builder()
    reference = copy.deepcopy(base)
    inputs = llava_inputs() if builder is tiny_llava else onevision_inputs(base)
    model = attach(base)
    with torch.no_grad():
        diff = (model(**inputs).logits - reference(**inputs).logits).abs().max().item()
        assert diff <= 1e-5
        for layer in model.agf:  # and the injection path is live once alpha moves
            layer.injection.alpha.fill_(0.5)
        assert (model(**inputs).logits - reference(**inputs).logits).abs().max().item() > 1e-4


def test_attach_folder_round_trip(tmp_path):
    from cliviz.model.attach import attach_folder

    base = tiny_llava()
    base.save_pretrained(tmp_path / "base")
    model = attach_folder(tmp_path / "base", tmp_path / "cli", vision_layers=[1, 2, 3])
    again = CLIForConditionalGeneration.from_pretrained(tmp_path / "cli", use_safetensors=True).eval()
    assert again.config.vision_layers == [1, 2, 3]
    inputs = llava_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, base(**inputs).logits, atol=1e-5, rtol=0)
    assert model.config.fusion == "cli"


@pytest.mark.slow  # a short training run per fusion
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_trains_with_falling_loss(fusion):
    model, tok = build_tiny(fusion, open_alpha=0.0)
    model.train()
    batch = make_batch(tok, model.config, seed=5, indices=list(range(8)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):  # the same batch: loss must fall
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if fusion != "projector":
        assert any(layer.injection.alpha.item() != 0 for layer in model.agf)


def test_training_stops_early_and_resumes_on_the_same_schedule(tmp_path):
    """--stop-step leaves a checkpoint partway through a schedule; --start-step carries it on to the end."""
    from cliviz.train import TrainSettings, lr_factor, train

    early = train(TrainSettings(steps=4, stop_step=2, batch_size=2, warmup=1), tmp_path / "early", torch.device("cpu"))
    assert early["steps"] == 2 and (tmp_path / "early" / "model.safetensors").is_file()
    seen = []
    rest = train(
        TrainSettings(steps=4, start_step=2, batch_size=2, warmup=1, init_from=str(tmp_path / "early")),
        tmp_path / "rest",
        torch.device("cpu"),
        on_step=lambda r: seen.append((r.step, r.fraction)),
    )
    assert rest["steps"] == 2 and seen == [(3, 0.75), (4, 1.0)]  # steps 3 and 4 of 4, not a fresh schedule
    assert (
        lr_factor(0.5, 0, 50) < lr_factor(0.5, 49, 50) == lr_factor(0.5, 999, 50)
    )  # a short re-warmup, then the schedule


@pytest.mark.slow  # two training runs, compared bit for bit
def test_resume_continues_the_same_run_exactly(tmp_path):
    """--resume restores weights, optimiser moments, aux heads, RNG and the running window: the
    stopped-and-resumed run ends bit for bit where the uninterrupted one does."""
    from safetensors.torch import load_file

    from cliviz.train import STATE_FILE, TrainSettings, read_train_state, settings_from_state, train

    cpu = torch.device("cpu")
    straight = train(TrainSettings(steps=30, batch_size=2, warmup=5), tmp_path / "straight", cpu)
    train(TrainSettings(steps=30, stop_step=25, batch_size=2, warmup=5), tmp_path / "half", cpu)
    state = read_train_state(tmp_path / "half")
    assert state.step == 25 and state.settings["stop_step"] == 25
    with pytest.raises(ValueError, match="after the saved step"):
        settings_from_state(state, stop_step=20)
    rest = train(settings_from_state(state), tmp_path / "rest", cpu, resume=state)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "rest" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest["final_train_acc"] == straight["final_train_acc"] and rest["resumed_at"] == [25] and rest["steps"] == 30
    half_log = (tmp_path / "half" / "training_log.jsonl").read_text().splitlines()
    assert (tmp_path / "rest" / "training_log.jsonl").read_text().splitlines() == half_log  # step 25 carried over
    assert not (tmp_path / "rest" / STATE_FILE).exists() and (tmp_path / "half" / STATE_FILE).exists()


@pytest.mark.slow  # two training runs
def test_a_start_step_continuation_logs_the_whole_run(tmp_path):
    """--init-from CKPT --start-step K (no training state) still writes one log from step 0."""
    from cliviz.train import TrainSettings, train

    cpu = torch.device("cpu")
    train(TrainSettings(steps=50, stop_step=25, batch_size=2, warmup=1), tmp_path / "early", cpu)
    summary = train(
        TrainSettings(steps=50, start_step=25, batch_size=2, warmup=1, init_from=str(tmp_path / "early")),
        tmp_path / "rest",
        cpu,
        save_dtype=torch.bfloat16,
    )
    rows = [json.loads(line) for line in (tmp_path / "rest" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [25, 50] and "resumed" not in rows[0] and rows[1]["resumed"]
    assert summary["total_seconds"] >= rows[1]["seconds"] > rows[0]["seconds"]  # seconds count from the first start
    assert summary["saved_dtype"] == "bfloat16" and summary["resumed_at"] == [25]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "rest" / "model.safetensors").values()} == {torch.bfloat16}


def test_training_labels_sit_on_answer_tokens():
    from cliviz.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = tiny_config("cli", len(tok), 3, 0)
    batch = make_batch(tok, cfg, seed=3, indices=[0])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    marked = (labels != -100).nonzero().flatten()
    # every labelled position holds its own token (the loss shifts), and every answer follows a '?'
    assert torch.equal(ids[marked], labels[marked])
    answers = [p for p in marked.tolist() if ids[p] != tok.eos_token_id]
    assert all(tok.convert_ids_to_tokens(int(ids[p - 1])) == "?" for p in answers)


def test_extra_training_questions_ask_about_other_pairs():
    from cliviz.data.questions import parse_extra_questions, training_questions

    extra = parse_extra_questions("relation:2, position:1")
    assert extra == {"relation": 2, "position": 1}
    grew = 0
    for index in range(40):
        scene, qas = scene_with_questions(9, index)
        more = training_questions(scene, qas, extra, np.random.default_rng(index))
        assert set(map(str, qas)) <= set(map(str, more))  # the base questions all stay
        added = len(more) - len(qas)
        assert added <= 3
        grew += added > 0
        relations = [qa for qa in more if qa.qtype == "relation"]
        pairs = [frozenset(w for w in qa.question.split() if w in COLORS) for qa in relations]
        assert len(pairs) == len(set(pairs))  # never the same pair twice, mirrored or not
        ys = {o.color: o.y for o in scene.objects}
        for qa in relations:  # extra questions are answered right too
            a, b = [w for w in qa.question.split() if w in COLORS]
            assert qa.answer == ("above" if ys[a] < ys[b] else "below")
    assert grew > 20
    for bad in ("relation", "relation:x", "colour:2"):
        with pytest.raises(ValueError, match="extra-questions"):
            parse_extra_questions(bad)
    assert parse_extra_questions("") == {}


def test_make_batch_with_extra_questions_labels_more_answers():
    from cliviz.data.questions import parse_extra_questions
    from cliviz.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = tiny_config("cli", len(tok), 3, 0)
    plain = make_batch(tok, cfg, seed=3, indices=[0, 1, 2, 3])
    more = make_batch(tok, cfg, seed=3, indices=[0, 1, 2, 3], extra=parse_extra_questions("relation:2,position:1"))
    assert (more["labels"] != -100).sum() > (plain["labels"] != -100).sum()
    assert torch.equal(more["pixel_values"], plain["pixel_values"])
    assert {"aux_center_x", "aux_center_y"} <= set(more)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_save_load_round_trip_and_cached_generation(tmp_path, fusion):
    model, tok = build_tiny(fusion)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path, device="cpu")
    batch = make_batch(tok, model.config, seed=1, indices=[0, 1])
    inputs = {"input_ids": batch["input_ids"][:, :80], "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, suppress_tokens=[0, 3])
        with_cache = loaded.generate(**inputs, **kw)
        without = loaded.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    assert tok2.get_vocab() == tok.get_vocab()


def test_config_refuses_bad_layers():
    from cliviz.model import CLIConfig

    base = tiny_llava().config
    with pytest.raises(ValueError, match="vision layer"):
        CLIConfig(base_config=base, vision_layers=[0, 9])
    with pytest.raises(ValueError, match="injection layer"):
        CLIConfig(base_config=base, injection_layers=[3])
    with pytest.raises(ValueError, match="fusion"):
        CLIConfig(base_config=base, fusion="magic")


def test_shallow_gates_are_static_one_hot(tiny_cli):
    model, _ = build_tiny("shallow")
    g = model.agf[0].gate(torch.randn(2, 4, model.config.base_config.text_config.hidden_size))
    assert g.shape == (2, 4, len(model.config.vision_layers))
    assert torch.equal(g.sum(-1), torch.ones(2, 4)) and set(g.unique().tolist()) <= {0.0, 1.0}
    # shallow LLM layers read shallow vision layers
    firsts = [int(layer.gate.weights.argmax()) for layer in model.agf]
    assert firsts == sorted(firsts) and firsts[0] == 0 and firsts[-1] == len(model.config.vision_layers) - 1


BUNDLED_MODELS = sorted(p.parent for p in (REPO / "assets" / "models").glob("*/config.json"))
READ_FIELDS = ("agf_read", "amp_norm", "read_max_tokens", "read_position_code")


def test_every_bundled_cli_config_names_its_read():
    named = {}
    for folder in BUNDLED_MODELS:
        raw = json.loads((folder / "config.json").read_text())
        if raw["model_type"] == "cliviz_cli":
            assert all(field in raw for field in READ_FIELDS), folder.name
            named[folder.name] = raw["agf_read"]
    assert named["cli-tiny"] == "full" and named["cli-staged-tiny"] == "light"  # both reads ship, by name


def test_a_config_without_its_read_is_refused_not_guessed(tmp_path):
    from cliviz.errors import CLIVizError
    from cliviz.model.configuration import CLIConfig

    raw = json.loads((BUNDLED / "config.json").read_text())
    assert CLIConfig.from_dict(raw).agf_read == "full"
    unnamed = {k: v for k, v in raw.items() if k != "agf_read"}
    with pytest.raises(ValueError, match="agf_read"):
        CLIConfig.from_dict(unnamed)
    folder = tmp_path / "unnamed"
    folder.mkdir()
    for item in BUNDLED.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "config.json").write_text(json.dumps(unnamed))
    with pytest.raises(CLIVizError, match="agf_read") as err:
        load_model(folder, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["cli-tiny", "deepstack-tiny", "cli-staged-tiny"])
def test_bundled_alphas_load_as_one_element_vectors_with_the_stored_values(name):
    from safetensors import safe_open

    folder = REPO / "assets" / "models" / name
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = [f.get_tensor(k) for k in sorted(k for k in f.keys() if k.endswith("injection.alpha"))]
    model, _ = load_model(folder, device="cpu")
    assert len(stored) == len(model.agf) > 0
    for layer, value in zip(model.agf, stored):
        assert layer.injection.alpha.shape == (1,)
        assert layer.injection.alpha.detach().item() == value.item()
    assert {tuple(v.shape) for v in stored} == ({()} if name != "cli-staged-tiny" else {(1,)})


def test_a_scalar_alpha_checkpoint_answers_as_its_vector_alpha_twin(tmp_path):
    """The same weights stored with scalar gains (first design) and with [1] gains give the same logits."""
    from safetensors.torch import load_file, save_file

    model, tok = build_tiny("cli", open_alpha=0.9)
    model.save_pretrained(tmp_path / "vector")
    tok.save_pretrained(tmp_path / "vector")
    scalar = tmp_path / "scalar"
    scalar.mkdir()
    for item in (tmp_path / "vector").iterdir():
        (scalar / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(scalar / "model.safetensors"))
    assert any(k.endswith("injection.alpha") and t.shape == (1,) for k, t in tensors.items())
    save_file(
        {k: t.reshape(()) if k.endswith("injection.alpha") else t for k, t in tensors.items()},
        str(scalar / "model.safetensors"),
        metadata={"format": "pt"},
    )
    batch = make_batch(tok, model.config, seed=5, indices=[0, 1])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    logits = []
    for folder in ("vector", "scalar"):
        loaded, _ = load_model(tmp_path / folder, device="cpu")
        with torch.no_grad():
            logits.append(loaded(**inputs).logits)
    assert torch.equal(logits[0], logits[1])
