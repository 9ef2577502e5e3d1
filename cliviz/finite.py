"""Refuse NaN / Inf where answers and traces are made: a broken model must not answer with `p=nan`.

Non-finite weights are caught when a model loads (`cliviz.model.weights.check_finite_parameters`); a
finite model can still overflow on some input (half precision, huge activations), so the scores and
gates of every run are checked too, and the run is refused with one line instead of an empty answer.
"""

from __future__ import annotations

import torch

from cliviz.errors import CLIVizError


def require_finite(values: torch.Tensor, what: str, model=None) -> None:
    """CLIVizError when `values` holds NaN or Inf; `what` says which numbers (e.g. "answer scores")."""
    if values.numel() and not bool(torch.isfinite(values).all()):
        name = str(getattr(model, "name_or_path", "") or "this model")
        raise CLIVizError(
            f"{name} produced NaN or infinite {what} for this input; its weights or config are "
            "broken (no answer is given)"
        )
