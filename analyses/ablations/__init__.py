"""Ablations: change what a CLI model's gates (or injections) do, and measure what the answer loses.

The gates say *where* each LLM layer reads vision from; they do not say whether the model *uses*
what it reads. An ablation answers that causally: run the model again with one part of the fusion
replaced, and compare the answer's log-probability, its argmax and its accuracy with the unablated
run. Ablations act on the gate `agf.<j>.gate` (a softmax over the K selected vision layers) and the
injection `agf.<j>.injection` of the chosen LLM layers, named by their REAL indices
(`config.injection_layers`, `config.vision_layers`).

Kinds of ablation (`Ablation.kind`), each applied at the chosen LLM layers and token positions:

- ``knockout``: set the gates of the chosen vision layers to 0 and renormalise the rest, so the
  layer reads only from the other vision layers with the same total weight (`g'_k = g_k 1[k not in
  S] / sum_{k' not in S} g_k'`). It asks "what if this LLM layer could not see vision layer k?".
  If every bit of weight was on the knocked-out layers (a static one-hot gate), nothing is left to
  renormalise and the gate becomes 0 (nothing is injected).
- ``zero``: set those gates to 0 *without* renormalising (all of them when no vision layer is
  given): removes the contribution and shrinks the injection.
- ``uniform``: replace the gate by the uniform distribution over the chosen vision layers (all K by
  default): keeps the reads, removes the choice.
- ``onehot``: force the gate onto one vision layer (`value`, a real hidden_states index): the static
  one-to-one wiring of the `shallow` baseline, at that layer.
- ``mean``: replace every token's gate by the data-set mean gate of that LLM layer (token-pooled
  over the same token set, optionally per question type). Dynamic, token-specific gating matters
  exactly as much as this ablation hurts. Means are given (`Ablation.means`, `[L, K]` or
  `{qtype: [L, K]}`, e.g. from `mean_gates` on a held-out set) or computed from the unablated runs
  of the samples being scored.
- ``injection_off``: zero the injection module's output: that LLM layer receives nothing extra
  (with every layer off, a CLI model is its base LLaVA model).
- ``patch``: put in the gates of a donor sample's unablated run (`value` = donor index, default the
  next sample), aligned by role: image tokens by position, question tokens from the end of the
  prompt (the token that predicts the answer meets its counterpart), answer tokens by step.
  Positions without a counterpart keep their own gates.

Token sets (`Ablation.tokens`): ``all`` (every real token), ``prompt`` (`<bos>` and question
words), ``image`` (image placeholders), ``answer`` (the position(s) whose output predicts the
answer: the last prompt token, then each fed answer token but the last).

One entry point for a whole study: `run_study(model, tok, samples, conditions)` returns an
`AblationReport` (scores, effects, per-type flips, largest effects, `[L, K]` grid matrices and
heatmaps, renders itself, atomic writes) —
what `cliviz ablate` runs (`report`). Presets are `functools.partial`s of it: `run_grid` (every
knockout cell plus each LLM layer's injection off, with faithfulness), `run_injection_off`.

What comes back: `score_conditions` gives teacher-forced scores per (sample, condition) (see
`cliviz.intervene.measures`); `effects_frame` / `knockout_grid` reduce them to tidy effects with bootstrap CIs
(`effects`); `faithfulness` asks whether the cells the gates weigh most are the ones whose removal
hurts most. All conditions of a study run together in a few batched forwards that share the
unablated prefix (`cliviz.intervene.engine`), equal to the one-forward-per-condition loop the tests keep as their
oracle (`tests/oracles.py`).

The engine lives in the library, `cliviz.intervene` (`spec`, `layout`, `interventions`, `engine`,
`measures`, `scoring`); this package keeps what is built on it: `effects` and `faithfulness` (what
users call) → `report` (one study, one call). Its names are re-exported here.

Example::

    from cliviz.analyses.ablations import Ablation, StudySamples, run_grid, run_study
    samples = StudySamples(images, questions, answers, qtypes)
    report = run_study(model, tok, samples, [None, Ablation("knockout", llm_layers=[2], vision_layers=[3])])
    report.per_type()                     # flips and Δ log-prob per question type
    grid = run_grid(model, tok, samples)  # + faithfulness (Holm-corrected) and off_explains()
"""

from cliviz.analyses.ablations.effects import (
    GRID_METRICS,
    METRIC_LABELS,
    effects_frame,
    grid_matrix,
    knockout_grid,
    metric_label,
)
from cliviz.analyses.ablations.faithfulness import faithfulness
from cliviz.analyses.ablations.report import (
    KNOCKOUT_NOTE,
    MIN_CI_SAMPLES,
    AblationReport,
    StudySamples,
    grid_figure,
    grid_study_conditions,
    injection_off_conditions,
    report_paths,
    run_grid,
    run_injection_off,
    run_study,
    study_conditions,
)
from cliviz.intervene.engine import CACHE_BUDGET_BYTES
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
    "KINDS",
    "TOKEN_SETS",
    "GRID_METRICS",
    "REFERENCE",
    "Ablation",
    "apply_gate_ablation",
    "check_conditions",
    "score_conditions",
    "score_with_gate_mass",
    "effects_frame",
    "grid_conditions",
    "knockout_grid",
    "grid_matrix",
    "single_cell",
    "faithfulness",
    "mean_gates",
    "ALL",
    "CACHE_BUDGET_BYTES",
    "apply_ablation",
    "AblationReport",
    "MIN_CI_SAMPLES",
    "run_study",
    "run_grid",
    "run_injection_off",
    "StudySamples",
    "KNOCKOUT_NOTE",
    "grid_study_conditions",
    "injection_off_conditions",
    "study_conditions",
    "report_paths",
    "grid_figure",
    "METRIC_LABELS",
    "metric_label",
]
