"""Small data sets and tokenizers for the conversation-data tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# A ChatML (Qwen2-style) template with plain string content and Qwen2's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer(template: str = CHATML_TEMPLATE):
    """Byte-level BPE with Qwen2's specials: no bos, eos = `<|im_end|>`, pad = `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(
        ["what color is the circle ?", "system user assistant You are a helpful assistant."], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=template,
    )


def word_level():
    """The bundled word-level tokenizer and the tiny model config (64 image tokens per image)."""
    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.train import tiny_config

    tok = build_tokenizer()
    return tok, tiny_config("cli", len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def llava_row(i: int, image: str | None = None, turns: int = 1) -> dict:
    """A good LLaVA instruction row about `images/{i}.png` (ShapesVQA words, so word-level models can read it)."""
    questions = [
        ("what color is the circle ?", "red"),
        ("how many objects are there ?", "two"),
        ("what shape is the red object ?", "circle"),
    ]
    conversation = []
    for t in range(turns):
        q, a = questions[(i + t) % len(questions)]
        conversation += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": f"row-{i}", "image": image or f"{i}.png", "conversations": conversation}


def llava_dataset(root: Path, n: int, turns: int = 1) -> tuple[list[dict], Path]:
    """`n` good rows and their images in `root/images` (returned as the image folder)."""
    images = root / "images"
    for i in range(n):
        write_png(images / f"{i}.png", i)
    return [llava_row(i, turns=turns) for i in range(n)], images


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
