"""Labelled evaluation sets: `samples.jsonl` rows (image, question, answer, qtype) as written by
`cliviz data`, read whole (they are small, unlike training data, which `cliviz.data.sources`
streams) with bad rows counted, never silently dropped."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cliviz.data.conversations import BadRow
from cliviz.errors import CLIVizError


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


# How the bounded row parser's reasons (`cliviz.data.rows`) read in eval/compare/sweep summaries.
LABELS = {"malformed_json": "malformed line", "malformed_row": "malformed line", "missing_image": "missing image"}


def _record(line: str, number: int, folder: Path, allow_absolute: bool) -> Record:
    """One checked row (`cliviz.data.rows`: depth, field types, text, image name inside `folder`)."""
    from cliviz.data.rows import image_path, json_row, text

    row = json_row(line)
    if not isinstance(row, dict):
        raise BadRow("malformed_row", "not an object")
    question = text(row.get("question"), "question")
    answer, qtype = text(row.get("answer"), "answer", required=False), text(row.get("qtype"), "qtype", required=False)
    image = image_path(row.get("image"), folder, allow_absolute)
    try:
        exists = image.is_file()
    except OSError as err:
        raise BadRow("bad_image_name", err.strerror or str(err)) from None
    if not exists:
        raise BadRow("missing_image", str(image))
    return Record(image, question, answer, qtype, number)


def read_jsonl(data: str | os.PathLike, allow_absolute: bool = False) -> DataSet:
    """Read `DIR/samples.jsonl` or a JSONL file; image paths are relative to the file's folder and
    must stay inside it (`allow_absolute` admits absolute paths).

    Bad rows — malformed, too deep, a field of the wrong type, text no tokenizer takes, an image name
    too long or outside the folder, a missing image — are skipped and counted (never silently).
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
            record = _record(line, number, path.parent, allow_absolute)
        except BadRow as bad:
            skipped[LABELS.get(bad.reason, bad.reason.replace("_", " "))] += 1
            continue
        records.append(record)
    if not records:
        raise CLIVizError(f"no usable samples in {path}" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return DataSet(records, dict(skipped))
