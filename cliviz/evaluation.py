"""Accuracy of a model on a ShapesVQA-style JSONL set, overall and per question type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from cliviz.data.samples import DataSet
from cliviz.inference import answer, default_max_new_tokens, score_references
from cliviz.inputs import is_word_level, load_image
from cliviz.memory import auto_batch_size, in_batches, prompt_tokens_estimate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cliviz.model.modeling import CLIForConditionalGeneration


def normalise_answer(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: how free-text answers are matched."""
    return " ".join(text.lower().strip().strip(".!?,;:\"'").split())


def evaluate(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    data: DataSet,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Greedy answers vs references: `{"overall", "per_type", "n", "n_per_type", "accuracy_ci",
    "skipped"}`; `accuracy_ci` holds 95% Wilson intervals (`cliviz.intervals`), `{"overall": [lo, hi],
    "per_type": {qtype: [lo, hi]}}` — 10 questions per type leave an interval ±0.2 wide or more.

    `batch_size` None: as many rows as fit the device's free memory (`cliviz.memory.auto_batch_size`);
    a batch that runs out of memory anyway is halved and retried.

    Bundled word-level models answer one word: exact match. Real checkpoints answer in free text:
    the whole generated answer must match the reference after `normalise_answer`, and the reference
    itself is scored teacher-forced (`score_references`): `reference_logprob` (sum over its tokens)
    and `reference_logprob_mean` (per token), averaged over samples, overall and per type.
    """
    word_level = is_word_level(tokenizer)
    correct: dict[str, list[int]] = defaultdict(list)
    ref_sum: dict[str, list[float]] = defaultdict(list)
    ref_mean: dict[str, list[float]] = defaultdict(list)
    labelled = [r for r in data.records if r.answer is not None]
    new_tokens = 2 if word_level else default_max_new_tokens(tokenizer)
    if batch_size is None:
        batch_size = auto_batch_size(model, prompt_tokens_estimate(model.config), new_tokens, new_tokens)

    def run(chunk):
        images = [load_image(r.image_path) for r in chunk]
        questions = [r.question for r in chunk]
        answers = answer(model, tokenizer, images, questions, max_new_tokens=2 if word_level else None)
        scores = (
            None if word_level else score_references(model, tokenizer, images, questions, [r.answer for r in chunk])
        )
        return answers, scores

    for chunk, (answers, scores) in in_batches(labelled, batch_size, run):
        for i, (record, ans) in enumerate(zip(chunk, answers)):
            qtype = record.qtype or "unknown"
            if word_level:
                correct[qtype].append(int(ans.text == record.answer))
                continue
            assert record.answer is not None  # `labelled` holds only rows with a reference
            correct[qtype].append(int(normalise_answer(ans.text) == normalise_answer(record.answer)))
            ref_sum[qtype].append(scores[i].total)
            ref_mean[qtype].append(scores[i].mean)
        if on_batch:
            on_batch(len(chunk))
    result = _summary(correct)
    result["accuracy_ci"] = accuracy_intervals(correct)
    result["skipped"] = data.skipped
    if not word_level:
        result["reference_logprob"] = _summary(ref_sum)
        result["reference_logprob_mean"] = _summary(ref_mean)
    return result


def _summary(values: Mapping[str, Sequence[float]]) -> dict:
    per_type = {k: sum(v) / len(v) for k, v in sorted(values.items())}
    total = [x for v in values.values() for x in v]
    return {
        "overall": sum(total) / len(total) if total else None,
        "per_type": per_type,
        "n": len(total),
        "n_per_type": {k: len(v) for k, v in sorted(values.items())},
    }


def accuracy_intervals(correct: dict[str, list[int]]) -> dict:
    """95% Wilson intervals of the accuracy overall and per type, from 0/1 outcomes per type."""
    from cliviz.intervals import wilson_interval

    total = [x for v in correct.values() for x in v]
    return {
        "overall": list(wilson_interval(sum(total), len(total))),
        "per_type": {k: list(wilson_interval(sum(v), len(v))) for k, v in sorted(correct.items())},
    }
