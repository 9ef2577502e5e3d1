"""What is measured per (sample, condition), from the log-probs at the answer positions.

Per row: the log-prob of the reference answer's first token (`logprob_ref`) and of the whole
reference, teacher-forced (`logprob_ref_seq`); the log-prob of the model's own unablated answer
token (`logprob_own`); the argmax answer under the condition (special tokens suppressed as in
generation); `flipped` (that argmax differs from the unablated one) and `correct` (every reference
token is the argmax under teacher forcing). The engine reduces each row to these numbers as soon as
its forward is done, so memory does not grow with the vocabulary; `scores_frame` lays them out with
the changes versus the unablated run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cliviz.inputs import is_word_level
from cliviz.intervene.layout import Sample
from cliviz.intervene.spec import REFERENCE, Ablation


def score_row(lp: np.ndarray, sample: Sample, own: int, suppress: list[int]) -> dict[str, Any]:
    """Numbers of one (sample, condition) from its log-probs at the answer positions `[n, V]`."""
    answer_ids = sample.answer if sample.answer else [own]
    masked = lp.copy()
    masked[:, suppress] = -np.inf
    top = masked.argmax(-1)
    picked = lp[np.arange(len(answer_ids)), answer_ids]
    return {
        "ref_token": int(answer_ids[0]),
        "logprob_ref": float(picked[0]),
        "logprob_ref_seq": float(picked.sum()),
        "logprob_own": float(lp[0, own]),
        "answer_token": int(top[0]),
        "answer_logprob": float(lp[0, top[0]]),
        "flipped": bool(top[0] != own),
        "correct": bool(np.all(top == np.asarray(answer_ids))),
    }


def scores_frame(
    tokenizer,
    samples: list[Sample],
    conditions: Sequence[Ablation | None],
    questions: Sequence[str],
    qtypes: Sequence[str | None] | None,
    own: np.ndarray,
    ref_logprobs: list,
    results: dict[tuple[int, int], dict[str, Any]],
    suppress: list[int],
) -> pd.DataFrame:
    """One row per (sample, condition), samples outer (columns: see `score_conditions`). `own [N]`
    and `ref_logprobs` (per sample `[n_answer, V]`) come from the reference run; `results` holds
    the `score_row` of every ablated (sample, condition index)."""
    base_rows = {s: score_row(ref_logprobs[s], samples[s], int(own[s]), suppress) for s in range(len(samples))}
    records = []
    for s in range(len(samples)):
        for c, a in enumerate(conditions):
            res, base = (base_rows[s] if a is None else results[(s, c)]), base_rows[s]
            records.append(
                {
                    "sample": s,
                    "condition": REFERENCE if a is None else a.label,
                    "kind": "none" if a is None else a.kind,
                    "qtype": qtypes[s] if qtypes is not None else None,
                    "question": questions[s],
                    "reference": _text(tokenizer, samples[s].answer or [int(own[s])]),
                    "own_answer": _text(tokenizer, [int(own[s])]),
                    "answer": _text(tokenizer, [res["answer_token"]]),
                    "prob": math.exp(res["answer_logprob"]),
                    "logprob_ref": res["logprob_ref"],
                    "logprob_ref_seq": res["logprob_ref_seq"],
                    "logprob_ref_mean": res["logprob_ref_seq"] / samples[s].n_answer,  # per token: free-text answers
                    "delta_logprob_ref_seq": res["logprob_ref_seq"] - base["logprob_ref_seq"],
                    "logprob_own": res["logprob_own"],
                    "delta_logprob_ref": res["logprob_ref"] - base["logprob_ref"],
                    "delta_logprob_own": res["logprob_own"] - base["logprob_own"],
                    "flipped": res["flipped"],
                    "correct": res["correct"],
                }
            )
    return pd.DataFrame.from_records(records)


def _text(tokenizer, ids: list[int]) -> str:
    """Token ids as the reader sees them: words for the bundled word-level models, decoded text for
    subword ones (ids past the tokenizer's own vocabulary — padded embedding rows — as `<id>`)."""
    if is_word_level(tokenizer):
        return " ".join(tokenizer.convert_ids_to_tokens([int(t) for t in ids]))
    known = [int(t) for t in ids if int(t) < len(tokenizer)]
    text = tokenizer.decode(known, skip_special_tokens=False)
    return text if len(known) == len(ids) else text + "".join(f"<{int(t)}>" for t in ids if int(t) >= len(tokenizer))
