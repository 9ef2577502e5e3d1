"""Batched greedy answering: the one place that turns (image, question) pairs into answers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from PIL import Image

from cliviz.arguments import check_max_new_tokens, check_request, warn
from cliviz.finite import require_finite
from cliviz.inputs import is_word_level
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import batch_prompts, image_inputs, pad_id, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token (eos included when produced)


PLACEHOLDERS = ("<image>", "<video>")  # LLaVA's image token, LLaVA-OneVision's video token


def suppressed_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that are never an answer: padding, unknown, `<bos>`, image and video placeholders."""
    vocab = tokenizer.get_vocab()
    ids = [
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        *(vocab.get(t) for t in PLACEHOLDERS),
    ]
    return sorted({int(t) for t in ids if t is not None and t >= 0})


WORD_LEVEL_MAX_NEW_TOKENS = 4  # bundled models answer one word (+ eos)
SUBWORD_MAX_NEW_TOKENS = 256  # real checkpoints answer in sentences; the command line allows up to 1024


def default_max_new_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """The answer length limit when the user gives none: by the kind of model the tokenizer belongs to."""
    return WORD_LEVEL_MAX_NEW_TOKENS if is_word_level(tokenizer) else SUBWORD_MAX_NEW_TOKENS


def generation_kwargs(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> dict:
    """Greedy decoding that never emits the `suppressed_tokens` (pad falls back to eos when unset)."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id(tokenizer),
        "suppress_tokens": suppressed_tokens(tokenizer),
    }


def prepare_inputs(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: list[Image.Image],
    questions: list[str],
) -> dict:
    """Left-padded prompts and the image inputs (`pixel_values`, and `image_sizes` for OneVision)."""
    pixels = image_inputs(images, model.config)
    ids, mask = batch_prompts(tokenizer, questions, model.config, pixels.token_counts)
    return {
        "input_ids": ids.to(model.device),
        "attention_mask": mask.to(model.device),
        **pixels.to_model(model.device, model.dtype),
    }


def token_texts(tokenizer: PreTrainedTokenizerBase, ids) -> list[str]:
    """The text of each token id, as traces store it. Real checkpoints pad their embedding matrix
    past the tokenizer's vocabulary (LLaVA-1.5: 32,064 rows for 32,002 tokens), so a model can emit
    an id the tokenizer has no text for: it is written `<id:N>` rather than None."""
    ids = [int(t) for t in ids]
    texts = tokenizer.convert_ids_to_tokens(ids)
    return [text if isinstance(text, str) else f"<id:{t}>" for t, text in zip(ids, texts)]


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Tokens up to (not including) the first eos: joined as words for the bundled word-level
    tokenizer, `tokenizer.decode(..., skip_special_tokens=True)` for subword ones."""
    if not is_word_level(tokenizer):
        eos = tokenizer.eos_token_id
        upto = ids.index(eos) if eos is not None and eos in ids else len(ids)
        text = cast(str, tokenizer.decode(ids[:upto], skip_special_tokens=True))  # one sequence in, one text out
        return text.strip()
    words = []
    for t in ids:
        if t == tokenizer.eos_token_id:
            break
        words.append(token_texts(tokenizer, [t])[0])  # an id past the vocabulary reads <id:N>
    return " ".join(words)


@torch.no_grad()
def answer(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int | None = None,
) -> list[Answer]:
    """Answer a batch of questions (one image each) greedily, with per-token log-probs."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(tokenizer)
    inputs = prepare_inputs(model, tokenizer, images, questions)
    out = model.generate(
        **inputs, **generation_kwargs(tokenizer, max_new_tokens), output_logits=True, return_dict_in_generate=True
    )
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


def ask(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image: Image.Image | str | os.PathLike,
    question: str,
    *,
    max_new_tokens: int | None = None,
) -> Answer:
    """Answer one question greedily, through the checks `cliviz ask` runs (`cliviz.arguments.check_request`).

    `image`: a PIL image, a numpy array or a path. Bad arguments raise `CLIVizError` with one line
    naming them; an image unlike a bundled model's scenes gives a `CLIVizWarning`. Example::

        from cliviz import ask, load_image, load_model
        model, tok = load_model()
        ask(model, tok, load_image("assets/examples/color.png"), "what color is the triangle").text   # 'blue'
    """
    request = check_request(model, tokenizer, image, question)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    warn(request.warnings)
    return answer(model, tokenizer, [request.image], [request.question], max_new_tokens=max_new_tokens)[0]


@dataclass
class ReferenceScore:
    """Teacher-forced log-probs of a given reference answer, one per reference token (no eos)."""

    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        """Per-token mean: comparable across answers of different lengths."""
        return self.total / len(self.logprobs) if self.logprobs else float("nan")


def reference_ids(tokenizer: PreTrainedTokenizerBase, reference: str) -> list[int]:
    """A reference answer's token ids as the model would emit them right after the prompt."""
    return list(tokenizer(str(reference).strip(), add_special_tokens=False).input_ids)


@torch.no_grad()
def score_references(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: list[Image.Image],
    questions: list[str],
    references: list[str],
) -> list[ReferenceScore]:
    """Log-prob of each reference answer given (image, question), teacher-forced in one batched forward.

    How free-text answers of real checkpoints are scored (`cliviz eval`): a long answer is judged
    by how likely the model finds the whole reference, not by whether its first token matches.
    """
    pixels = image_inputs(images, model.config)
    prompts = [prompt_ids(tokenizer, q, model.config, n) for q, n in zip(questions, pixels.token_counts)]
    answers = [reference_ids(tokenizer, r) for r in references]
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)  # [B, T], left-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=position_ids.to(model.device),
        **pixels.to_model(model.device, model.dtype),
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # [B, T, V]
    scores = []
    for i, answer_ids in enumerate(answers):
        start = width - len(answer_ids) - 1  # the position that predicts the first answer token
        picked = [float(logprobs[i, start + s, t]) for s, t in enumerate(answer_ids)]
        scores.append(ReferenceScore(picked))
    return scores
