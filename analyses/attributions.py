"""Token-level attributions: which gate cells, image patches and prompt tokens made each answer token.

**The question.** For every answer token s a target `f_s` is computed teacher-forced on the model's
own greedy answer (or on an answer you give); attributions split `f_s` over three kinds of input.
Three targets (`target=`):

- `margin` (default): the answer token's logit minus the logit of its runner-up, the best other
  token at the real input (never a suppressed token such as padding); the runner-up is kept fixed
  along the integration path so that `f_s` is smooth. "How much more does the model prefer its
  answer": it decides the argmax, does not saturate, and ignores the part of the logits shared by
  every token (why it is the default rather than `logit`);
- `logit`: the answer token's pre-softmax logit (does not saturate);
- `logprob`: `f_s = log p(answer_s | image, prompt, answer_<s)`. When the model is sure (p close to
  1, most answers of the bundled models) the log-prob is flat — `log p ≈ -(1 - p)` — so its gradient
  at the real input is tiny (1e-7 and below): gradient × input maps are numerical noise there.
  Integrated gradients integrate along a path from a distant baseline where the log-prob is not flat,
  so a *complete* IG (its sum equals f(x) - f(baseline)) stays a valid accounting. `warnings()`
  therefore follows the method, per answer token: a saturated token (p > `SATURATION_P`, 0.99)
  flags its gradient × input maps (patches, prompt tokens, gxi gate cells); IG gate cells are
  flagged only when completeness fails (error > `COMPLETENESS_TOL`, 5%) or f(x) - f(baseline) is
  below `REL_FLOOR` (nothing to split).

1. **Gate cells** (LLM layer i, vision layer k). The gate outputs of all injection layers,
   `G [L, T, K]` (every token position), are treated as *the input*: forward hooks on the gate
   modules (`agf.<j>.gate`, the one hook point of cliviz) replace the gates by a tensor we
   control, so `f_s(G)` is the model with the gate network cut out and G set by hand. At the real
   gates `f_s(G_actual)` is exactly the model's log-prob. Two methods:
   - `gxi`, gradient x input: `dF/dG * G` at G_actual;
   - `ig`, integrated gradients (Captum's `IntegratedGradients`, Gauss-Legendre rule) from a
     baseline G' — `uniform` (every gate 1/K: "no preference") or `injection_off` (G' = 0: the
     injection is `tanh(alpha) W_o sum_k g_k c_k`, so zero gates inject nothing) —
     `IG = (G - G') * integral_0^1 dF/dG(G' + a (G - G')) da`. Interpolation steps are stacked in
     the batch dimension, at most `internal_batch_size` per forward.
   Both are summed over token positions: `gate_cells [n_answer, L, K]`; the per-position totals
   (summed over L and K) are kept as `gate_token_scores [n_answer, n_tokens]`.

   **Completeness** (the property that makes IG an accounting, not a picture): the IG attributions
   of one answer token sum to `f_s(G_actual) - f_s(G')`, up to the error of the integration rule.
   `completeness_error[s] = |sum IG_s - (f_s(G) - f_s(G'))| / max(|f_s(G) - f_s(G')|, REL_FLOOR)`,
   `REL_FLOOR = 1e-3` (in the target's units). When `|f(G) - f(G')|` is below the floor the ratio is
   divided by the floor and only bounds the absolute error: the total being split is itself
   negligible, and `completeness_lines()` says so instead of printing a reassuring percentage. It
   is reported for `ig` (NaN for `gxi`, which has no such property). Note that with the `uniform`
   baseline a vision layer whose gate is zero still gets credit (moving its gate from 1/K to 0
   changed the output); with `injection_off` and with `gxi` it gets exactly zero.

2. **Image patches** (attention-free): gradient x input on the AMP memory `Vhat [K, N, D]` — the
   projected vision layers that every injection layer reads — summed over D: a map per vision
   layer `patches [n_answer, K, N]`, combined over layers by summing (`combined`, `[n_answer, N]`),
   reshaped to the patch grid (`patch_grid`, 8 x 8 for the bundled model). This pass runs the
   real model (gates live), so it includes effects through the gates. The LLaVA path (projected
   final-layer features at the image-token positions of the prompt) is kept apart as
   `image_token_scores [n_answer, n_image_tokens]` (gradient x input on those embeddings).
   `fusion="deepstack"` has no AMP memory: its `patches` are NaN.

3. **Prompt tokens**: gradient x input on the input embeddings of every non-image position
   (`<bos>`, the question words and the answer tokens fed back), summed over the embedding
   dimension: `prompt_scores [n_answer, n_prompt_tokens]`, with `prompt_tokens` (texts) and
   `prompt_positions`. A position after the target (a later answer token) scores exactly 0.

Patches and prompt tokens use gradient x input for both methods; `method` picks the gate-cell
method. Names, the same in the command line, the README, the dashboard and `description()`:
`ig` = "integrated gradients", `gxi` = "gradient × input". Colour scales are symmetric around 0
with their absolute range written in the colour-bar title (`±2.3e-07`), so a map of noise never
looks like a strong signal without saying how small it is. A `projector` model has no gates and no
injection: `attribute` refuses it with a `CLIVizError`.

**Stored in the trace file** (`AttributionResult.to_trace()` -> `Trace.attributions`, float32):
`gate_cells [n_answer, L, K]`, `patches [n_answer, K, N]`, `prompt_scores [n_answer, P]`,
`completeness_error [n_answer]`, `image_token_scores [n_answer, n_image_tokens]`,
`gate_token_scores [n_answer, n_tokens]`, `target_value [n_answer]` (f at the real gates),
`baseline_value [n_answer]` (f at the baseline gates), `runner_up_ids [n_answer]` (-1 unless
`target="margin"`), and `attribution_settings = [method (0 gxi, 1 ig), steps, baseline (0 uniform,
1 injection_off), grid rows, grid cols, target (0 logprob, 1 logit, 2 margin)]`.
`AttributionResult.from_trace(trace)` rebuilds the result from them (older files, written before the
targets, hold `target_logprob` / `baseline_logprob` and five settings: read as `target="logprob"`).

Modules: `attribution_settings` (names, defaults and option checks, no torch), `attribution_compute`
(hooks, IG, `attribute`), `attribution_result` (`AttributionResult`: words, warnings, storage, frames)
and `attribution_plots` (figures and the HTML page). This module gathers their public names.

Example::

    from cliviz import attribute, load_image, load_model
    model, tok = load_model()
    image = load_image("assets/examples/glyph.png")
    r = attribute(model, tok, image, "what digit is in the corner ?", method="ig", steps=32)
    r.gate_cells[0]            # [L, K]: credit of each (LLM layer, vision layer) for answer token 0
    r.completeness_lines()     # sum of attributions vs f(x) - f(baseline), per answer token
    assert r.combined_grid(0).shape == (8, 8)   # patch map of answer token 0
"""

from __future__ import annotations

from cliviz.analyses.attribution_compute import (
    attribute,
    baseline_gates,
    integrated_gradients,
    runner_up_ids,
    target_values,
)
from cliviz.analyses.attribution_plots import (
    cell_heatmap_figure,
    overlay_colorscale,
    patch_overlay_figure,
    scale_title,
    token_strip_figure,
    write_attribution_html,
)
from cliviz.analyses.attribution_result import ARRAY_NAMES, FRAME_COLUMNS, AttributionResult
from cliviz.analyses.attribution_settings import (
    BASELINES,
    COMPLETENESS_TOL,
    DEFAULT_TARGET,
    MAX_STEPS,
    METHOD_NAMES,
    METHODS,
    REL_FLOOR,
    SATURATION_P,
    TARGET_NAMES,
    TARGETS,
    check_options,
)

__all__ = [
    "ARRAY_NAMES",
    "BASELINES",
    "COMPLETENESS_TOL",
    "DEFAULT_TARGET",
    "FRAME_COLUMNS",
    "MAX_STEPS",
    "METHODS",
    "METHOD_NAMES",
    "REL_FLOOR",
    "SATURATION_P",
    "TARGETS",
    "TARGET_NAMES",
    "AttributionResult",
    "attribute",
    "baseline_gates",
    "cell_heatmap_figure",
    "check_options",
    "integrated_gradients",
    "overlay_colorscale",
    "patch_overlay_figure",
    "runner_up_ids",
    "scale_title",
    "target_values",
    "token_strip_figure",
    "write_attribution_html",
]
