"""The ablation spec: what to change, in the model's real layer indices, checked when it is made.

An `Ablation` names one intervention (kind, LLM layers, vision layers, token set; the kinds and
token sets are described in the package docstring) and refuses impossible combinations at once. A
`Plan` is that spec mapped onto one model: injection positions `j` instead of real layer indices,
and the gate rewrite as numbers — a `keep` multiplier (knockout, zero), a constant `fill`
(uniform, onehot) or neither (mean and patch fill per sample, injection_off zeroes the injection).
The engine only ever sees plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cliviz.errors import CLIVizError
from cliviz.token_sets import TOKEN_SETS

KINDS = ("knockout", "zero", "uniform", "onehot", "mean", "injection_off", "patch")
REFERENCE = "reference"  # the condition label of the unablated run
ALL = "all"  # the question-type label of rows pooled over every sample


@dataclass
class Ablation:
    """One intervention on the fusion. Layers are the model's REAL indices:
    `llm_layers` from `config.injection_layers` (None = every injection layer) and
    `vision_layers` from `config.vision_layers` (hidden_states indices).

    `tokens`: where to intervene — all | prompt | image | answer (the position(s) predicting the
    answer). `value`: the forced vision layer for ``onehot`` (real index); the donor sample index for
    ``patch`` (default: the next sample). `means` / `per_qtype`: for ``mean`` only (see the package
    docstring). `name`: the condition's label in result frames (default: `label`).
    """

    kind: str
    llm_layers: list[int] | None = None
    vision_layers: list[int] | None = None
    tokens: str = "all"
    value: int | None = None
    name: str | None = None
    means: Any = None  # [L, K] array, or {qtype: [L, K]}; None = computed from the unablated runs
    per_qtype: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CLIVizError(f"unknown ablation kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.tokens not in TOKEN_SETS:
            raise CLIVizError(f"unknown token set {self.tokens!r}; use one of {', '.join(TOKEN_SETS)}")
        self.llm_layers = None if self.llm_layers is None else [int(i) for i in self.llm_layers]
        self.vision_layers = None if self.vision_layers is None else [int(k) for k in self.vision_layers]
        if self.llm_layers is not None and not self.llm_layers:
            raise CLIVizError("llm_layers is empty (use None for every injection layer)")
        if self.vision_layers is not None and not self.vision_layers:
            raise CLIVizError("vision_layers is empty (use None for every vision layer)")
        if self.kind == "knockout" and self.vision_layers is None:
            raise CLIVizError("a knockout needs the vision layer(s) to knock out (vision_layers)")
        if self.kind == "onehot" and self.value is None:
            if self.vision_layers is not None and len(self.vision_layers) == 1:
                self.value = self.vision_layers[0]
            else:
                raise CLIVizError("a onehot ablation needs the vision layer to force (value)")
        if self.kind in ("injection_off", "mean", "patch") and self.vision_layers is not None:
            raise CLIVizError(f"a {self.kind} ablation takes no vision layers (it acts on the whole gate)")

    @property
    def label(self) -> str:
        """`name`, or a readable description: `knockout L2 V3`, `injection_off L1,2,3 @answer`."""
        if self.name:
            return self.name
        parts = [self.kind]
        parts.append("L*" if self.llm_layers is None else "L" + ",".join(map(str, self.llm_layers)))
        if self.vision_layers is not None:
            parts.append("V" + ",".join(map(str, self.vision_layers)))
        if self.kind == "onehot":
            parts.append(f"->V{self.value}")
        if self.kind == "patch":
            parts.append("donor=next" if self.value is None else f"donor={self.value}")
        if self.kind == "mean" and self.per_qtype:
            parts.append("per-qtype")
        if self.tokens != "all":
            parts.append(f"@{self.tokens}")
        return " ".join(parts)


def _position(values: Sequence[int], real: int, what: str) -> int:
    try:
        return list(values).index(int(real))
    except ValueError:
        known = ", ".join(map(str, values)) or "none"
        raise CLIVizError(f"{what} {real} is not in this model ({what}s: {known})") from None


@dataclass
class Plan:
    """An `Ablation` mapped onto one model: positions instead of real indices, numeric fills."""

    ablation: Ablation
    layers: list[int]  # positions j into config.injection_layers
    keep: np.ndarray | None  # [K] multiplier (knockout/zero); None = the gate is replaced outright
    renorm: bool
    fill: np.ndarray | None  # [K] constant replacement (uniform/onehot)
    inj_off: bool

    @property
    def touches_gate(self) -> bool:
        """Every kind but injection_off rewrites the gate."""
        return not self.inj_off


def n_slots(model) -> int:
    """K: the width of the gate (`len(vision_layers)`; 1 for deepstack's ungated injection)."""
    gate = model.agf[0].gate
    return int(gate.n_vision) if hasattr(gate, "n_vision") else int(gate.to_logits.out_features)


def make_plan(ablation: Ablation, model) -> Plan:
    """Map `ablation` onto `model` (CLIVizError for layers the model lacks, or a model without gates)."""
    cfg = model.config
    if len(model.agf) == 0:
        raise CLIVizError(f"this model has no gates or injections (fusion={cfg.fusion}): nothing to ablate")
    inj, vis = list(cfg.injection_layers), list(cfg.vision_layers)
    k = n_slots(model)
    if ablation.llm_layers is None:
        layers = list(range(len(inj)))
    else:
        layers = [_position(inj, i, "LLM layer") for i in ablation.llm_layers]
    chosen = None
    if ablation.vision_layers is not None:
        chosen = [_position(vis, v, "vision layer") for v in ablation.vision_layers]
    if chosen is not None and k != len(vis):  # deepstack: one ungated slot that reads the final vision layer
        chosen = [0]
    keep = fill = None
    renorm = False
    if ablation.kind in ("knockout", "zero"):
        keep = np.ones(k, dtype=np.float32)
        keep[chosen if chosen is not None else slice(None)] = 0.0
        renorm = ablation.kind == "knockout"
    elif ablation.kind == "uniform":
        idx = chosen if chosen is not None else list(range(k))
        fill = np.zeros(k, dtype=np.float32)
        fill[idx] = 1.0 / len(set(idx))
    elif ablation.kind == "onehot":
        fill = np.zeros(k, dtype=np.float32)
        assert ablation.value is not None  # an onehot Ablation is refused without its value
        forced = _position(vis, ablation.value, "vision layer")
        fill[forced if k == len(vis) else 0] = 1.0
    return Plan(ablation, layers, keep, renorm, fill, ablation.kind == "injection_off")


def check_conditions(model, conditions: Sequence[Ablation | None]) -> None:
    """Refuse (CLIVizError) ablations that do not fit this model (layers it lacks, no gates...)."""
    for a in conditions:
        if a is not None:
            make_plan(a, model)


def grid_conditions(model, kind: str = "knockout", tokens: str = "all") -> list[Ablation | None]:
    """The reference plus one single-cell ablation per (injection layer, vision layer)."""
    cfg = model.config
    if len(model.agf) == 0:
        raise CLIVizError(f"this model has no gates (fusion={cfg.fusion}): no knockout grid")
    return [None] + [
        Ablation(kind, [i], [k], tokens=tokens, name=f"{kind} L{i} V{k}")
        for i in cfg.injection_layers
        for k in cfg.vision_layers
    ]
