"""Tiny llava-hf-style checkpoint folders, built in-process so that nothing is downloaded.

Each folder holds what a hub checkpoint holds: weights (any dtype, safetensors), a fast BPE
tokenizer with the family's special tokens and chat template, and the processor files
(`preprocessor_config.json`, `processor_config.json`, `chat_template.jinja`):
- `llava15_folder`: CLIP + Llama, LLaVA-1.5's `USER: <image>\\n... ASSISTANT:` template, 32 px /
  patch 8 (16 image tokens after dropping CLS), stored in float16 by default as llava-1.5-7b-hf is;
- `onevision_folder`: SigLIP + Qwen2, a ChatML template, anyres grid pinpoints up to 3x3 crops of
  32 px, so wide, tall and square images get different crop and token counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def llava15_base(tok, seed: int = 0, layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
    )
    tc = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok) + 20,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def onevision_base(tok, seed: int = 0, layers: int = 3):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vc = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
    )
    tc = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok) + 20,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


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
