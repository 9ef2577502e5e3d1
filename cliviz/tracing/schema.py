"""`Trace`: everything recorded about one (image, question) run of a CLI model.

Positions and steps. The model reads `n_tokens` input positions: the prompt (`<bos>`, image
placeholders, question words) and every generated token except the last (which is never fed
back). Generation step `s` is computed at position `answer_positions[s]` (the last prompt position
for step 0) and emits `answer_ids[s]`. So "the gates that produced answer token s" are
`gates[:, answer_positions[s]]` — see `Trace.answer_gates()`.

Shapes (float32): `gates [n_injection_layers, n_tokens, K]` (rows sum to 1; zero injection layers
for the `projector` fusion, which has no gates), `injection_norm [n_injection_layers, n_tokens]`
(L2 norm of the residual update), `answer_logprobs [n_answer]`, `topk_ids/topk_logprobs
[n_answer, k]`. `attributions` holds optional named arrays added by `cliviz attribute`.

Compact traces (`cliviz.tracing.compact`): `gate_positions [n_kept]` (sorted token positions) says
which positions `gates` and `injection_norm` hold when only some were kept — then they are
`[n_injection_layers, n_kept, K]` and `[n_injection_layers, n_kept]`, and `gate_columns(positions)`
maps token positions to their columns. None (the default) means every position is kept.

Schema 3 adds `gate_positions`. Schema 2 adds the causal check of the map to the meta (`injection_off_answer`,
`injection_off_changed`, `injection_off_delta_logprob`; see `cliviz.tracing.causal`): None when not
measured (schema-1 files, `trace_batch` without `causal_check=True`, models without injection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cliviz.token_sets import TOKEN_SETS as TOKEN_SETS  # the selections a trace's views take
from cliviz.tracing.causal import CausalCheck, map_kind_note
from cliviz.tracing.display import trace_heatmap_figure, trace_html

SCHEMA_VERSION = 3
# schema 1 lacks the causal-check columns (read as None), schema 2 lacks gate_positions (every position kept)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
ROLES = ("image", "prompt", "answer")
PYTHON_CHECK_HINT = "trace it with causal_check=True"  # how a missing causal check is recorded, in Python terms
# The per-trace arrays, in the order of `to_dict()` and of the trace file's columns.
ARRAY_FIELDS = (
    "token_ids",
    "token_texts",
    "token_roles",
    "gates",
    "injection_norm",
    "answer_ids",
    "answer_texts",
    "answer_positions",
    "answer_logprobs",
    "topk_ids",
    "topk_texts",
    "topk_logprobs",
)


@dataclass
class TraceMeta:
    question: str
    answer: str
    model: str
    config_hash: str
    fusion: str
    vision_layers: list[int]
    injection_layers: list[int]
    image_sha256: str
    image_width: int
    image_height: int
    device: str
    dtype: str
    created_at: str
    cliviz_version: str
    schema_version: int = SCHEMA_VERSION
    qtype: str | None = None
    reference_answer: str | None = None
    sample_id: str | None = None
    injection_off_answer: str | None = None  # first answer token with the injection off everywhere
    injection_off_changed: bool | None = None  # did it differ from the model's own first answer token?
    injection_off_delta_logprob: float | None = None  # log p_off(own token) - log p(own token), nats


@dataclass
class Trace:
    meta: TraceMeta
    token_ids: np.ndarray  # [n_tokens] int64
    token_texts: list[str]
    token_roles: list[str]  # each in ROLES
    gates: np.ndarray  # [n_injection_layers, n_tokens, K] float32
    injection_norm: np.ndarray  # [n_injection_layers, n_tokens] float32
    answer_ids: np.ndarray  # [n_answer] int64
    answer_texts: list[str]
    answer_positions: np.ndarray  # [n_answer] int64: the position whose output is answer token s
    answer_logprobs: np.ndarray  # [n_answer] float32
    topk_ids: np.ndarray  # [n_answer, k] int64
    topk_texts: list[list[str]]
    topk_logprobs: np.ndarray  # [n_answer, k] float32
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    gate_positions: np.ndarray | None = None  # [n_kept] int64: the positions gates hold; None = all

    def __repr__(self) -> str:
        m = self.meta
        shape = "x".join(str(d) for d in self.gates.shape)
        return (
            f"Trace({m.question!r} -> {m.answer!r}, model={m.model!r}, {self.n_tokens} tokens, "
            f"{len(self.answer_ids)} answer steps, gates {shape})"
        )

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def has_gates(self) -> bool:
        return self.gates.size > 0

    def role_mask(self, role: str) -> np.ndarray:
        return np.array([r == role for r in self.token_roles], dtype=bool)

    @property
    def causal(self):
        """The map's causal check (`cliviz.tracing.causal.CausalCheck`), or None when not measured."""
        m = self.meta
        if m.injection_off_changed is None or m.injection_off_delta_logprob is None:
            return None
        return CausalCheck(
            m.injection_off_answer or "", bool(m.injection_off_changed), float(m.injection_off_delta_logprob)
        )

    def map_notes(self, how_to_check: str = PYTHON_CHECK_HINT) -> list[str]:
        """What to print beside this trace's gate map: the fusion's kind of map and the causal check.
        `how_to_check`: how the reader records a missing check (the Python keyword by default; the
        command line passes its flag, `cliviz.cli.render.CLI_CHECK_HINT`)."""
        notes = [n for n in [map_kind_note(self.meta.fusion, self.meta.injection_layers, self.meta.vision_layers)] if n]
        check = self.causal
        if check is not None:
            notes.append(check.summary(self.answer_texts[0] if len(self.answer_texts) else ""))
        elif self.meta.fusion != "projector":
            notes.append(f"causal check not recorded for this trace ({how_to_check}).")
        return notes

    def heatmap(self, token: int | None = None, role: str | None = None):
        """The gate map as a plotly `Figure`: answer step `token` (0, 1, ...), or a token `role`
        (answer | image | prompt | all); default: the mean over answer steps. See `analyses.heatmaps`."""
        return trace_heatmap_figure(self, token=token, role=role)

    def _repr_html_(self) -> str:
        """Jupyter display: question, answer, token strip, the causal check and the heatmap."""
        return trace_html(self)

    def gate_columns(self, positions: np.ndarray) -> np.ndarray:
        """Columns of `gates` / `injection_norm` that hold token `positions`; CLIVizError when a compact
        trace did not keep some of them (e.g. image positions of an answer-only trace)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.gate_positions is None:
            return positions
        kept = np.asarray(self.gate_positions, dtype=np.int64)
        cols = np.clip(np.searchsorted(kept, positions), 0, max(len(kept) - 1, 0))
        if len(positions) and (len(kept) == 0 or np.any(kept[cols] != positions)):
            from cliviz.errors import CLIVizError

            raise CLIVizError(
                f"this trace kept gates at {len(kept)} of {self.n_tokens} positions only (a compact trace): "
                "the positions asked for were not recorded"
            )
        return cols

    def answer_gates(self) -> np.ndarray:
        """Gates that produced each answer token: `[n_injection_layers, n_answer, K]`."""
        return self.gates[:, self.gate_columns(self.answer_positions)]

    def validate(self) -> None:
        """Check the shape contract; raises ValueError naming the first broken field."""
        n, n_ans = self.n_tokens, len(self.answer_ids)
        if not (len(self.token_texts) == len(self.token_roles) == n):
            raise ValueError("token_ids, token_texts and token_roles differ in length")
        if any(r not in ROLES for r in self.token_roles):
            raise ValueError(f"token roles must be one of {ROLES}")
        kept = n if self.gate_positions is None else len(self.gate_positions)
        if self.gate_positions is not None:
            gp = np.asarray(self.gate_positions)
            if gp.ndim != 1 or gp.dtype.kind not in "iu" or np.any(np.diff(gp) <= 0) or np.any((gp < 0) | (gp >= n)):
                raise ValueError("gate_positions must be increasing token positions")
        if self.gates.ndim != 3 or self.gates.shape[1] != kept:
            raise ValueError(f"gates must be [layers, {kept}, K], got {self.gates.shape}")
        if self.gates.shape[0] != len(self.meta.injection_layers) or self.gates.shape[2] != len(
            self.meta.vision_layers
        ):
            raise ValueError("gates must be [len(injection_layers), n_tokens, len(vision_layers)]")
        if self.injection_norm.shape != self.gates.shape[:2]:
            raise ValueError(f"injection_norm must be {self.gates.shape[:2]}, got {self.injection_norm.shape}")
        for name in ("answer_texts", "answer_positions", "answer_logprobs", "topk_ids", "topk_texts", "topk_logprobs"):
            if len(getattr(self, name)) != n_ans:
                raise ValueError(f"{name} must have one entry per answer token ({n_ans})")
        if n_ans and (self.answer_positions.min() < 0 or self.answer_positions.max() >= n):
            raise ValueError("answer_positions outside the token range")
        for name in ("gates", "injection_norm", "answer_logprobs", "topk_logprobs"):
            values = np.asarray(getattr(self, name))
            if values.dtype.kind not in "fiu" or not np.all(np.isfinite(values)):
                raise ValueError(f"{name} must hold finite numbers")
        self._validate_meta()

    def _validate_meta(self) -> None:
        """Field types of `meta` (a trace can come back from a browser store or a hand-written dict)."""
        m = self.meta
        for name in (
            "question",
            "answer",
            "model",
            "config_hash",
            "fusion",
            "image_sha256",
            "device",
            "dtype",
            "created_at",
            "cliviz_version",
        ):
            if not isinstance(getattr(m, name), str):
                raise ValueError(f"meta.{name} must be a string")
        for name in ("qtype", "reference_answer", "sample_id"):
            if not isinstance(getattr(m, name), (str, type(None))):
                raise ValueError(f"meta.{name} must be a string or null")
        for name in ("vision_layers", "injection_layers"):
            layers = getattr(m, name)
            if not isinstance(layers, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
                raise ValueError(f"meta.{name} must be a list of integers")
        for name in ("image_width", "image_height", "schema_version"):
            if not isinstance(getattr(m, name), int) or isinstance(getattr(m, name), bool):
                raise ValueError(f"meta.{name} must be an integer")
        if not all(isinstance(t, str) for t in [*self.token_texts, *self.answer_texts]):
            raise ValueError("token_texts and answer_texts must hold strings")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not arrays) — what `--json` prints."""
        from dataclasses import asdict

        out: dict[str, Any] = {"meta": asdict(self.meta)}
        for name in ARRAY_FIELDS:
            value = getattr(self, name)
            out[name] = value.tolist() if isinstance(value, np.ndarray) else value
        out["attributions"] = {k: v.tolist() for k, v in self.attributions.items()}
        if self.gate_positions is not None:  # a compact trace read from a file
            out["gate_positions"] = np.asarray(self.gate_positions).tolist()
        return out
