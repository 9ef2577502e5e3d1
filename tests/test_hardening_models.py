"""Issue 18, items 1-4: a model folder never runs code, broken configs and weights are one line,
broken models never answer, and a folder's generation_config.json decides nothing.

The corpus of broken folders runs in `test_corpus.py`; here: the limits against real checkpoint
shapes of both families, the safety guards themselves, and the run-time finiteness checks.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import sys

import pytest
import torch
from PIL import Image

from cliviz.errors import CLIVizError

from conftest import BUNDLED, EXAMPLES, REPO

# ----------------------------------------------------------------------------------------- item 1


def test_every_from_pretrained_call_refuses_remote_code_explicitly():
    """`trust_remote_code=False` is written at every transformers `from_pretrained` call cliviz makes."""
    missing = []
    for path in [*REPO.glob("cliviz/**/*.py"), *REPO.glob("app/*.py"), *REPO.glob("analyses/**/*.py")]:
        source = path.read_text()
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                keywords = {k.arg: k.value for k in node.keywords}
                value = keywords.get("trust_remote_code")
                if isinstance(value, ast.Constant) and value.value is False:
                    continue
                line = source.splitlines()[node.lineno - 1]
                missing.append(f"{rel}:{node.lineno}: {line.strip()}")
    assert not missing, missing


def test_no_stdin_while_loading():
    """Whatever waits on stdin, a prompt inside `no_stdin` reads end of file, not the user's `y`."""
    from cliviz.model.safety import no_stdin

    saved = sys.stdin
    sys.stdin = io.StringIO("y\ny\n")
    try:
        with no_stdin():
            with pytest.raises(EOFError):
                input("Do you wish to run the custom code? [y/N] ")
        assert sys.stdin.readline() == "y\n"  # untouched for the rest of the program
    finally:
        sys.stdin = saved


def test_known_transformers_classes_pass_the_code_check(tmp_path):
    """Real checkpoints name transformers' own classes: those folders are not refused."""
    from cliviz.model.safety import refuse_remote_code

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor"})
    )
    onevision = {"image_processor_type": "LlavaOnevisionImageProcessor"}
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"processor_class": "LlavaOnevisionProcessor", "image_processor": onevision})
    )
    refuse_remote_code(tmp_path)
    for folder in (REPO / "assets" / "models").iterdir():
        refuse_remote_code(folder)


# ----------------------------------------------------------------------------------------- item 3


def _cli_config(base) -> dict:
    """A cliviz config dict around a transformers LLaVA-family config (what config.json holds)."""
    from cliviz.model.configuration import CLIConfig

    n_vision = base.vision_config.num_hidden_layers
    cfg = CLIConfig(
        base_config=base,
        vision_layers=list(range(n_vision // 4, n_vision + 1, n_vision // 4)),
        injection_layers=[4, 8, 12],
    )
    return json.loads(cfg.to_json_string(use_diff=False))


def _llava(text_cls, vision: dict, text: dict, vocab: int):
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_cls(vocab_size=vocab, **text),
        image_token_index=vocab - 1,
    )


def _onevision(text: dict, vocab: int):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(vocab_size=vocab, **text),
        image_token_index=151646,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)


def real_checkpoint_configs() -> dict[str, dict]:
    """The shapes of real checkpoints (no weights): LLaVA-1.5 7B/13B, a Mistral LLaVA, OneVision 0.5B/7B/72B."""
    from transformers import LlamaConfig, MistralConfig

    return {
        "llava-1.5-7b": _cli_config(
            _llava(
                LlamaConfig,
                CLIP_L_336,
                dict(
                    hidden_size=4096,
                    intermediate_size=11008,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=32,
                    max_position_embeddings=4096,
                ),
                32064,
            )
        ),
        "llava-1.5-13b": _cli_config(
            _llava(
                LlamaConfig,
                CLIP_L_336,
                dict(
                    hidden_size=5120,
                    intermediate_size=13824,
                    num_hidden_layers=40,
                    num_attention_heads=40,
                    num_key_value_heads=40,
                    max_position_embeddings=4096,
                ),
                32064,
            )
        ),
        "llava-mistral-7b": _cli_config(
            _llava(
                MistralConfig,
                CLIP_L_336,
                dict(
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    max_position_embeddings=32768,
                ),
                32064,
            )
        ),
        "onevision-qwen2-0.5b": _cli_config(
            _onevision(
                dict(
                    hidden_size=896,
                    intermediate_size=4864,
                    num_hidden_layers=24,
                    num_attention_heads=14,
                    num_key_value_heads=2,
                    max_position_embeddings=32768,
                    tie_word_embeddings=True,
                ),
                152000,
            )
        ),
        "onevision-qwen2-7b": _cli_config(
            _onevision(
                dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    max_position_embeddings=32768,
                ),
                152128,
            )
        ),
        "onevision-qwen2-72b": _cli_config(
            _onevision(
                dict(
                    hidden_size=8192,
                    intermediate_size=29568,
                    num_hidden_layers=80,
                    num_attention_heads=64,
                    num_key_value_heads=8,
                    max_position_embeddings=32768,
                ),
                152064,
            )
        ),
    }


@pytest.mark.parametrize("name", list(real_checkpoint_configs()))
def test_real_checkpoint_configs_pass_validation(name):
    from cliviz.model.validation import validate_config

    raw = real_checkpoint_configs()[name]
    validate_config(raw)
    # fields the lead adds to the cliviz config (low-rank read, ...) are not refused
    validate_config({**raw, "read_width": 256, "read_heads": 8, "agf_read": "lowrank", "amp_norm": "layer"})


def test_validation_refuses_before_building(tmp_path):
    """`num_hidden_layers: 1000000` kept transformers allocating for minutes: now refused on reading."""
    import time

    from cliviz.model.loading import check_model_dir

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["base_config"]["text_config"]["num_hidden_layers"] = 1_000_000
    raw["injection_layers"] = [1, 2, 3]
    (folder / "config.json").write_text(json.dumps(raw))
    t0 = time.perf_counter()
    wanted = r"base_config\.text_config\.num_hidden_layers is 1,000,000, outside 1\.\.256"
    with pytest.raises(CLIVizError, match=wanted):
        check_model_dir(folder)
    assert time.perf_counter() - t0 < 60  # a guard against the old minutes-long build, not a timing claim


def test_onevision_cli_folder_loads(tmp_path):
    """A LLaVA-OneVision CLI folder (SigLIP + Qwen2, anyres pinpoints) passes every check and loads."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model.attach import attach
    from cliviz.model.loading import load_model

    tok = build_tokenizer()
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
    )
    base = LlavaOnevisionForConditionalGeneration(
        LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=[[32, 32], [32, 64]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    ).eval()
    model = attach(base, vision_layers=[1, 2, 3], injection_layers=[1, 2])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    LlavaOnevisionImageProcessorPil(  # OneVision needs its anyres processor, matching the config
        size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [32, 64]]
    ).save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, device="cpu")
    assert loaded.config.base_model_type == "llava_onevision"
    want = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name


# ----------------------------------------------------------------------------------------- item 4


def test_hostile_generation_config_decides_nothing(tmp_path):
    """num_beams 1000, do_sample, a billion tokens: cliviz decodes greedily with its own limits."""
    from cliviz.inference import answer
    from cliviz.model.loading import load_model

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED, folder)
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "num_beams": 1000,
                "do_sample": True,
                "temperature": 1e-9,
                "top_k": 1,
                "max_length": 10**9,
                "max_new_tokens": 10**9,
                "num_return_sequences": 50,
                "eos_token_id": 7,
            }
        )
    )
    model, tok = load_model(folder, device="cpu")
    clean, clean_tok = load_model(BUNDLED, device="cpu")
    assert model.generation_config.num_beams == 1 and model.generation_config.do_sample is False
    assert model.generation_config.num_return_sequences in (None, 1)
    image = Image.open(EXAMPLES / "color.png")
    got = answer(model, tok, [image], ["what color is the triangle ?"], max_new_tokens=4)[0]
    want = answer(clean, clean_tok, [image], ["what color is the triangle ?"], max_new_tokens=4)[0]
    assert got.text == want.text == "blue" and got.token_ids == want.token_ids
    assert len(got.token_ids) <= 4


def test_non_finite_scores_refused_by_answer_and_trace():
    """Finite weights can still overflow (here an lm_head of 3e38): the run is refused, not answered."""
    from cliviz.inference import answer
    from cliviz.tracing import trace

    from conftest import build_tiny

    broken, tok = build_tiny("cli")  # a model of its own: deep copies keep the original's injection hooks
    with torch.no_grad():
        broken.base.lm_head.weight.fill_(3e38)
    image = Image.open(EXAMPLES / "color.png")
    with pytest.raises(CLIVizError, match="NaN or infinite answer scores"):
        answer(broken, tok, [image], ["what color is the triangle ?"])
    with pytest.raises(CLIVizError, match="NaN or infinite answer scores"):
        trace(broken, tok, image, "what color is the triangle ?")


def test_non_finite_gates_refused_by_trace():
    """gate_temperature 0 (or a NaN gate weight) made every gate NaN; trace then crashed downstream."""
    from cliviz.tracing import trace

    from conftest import build_tiny

    broken, tok = build_tiny("cli")
    with torch.no_grad():
        broken.agf[0].gate.to_logits.weight.fill_(float("nan"))
    with pytest.raises(CLIVizError, match="produced NaN or infinite (answer scores|gate values)"):
        trace(broken, tok, Image.open(EXAMPLES / "color.png"), "what color is the triangle ?")


def test_attach_folder_refuses_a_base_that_asks_to_run_its_code(tmp_path):
    """The Python API `attach_folder` (not only `cliviz attach`) refuses an `auto_map` before loading."""
    import json

    from cliviz.model.attach import attach_folder

    base = tmp_path / "evil"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llava", "auto_map": {"AutoModel": "evil.Model"}}))
    (base / "evil.py").write_text("raise SystemExit('the folder code ran')\n")
    with pytest.raises(CLIVizError, match="code"):
        attach_folder(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
