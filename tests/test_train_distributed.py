"""torchrun for every `--train` choice: 2 gloo processes, DDP and FSDP, on a tiny float16 LLaVA-1.5
with CLI attached. A trained vision tower has parameters that never reach the loss (CLIP's
`post_layernorm`): DDP must be told to look for them, or step 2 fails."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun
from factories import attached_llava15_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return attached_llava15_run(tmp_path_factory.mktemp("train-distributed"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("parts", ["cli", "cli,projector", "cli,llm", "all"])
def test_every_train_choice_runs_under_torchrun(setup, parts, mode, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(
        "train",
        "--init-from",
        str(setup["cli"]),
        "--data",
        str(setup["data"]),
        "--image-folder",
        str(setup["images"]),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--train",
        parts,
        "--distributed",
        mode,
        "--lr",
        "1e-3",
        "--warmup",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["step_loss"]) for r in rows)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["trained"] == parts
    before, after = load_file(setup["cli"] / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    marks = {"cli": "agf.", "cli,projector": "multi_modal_projector.", "cli,llm": "lm_head."}  # as the file names them
    if parts == "all":
        assert any("vision_tower." in k for k in changed)
    else:
        assert any(marks[parts] in k for k in changed), sorted(changed)
        assert not any("vision_tower." in k for k in changed)
