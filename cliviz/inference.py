"""Batched greedy answering: the one place that turns (image, question) pairs into answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from cliviz.finite import require_finite
from cliviz.inputs import is_word_level
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import batch_prompts, pad_id, pixel_values


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token (eos included when produced)


def suppressed_tokens(tokenizer) -> list[int]:
    """Tokens that are never an answer: padding, unknown, `<bos>`, image placeholders."""
    ids = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<image>")]
    return sorted({int(t) for t in ids if t is not None and t >= 0})


def generation_kwargs(tokenizer, max_new_tokens: int) -> dict:
    """Greedy decoding that never emits the `suppressed_tokens` (pad falls back to eos when unset)."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id(tokenizer),
        "suppress_tokens": suppressed_tokens(tokenizer),
    }


def prepare_inputs(model: CLIForConditionalGeneration, tokenizer, images: list[Image.Image], questions: list[str]) -> dict:
    ids, mask = batch_prompts(tokenizer, questions, model.config)
    return {
        "input_ids": ids.to(model.device),
        "attention_mask": mask.to(model.device),
        "pixel_values": pixel_values(images, model.config).to(model.device, model.dtype),
    }


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Tokens up to (not including) the first eos: joined as words for the bundled word-level
    tokenizer, `tokenizer.decode(..., skip_special_tokens=True)` for subword ones."""
    if not is_word_level(tokenizer):
        eos = tokenizer.eos_token_id
        upto = ids.index(eos) if eos is not None and eos in ids else len(ids)
        return tokenizer.decode(ids[:upto], skip_special_tokens=True).strip()
    words = []
    for t in ids:
        if t == tokenizer.eos_token_id:
            break
        words.append(tokenizer.convert_ids_to_tokens(t))
    return " ".join(words)


@torch.no_grad()
def answer(
    model: CLIForConditionalGeneration, tokenizer, images: list[Image.Image], questions: list[str], max_new_tokens: int = 4
) -> list[Answer]:
    """Answer a batch of questions (one image each) greedily, with per-token log-probs."""
    inputs = prepare_inputs(model, tokenizer, images, questions)
    out = model.generate(**inputs, **generation_kwargs(tokenizer, max_new_tokens), output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]  # [B, new]
    # raw logits (not the processed scores) so that probabilities match what `trace` records
    require_finite(torch.stack(list(out.logits), dim=1), "answer scores", model)  # [B, new, V]
    logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], dim=1)  # [B, new, V]
    chosen = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B, new]
    answers = []
    for row, lp in zip(new.tolist(), chosen.tolist()):
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        answers.append(Answer(decode_answer(tokenizer, row), row[:n], lp[:n]))
    return answers
