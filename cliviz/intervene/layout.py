"""Data layout for teacher forcing: samples as token ids, chunks of them as left-padded batches.

Scoring is teacher-forced: a sample's prompt plus its reference answer minus the last token is fed
once (`Sample.fed`), and the answer's log-probabilities are read at the positions that predict it
(the last prompt token, then each fed answer token). A `Batch` stacks rows of different lengths
left-padded, remembers each row's padding (`offsets`) and lists the scored positions in one flat
gather (`gather_rows`, `gather_pos`), so a whole chunk's answer logits come out of one indexing.
Token sets (`Sample.token_mask`) and the role alignment of a `patch` donor (`donor_map`) are
defined here, on unpadded positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cliviz.errors import CLIVizError
from cliviz.inference import answer, suppressed_tokens
from cliviz.inputs import is_word_level
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import prompt_ids

_ROLE_PROMPT, _ROLE_ANSWER = 1, 3


@dataclass
class Sample:
    """One (image, question, reference) laid out for teacher forcing (unpadded positions)."""

    prompt: list[int]
    answer: list[int] | None  # reference ids; None = the model's own answer (the reference run decides it)
    qtype: str | None
    roles: np.ndarray = field(init=False)

    @property
    def fed(self) -> list[int]:
        """The ids that go in: the prompt and every reference token but the last."""
        return self.prompt + (self.answer[:-1] if self.answer else [])

    @property
    def n_answer(self) -> int:
        """How many answer tokens are scored (1 when the model's own answer is the reference)."""
        return len(self.answer) if self.answer else 1

    def __post_init__(self) -> None:
        roles = np.full(len(self.fed), _ROLE_PROMPT, dtype=np.int8)
        roles[len(self.prompt) :] = _ROLE_ANSWER
        self.roles = roles

    def token_mask(self, tokens: str, image_id: int) -> np.ndarray:
        """`[T]` bool: the fed positions of token set `tokens` (all | prompt | image | answer)."""
        n = len(self.fed)
        if tokens == "all":
            return np.ones(n, dtype=bool)
        if tokens == "image":
            return np.asarray(self.fed) == image_id
        if tokens == "prompt":
            return (self.roles == _ROLE_PROMPT) & (np.asarray(self.fed) != image_id)
        mask = np.zeros(n, dtype=bool)  # answer: the positions whose output predicts an answer token
        start = len(self.prompt) - 1
        mask[start : start + self.n_answer] = True
        return mask


def layout_samples(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    references: Sequence[str | list[int] | None] | None,
    qtypes: Sequence[str | None] | None,
    n_images: Sequence[int] | None = None,
) -> list[Sample]:
    """Tokenise each (question, reference); a missing or empty reference means the model's own answer.

    A reference is text, or already token ids (a generated answer, scored exactly as generated).
    `n_images`: each image's placeholder count (`ImageInputs.token_counts`; needed for LLaVA-OneVision,
    whose count depends on the image)."""
    samples = []
    unk = tokenizer.unk_token_id
    for i, q in enumerate(questions):
        ref = references[i] if references is not None else None
        ids = None
        if isinstance(ref, (list, tuple)):
            ids = [int(t) for t in ref] or None
        elif ref is not None and str(ref).strip():
            ids = tokenizer(str(ref), add_special_tokens=False).input_ids
            if not ids:
                ids = None
            elif unk is not None and unk in ids:
                raise CLIVizError(f"reference answer {ref!r} has words outside the model's vocabulary")
        n_img = n_images[i] if n_images is not None else None
        samples.append(
            Sample(prompt_ids(tokenizer, q, model.config, n_img), ids, qtypes[i] if qtypes is not None else None)
        )
    return samples


def own_answers(
    model, tokenizer, images: Sequence, questions: Sequence[str], references: Sequence[str | list[int] | None] | None
) -> list[str | list[int] | None] | None:
    """Missing references of a real checkpoint become the model's own greedy answer, as token ids
    (eos dropped), so that a free-text answer is scored whole rather than by its first token.
    The bundled word-level models answer one word, which the first answer position already is."""
    refs: list[str | list[int] | None] = list(references) if references is not None else [None] * len(questions)
    missing = [i for i, r in enumerate(refs) if r is None or (isinstance(r, str) and not r.strip())]
    if not missing or is_word_level(tokenizer):
        return None if references is None else list(references)
    answers = answer(model, tokenizer, [images[i] for i in missing], [questions[i] for i in missing])
    for i, ans in zip(missing, answers):
        ids = [t for t in ans.token_ids if t != tokenizer.eos_token_id]
        refs[i] = ids or None
    return refs


def suppressed(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens generation never emits: not answers."""
    return suppressed_tokens(tokenizer)


@dataclass
class Batch:
    """A chunk of samples, left-padded to one width W, with its P scored positions."""

    ids: torch.Tensor  # [R, W]
    mask: torch.Tensor  # [R, W]
    offsets: np.ndarray  # [R] left padding of each row
    gather_rows: torch.Tensor  # [P] row of each scored position
    gather_pos: torch.Tensor  # [P] position of each scored position
    spans: list[tuple[int, int]]  # per row: slice into the P scored positions


def make_batch(samples: list[Sample], which: Sequence[int], pad_id: int, device) -> Batch:
    """Rows `which` of `samples`, left-padded with `pad_id` (`cliviz.model.processing.pad_id`: the
    attention mask hides padding, so any id gives the same result), on `device`."""
    fed = [samples[s].fed for s in which]
    width = max(len(f) for f in fed)
    ids = torch.full((len(fed), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(fed), width), dtype=torch.long)
    offsets = np.zeros(len(fed), dtype=np.int64)
    rows: list[int] = []
    pos: list[int] = []
    spans: list[tuple[int, int]] = []
    for r, (s, f) in enumerate(zip(which, fed, strict=True)):
        off = width - len(f)
        offsets[r] = off
        ids[r, off:] = torch.tensor(f)
        mask[r, off:] = 1
        start = off + len(samples[s].prompt) - 1
        n = samples[s].n_answer
        spans.append((len(rows), len(rows) + n))
        rows += [r] * n
        pos += list(range(start, start + n))
    return Batch(
        ids.to(device),
        mask.to(device),
        offsets,
        torch.tensor(rows, device=device),
        torch.tensor(pos, device=device),
        spans,
    )


def pad_into(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Left-pad per-row `[T_r, ...]` tensors with zeros into `[R, width, ...]`."""
    first = parts[0]
    out = torch.zeros((len(parts), width, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for r, part in enumerate(parts):
        out[r, width - part.shape[0] :] = part
    return out


def _after_image(prompt: list[int], image_id: int) -> int:
    """The position right after the last image placeholder (0 when there is none)."""
    return len(prompt) - prompt[::-1].index(image_id) if image_id in prompt else 0


def donor_map(receiver: Sample, donor: Sample, image_id: int) -> np.ndarray:
    """Donor position for each receiver position (-1: no counterpart), aligned by role: the prompt
    head up to the last image token by position (a chat template's prefix is the same in every
    sample), the question words from their end, the answer from its start."""
    t_r, t_d = len(receiver.fed), len(donor.fed)
    p_r, p_d = len(receiver.prompt), len(donor.prompt)
    front, front_d = _after_image(receiver.prompt, image_id), _after_image(donor.prompt, image_id)
    out = np.full(t_r, -1, dtype=np.int64)
    for p in range(t_r):
        if p < front:
            q = p if p < front_d else -1
        elif p < p_r:
            q = p_d - (p_r - p)
            q = q if q >= front else -1
        else:
            q = p_d + (p - p_r)
            q = q if q < t_d else -1
        out[p] = q
    return out
