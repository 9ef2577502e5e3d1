"""Real checkpoints as researchers hold them: a LLaVA-1.5 folder stored in float16 (as
llava-1.5-7b-hf is) and a LLaVA-OneVision folder, attached, then every model command in every
dtype on the CPU — the whole model (tower, projector, LLM, AMP, AGF) in the requested dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

torch.set_num_threads(1)
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, llava15_attached, onevision_attached) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    out = {"llava": llava15_attached["cli"], "onevision": onevision_attached["cli"]}
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate([(50, 30), (24, 70)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            data / "images" / f"{i}.png"
        )
        rows.append(
            {"image": f"images/{i}.png", "question": "What is shown?", "answer": "a red square", "qtype": "caption"}
        )
    (data / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out["data"], out["image"] = data, data / "images" / "0.png"
    return out


def test_attach_keeps_the_stored_dtype_without_pinning_it(folders):
    from safetensors import safe_open

    with safe_open(folders["llava"] / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # saved as the base is stored


@pytest.mark.parametrize("family", ["llava", "onevision"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_whole_model_in_the_requested_dtype(folders, family, dtype):
    from cliviz.inference import answer
    from cliviz.model.loading import load_model

    model, tok = load_model(folders[family], device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {DTYPES[dtype]}
    ans = answer(model, tok, [Image.open(folders["image"])], ["What is shown?"], max_new_tokens=3)[0]
    assert len(ans.token_ids) >= 1 and all(np.isfinite(ans.logprobs))


COMMANDS = {
    "ask": lambda f: ["ask", str(f["image"]), "What is shown?", "--max-new-tokens", "3", "--json"],
    "trace": lambda f: ["trace", str(f["image"]), "What is shown?", "--max-new-tokens", "3", "--json"],
    "ablate": lambda f: [
        "ablate",
        str(f["image"]),
        "What is shown?",
        "--kind",
        "injection_off",
        "--out",
        str(f["tmp"] / "a.parquet"),
    ],
    "attribute": lambda f: ["attribute", str(f["image"]), "What is shown?", "--method", "gxi"],
    "sweep": lambda f: [
        "sweep",
        "--data",
        str(f["data"]),
        "--out",
        str(f["tmp"] / "s.parquet"),
        "--max-new-tokens",
        "3",
    ],
    "eval": lambda f: ["eval", "--data", str(f["data"]), "--json"],
}


# float32 in the fast tier; the half-precision runs of every command are the second tier's
HALF = [pytest.param(d, marks=pytest.mark.slow) for d in ("bfloat16", "float16")]


@pytest.mark.parametrize("family", ["llava", "onevision"])
@pytest.mark.parametrize("dtype", ["float32", *HALF])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_in_every_dtype(folders, tmp_path, family, dtype, command):
    """In-process (typer's runner) to keep CI fast; `auto` is float32 on this CPU (covered above)."""
    from cliviz.cli.main import app

    args = COMMANDS[command]({**folders, "tmp": tmp_path}) + [
        "--model",
        str(folders[family]),
        "--device",
        "cpu",
        "--dtype",
        dtype,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    if command == "eval":
        out = json.loads(result.output)
        assert out["n"] == 2 and np.isfinite(out["reference_logprob_mean"]["overall"])
