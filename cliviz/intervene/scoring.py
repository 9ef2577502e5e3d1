"""Scoring entry points: teacher-forced scores of conditions over samples, mean gates, one dashboard cell.

These are the functions a user calls; they hand the work to the engine (`engine.run_conditions`)
and return tidy frames (one row per sample and condition, columns in `score_conditions`). `None`
among the conditions is the unablated run, which every other condition is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from transformers import PreTrainedTokenizerBase

from cliviz.errors import CLIVizError
from cliviz.intervene.engine import reference_run, run_conditions
from cliviz.intervene.layout import layout_samples, suppressed
from cliviz.intervene.spec import KINDS, TOKEN_SETS, Ablation
from cliviz.model import processing
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.processing import image_inputs


def mean_gates(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    tokens: str = "all",
    qtypes: Sequence[str | None] | None = None,
    max_batch: int = 256,
):
    """Token-pooled mean gate per LLM layer over the unablated runs: `[L, K]`, or with `qtypes`
    `{qtype: [L, K]}` — the `means` a ``mean`` ablation takes (e.g. from a held-out set)."""
    if tokens not in TOKEN_SETS:
        raise CLIVizError(f"unknown token set {tokens!r}; use one of {', '.join(TOKEN_SETS)}")
    pixels = image_inputs(list(images), model.config)
    samples = layout_samples(model, tokenizer, questions, None, qtypes, pixels.token_counts)
    ref = reference_run(
        model,
        samples,
        pixels,
        suppressed(tokenizer),
        processing.pad_id(tokenizer),
        max_batch=max_batch,
        token_sets={tokens},
        keep_gates=False,
        progress=None,
    )
    if not ref.token_sums:
        raise CLIVizError(f"this model has no gates (fusion={model.config.fusion})")
    sums, counts = ref.token_sums[tokens]
    if qtypes is None:
        return (sums.sum(0) / max(counts.sum(), 1)).astype(np.float32)
    labels = np.asarray([str(q) for q in qtypes])
    return {
        q: (sums[labels == q].sum(0) / max(counts[labels == q].sum(), 1)).astype(np.float32)
        for q in sorted(set(labels))
    }


def score_with_gate_mass(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    conditions: Sequence[Ablation | None],
    *,
    max_batch: int = 256,
    qtypes: Sequence[str | None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """`score_conditions` plus the unablated gate mass at the answer positions `[N, L, K]` (None
    without gates), for `effects_frame(..., gate_mass=...)` — no second reference forward."""
    frame, ref = run_conditions(
        model,
        tokenizer,
        images,
        questions,
        references,
        conditions,
        qtypes=qtypes,
        max_batch=max_batch,
        progress=progress,
    )
    return frame, ref.gate_mass


def score_conditions(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    conditions: Sequence[Ablation | None],
    *,
    max_batch: int = 256,
    qtypes: Sequence[str | None] | None = None,
    progress: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> pd.DataFrame:
    """Teacher-forced scores of every (sample, condition): one row each (samples outer).

    A reference of None (or "") means the model's own unablated answer (first token). `None` in
    `conditions` is the unablated run. Columns: sample, condition, kind, qtype, question, reference,
    own_answer, answer (argmax under the condition), prob (its probability), logprob_ref (first
    reference token), logprob_ref_seq (whole reference), logprob_own (the unablated argmax token),
    delta_logprob_ref / delta_logprob_own (vs the unablated run), flipped, correct.
    """
    frame, _ = run_conditions(
        model,
        tokenizer,
        images,
        questions,
        references,
        conditions,
        qtypes=qtypes,
        max_batch=max_batch,
        progress=progress,
        share_prefix=share_prefix,
    )
    return frame


def single_cell(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image: Image.Image,
    question: str,
    llm_layer: int,
    vision_layer: int | None,
    kind: str = "knockout",
) -> dict[str, Any]:
    """Ablate one (LLM layer, vision layer) cell for one question; compare with the unablated answer.

    Returns `answer`, `prob` (argmax under the ablation and its probability), `base_answer`,
    `base_prob` (unablated), `delta_logprob` (change of the base answer's log-prob), plus
    `base_answer_prob` (the base answer's probability under the ablation) and `flipped`.
    `vision_layer` is ignored by ``uniform`` and ``injection_off``; ``mean`` and ``patch`` need a
    data set and are refused here.
    """
    if kind in ("mean", "patch"):
        raise CLIVizError(f"a {kind} ablation needs a data set; use score_conditions")
    if kind not in KINDS:
        raise CLIVizError(f"unknown ablation kind {kind!r}; use one of {', '.join(KINDS)}")
    vis = None if kind in ("uniform", "injection_off") or vision_layer is None else [vision_layer]
    ablation = Ablation(kind, [llm_layer], vis, value=vision_layer if kind == "onehot" else None)
    frame = score_conditions(model, tokenizer, [image], [question], None, [None, ablation], max_batch=2)
    base, abl = frame.iloc[0], frame.iloc[1]

    def text(word: str) -> str:  # as `cliviz.inference.decode_answer`: an answer that ends at once is ""
        return "" if word == tokenizer.eos_token else word

    return {
        "answer": text(abl["answer"]),
        "prob": float(abl["prob"]),
        "base_answer": text(base["answer"]),
        "base_prob": float(base["prob"]),
        "delta_logprob": float(abl["delta_logprob_own"]),
        "base_answer_prob": float(math.exp(abl["logprob_own"])),
        "flipped": bool(abl["flipped"]),
        "condition": abl["condition"],
    }
