"""`cliviz train` on a frozen checkpoint: CLI-only training of attached float16 LLaVA-1.5 and
LLaVA-OneVision folders on LLaVA-format conversation data; DDP and FSDP on CPU (gloo, 2 processes)
equal one process with the doubled batch; exact resume; gradient checkpointing; bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llava_folders import llava15_folder, onevision_folder
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_clean_error, run_main, torchrun
from factories import write_llava_data

torch.set_num_threads(1)
CLI_PREFIXES = ("amp.", "read_kv.", "agf.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train-checkpoint")
    out = {}
    for family, build in (("llava", llava15_folder), ("onevision", onevision_folder)):
        base = build(root / f"{family}-base", dtype=torch.float16)
        proc = run_main("attach", "--base", str(base), "--out", str(root / family))
        assert proc.returncode == 0, proc.stderr
        out[family] = root / family
    out["data"], out["images"] = write_llava_data(root / "data")
    out["root"] = root
    return out


def train_args(setup, family: str, out, *extra: str) -> list[str]:
    return [
        "train",
        "--init-from",
        str(setup[family]),
        "--data",
        str(setup["data"]),
        "--image-folder",
        str(setup["images"]),
        "--out",
        str(out),
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def losses(folder) -> list[float]:
    return [row["step_loss"] for row in map(json.loads, (folder / "training_log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("family", ["llava", "onevision"])
def test_cli_only_training_of_an_attached_checkpoint(setup, family, tmp_path):
    """The loss falls, the base stays bit-identical (and float16, as stored), alpha and the gates
    move, bad rows are counted, and the trained folder answers in ask and trace."""
    out = tmp_path / "trained"
    proc = run_main(*train_args(setup, family, out, "--steps", "30", "--batch-size", "8"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "missing_image" in proc.stdout and "no_image_token" in proc.stdout
    curve = losses(out)
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.05, curve
    before, after = load_file(setup[family] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith(CLI_PREFIXES)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert {v.dtype for v in after.values()} == {torch.float16}
    assert all(after[k].abs().min() > 0 for k in after if k.endswith("alpha"))
    assert any(not torch.equal(before[k], after[k]) for k in after if ".gate.to_logits." in k)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["trained"] == "cli" and 0 < summary["trainable_parameters"] < summary["parameters"] / 5
    assert (
        summary["data"]["skipped"] == {"missing_image": 1, "no_image_token": 1}
        or sum(summary["data"]["skipped"].values()) >= 2
    )
    card = (out / "README.md").read_text()
    assert str(setup["data"]) in card and f"{summary['trainable_parameters']:,}" in card
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).is_file(), name
    image = setup["images"] / "1.png"
    for command in (
        ["ask", str(image), "What color is the picture?", "--max-new-tokens", "4", "--json"],
        ["trace", str(image), "What color is the picture?", "--max-new-tokens", "4", "--json"],
    ):
        proc = run_main(*command, "--model", str(out), "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
    from cliviz.app.factory import load_backend  # and the dashboard's backend serves it

    backend = load_backend(out, None, device="cpu", dtype="float32")
    assert backend.ask(Image.open(image).convert("RGB"), "What color is the picture?").has_gates


def test_only_alpha_has_a_gradient_at_step_0_and_alpha_leaves_zero(setup):
    """At init the injection adds nothing, so only alpha gets a gradient; its own learning rate
    (no warmup) moves it off zero in the first step."""
    from cliviz.model.loading import load_model
    from cliviz.train.settings import TrainSettings
    from cliviz.train.setup import param_groups, select_trainable

    model, tok = load_model(setup["llava"], device="cpu", dtype="float32")
    select_trainable(model, "cli")
    from cliviz.data.collate import collator_for_model
    from cliviz.data.sources import open_source

    source = open_source(setup["data"], setup["images"])
    rows = [row for row, _ in zip(source, range(4))]
    inputs = collator_for_model(model.config, tok)(rows).inputs
    model.train()
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
    ).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1)
    )
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.endswith("injection.alpha") for n in with_grad)
    groups = param_groups(model, TrainSettings(steps=1, init_from="x", alpha_lr=1e-2))
    assert [g["name"] for g in groups] == ["weights", "alpha"] and groups[1]["weight_decay"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_doubled_batch(setup, mode, tmp_path):
    """gloo on CPU: 2 processes x batch 4 give the loss curve and weights of 1 process x batch 8."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_main(*train_args(setup, "llava", one, "--steps", "5", "--batch-size", "8"))
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(*train_args(setup, "llava", two, "--steps", "5", "--batch-size", "4", "--distributed", mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=1e-5)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    assert json.loads((two / "training_summary.json").read_text())["world_size"] == 2


def test_resume_and_gradient_checkpointing_give_the_same_run(setup, tmp_path):
    """Stopped at step 2 and resumed: bit for bit the uninterrupted run; checkpointed activations
    (recomputed in backward, injections included) change no number."""
    common = ("--steps", "4", "--batch-size", "4")
    straight, half, rest, checkpointed = (tmp_path / n for n in ("straight", "half", "rest", "gc"))
    for out, extra in ((straight, ()), (half, ("--stop-step", "2")), (checkpointed, ("--gradient-checkpointing",))):
        proc = run_main(*train_args(setup, "onevision", out, *common, *extra))
        assert proc.returncode == 0, proc.stderr
    assert (half / "train_state.safetensors").is_file() and not (straight / "train_state.safetensors").exists()
    state_mb = (half / "train_state.safetensors").stat().st_size / 2**20
    assert state_mb < (half / "model.safetensors").stat().st_size / 2**20  # trained weights + moments only
    proc = run_main("train", "--resume", str(half), "--out", str(rest))
    assert proc.returncode == 0, proc.stderr
    a = load_file(straight / "model.safetensors")
    for other in (rest, checkpointed):
        b = load_file(other / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), other.name
    assert losses(rest) == losses(straight)


def test_bad_training_options_are_one_line(setup, tmp_path):
    base = ["train", "--out", str(tmp_path / "x"), "--steps", "2"]
    assert_clean_error(run_main(*base, "--init-from", str(tmp_path)), "not a model folder")
    assert_clean_error(
        run_main(*base, "--init-from", str(setup["llava"]), "--data", str(tmp_path / "none.json")), "not found"
    )
    assert_clean_error(
        run_main(*base, "--init-from", str(setup["llava"]), "--data", str(setup["data"]), "--train", "lora"),
        "unknown train choice",
    )
    assert_clean_error(run_main(*base, "--distributed", "mpi"), "unknown distributed mode")
    assert_clean_error(run_main("train", "--out", str(tmp_path / "y")), "--steps or --minutes")
    assert not (tmp_path / "x").exists()
