"""Interventions on a CLI model's gates and injections, scored teacher-forced in batched forwards.

This is the engine under every causal claim the toolkit makes: the map's causal check that travels
with each `trace` (`cliviz.tracing.causal`), the ablation studies of `cliviz.analyses.ablations`
(effects, faithfulness, reports) and the dashboard's click-to-ablate cell. It acts on the gate
`agf.<j>.gate` and the injection `agf.<j>.injection` of the chosen LLM layers, named by their REAL
indices (`config.injection_layers`, `config.vision_layers`); the kinds of ablation and the token
sets are described in `cliviz.analyses.ablations` and `spec`.

Modules, each importing only the ones before it: `envoy` (the nnsight wrapper, built once per model)
→ `spec` (Ablation, kinds, plans) → `layout` (teacher-forced samples, padded batches) →
`interventions` (the per-row gate rewrite) → `measures` (numbers per row) → `engine` (batched,
prefix-sharing forwards) → `scoring` (what callers use: `score_conditions`, `mean_gates`,
`single_cell`).

The package sits below `cliviz.tracing` and `cliviz.analyses`: it imports neither (checked by
`tests/test_layers.py`).

Example::

    from cliviz.intervene import Ablation, score_conditions
    frame = score_conditions(model, tok, images, questions, None,
                             [None, Ablation("injection_off")])
"""

from cliviz.intervene.engine import CACHE_BUDGET_BYTES, run_conditions
from cliviz.intervene.envoy import envoy
from cliviz.intervene.interventions import apply_ablation, apply_gate_ablation
from cliviz.intervene.scoring import mean_gates, score_conditions, score_with_gate_mass, single_cell
from cliviz.intervene.spec import (
    ALL,
    KINDS,
    REFERENCE,
    TOKEN_SETS,
    Ablation,
    check_conditions,
    grid_conditions,
)

__all__ = [
    "ALL",
    "CACHE_BUDGET_BYTES",
    "KINDS",
    "REFERENCE",
    "TOKEN_SETS",
    "Ablation",
    "apply_ablation",
    "apply_gate_ablation",
    "check_conditions",
    "envoy",
    "grid_conditions",
    "mean_gates",
    "run_conditions",
    "score_conditions",
    "score_with_gate_mass",
    "single_cell",
]
