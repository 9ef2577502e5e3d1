"""Is there anything to read in this gate map? Untrained gates make every map look like a finding.

A freshly attached (or barely trained) CLI model has `tanh(alpha) ≈ 0` in every injection layer:
the injection `tanh(alpha) W_o sum_k g_k c_k` adds (almost) nothing to the residual stream, so the
gates' softmax still shows a distribution — near-uniform after `cliviz attach`, with a "top" vision
layer — that decides nothing. Every map (terminal, pages, dashboard) shows `untrained_note` above it.

Two checks, the same words: from the model (`max |tanh(alpha)|` below `UNTRAINED_TANH`) and, where
only traces are at hand, from what they recorded (the injection's norm, which carries the
`tanh(alpha)` factor, below `UNTRAINED_NORM` at every layer and token: `untrained_note` for one
trace, `untrained_note_from_norm` for the largest norm of a whole set, `GateSummary.untrained_note`).
Measured at the answer of `color.png`: the bundled cli-attached-tiny reaches 0.06 (tanh α = 0.005);
trained bundled models 12-20 (median), 40-180 (max).
"""

from __future__ import annotations

import numpy as np

UNTRAINED_TANH = 0.01  # max |tanh(alpha)| below this: the injection is all but off
UNTRAINED_NORM = 0.1  # max injection norm in a trace below this: the same, seen from the trace

_WORDS = "these gates are untrained: the injection adds (almost) nothing, so this map shows no routing the model uses"


def untrained_note_from_model(model) -> str | None:
    """The warning for a model whose every injection layer has `|tanh(alpha)| < UNTRAINED_TANH`, else None."""
    import torch

    layers = list(getattr(model, "agf", []) or [])
    if not layers:
        return None
    values = [float(torch.tanh(layer.injection.alpha.detach().float()).abs().max()) for layer in layers]
    top = max(values)
    return f"{_WORDS} (max |tanh α| = {top:.3g})." if top < UNTRAINED_TANH else None


def largest_norm(norms) -> float | None:
    """`max |norm|` over recorded injection norms, or None when there are none or one is not finite
    (nothing to judge from: no warning rather than a wrong one)."""
    values = np.asarray(norms, dtype=float)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    return float(np.abs(values).max())


def untrained_note_from_norm(top: float | None) -> str | None:
    """The warning when the largest injection norm recorded (in one trace or a whole set) stays below
    `UNTRAINED_NORM`, else None. The one rule every trace-based map applies."""
    if top is None or not np.isfinite(top):
        return None
    return f"{_WORDS} (max injection norm {top:.2g}; tanh α ≈ 0)." if top < UNTRAINED_NORM else None


def untrained_note(trace) -> str | None:
    """The warning for a trace whose injection norm stays below `UNTRAINED_NORM` everywhere, else None
    (a model without gates or without a recorded injection gets None)."""
    if not getattr(trace, "has_gates", False):
        return None
    return untrained_note_from_norm(largest_norm(getattr(trace, "injection_norm", np.zeros(0))))
