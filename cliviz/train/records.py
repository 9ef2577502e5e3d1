"""What a run leaves beside its weights: the JSONL training log, `training_summary.json`, and a
model card (README.md) saying what was trained on what, for how long, and how many parameters.

The log is a record, not state: a crash can leave a half-written last line, which readers skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

LOG_FILE = "training_log.jsonl"
SUMMARY_FILE = "training_summary.json"
CARD_FILE = "README.md"


class TrainingLog:
    """Appends one JSON object per logged step; a resumed run's log first repeats the run so far."""

    def __init__(self, out: Path, earlier: list[dict] | None = None, enabled: bool = True) -> None:
        self._file: IO[str] | None = None
        if enabled:
            try:
                self._file = open(out / LOG_FILE, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
                self._file.writelines(json.dumps(row) + "\n" for row in earlier or [])
                self._file.flush()
            except OSError as err:
                from cliviz.atomic import write_error
                from cliviz.errors import CLIVizError

                raise CLIVizError(f"cannot write the training log in {out}: {write_error(err)}") from None

    def write(self, row: dict) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
            except OSError as err:
                from cliviz.atomic import write_error
                from cliviz.errors import CLIVizError

                raise CLIVizError(f"cannot write the training log {self._file.name}: {write_error(err)}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def earlier_log_rows(run: Path, up_to_step: int) -> list[dict]:
    """The log rows of an interrupted run up to the step a continuation starts from."""
    path = run / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= up_to_step:
            rows.append(row)
    return rows


def recorded_seed(model_dir: str | Path) -> int | None:
    """The seed `train` recorded in a model folder's training_summary.json (None if absent), so
    `compare` can tell two checkpoints of one run from two seeds."""
    try:
        seed = json.loads((Path(model_dir) / SUMMARY_FILE).read_text())["settings"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) else None


def write_summary(out: Path, summary: dict) -> None:
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def write_model_card(out: Path, summary: dict, into: Path | None = None) -> None:
    """A short README.md for a model trained on a checkpoint: what it is and how it was made.

    Runs from scratch (the bundled models) keep their hand-written cards; this one is written only
    when `out` holds none or one this function wrote. `into`: the folder to write it to (a staging
    folder that is renamed into `out` afterwards), default `out`.
    """
    existing = out / CARD_FILE
    marker = "<!-- written by cliviz train -->"
    if existing.exists() and marker not in existing.read_text(encoding="utf-8", errors="replace"):
        return
    path = (into or out) / CARD_FILE
    s, data = summary["settings"], summary.get("data", {})
    skipped = ", ".join(f"{k} {v}" for k, v in data.get("skipped", {}).items()) or "none"
    lines = [
        marker,
        f"# {out.name}",
        "",
        f"A CLI model trained by `cliviz train` ({summary.get('trained', 'cli')} parameters trained).",
        "",
        "| | |",
        "|---|---|",
        f"| started from | `{s.get('init_from') or 'scratch (tiny ShapesVQA architecture)'}` |",
        f"| data | `{s.get('data') or 'generated ShapesVQA scenes'}`"
        + (f" (images: `{s['image_folder']}`)" if s.get("image_folder") else "")
        + " |",
        f"| samples seen | {data.get('samples', 'n/a')} in {data.get('batches', 'n/a')} batches, "
        f"{data.get('label_tokens', 'n/a')} answer tokens; skipped rows: {skipped} |",
        f"| steps | {summary['steps']} of batch {s['batch_size']} x {summary.get('world_size', 1)} process(es) |",
        f"| trainable parameters | {summary['trainable_parameters']:,} of {summary['parameters']:,} |",
        f"| learning rates | {s['lr']} (alpha {s['alpha_lr']}), warmup {s['warmup']}, cosine |",
        f"| wall time | {summary.get('total_seconds', summary['seconds']):.0f} s on {summary.get('device', 'cpu')} |",
        f"| final training loss | {summary.get('final_train_loss')} |",
        "",
        "Base weights are frozen unless `train` says otherwise; the log is `training_log.jsonl`, the full "
        "record `training_summary.json`.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
