"""Labelled evaluation sets: `samples.jsonl` rows (image, question, answer, qtype) as written by
`cliviz data`, read whole (they are small, unlike training data, which `cliviz.data.sources`
streams) with bad rows counted, never silently dropped."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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
