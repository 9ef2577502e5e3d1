"""Tiny models, checkpoint folders and synthetic traces: the one home of the tests' builders.

Following transformers' `ModelTester` pattern, every tiny model is described once by its sizes
(`TinySizes`) and built from a config, in-process, so that nothing is downloaded:
- `build_tiny`: the bundled CLI architecture (`cliviz.train.tiny_config`) with random weights and
  alpha opened so that the injection matters;
- `tiny_llava` / `tiny_onevision`: bare LLaVA / LLaVA-OneVision models (vocabulary 50, image token 3);
- `llava15_folder` / `onevision_folder`: llava-hf-style checkpoint folders, holding what a hub
  checkpoint holds: weights (any dtype, safetensors), a fast BPE tokenizer with the family's special
  tokens and chat template, and the processor files (`preprocessor_config.json`,
  `processor_config.json`, `chat_template.jinja`). `llava15_folder`: CLIP + Llama, LLaVA-1.5's
  `USER: <image>\\n... ASSISTANT:` template, 32 px / patch 8 (16 image tokens after dropping CLS),
  float16 by default as llava-1.5-7b-hf is; `onevision_folder`: SigLIP + Qwen2, a ChatML template,
  anyres grid pinpoints up to 3x3 crops of 32 px, so wide, tall and square images get different
  crop and token counts;
- `hand_trace`, `synthetic_traces`, `good_trace`: `Trace`s made without a model (exact given gates;
  question-type-dependent gates with noise; a small valid trace).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from cliviz.tracing.schema import Trace

SIZE, PATCH = 32, 8

# LLaVA-1.5's template in miniature: `USER: <image>\n{question} ASSISTANT:` from structured content.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# LLaVA-OneVision's (Qwen2 ChatML) template in miniature.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64], [96, 96]]
CORPUS = [
    "what color is the circle ?",
    "USER: ASSISTANT: a red square",
    "how many shapes are there",
    "the answer is a long sentence about the picture",
    "user assistant system",
]


def build_tokenizer(specials: list[str], chat_template: str, bos: str | None, eos: str, pad: str):
    """A byte-level BPE (any text is spellable) with the given specials; `bos` (if any) added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_template,
    )


def llava15_tokenizer():
    return build_tokenizer(["<s>", "</s>", "<pad>", "<image>"], LLAVA15_TEMPLATE, "<s>", "</s>", "<pad>")


def onevision_tokenizer():
    return build_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        ONEVISION_TEMPLATE,
        None,
        "<|im_end|>",
        "<|endoftext|>",
    )


def llava15_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def onevision_image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def llava15_processor(tok, image_processor=None):
    """What a llava-hf checkpoint ships: 1 extra (CLS) token, dropped by the "default" strategy."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor or llava15_image_processor(),
        tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA15_TEMPLATE,
        num_additional_image_tokens=1,
    )


def onevision_processor(tok, image_processor=None):
    from transformers import LlavaOnevisionProcessor

    return LlavaOnevisionProcessor(
        image_processor or onevision_image_processor(),
        tok,
        video_processor=None,
        num_image_tokens=(SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny LLaVA-family model: CLIP/SigLIP tower + Llama/Qwen2 LLM, 32 px / patch 8."""

    vision_hidden: int = 32
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    image: int = SIZE
    patch: int = PATCH

    def vision(self, cls):
        return cls(
            hidden_size=self.vision_hidden,
            intermediate_size=2 * self.vision_hidden,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.heads,
            image_size=self.image,
            patch_size=self.patch,
        )

    def text(self, cls, vocab_size: int, **token_ids: int | None):
        return cls(
            hidden_size=self.text_hidden,
            intermediate_size=2 * self.text_hidden,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=vocab_size,
            **token_ids,
        )

    def llava(self, vocab_size: int, image_token: int, seed: int = 0, **token_ids: int | None):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        torch.manual_seed(seed)
        cfg = LlavaConfig(
            vision_config=self.vision(CLIPVisionConfig),
            text_config=self.text(LlamaConfig, vocab_size, **token_ids),
            image_token_index=image_token,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        return LlavaForConditionalGeneration(cfg).eval()

    def onevision(self, vocab_size: int, image_token: int, seed: int = 0, pinpoints=None, **extra):
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            Qwen2Config,
            SiglipVisionConfig,
        )

        torch.manual_seed(seed)
        tokens = {k: extra.pop(k) for k in ("eos_token_id", "pad_token_id") if k in extra}
        cfg = LlavaOnevisionConfig(
            vision_config=self.vision(SiglipVisionConfig),
            text_config=self.text(Qwen2Config, vocab_size, **tokens),
            image_token_index=image_token,
            image_grid_pinpoints=pinpoints or [[self.image, self.image]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **extra,
        )
        return LlavaOnevisionForConditionalGeneration(cfg).eval()


TINY = TinySizes()


def tiny_llava(seed: int = 0):
    """A bare tiny LLaVA-1.5 (CLIP + Llama), vocabulary 50, image token 3."""
    return TINY.llava(50, 3, seed)


def tiny_onevision(seed: int = 0):
    """A bare tiny LLaVA-OneVision (SigLIP + Qwen2), one 32 px pinpoint, vocabulary 50, image token 3."""
    return TINY.onevision(50, 3, seed)


def llava15_base(tok, seed: int = 0, layers: int = 3):
    sizes = TinySizes(vision_layers=layers)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return sizes.llava(len(tok) + 20, tok.convert_tokens_to_ids("<image>"), seed, **ids)


def onevision_base(tok, seed: int = 0, layers: int = 3):
    return TinySizes(vision_layers=layers).onevision(
        len(tok) + 20,
        tok.convert_tokens_to_ids("<image>"),
        seed,
        pinpoints=PINPOINTS,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_aspect_ratio="anyres_max_9",
    )


def _save(folder: Path, model, tok, image_processor, processor_config: dict, template: str, dtype: torch.dtype) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(folder)
    model.to(torch.float32)
    tok.save_pretrained(folder)
    image_processor.save_pretrained(folder)  # preprocessor_config.json, as hub checkpoints have it
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (folder / "chat_template.jinja").write_text(template)
    return folder


def llava15_folder(folder: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    tok = llava15_tokenizer()
    config = {
        "processor_class": "LlavaProcessor",
        "patch_size": PATCH,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "image_token": "<image>",
    }
    return _save(folder, llava15_base(tok, seed), tok, llava15_image_processor(), config, LLAVA15_TEMPLATE, dtype)


def onevision_folder(folder: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    tok = onevision_tokenizer()
    config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (SIZE // PATCH) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_token": "<image>",
        "video_token": "<video>",
    }
    return _save(folder, onevision_base(tok, seed), tok, onevision_image_processor(), config, ONEVISION_TEMPLATE, dtype)


# ------------------------------------------------------------------------------ tiny CLI models


def build_tiny(fusion: str = "cli", seed: int = 0, open_alpha: float = 0.7):
    """The bundled architecture with random weights; alpha opened so that injection matters."""
    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model import CLIForConditionalGeneration
    from cliviz.train import tiny_config

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = tiny_config(fusion, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    model = CLIForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.fill_(open_alpha)
    return model, tok


# --------------------------------------------------------------------------- synthetic traces

VISION = [2, 5, 8]  # real hidden_states indices, deliberately not 0..K-1
LLM = [1, 3]


def hand_trace(
    gates: np.ndarray,
    answer_positions: list[int],
    *,
    qtype: str | None = "colour",
    sample_id: str = "s",
    roles: list[str] | None = None,
    norms: np.ndarray | None = None,
    vision: list[int] = VISION,
    llm: list[int] = LLM,
) -> Trace:
    """A Trace with exactly the given gates `[L, T, K]` (not renormalised)."""
    from cliviz.tracing.schema import ROLES, Trace, TraceMeta  # the trace classes pull in torch & co.

    gates = np.asarray(gates, dtype=np.float32)
    L, T, K = gates.shape
    n_ans = len(answer_positions)
    meta = TraceMeta(
        question="what colour is the square?",
        answer="red",
        model="hand",
        config_hash="0",
        fusion="cli",
        vision_layers=list(vision),
        injection_layers=list(llm),
        image_sha256="0" * 64,
        image_width=8,
        image_height=8,
        device="cpu",
        dtype="float32",
        created_at="2025-01-01T00:00:00+00:00",
        cliviz_version="0.1.0",
        qtype=qtype,
        reference_answer="red",
        sample_id=sample_id,
    )
    return Trace(
        meta=meta,
        token_ids=np.arange(T, dtype=np.int64),
        token_texts=[f"t{i}" for i in range(T)],
        token_roles=roles or [ROLES[min(i, 2)] if i < 2 else "prompt" for i in range(T)],
        gates=gates,
        injection_norm=(np.asarray(norms, np.float32) if norms is not None else np.ones((L, T), np.float32)),
        answer_ids=np.arange(n_ans, dtype=np.int64),
        answer_texts=[f"a{s}" for s in range(n_ans)],
        answer_positions=np.asarray(answer_positions, dtype=np.int64),
        answer_logprobs=np.zeros(n_ans, np.float32),
        topk_ids=np.zeros((n_ans, 1), np.int64),
        topk_texts=[["x"] for _ in range(n_ans)],
        topk_logprobs=np.zeros((n_ans, 1), np.float32),
    )


def onehot(k: int, K: int = 3) -> list[float]:
    v = [0.0] * K
    v[k] = 1.0
    return v


def synthetic_traces(
    n: int = 120,
    *,
    seed: int = 0,
    noise: float = 0.15,
    qtypes: tuple[str, ...] = ("colour", "count", "glyph", "position"),
    n_tokens: int = 12,
    L: int = 3,
    K: int = 4,
    n_answer: int = 2,
) -> list[Trace]:
    """Traces whose gates depend on the question type (a preferred vision layer per type and LLM
    layer) plus Dirichlet-like noise; used by the probe and the figure tests."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = i % len(qtypes)
        logits = rng.normal(0, noise * 3, size=(L, n_tokens, K))
        for layer in range(L):
            logits[layer, :, (q + layer) % K] += 2.0
        g = np.exp(logits)
        g /= g.sum(-1, keepdims=True)
        roles = (
            ["prompt"]
            + ["image"] * (n_tokens // 2)
            + ["prompt"] * (n_tokens - n_tokens // 2 - 1 - (n_answer - 1))
            + ["answer"] * (n_answer - 1)
        )
        pos = list(range(n_tokens - n_answer, n_tokens))
        t = hand_trace(
            g,
            pos,
            qtype=qtypes[q],
            sample_id=f"s{i}",
            roles=roles,
            norms=rng.gamma(2.0, 0.5, size=(L, n_tokens)),
            vision=list(range(1, 3 * K, 3)),
            llm=list(range(2, 2 + 2 * L, 2)),
        )
        t.answer_texts = ["red" if s == 0 else "<eos>" for s in range(n_answer)]
        t.validate()
        out.append(t)
    return out


def good_trace(n_layers: int = 2, n_tokens: int = 6, k: int = 3, n_answer: int = 2, seed: int = 0):
    """A small valid `Trace` (softmax gates, negative log-probs)."""
    from cliviz.tracing.schema import ROLES, Trace, TraceMeta

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_layers, n_tokens, k)).astype(np.float32)
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    meta = TraceMeta(
        question="what color is the circle ?",
        answer="red",
        model="m",
        config_hash="h",
        fusion="cli",
        vision_layers=list(range(1, k + 1)),
        injection_layers=list(range(1, n_layers + 1)),
        image_sha256="0" * 64,
        image_width=64,
        image_height=64,
        device="cpu",
        dtype="float32",
        created_at="2026-01-01T00:00:00+00:00",
        cliviz_version="0.1.0",
        qtype="color",
        reference_answer="red",
        sample_id=f"s{seed}",
    )
    return Trace(
        meta=meta,
        token_ids=np.arange(n_tokens, dtype=np.int64),
        token_texts=[f"t{i}" for i in range(n_tokens)],
        token_roles=[ROLES[i % 3] for i in range(n_tokens)],
        gates=gates.astype(np.float32),
        injection_norm=rng.random((n_layers, n_tokens), dtype=np.float32),
        answer_ids=np.arange(n_answer, dtype=np.int64),
        answer_texts=[f"a{i}" for i in range(n_answer)],
        answer_positions=np.arange(n_tokens - n_answer, n_tokens, dtype=np.int64),
        answer_logprobs=-rng.random(n_answer, dtype=np.float32),
        topk_ids=np.zeros((n_answer, 2), np.int64),
        topk_texts=[["x", "y"]] * n_answer,
        topk_logprobs=-rng.random((n_answer, 2), dtype=np.float32),
    )


LLAVA_DATA_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_llava_data(root: Path) -> tuple:
    """A LLaVA instruction file (JSON list, two turns each) with images of three shapes, plus two bad rows."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        name = list(LLAVA_DATA_COLORS)[i % 3]
        w, h = [(48, 32), (32, 64), (40, 40)][i % 3]
        pixels = np.full((h, w, 3), LLAVA_DATA_COLORS[name], dtype=np.uint8) + rng.integers(
            0, 20, (h, w, 3), dtype=np.uint8
        )
        Image.fromarray(pixels).save(images / f"{i}.png")
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the picture?"},
                    {"from": "gpt", "value": f"The picture is {name}."},
                    {"from": "human", "value": "Are you sure?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        )
    rows.append(
        {
            "id": "no-image",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
        }
    )
    rows.append(
        {
            "id": "no-token",
            "image": "0.png",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
        }
    )
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json", images


def attached_llava15_run(root: Path) -> dict:
    """What a training test starts from: a float16 LLaVA-1.5 folder with CLI attached (`cli`) and a
    LLaVA instruction file (`data`) with its image folder (`images`)."""
    from cliviz.model.attach import attach_folder

    base = llava15_folder(root / "base", dtype=torch.float16)
    attach_folder(base, root / "cli")
    data, images = write_llava_data(root / "data")
    return {"cli": root / "cli", "data": data, "images": images}


def make_lively(model, seed: int = 0) -> None:
    """An attached model whose injection acts (alpha 0.8 everywhere) with random gates and AMP
    corrections (`tanh(alpha) = 0` and zero LoRA at init would make every ablation a no-op)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.fill_(0.8)
            torch.nn.init.normal_(layer.gate.to_logits.weight, std=0.5)
        for lora in model.amp.loras:
            torch.nn.init.normal_(lora.up.weight, std=0.1)
