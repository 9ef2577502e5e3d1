"""The server side of the dashboard: one model and one trace set, loaded once, read-only.

`Backend` is built by `create_app` and captured by the callbacks (no module globals). It holds
nothing that belongs to a user: every request brings its state from the browser stores (see
`cliviz.app.state`). The model is shared by every request; a lock serialises the runs that hook
into it (nnsight tracing, ablations, gradient attributions), because hooks live on the modules.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from cliviz.errors import CLIVizError


@dataclass(frozen=True)
class Example:
    """A bundled example image with its question (from `assets/examples/samples.jsonl`)."""

    name: str
    question: str
    qtype: str | None
    answer: str | None
    data: bytes


def examples_dir() -> Path:
    return Path(str(resources.files("cliviz.assets"))) / "examples"


def load_examples(folder: Path | None = None) -> dict[str, Example]:
    """Name (file stem) -> Example, in file order; a missing or broken list gives none."""
    folder = folder or examples_dir()
    out: dict[str, Example] = {}
    listing = folder / "samples.jsonl"
    if not listing.is_file():
        return out
    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path = folder / Path(rec["image"]).name  # names only: stay inside the examples folder
            out[path.stem] = Example(path.stem, rec["question"], rec.get("qtype"), rec.get("answer"), path.read_bytes())
        except (json.JSONDecodeError, KeyError, OSError):
            continue
    return out


@dataclass
class Backend:
    model: Any
    tokenizer: Any
    traces: Any = None  # TraceSet or None
    examples: dict[str, Example] = field(default_factory=dict)
    model_label: str = ""
    traces_label: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        # derived, read-only views of the trace set, one per selection (shared by every user)
        self.dataset_view = lru_cache(maxsize=8)(self._dataset_view)

    # ------------------------------------------------------------------------ model runs
    def request(self, image: Any, question: Any):
        """The checked (image, question) with its warnings: the path the API and the commands take
        (`cliviz.arguments.check_request`); `CLIVizError` with one line for bad input."""
        from cliviz.arguments import check_request

        return check_request(self.model, self.tokenizer, image, question)

    def ask(self, image: Image.Image, question: str):
        """Answer and record the gates: a `Trace`."""
        from cliviz.tracing import trace

        checked = self.request(image, question)
        with self.lock:
            return trace(self.model, self.tokenizer, checked.image, checked.question)  # the model's default length

    def ablate(
        self, image: Image.Image, question: str, llm_layer: int, vision_layer: int, kind: str = "knockout"
    ) -> dict:
        """One gate-cell intervention and the re-run answer (`cliviz.analyses.ablations.single_cell`)."""
        from cliviz.analyses.ablations import single_cell

        checked = self.request(image, question)
        with self.lock:
            return single_cell(
                self.model, self.tokenizer, checked.image, checked.question, llm_layer, vision_layer, kind=kind
            )

    def attribute(self, image: Image.Image, question: str, method: str = "gxi", target: str = "logprob"):
        """Attribution of each answer token (`cliviz.analyses.attributions.attribute`)."""
        from cliviz.analyses.attributions import attribute

        checked = self.request(image, question)
        with self.lock:
            return attribute(self.model, self.tokenizer, checked.image, checked.question, method=method, target=target)

    # ------------------------------------------------------------------------ trace set
    def _dataset_view(self, select: str):
        from cliviz.analyses.heatmaps import gate_rows

        if self.traces is None:
            raise CLIVizError("no trace set loaded: start with `cliviz dash --traces FILE.parquet`")
        return gate_rows(self.traces, select)


def load_backend(
    model_dir: str | Path | None = None,
    traces_path: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> Backend:
    """Read the trace set (cheap, checked first) and load the model: CLIVizError on bad input."""
    from cliviz.model.loading import load_model
    from cliviz.tracing.traceset import TraceSet

    traces = TraceSet.read(traces_path) if traces_path is not None else None
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    label = Path(str(getattr(model, "name_or_path", "") or "model")).name
    return Backend(
        model=model,
        tokenizer=tokenizer,
        traces=traces,
        examples=load_examples(),
        model_label=f"{label} ({model.config.fusion}, {model.device})",
        traces_label=f"{Path(traces_path).name} ({len(traces)} traces)" if traces is not None else "",
    )
