"""Low-precision training on a float16 LLaVA folder, through `cliviz train` in this process: a bf16
run saves the frozen base bit for bit as the source stored it; a float16 run's loss scaler is part
of the training state (JSON in the safetensors file), so stopping and resuming equals the
uninterrupted run even when steps are skipped for overflow; a state written without the scaler
still resumes, with one warning line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_main

torch.set_num_threads(1)
CLI_PREFIXES = ("amp.", "read_kv.", "agf.")
STATE = "train_state.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Twelve one-turn rows over three coloured images (what color is it?)."""
    root = tmp_path_factory.mktemp("precision-data")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, rgb) in enumerate(
        list({"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}.items()) * 4
    ):
        pixels = np.full((32, 40, 3), rgb, dtype=np.uint8) + rng.integers(0, 20, (32, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": f"It is {name}."}]
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json", images


def train(init_from: Path, data: tuple[Path, Path], out: Path, *extra: str):
    return run_main(
        "train",
        "--init-from",
        str(init_from),
        "--data",
        str(data[0]),
        "--image-folder",
        str(data[1]),
        "--out",
        str(out),
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    )


def log_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal alone calls -0.0 and 0.0 equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


# ---------------------------------------------------------------------------------- bf16 saving


def test_a_bf16_run_saves_the_float16_base_bit_for_bit(llava15_attached, data, tmp_path):
    """`train --dtype bfloat16 --steps 2` on a float16 folder: every base tensor of the trained folder
    is the source folder's own (dtype and bits), although the run held them in bf16; the CLI
    weights did train. Fails if the base is saved from the model (a float16 -> bf16 -> float16 round trip)."""
    source = llava15_attached["cli"]
    out = tmp_path / "bf16"
    proc = train(source, data, out, "--dtype", "bfloat16", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    base = [k for k in before if not k.startswith(CLI_PREFIXES)]
    changed_by_bf16 = [k for k in base if not torch.equal(before[k].to(torch.bfloat16).to(torch.float16), before[k])]
    assert changed_by_bf16  # the test has teeth: a bf16 round trip alters these
    assert [k for k in base if not same_bits(before[k], after[k])] == []
    assert {after[k].dtype for k in after} == {torch.float16}  # saved as the source stored it
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(CLI_PREFIXES))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["settings"]["dtype"] == "bfloat16" and summary["saved_dtype"] == "float16"


# ---------------------------------------------------------------------------------- fp16 scaler


@pytest.fixture
def lively_scaler(monkeypatch):
    """float16 runs whose loss scale grows after every good step (growth_interval 1, not 2000): on
    these tiny models it overflows within a few steps, so skipped steps and a moved scale happen in
    a 6-step run, as they do over thousands of steps of a real one."""
    import cliviz.train.loop as loop
    from cliviz.train.precision import precision_for

    def lively(base_dtype: torch.dtype, device: torch.device):
        precision = precision_for(base_dtype, device)
        if precision.scaler is not None:
            precision.scaler = torch.amp.GradScaler(device.type, growth_interval=1)
        return precision

    monkeypatch.setattr(loop, "precision_for", lively)


def no_pickles(monkeypatch) -> None:
    """Fail the test if anything unpickles (torch.load) while a run resumes."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: the training state must load from safetensors only")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_resumed_float16_run_equals_the_uninterrupted_one(
    llava15_attached, data, tmp_path, lively_scaler, monkeypatch
):
    """6 steps straight vs stopped at 4 (after an overflow moved the scale) and resumed: the same
    losses, skipped steps and weights bit for bit, because the state file carries the scaler's
    state as JSON metadata (read back without unpickling anything)."""
    source = llava15_attached["cli"]
    straight, half, rest = tmp_path / "straight", tmp_path / "half", tmp_path / "rest"
    common = ("--dtype", "float16", "--steps", "6")
    assert train(source, data, straight, *common).returncode == 0
    proc = train(source, data, half, *common, "--stop-step", "4")
    assert proc.returncode == 0, proc.stderr
    skipped = [row["step"] for row in log_rows(straight) if row.get("skipped_step")]
    assert skipped and min(skipped) <= 4 < max(skipped), skipped  # the scale moved before the stop and after

    with safe_open(str(half / STATE), framework="pt") as f:
        saved = json.loads(f.metadata()["scaler"])
    assert saved["growth_interval"] == 1 and saved["scale"] != 65536.0  # no longer where it started

    no_pickles(monkeypatch)
    proc = run_main("train", "--resume", str(half), "--out", str(rest))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    assert log_rows(rest) and [(r["step"], r["step_loss"], r.get("skipped_step")) for r in log_rows(rest)] == [
        (r["step"], r["step_loss"], r.get("skipped_step")) for r in log_rows(straight)
    ]
    a, b = load_file(straight / "model.safetensors"), load_file(rest / "model.safetensors")
    assert [k for k in a if not same_bits(a[k], b[k])] == []


def strip_scaler(state_file: Path, scaler: object = None) -> None:
    """Rewrite a state file as an older cliviz wrote it (no `scaler`), or with `scaler` in its place."""
    with safe_open(str(state_file), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    metadata.pop("scaler")
    if scaler is not None:
        metadata["scaler"] = json.dumps(scaler)
    save_file(tensors, str(state_file), metadata=metadata)


def test_a_state_without_the_scaler_resumes_with_one_warning_and_a_bad_one_is_refused(llava15_attached, data, tmp_path):
    """A float16 state from before the scaler was saved resumes (the scale starts afresh) and says so
    in one line; a scaler record no GradScaler could hold is one error line; a bf16 state has no
    scaler and resumes without a word."""
    source = llava15_attached["cli"]
    half = tmp_path / "half"
    assert train(source, data, half, "--dtype", "float16", "--steps", "2", "--stop-step", "1").returncode == 0
    state = half / STATE
    original = state.read_bytes()

    strip_scaler(state)
    proc = run_main("train", "--resume", str(half), "--out", str(tmp_path / "old"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "loss scale" in warnings[0] and "65536" in warnings[0], proc.stderr

    for bad in (
        {"scale": float("nan")},
        {"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1, "_growth_tracker": 0},
    ):
        state.write_bytes(original)
        strip_scaler(state, bad)
        assert_clean_error(run_main("train", "--resume", str(half), "--out", str(tmp_path / "bad")), "scaler")

    bf16 = tmp_path / "bf16"
    assert train(source, data, bf16, "--dtype", "bfloat16", "--steps", "2", "--stop-step", "1").returncode == 0
    with safe_open(str(bf16 / STATE), framework="pt") as f:
        assert "scaler" not in f.metadata()
    proc = run_main("train", "--resume", str(bf16), "--out", str(tmp_path / "bf16-rest"))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
