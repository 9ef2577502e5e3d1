"""Compact trace sets: what a set keeps, chosen when it is written and recorded in every part file.

A LLaVA-1.5-7B trace holds ~1.9 MB of float32 gates (31 injection layers x ~600 positions x 25
vision layers), almost all of it at image positions. Two choices shrink it, both lossy and both
off by default:

- ``gates="float16"``: gates stored as half floats (3 significant digits; a gate row still sums to
  1 within 1e-3). Readers get float32 back.
- ``positions``: which token positions keep their gates and injection norms — ``"all"``
  (lossless), ``"answer+prompt"`` (the answer steps and the question's words, no image positions) or
  ``"answer"`` (only the positions whose output is an answer token: what the mean answer-step maps,
  the trajectories and the probes read). Tokens, answers and log-probs are always kept whole; the
  kept positions are the trace's `gate_positions`.

The choice is written into each part file's metadata (``cliviz.compact``) and into the set's
manifest, so every reader knows what a set holds, and appends follow the set's choice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace

GATE_DTYPES = ("float32", "float16")
POSITION_SETS = ("all", "answer+prompt", "answer")


@dataclass(frozen=True)
class Compact:
    """What a trace set keeps; the default keeps everything (lossless)."""

    gates: str = "float32"
    positions: str = "all"

    def __post_init__(self) -> None:
        if self.gates not in GATE_DTYPES:
            raise CLIVizError(f"unknown gate dtype {self.gates!r}; use {' or '.join(GATE_DTYPES)}")
        if self.positions not in POSITION_SETS:
            raise CLIVizError(f"unknown position set {self.positions!r}; use one of {', '.join(POSITION_SETS)}")

    @property
    def lossless(self) -> bool:
        return self == Compact()

    def describe(self) -> str:
        if self.lossless:
            return "lossless (float32 gates at every position)"
        return f"{self.gates} gates at {self.positions} positions"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str | None, where: str) -> Compact:
        """The recorded choice (None: a file written before compaction existed, i.e. lossless)."""
        if raw is None:
            return cls()
        try:
            data = json.loads(raw)
            return cls(**{k: str(data[k]) for k in ("gates", "positions")})
        except (ValueError, TypeError, KeyError):
            raise CLIVizError(f"{where} records an unreadable compaction {raw!r}") from None


def kept_positions(trace: Trace, positions: str) -> np.ndarray | None:
    """Token positions to keep for `positions` (None: all of them)."""
    if positions == "all":
        return None
    keep = set(np.asarray(trace.answer_positions, dtype=np.int64).tolist())
    if positions == "answer+prompt":
        keep |= {i for i, r in enumerate(trace.token_roles) if r == "prompt"}
    return np.array(sorted(keep), dtype=np.int64)


def compact_trace(trace: Trace, compact: Compact) -> Trace:
    """`trace` with only the kept positions' gates and norms (positions already dropped stay dropped)."""
    keep = kept_positions(trace, compact.positions)
    if keep is None:
        return trace
    cols = trace.gate_columns(keep)
    return replace(trace, gates=trace.gates[:, cols], injection_norm=trace.injection_norm[:, cols], gate_positions=keep)
