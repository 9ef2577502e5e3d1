"""Accuracy of a model on a ShapesVQA-style JSONL set, overall and per question type."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cliviz.errors import CLIVizError
from cliviz.inference import answer
from cliviz.inputs import load_image


@dataclass
class Record:
    image_path: Path
    question: str
    answer: str | None
    qtype: str | None
    line: int


@dataclass
class DataSet:
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, reported to the user


def read_jsonl(data: str | Path) -> DataSet:
    """Read `DIR/samples.jsonl` or a JSONL file; image paths are relative to the file's folder.

    Malformed lines and rows whose image is missing are skipped and counted (never silently).
    """
    path = Path(data)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.is_file():
        raise CLIVizError(f"data not found: {path} (give a folder holding samples.jsonl, or a .jsonl file)")
    records: list[Record] = []
    skipped: dict[str, int] = defaultdict(int)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CLIVizError(f"data file {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = row["image"], row["question"]
            if not isinstance(image, str) or not isinstance(question, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped["malformed line"] += 1
            continue
        image_path = (path.parent / image) if not Path(image).is_absolute() else Path(image)
        if not image_path.is_file():
            skipped["missing image"] += 1
            continue
        records.append(Record(image_path, question, row.get("answer"), row.get("qtype"), number))
    if not records:
        raise CLIVizError(f"no usable samples in {path}" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return DataSet(records, dict(skipped))


def normalise_answer(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: how free-text answers are matched."""
    return " ".join(text.lower().strip().strip(".!?,;:\"'").split())


def evaluate(
    model, tokenizer, data: DataSet, batch_size: int = 64, on_batch: Callable[[int], None] | None = None
) -> dict:
    """Greedy answers vs references: `{"overall", "per_type", "n", "skipped"}`.

    Bundled word-level models answer one word: exact match. Real checkpoints answer in free text:
    the whole generated answer must match the reference after `normalise_answer`, and the reference
    itself is scored teacher-forced (`score_references`): `reference_logprob` (sum over its tokens)
    and `reference_logprob_mean` (per token), averaged over samples, overall and per type.
    """
    from cliviz.inference import score_references
    from cliviz.inputs import is_word_level

    word_level = is_word_level(tokenizer)
    correct: dict[str, list[int]] = defaultdict(list)
    ref_sum: dict[str, list[float]] = defaultdict(list)
    ref_mean: dict[str, list[float]] = defaultdict(list)
    labelled = [r for r in data.records if r.answer is not None]
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        images = [load_image(r.image_path) for r in chunk]
        questions = [r.question for r in chunk]
        answers = answer(model, tokenizer, images, questions, max_new_tokens=2 if word_level else None)
        scores = (
            None if word_level else score_references(model, tokenizer, images, questions, [r.answer for r in chunk])
        )
        for i, (record, ans) in enumerate(zip(chunk, answers)):
            qtype = record.qtype or "unknown"
            if word_level:
                correct[qtype].append(int(ans.text == record.answer))
                continue
            correct[qtype].append(int(normalise_answer(ans.text) == normalise_answer(record.answer)))
            ref_sum[qtype].append(scores[i].total)
            ref_mean[qtype].append(scores[i].mean)
        if on_batch:
            on_batch(len(chunk))
    result = _summary(correct)
    result["skipped"] = data.skipped
    if not word_level:
        result["reference_logprob"] = _summary(ref_sum)
        result["reference_logprob_mean"] = _summary(ref_mean)
    return result


def _summary(values: dict[str, list[float]]) -> dict:
    per_type = {k: sum(v) / len(v) for k, v in sorted(values.items())}
    total = [x for v in values.values() for x in v]
    return {
        "overall": sum(total) / len(total) if total else None,
        "per_type": per_type,
        "n": len(total),
        "n_per_type": {k: len(v) for k, v in sorted(values.items())},
    }
