"""Names and checks of the attribution settings, without torch: a bad `--method` answers at once.

Kept apart from the computation (`attribution_compute`) so that the command line checks its options
before importing torch (seconds), and so that the dashboard's controls name the same choices.
"""

from __future__ import annotations

import numbers

METHODS = ("ig", "gxi")
METHOD_NAMES = {"ig": "integrated gradients", "gxi": "gradient × input"}  # the one name of each, everywhere
METHOD_CODES = {"gxi": 0, "ig": 1}  # as stored in `attribution_settings`
BASELINES = ("uniform", "injection_off")
TARGETS = ("logprob", "logit", "margin")  # stored by their index in `attribution_settings`
TARGET_NAMES = {
    "logprob": "log-prob of the answer token",
    "logit": "logit of the answer token",
    "margin": "margin: answer-token logit minus runner-up logit",
}
# The default target. The log-prob saturates (p ≈ 1 on almost every answer of the bundled models, so
# its gradient vanishes); the logit does not, but it carries a part shared by every token (adding a
# constant to all logits changes it and not the answer). The margin over the runner-up is what
# decides the answer, does not saturate and ignores that shared part.
DEFAULT_TARGET = "margin"
REL_FLOOR = 1e-3  # denominator floor of the relative completeness error, in the target's units
SATURATION_P = 0.99  # above this probability a log-prob target is flat: gradient × input maps are noise
COMPLETENESS_TOL = 0.05  # IG whose sum misses f(x) - f(baseline) by more than this is not an accounting
MAX_STEPS = 4096


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_options(
    method: str, baseline: str, steps: int, internal_batch_size: int, target: str = DEFAULT_TARGET
) -> None:
    """Refuse bad settings with one-line `CLIVizError`s (shared by the API and the command line)."""
    from cliviz.errors import CLIVizError

    if target not in TARGETS:
        raise CLIVizError(f"unknown attribution target {target!r}; use one of {', '.join(TARGETS)}")
    if method not in METHODS:
        raise CLIVizError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    if baseline not in BASELINES:
        raise CLIVizError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise CLIVizError(f"--steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if not _is_int(internal_batch_size) or internal_batch_size < 1:
        raise CLIVizError(f"internal batch size must be a positive integer, got {internal_batch_size!r}")
