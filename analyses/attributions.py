"""Token-level attributions: which gate cells, image patches and prompt tokens made each answer token.

**The question.** For every answer token s a target `f_s` is computed teacher-forced on the model's
own greedy answer (or on an answer you give); attributions split `f_s` over three kinds of input.
Three targets (`target=`):

- `logprob` (default): `f_s = log p(answer_s | image, prompt, answer_<s)`. When the model is sure
  (p close to 1) the log-prob is flat — `log p ≈ -(1 - p)` — so every gradient, and every map, is
  tiny (1e-7 and below on the bundled model): numerical noise, not signal. `warnings()` says so for
  any answer token with p > `SATURATION_P` (0.99) and suggests the other two targets;
- `logit`: the answer token's pre-softmax logit (does not saturate);
- `margin`: the answer token's logit minus the logit of its runner-up, the best other token at the
  real input (never a suppressed token such as padding); the runner-up is kept fixed along the
  integration path so that `f_s` is smooth. "How much more does the model prefer its answer".

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

Example::

    from cliviz import attribute, load_image, load_model
    model, tok = load_model()
    image = load_image("assets/examples/glyph.png")
    r = attribute(model, tok, image, "what digit is in the corner ?", method="ig", steps=32, target="margin")
    r.gate_cells[0]            # [L, K]: credit of each (LLM layer, vision layer) for answer token 0
    r.completeness_lines()     # sum of attributions vs f(x) - f(baseline), per answer token
    assert r.combined_grid(0).shape == (8, 8)   # patch map of answer token 0
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import html as html_lib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace

METHODS = ("ig", "gxi")
METHOD_NAMES = {"ig": "integrated gradients", "gxi": "gradient × input"}  # the one name of each, everywhere
_METHOD_CODES = {"gxi": 0, "ig": 1}  # as stored in `attribution_settings`
BASELINES = ("uniform", "injection_off")
TARGETS = ("logprob", "logit", "margin")  # stored by their index in `attribution_settings`
TARGET_NAMES = {
    "logprob": "log-prob of the answer token",
    "logit": "logit of the answer token",
    "margin": "margin: answer-token logit minus runner-up logit",
}
ARRAY_NAMES = (
    "gate_cells",
    "patches",
    "prompt_scores",
    "completeness_error",
    "image_token_scores",
    "gate_token_scores",
    "target_value",
    "baseline_value",
    "runner_up_ids",
    "attribution_settings",
)
_OLD_NAMES = {"target_value": "target_logprob", "baseline_value": "baseline_logprob"}  # files before targets
REL_FLOOR = 1e-3  # denominator floor of the relative completeness error, in the target's units
SATURATION_P = 0.99  # above this probability a log-prob target is flat: its attributions are noise
MAX_STEPS = 4096
# The columns of `Attribution.to_frame()`, in order.
FRAME_COLUMNS = (
    "step",
    "answer_token",
    "kind",
    "llm_layer",
    "vision_layer",
    "patch",
    "patch_row",
    "patch_col",
    "position",
    "token",
    "value",
)

# ===================================================================================== hooks
# Hooks live only for one `attribute` call and act only when the ContextVar holds *their* state,
# so other threads using the same model (the dashboard) run it untouched meanwhile.


@dataclass(eq=False)
class _HookState:
    mode: str = "off"  # off | record | run
    gates: torch.Tensor | None = None  # run: [B, L, T, K] replaces every gate output
    embeds: torch.Tensor | None = None  # run: [B, T, D] replaces the language model's inputs_embeds
    rec_gates: list = field(default_factory=list)
    rec_norms: list = field(default_factory=list)
    rec_embeds: torch.Tensor | None = None


_ACTIVE: contextvars.ContextVar[_HookState | None] = contextvars.ContextVar("cliviz_attribution", default=None)


@contextlib.contextmanager
def _hooks(model):
    state = _HookState()

    def gate_hook(j: int):
        def hook(module, args, out):
            if _ACTIVE.get() is not state:
                return None
            if state.mode == "record":
                state.rec_gates.append(out.detach().float())
            elif state.gates is not None:
                return state.gates[:, j].to(out.dtype)  # [B, T, K]
            return None

        return hook

    def injection_hook(module, args, out):
        if _ACTIVE.get() is state and state.mode == "record":
            state.rec_norms.append(out.detach().float().norm(dim=-1))  # [B, T]

    def embeds_hook(module, args, kwargs):
        if _ACTIVE.get() is not state:
            return None
        if state.mode == "record":
            state.rec_embeds = kwargs["inputs_embeds"].detach()
        elif state.embeds is not None:
            return args, {**kwargs, "inputs_embeds": state.embeds}
        return None

    handles = []
    try:
        for j, layer in enumerate(model.agf):
            handles.append(layer.gate.register_forward_hook(gate_hook(j)))
            handles.append(layer.injection.register_forward_hook(injection_hook))
        handles.append(model.base.model.language_model.register_forward_pre_hook(embeds_hook, with_kwargs=True))
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)
    finally:
        for h in handles:
            h.remove()


class _Runner:
    """The model as functions of (embeddings, AMP memory, gates) for one teacher-forced sequence.

    `record(ids)` runs the real model once and keeps the merged input embeddings (image features
    already at the image tokens), the AMP memory, the gates and the injection norms; later calls
    reuse them, so the vision tower runs once per attribution (except `deepstack`, which needs the
    pixel path for its image-token injection and gets the embeddings swapped in by a hook).
    """

    def __init__(
        self,
        model,
        state: _HookState,
        images: dict[str, torch.Tensor],
        answer_positions,
        answer_ids,
        target: str = "logprob",
    ):
        self.model, self.state, self.images, self.target = model, state, images, target  # pixel_values (+ image_sizes)
        dev = model.device
        self.positions = torch.as_tensor(np.asarray(answer_positions), dtype=torch.long, device=dev)  # [n]
        self.targets = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long, device=dev)  # [n]
        self.runner_up: torch.Tensor | None = None  # [n] for target="margin", set from the real logits
        self.ids = self.embeds = self.memory = self.memory_mask = None

    def record(self, ids: torch.Tensor):
        """One real forward over `ids [1, T]`: returns (gates [L,T,K], norms [L,T], logits at answer positions)."""
        st = self.state
        st.mode, st.rec_gates, st.rec_norms = "record", [], []
        with torch.no_grad():
            out = self.model(input_ids=ids, **self.images, attention_mask=torch.ones_like(ids), use_cache=False)
        st.mode = "run"
        self.ids, self.embeds, self.memory = ids, st.rec_embeds, out.vision_memory  # [1,T,D], [1,K,N,D]
        self.memory_mask = out.vision_memory_mask  # [1, N] or None
        gates = torch.stack([g[0] for g in st.rec_gates]) if st.rec_gates else None  # [L, T, K]
        norms = torch.stack([n[0] for n in st.rec_norms]) if st.rec_norms else None  # [L, T]
        return gates, norms, out.logits[0, self.positions].float()  # [n, V]

    def values(self, embeds: torch.Tensor, memory: torch.Tensor | None, gates: torch.Tensor | None) -> torch.Tensor:
        """The target `f` of every answer token, `[B, n_answer]`; `gates [B, L, T, K]` replaces the gate
        outputs (None: live)."""
        b = embeds.shape[0]
        self.state.gates = gates
        mask = torch.ones(b, embeds.shape[1], dtype=torch.long, device=embeds.device)
        try:
            if self.model.config.fusion == "deepstack":
                self.state.embeds = embeds
                images = {k: v.expand(b, *v.shape[1:]) for k, v in self.images.items()}
                out = self.model(
                    input_ids=self.ids.expand(b, -1),
                    **images,
                    attention_mask=mask,
                    use_cache=False,
                    logits_to_keep=self.positions,
                )
            else:
                memory_mask = None if self.memory_mask is None else self.memory_mask.expand(b, -1)
                out = self.model(
                    inputs_embeds=embeds,
                    vision_memory=memory,
                    vision_memory_mask=memory_mask,
                    attention_mask=mask,
                    use_cache=False,
                    logits_to_keep=self.positions,
                )
        finally:
            self.state.gates = self.state.embeds = None
        return target_values(out.logits.float(), self.targets, self.target, self.runner_up)  # [B, n]

    def const(self, b: int):
        """Embeddings and memory repeated `b` times (no grad)."""
        m = self.memory.expand(b, *self.memory.shape[1:]) if self.memory is not None else None
        return self.embeds.expand(b, *self.embeds.shape[1:]), m

    def gate_fn(self, s: int):
        """`G [B, L, T, K] -> f_s [B]` for Captum."""

        def f(gates: torch.Tensor) -> torch.Tensor:
            e, m = self.const(gates.shape[0])
            return self.values(e, m, gates)[:, s]

        return f


def target_values(
    logits: torch.Tensor, answer_ids: torch.Tensor, target: str, runner_up: torch.Tensor | None = None
) -> torch.Tensor:
    """`f` for every answer token from `logits [B, n, V]` and `answer_ids [n]`: `[B, n]`."""
    b = logits.shape[0]
    index = answer_ids.view(1, -1, 1).expand(b, -1, 1)
    if target == "logprob":
        return torch.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    chosen = logits.gather(-1, index).squeeze(-1)  # [B, n]
    if target == "logit":
        return chosen
    if runner_up is None:
        raise ValueError("the margin target needs the runner-up tokens")
    return chosen - logits.gather(-1, runner_up.view(1, -1, 1).expand(b, -1, 1)).squeeze(-1)


def runner_up_ids(logits: torch.Tensor, answer_ids: torch.Tensor, never: list[int]) -> torch.Tensor:
    """The best other token at each answer position, `[n]`, from the real logits `[n, V]`; tokens
    generation never emits (`never`: padding, `<bos>`, image placeholders) are not candidates."""
    masked = logits.clone()
    masked[:, never] = -torch.inf
    masked[torch.arange(len(answer_ids)), answer_ids] = -torch.inf
    return masked.argmax(-1)


# ===================================================================================== result


@dataclass
class AttributionResult:
    """Attributions of every answer token of one (image, question); see the module docstring.

    Shapes: `gate_cells [n_answer, L, K]`, `patches [n_answer, K, N]` (N = patch_grid[0] *
    patch_grid[1]), `prompt_scores [n_answer, P]` with `prompt_tokens` / `prompt_positions [P]`,
    `completeness_error [n_answer]` (NaN unless `method == "ig"`), `image_token_scores
    [n_answer, n_image_tokens]`, `gate_token_scores [n_answer, n_tokens]`, `target_value` /
    `baseline_value [n_answer]` (f at the real and at the baseline gates, in the target's units),
    `runner_up_ids [n_answer]` (margin only). In Jupyter the result shows itself (`_repr_html_`).
    """

    trace: Trace
    method: str
    gate_cells: np.ndarray
    patches: np.ndarray
    patch_grid: tuple[int, int]
    prompt_scores: np.ndarray
    prompt_tokens: list[str]
    prompt_positions: np.ndarray
    completeness_error: np.ndarray
    image_token_scores: np.ndarray
    gate_token_scores: np.ndarray
    target_value: np.ndarray
    baseline_value: np.ndarray
    baseline: str = "uniform"
    steps: int = 64
    target: str = "logprob"
    runner_up_ids: np.ndarray | None = None

    # -- views ---------------------------------------------------------------------------------
    @property
    def n_answer(self) -> int:
        return int(self.gate_cells.shape[0])

    @property
    def answer_tokens(self) -> list[str]:
        return list(self.trace.answer_texts)

    @property
    def vision_layers(self) -> list[int]:
        return list(self.trace.meta.vision_layers)

    @property
    def injection_layers(self) -> list[int]:
        return list(self.trace.meta.injection_layers)

    @property
    def combined(self) -> np.ndarray:
        """Patch maps summed over vision layers: `[n_answer, N]`."""
        return self.patches.sum(axis=1)

    def combined_grid(self, step: int = 0) -> np.ndarray:
        """The combined patch map of one answer token on the patch grid: `[rows, cols]`."""
        return self.combined[self._step(step)].reshape(self.patch_grid)

    def totals(self) -> np.ndarray:
        """Sum of the gate-cell attributions of each answer token: `[n_answer]` (IG: ~ f(x) - f(baseline))."""
        return self.gate_cells.sum(axis=(1, 2))

    def top_cells(self, step: int, n: int = 3) -> list[tuple[int, int, float]]:
        """The `n` gate cells with the largest |attribution|: (LLM layer, vision layer, value), real indices."""
        m = self.gate_cells[self._step(step)]
        order = np.argsort(-np.abs(m), axis=None)[:n]
        return [
            (self.injection_layers[i], self.vision_layers[k], float(m[i, k]))
            for i, k in zip(*np.unravel_index(order, m.shape))
        ]

    def _step(self, step: int) -> int:
        if not -self.n_answer <= step < self.n_answer:
            raise ValueError(f"answer step {step} outside 0..{self.n_answer - 1}")
        return step % self.n_answer

    # -- what was computed, in words (one wording for the CLI, pages, dashboard and notebooks) ---
    @property
    def runner_up_tokens(self) -> list[str]:
        """Runner-up token text per answer step (margin target), looked up in the trace's top-k."""
        if self.runner_up_ids is None or self.target != "margin":
            return []
        out = []
        for s, rid in enumerate(np.asarray(self.runner_up_ids, dtype=np.int64)):
            hits = [t for t, i in zip(self.trace.topk_texts[s], self.trace.topk_ids[s]) if int(i) == rid]
            out.append(hits[0] if hits else f"id {int(rid)}")
        return out

    @property
    def answer_probs(self) -> np.ndarray:
        """Probability of each attributed answer token under the real model: `[n_answer]`."""
        return np.exp(np.asarray(self.trace.answer_logprobs, dtype=np.float64))

    def saturated_steps(self) -> list[int]:
        """Answer steps whose log-prob target is flat (p > SATURATION_P): their attributions are noise."""
        if self.target != "logprob":
            return []
        return [s for s, p in enumerate(self.answer_probs) if p > SATURATION_P]

    def description(self) -> str:
        """What was attributed, how: method, baseline, steps, target — the same words everywhere."""
        if self.method == "ig":
            base = "every gate 1/K" if self.baseline == "uniform" else "every gate 0: injection off"
            gates = f"integrated gradients (ig), {self.steps} steps from the {self.baseline} baseline ({base})"
        else:
            gates = "gradient × input (gxi)"
        target = TARGET_NAMES[self.target]
        if self.target == "margin" and self.runner_up_tokens:
            pairs = ", ".join(f"{a!r} over {b!r}" for a, b in zip(self.answer_tokens, self.runner_up_tokens))
            target += f" ({pairs}; runner-up fixed at the real input)"
        return f"target f: {target}. Gate cells: {gates}; image patches and prompt tokens: gradient × input (gxi)."

    def warnings(self) -> list[str]:
        """One line per problem that makes the maps misleading (today: a saturated log-prob target)."""
        steps = self.saturated_steps()
        if not steps:
            return []
        tokens = ", ".join(f"{self.answer_tokens[s]!r} p = {self.answer_probs[s]:.4f}" for s in steps)
        biggest = max(float(np.nanmax(np.abs(self.gate_cells[s]))) if self.gate_cells[s].size else 0.0 for s in steps)
        return [
            f"saturated answer ({tokens} > {SATURATION_P}): the log-prob is flat there, so these attributions "
            f"are numerical noise (largest gate-cell value {biggest:.1e}), not signal; "
            "use --target margin or --target logit (target='margin' / 'logit')."
        ]

    def completeness_lines(self) -> list[str]:
        """IG completeness per answer token, its definition and the floor spelled out (empty for gxi)."""
        if self.method != "ig":
            return []
        lines = [
            f"completeness error = |sum of attributions - (f(x) - f(baseline))| / "
            f"max(|f(x) - f(baseline)|, floor), floor = {REL_FLOOR:g}"
        ]
        for w, total, fx, fb, err in zip(
            self.answer_tokens, self.totals(), self.target_value, self.baseline_value, self.completeness_error
        ):
            delta = float(fx) - float(fb)
            line = (
                f"{w!r}: sum {total:+.3g} vs f(x) - f(baseline) = {fx:+.4g} - ({fb:+.4g}) = {delta:+.3g}; "
                f"|difference| {abs(total - delta):.2g}, error {err:.2%}"
            )
            if abs(delta) < REL_FLOOR:
                line += (
                    f" — |f(x) - f(baseline)| is below the floor {REL_FLOOR:g}, so this only bounds the "
                    "absolute error: there is almost nothing to attribute"
                )
            lines.append(line)
        return lines

    def heatmap(self, step: int | None = 0):
        """Gate-cell attributions of answer token `step` (None: summed over tokens) as a plotly `Figure`."""
        return self.cell_heatmap_figure(step)

    def _repr_html_(self) -> str:
        from cliviz.analyses.display import attribution_html

        return attribution_html(self)

    # -- storage ------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The named float32 arrays stored in `Trace.attributions` (names in `ARRAY_NAMES`)."""
        settings = [
            _METHOD_CODES[self.method],
            self.steps,
            BASELINES.index(self.baseline),
            *self.patch_grid,
            TARGETS.index(self.target),
        ]
        runner = self.runner_up_ids if self.runner_up_ids is not None else np.full(self.n_answer, -1)
        out = {
            "gate_cells": self.gate_cells,
            "patches": self.patches,
            "prompt_scores": self.prompt_scores,
            "completeness_error": self.completeness_error,
            "image_token_scores": self.image_token_scores,
            "gate_token_scores": self.gate_token_scores,
            "target_value": self.target_value,
            "baseline_value": self.baseline_value,
            "runner_up_ids": runner,
            "attribution_settings": np.asarray(settings),
        }
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def to_trace(self) -> Trace:
        """A copy of the trace with the attribution arrays in `trace.attributions` (see `ARRAY_NAMES`)."""
        return dataclasses.replace(self.trace, attributions={**self.trace.attributions, **self.arrays()})

    @classmethod
    def from_trace(cls, trace: Trace) -> AttributionResult:
        """Rebuild a result from a trace that went through `to_trace` (e.g. read back from a trace file)."""
        a = dict(trace.attributions)
        for new, old in _OLD_NAMES.items():  # written before targets existed: a log-prob target
            if new not in a and old in a:
                a[new] = a[old]
        a.setdefault("runner_up_ids", np.full(len(trace.answer_ids), -1, dtype=np.float32))
        missing = [n for n in ARRAY_NAMES if n not in a]
        if missing:
            raise CLIVizError(f"trace holds no attributions (missing {', '.join(missing)}); run `cliviz attribute`")
        codes = [int(round(float(x))) for x in a["attribution_settings"]]
        if len(codes) not in (5, 6):
            raise CLIVizError(f"trace holds unreadable attribution settings ({len(codes)} values)")
        method_code, steps, base_code, rows, cols = codes[:5]
        target = TARGETS[codes[5]] if len(codes) == 6 else "logprob"
        prompt_positions = _prompt_positions(trace)
        return cls(
            trace=trace,
            method={v: k for k, v in _METHOD_CODES.items()}[method_code],
            gate_cells=a["gate_cells"],
            patches=a["patches"],
            patch_grid=(rows, cols),
            prompt_scores=a["prompt_scores"],
            prompt_tokens=[trace.token_texts[p] for p in prompt_positions],
            prompt_positions=prompt_positions,
            completeness_error=a["completeness_error"],
            image_token_scores=a["image_token_scores"],
            gate_token_scores=a["gate_token_scores"],
            target_value=a["target_value"],
            baseline_value=a["baseline_value"],
            baseline=BASELINES[base_code],
            steps=steps,
            target=target,
            runner_up_ids=np.asarray(a["runner_up_ids"]).astype(np.int64) if target == "margin" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists; NaN becomes None) — what `cliviz attribute --json` prints."""
        out: dict[str, Any] = {
            "question": self.trace.meta.question,
            "answer": self.trace.meta.answer,
            "answer_tokens": self.answer_tokens,
            "method": self.method,
            "method_name": METHOD_NAMES[self.method],
            "target": self.target,
            "runner_up_tokens": self.runner_up_tokens,
            "description": self.description(),
            "warnings": self.warnings(),
            "completeness": self.completeness_lines(),
            "rel_floor": REL_FLOOR,
            "answer_probs": self.answer_probs.tolist(),
            "baseline": self.baseline,
            "steps": self.steps,
            "vision_layers": self.vision_layers,
            "injection_layers": self.injection_layers,
            "patch_grid": list(self.patch_grid),
            "prompt_tokens": self.prompt_tokens,
            "prompt_positions": self.prompt_positions.tolist(),
        }
        for name in ARRAY_NAMES[:-1]:
            value = getattr(self, name)
            out[name] = None if value is None else _jsonable(value)
        trace = self.trace.to_dict()
        trace.pop("attributions", None)
        out["trace"] = trace
        return out

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (answer step, attributed item). Columns: step, answer_token, kind
        (`gate_cell` | `patch` | `prompt_token` | `image_token`), llm_layer, vision_layer (real
        indices; vision_layer NaN for a combined patch), patch, patch_row, patch_col, position, token,
        value. A patch row with vision_layer NaN is the combined map. Absent fields are NA."""
        rows, cols = self.patch_grid
        frames = [frame for s in range(self.n_answer) for frame in self._step_frames(s)]
        df = pd.concat(frames, ignore_index=True)
        for col in ("llm_layer", "vision_layer", "patch", "position"):
            if col not in df:
                df[col] = pd.NA
            df[col] = df[col].astype("Int64")
        df["patch_row"] = (df["patch"] // cols).astype("Int64") if rows * cols else pd.NA
        df["patch_col"] = (df["patch"] % cols).astype("Int64") if rows * cols else pd.NA
        if "token" not in df:
            df["token"] = None
        df["value"] = df["value"].astype(np.float32)
        df["kind"] = pd.Categorical(df["kind"], categories=["gate_cell", "patch", "prompt_token", "image_token"])
        return df[list(FRAME_COLUMNS)]

    def _step_frames(self, s: int) -> list[pd.DataFrame]:
        """Answer step s's rows of `to_frame`: gate cells, patches per vision layer, the combined
        patch map, prompt tokens, image tokens."""
        L, K = self.gate_cells.shape[1:]
        base = {"step": s, "answer_token": self.answer_tokens[s]}
        frames = []
        ii, kk = np.meshgrid(np.arange(L), np.arange(K), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    **base,
                    "kind": "gate_cell",
                    "llm_layer": np.asarray(self.injection_layers)[ii.ravel()] if L else [],
                    "vision_layer": np.asarray(self.vision_layers)[kk.ravel()] if L else [],
                    "value": self.gate_cells[s].ravel(),
                }
            )
        )
        n = self.patches.shape[2]
        kk, pp = np.meshgrid(np.arange(K), np.arange(n), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    **base,
                    "kind": "patch",
                    "vision_layer": np.asarray(self.vision_layers)[kk.ravel()],
                    "patch": pp.ravel(),
                    "value": self.patches[s].ravel(),
                }
            )
        )
        frames.append(pd.DataFrame({**base, "kind": "patch", "patch": np.arange(n), "value": self.combined[s]}))
        frames.append(
            pd.DataFrame(
                {
                    **base,
                    "kind": "prompt_token",
                    "position": self.prompt_positions,
                    "token": self.prompt_tokens,
                    "value": self.prompt_scores[s],
                }
            )
        )
        img_pos = np.flatnonzero(self.trace.role_mask("image"))
        frames.append(
            pd.DataFrame(
                {
                    **base,
                    "kind": "image_token",
                    "position": img_pos,
                    "patch": np.arange(len(img_pos)),
                    "value": self.image_token_scores[s],
                }
            )
        )
        return frames

    # -- plotting -----------------------------------------------------------------------------
    def token_strip_figure(self) -> go.Figure:
        """Two strips: the answer tokens coloured by their total gate-cell attribution, and below,
        per answer token, every prompt token coloured by its gradient x input."""
        from plotly.subplots import make_subplots

        from cliviz.analyses.heatmaps import DIVERGING

        totals = self.totals()
        labels = [f"{s}: {t}" for s, t in enumerate(self.answer_tokens)]
        fig = make_subplots(
            rows=2,
            cols=1,
            row_heights=[0.25, 0.75],
            vertical_spacing=0.18,
            subplot_titles=(
                f"answer tokens: total gate-cell attribution ({self.method}, {self.target})",
                f"prompt tokens: gradient × input (gxi) of the {self.target}",
            ),
        )
        tmax = _abs_max(totals)
        fig.add_trace(
            go.Heatmap(
                z=[totals.tolist()],
                x=labels,
                y=["answer"],
                text=[self.answer_tokens],
                texttemplate="%{text}",
                colorscale=DIVERGING,
                zmid=0,
                zmin=-tmax,
                zmax=tmax,
                coloraxis=None,
                colorbar={
                    "title": {"text": scale_title("gates", tmax), "side": "right"},
                    "y": 1.0,
                    "yanchor": "top",
                    "len": 0.3,
                },
                hovertemplate="answer token %{x}<br>total %{z:.3g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        cols = [f"{p}: {t}" for p, t in zip(self.prompt_positions, self.prompt_tokens)]
        pmax = _abs_max(self.prompt_scores)
        fig.add_trace(
            go.Heatmap(
                z=self.prompt_scores,
                x=cols,
                y=[f"-> {t}" for t in self.answer_tokens],
                text=[self.prompt_tokens] * self.n_answer,
                texttemplate="%{text}",
                colorscale=DIVERGING,
                zmid=0,
                zmin=-pmax,
                zmax=pmax,
                colorbar={
                    "title": {"text": scale_title("prompt", pmax), "side": "right"},
                    "y": 0.0,
                    "yanchor": "bottom",
                    "len": 0.6,
                },
                hovertemplate="prompt token %{x}<br>%{y}<br>grad × input %{z:.3g}<extra></extra>",
            ),
            row=2,
            col=1,
        )
        fig.update_yaxes(autorange="reversed", row=2, col=1)
        fig.update_xaxes(showticklabels=False)
        title = f"{self.trace.meta.question}  ->  {self.trace.meta.answer}" + self._noise_tag(None)
        fig.update_layout(
            template="simple_white",
            height=300 + 50 * self.n_answer,
            title=title,
            margin={"l": 80, "r": 30, "t": 80, "b": 20},
        )
        return fig

    def _noise_tag(self, step: int | None) -> str:
        """A title suffix when the shown token(s) are saturated under a log-prob target."""
        saturated = self.saturated_steps()
        if step is None and saturated or step is not None and self._step(step) in saturated:
            return " — saturated: noise"
        return ""

    def cell_heatmap_figure(self, step: int | None = 0) -> go.Figure:
        """(LLM layer x vision layer) gate-cell attributions of one answer token (None: summed over tokens)."""
        from cliviz.analyses.heatmaps import DIVERGING, heatmap_figure

        if step is None:
            m, what = self.gate_cells.sum(axis=0), "all answer tokens"
        else:
            s = self._step(step)
            m, what = self.gate_cells[s], f"answer token {s} {self.answer_tokens[s]!r}"
        zmax = _abs_max(m)
        title = f"gate cells, {what} ({self.method}, {self.target})" + self._noise_tag(step)
        fig = heatmap_figure(
            m,
            self.vision_layers,
            self.injection_layers,
            title=title,
            colorscale=DIVERGING,
            zmid=0.0,
            zmin=-zmax,
            zmax=zmax,
            colorbar_title=scale_title(self.method, zmax),
        )
        fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>attribution %{z:.3g}<extra></extra>")
        return fig

    def patch_overlay_figure(
        self,
        image: Image.Image,
        step: int = 0,
        layer: int | None = None,
        display_size: int = 256,
        max_alpha: float = 0.85,
    ) -> go.Figure:
        """The image with a semi-transparent diverging heatmap of the patch attributions on top
        (RdBu_r, red > 0 > blue, opacity growing with |value| up to `max_alpha`, so the image shows
        through where a patch did not matter). `layer`: a real vision-layer index (one of
        `vision_layers`), or None for the combined map."""
        s = self._step(step)
        if layer is None:
            grid, what = self.combined[s], "all vision layers"
        else:
            if layer not in self.vision_layers:
                raise ValueError(f"vision layer {layer} not in {self.vision_layers}")
            grid, what = self.patches[s, self.vision_layers.index(layer)], f"vision layer {layer}"
        rows, cols = self.patch_grid
        grid = np.asarray(grid, dtype=float).reshape(rows, cols)
        shown = image.convert("RGB").resize((display_size, display_size), Image.Resampling.NEAREST)
        cw, ch = display_size / cols, display_size / rows
        fig = go.Figure(go.Image(z=np.asarray(shown), hoverinfo="skip"))
        zmax = _abs_max(grid)
        fig.add_trace(
            go.Heatmap(
                z=grid,
                x=(np.arange(cols) + 0.5) * cw,
                y=(np.arange(rows) + 0.5) * ch,
                colorscale=overlay_colorscale(max_alpha),
                zmid=0,
                zmin=-zmax,
                zmax=zmax,
                colorbar={
                    "title": {"text": scale_title(f"gxi, {self.target}", zmax), "side": "right"},
                    "thickness": 14,
                },
                customdata=np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1),
                hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>%{z:.3g}<extra></extra>",
            )
        )
        fig.update_xaxes(visible=False, range=[0, display_size])
        fig.update_yaxes(visible=False, range=[display_size, 0], scaleanchor="x")
        fig.update_layout(
            template="simple_white",
            width=display_size + 180,
            height=display_size + 80,
            title=f"patches -> {self.answer_tokens[s]!r}, {what}" + self._noise_tag(s),
            margin={"l": 10, "r": 40, "t": 40, "b": 10},
        )
        return fig


def _abs_max(values: np.ndarray) -> float:
    """Largest finite |value|: the half-width of a symmetric colour scale (a tiny one when all are 0)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    return top if top > 0 else _ZERO_SCALE


_ZERO_SCALE = 1e-30


def scale_title(label: str, zmax: float) -> str:
    """Colour-bar title that states the absolute range, so a rescaled map of noise says how small it is."""
    return f"{label}<br>±{zmax:.2g}" if zmax > _ZERO_SCALE else f"{label}<br>all 0"


def overlay_colorscale(max_alpha: float = 0.85) -> list[list]:
    """RdBu_r (DIVERGING) with opacity growing with |value|: zero is fully transparent, so the image
    shows through wherever a patch did not matter."""
    import plotly.colors

    colors = plotly.colors.diverging.RdBu_r
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        alpha = max_alpha * abs(2 * i / (n - 1) - 1) ** 0.6
        scale.append([i / (n - 1), c.replace("rgb(", "rgba(").replace(")", f",{alpha:.3f})")])
    return scale


def _jsonable(a: np.ndarray) -> Any:
    return _nan_to_none(np.asarray(a, dtype=float).tolist())


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _prompt_positions(trace: Trace) -> np.ndarray:
    return np.flatnonzero(~trace.role_mask("image")).astype(np.int64)


def _patch_grid(model, n: int) -> tuple[int, int]:
    """The patch grid of the memory: square for LLaVA; a LLaVA-OneVision memory (base crop, anyres
    grid and newlines packed in one row) is shown as that one row."""
    vc = model.config.base_config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    return (side, side) if side * side == n else (1, n)


# ===================================================================================== compute


def _forced_trace(trace: Trace, tokenizer, answer_ids: list[int], gates, norms, logits, top_k: int = 5) -> Trace:
    """`trace` with its answer replaced by the teacher-forced `answer_ids` (gates from that forward)."""
    from cliviz.inference import token_texts

    n_prompt = int(trace.answer_positions[0]) + 1
    fed = trace.token_ids[:n_prompt].tolist() + answer_ids[:-1]
    lp = torch.log_softmax(logits, dim=-1).cpu()  # [n, V]
    ids = torch.tensor(answer_ids)
    top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
    words = [t for t in tokenizer.convert_ids_to_tokens(answer_ids) if t != tokenizer.eos_token]
    L, K = len(trace.meta.injection_layers), len(trace.meta.vision_layers)
    return dataclasses.replace(
        trace,
        meta=dataclasses.replace(trace.meta, answer=" ".join(words)),
        token_ids=np.asarray(fed, dtype=np.int64),
        token_texts=token_texts(tokenizer, fed),
        token_roles=trace.token_roles[:n_prompt] + ["answer"] * (len(answer_ids) - 1),
        gates=gates.cpu().numpy().astype(np.float32) if gates is not None else np.zeros((L, len(fed), K), np.float32),
        injection_norm=norms.cpu().numpy().astype(np.float32)
        if norms is not None
        else np.zeros((L, len(fed)), np.float32),
        answer_ids=np.asarray(answer_ids, dtype=np.int64),
        answer_texts=token_texts(tokenizer, answer_ids),
        answer_positions=np.arange(n_prompt - 1, n_prompt - 1 + len(answer_ids), dtype=np.int64),
        answer_logprobs=lp.gather(-1, ids[:, None]).squeeze(-1).numpy().astype(np.float32),
        topk_ids=top.indices.numpy().astype(np.int64),
        topk_texts=[token_texts(tokenizer, r) for r in top.indices.tolist()],
        topk_logprobs=top.values.numpy().astype(np.float32),
        attributions={},
    )


def _answer_ids(tokenizer, answer: str) -> list[int]:
    words = answer.split()
    if not words:
        raise CLIVizError("the answer to attribute is empty")
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # `tokenize` maps unknown words to [UNK]
    if backend is not None and backend.pre_tokenizer is not None:
        text = backend.normalizer.normalize_str(answer) if backend.normalizer is not None else answer
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    else:
        words = tokenizer.tokenize(answer)
    unknown = [w for w in dict.fromkeys(words) if w not in vocab]
    if unknown:
        raise CLIVizError(f"answer words not in the model's vocabulary: {', '.join(map(repr, unknown[:5]))}")
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def check_options(method: str, baseline: str, steps: int, internal_batch_size: int, target: str = "logprob") -> None:
    """Refuse bad settings with one-line `CLIVizError`s (shared by the API and the command line)."""
    if target not in TARGETS:
        raise CLIVizError(f"unknown attribution target {target!r}; use one of {', '.join(TARGETS)}")
    if method not in METHODS:
        raise CLIVizError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    if baseline not in BASELINES:
        raise CLIVizError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise CLIVizError(f"--steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if not isinstance(internal_batch_size, (int, np.integer)) or internal_batch_size < 1:
        raise CLIVizError(f"internal batch size must be a positive integer, got {internal_batch_size!r}")


def baseline_gates(gates: torch.Tensor, baseline: str) -> torch.Tensor:
    """Baseline G' for `gates [..., K]`: `uniform` (1/K) or `injection_off` (0)."""
    if baseline == "uniform":
        return torch.full_like(gates, 1.0 / gates.shape[-1])
    if baseline == "injection_off":
        return torch.zeros_like(gates)
    raise CLIVizError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")


def integrated_gradients(
    fn, gates: torch.Tensor, base: torch.Tensor, steps: int, internal_batch_size: int
) -> torch.Tensor:
    """Captum IG of `fn: [B, L, T, K] -> [B]` from `base` to `gates` (`[L, T, K]` each): `[L, T, K]`."""
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(fn).attribute(
        gates[None],
        baselines=base[None],
        n_steps=int(steps),
        method="gausslegendre",
        internal_batch_size=int(internal_batch_size),
    )
    return attr[0]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    if was:
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def attribute(
    model,
    tokenizer,
    image: Image.Image,
    question: str,
    *,
    method: str = "ig",
    steps: int = 64,
    baseline: str = "uniform",
    internal_batch_size: int = 16,
    answer: str | None = None,
    max_new_tokens: int = 4,
    target: str = "logprob",
) -> AttributionResult:
    """Attribute every answer token to gate cells, image patches and prompt tokens.

    `method`: `ig` (integrated gradients on the gates, `steps` Gauss-Legendre points from
    `baseline`, at most `internal_batch_size` points per forward) or `gxi` (gradient × input).
    `target`: `logprob` (saturates when p is close to 1: see `warnings()`), `logit` or `margin`
    (logit minus the runner-up's). `answer`: attribute this answer (words in the vocabulary; `<eos>`
    is appended) instead of the model's greedy one. Raises `CLIVizError` for bad options, words or a
    gate-less model. Example::

        from cliviz import attribute, load_image, load_model
        model, tok = load_model()
        image = load_image("assets/examples/color.png")
        r = attribute(model, tok, image, "what color is the triangle ?", method="gxi", target="logit")
        r.top_cells(0)              # [(llm_layer, vision_layer, value), ...]
    """
    from cliviz.inference import prepare_inputs, suppressed_tokens
    from cliviz.tracing.record import trace as record_trace

    check_options(method, baseline, steps, internal_batch_size, target)
    if model.config.fusion == "projector" or len(model.agf) == 0:
        raise CLIVizError(
            f"this model has no gates (fusion={model.config.fusion}): nothing is injected, "
            "so there are no gate cells or patch maps to attribute"
        )
    forced = _answer_ids(tokenizer, answer) if answer is not None else None
    tr = record_trace(model, tokenizer, image, question, max_new_tokens=max_new_tokens, causal_check=False)
    n_prompt = int(tr.answer_positions[0]) + 1
    answer_ids = forced if forced is not None else tr.answer_ids.tolist()
    fed = tr.token_ids[:n_prompt].tolist() + list(answer_ids[:-1])
    positions = np.arange(n_prompt - 1, n_prompt - 1 + len(answer_ids))
    images = {
        k: v
        for k, v in prepare_inputs(model, tokenizer, [image], [question]).items()
        if k in ("pixel_values", "image_sizes")
    }
    ids = torch.tensor([fed], dtype=torch.long, device=model.device)

    with _eval_mode(model), _hooks(model) as state, torch.enable_grad():
        run = _Runner(model, state, images, positions, answer_ids, target)
        gates, norms, logits = run.record(ids)
        if target == "margin":
            run.runner_up = runner_up_ids(logits, run.targets, suppressed_tokens(tokenizer))  # [n]
        if forced is not None:
            tr = _forced_trace(tr, tokenizer, list(answer_ids), gates, norms, logits)
        embed_scores, patches = _live_gradients(run, tr, model, len(answer_ids))
        per_pos, completeness, f_x, f_b = _gate_attributions(
            run, gates, len(answer_ids), method, baseline, steps, internal_batch_size
        )
    prompt_pos = _prompt_positions(tr)
    image_pos = np.flatnonzero(tr.role_mask("image"))
    return AttributionResult(
        trace=tr,
        method=method,
        baseline=baseline,
        steps=int(steps),
        gate_cells=per_pos.sum(axis=2).astype(np.float32),
        patches=patches.astype(np.float32),
        patch_grid=_patch_grid(model, patches.shape[2]),
        prompt_scores=embed_scores[:, prompt_pos].astype(np.float32),
        prompt_tokens=[tr.token_texts[p] for p in prompt_pos],
        prompt_positions=prompt_pos,
        completeness_error=completeness,
        image_token_scores=embed_scores[:, image_pos].astype(np.float32),
        gate_token_scores=per_pos.sum(axis=(1, 3)).astype(np.float32),
        target_value=f_x.astype(np.float32),
        baseline_value=f_b.astype(np.float32),
        target=target,
        runner_up_ids=run.runner_up.cpu().numpy() if run.runner_up is not None else None,
    )


def _live_gradients(run: _Runner, tr: Trace, model, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient x input on the embeddings and the AMP memory of the live model, every answer token at
    once (row s of a batch of n carries target s, so sum_s f_s[row s] separates the gradients):
    `(embedding scores [n, T], patch scores [n, K, N])` — patches NaN without an AMP memory."""
    eye = torch.eye(n, device=model.device)
    e, m = run.const(n)
    e = e.detach().clone().requires_grad_(True)
    leaves = [e]
    if m is not None:
        m = m.detach().clone().requires_grad_(True)
        leaves.append(m)
    values = run.values(e, m, None)  # [n, n]
    grads = torch.autograd.grad((values * eye).sum(), leaves)
    embed_scores = (grads[0] * e).sum(-1).float().detach().cpu().numpy()  # [n, T]
    if m is not None:
        return embed_scores, (grads[1] * m).sum(-1).float().detach().cpu().numpy()  # [n, K, N]
    n_img = int(tr.role_mask("image").sum())
    return embed_scores, np.full((n, len(model.config.vision_layers), n_img), np.nan, dtype=np.float32)


def _gate_attributions(
    run: _Runner, gates: torch.Tensor, n: int, method: str, baseline: str, steps: int, internal_batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The gates as the input, real `gates [L, T, K]` against the baseline gates: per-position
    attributions `[n, L, T, K]`, the completeness error `[n]` (NaN for gxi), f(x) and f(baseline) `[n]`."""
    g_base = baseline_gates(gates, baseline)
    e1, m1 = run.const(2)
    with torch.no_grad():
        f_pair = run.values(e1, m1, torch.stack([gates, g_base]))  # [2, n]
    f_x, f_b = f_pair[0].cpu().numpy(), f_pair[1].cpu().numpy()
    if method == "gxi":
        g = gates.expand(n, *gates.shape).clone().requires_grad_(True)  # [n, L, T, K]
        en, mn = run.const(n)
        values = run.values(en, mn, g)
        (grad,) = torch.autograd.grad((values * torch.eye(n, device=g.device)).sum(), [g])
        per_pos = (grad * g).detach()  # [n, L, T, K]
        completeness = np.full(n, np.nan, dtype=np.float32)
    else:
        per_pos = torch.stack(
            [integrated_gradients(run.gate_fn(s), gates, g_base, steps, internal_batch_size) for s in range(n)]
        ).detach()  # [n, L, T, K]
        total = per_pos.sum(dim=(1, 2, 3)).cpu().numpy()
        delta = f_x - f_b
        completeness = (np.abs(total - delta) / np.maximum(np.abs(delta), REL_FLOOR)).astype(np.float32)
    return per_pos.float().cpu().numpy(), completeness, f_x, f_b


# ===================================================================================== page


def write_attribution_html(result: AttributionResult, image: Image.Image, path: str | Path) -> Path:
    """A self-contained page (plotly.js inlined, opens offline): token strip, then per answer token
    the gate-cell heatmap and the patch overlay."""
    figs = [result.token_strip_figure()]
    for s in range(result.n_answer):
        figs.append(result.cell_heatmap_figure(s))
        figs.append(result.patch_overlay_figure(image, s))
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    meta = result.trace.meta
    lines = [result.description(), *result.completeness_lines()]
    if result.method == "gxi":
        lines.append("gradient × input has no completeness property; use method ig for an exact accounting.")
    notes = "".join(f"<p style='margin:2px 0'>{html_lib.escape(line)}</p>" for line in lines)
    warns = "".join(f"<p style='margin:2px 0;color:#D55E00'><b>{html_lib.escape(w)}</b></p>" for w in result.warnings())
    head = (
        f"<h2>{html_lib.escape(meta.question)} &rarr; {html_lib.escape(meta.answer)}</h2>"
        f"<p>model {html_lib.escape(meta.model)} ({html_lib.escape(meta.fusion)}).</p>{warns}{notes}"
    )
    body = [head, parts[0]]
    for s in range(result.n_answer):
        body.append(
            f"<h3>answer token {s}: {html_lib.escape(result.answer_tokens[s])}</h3>"
            f"<div style='display:flex;flex-wrap:wrap;gap:16px'><div>{parts[1 + 2 * s]}</div>"
            f"<div>{parts[2 + 2 * s]}</div></div>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cliviz attribution</title></head>"
        "<body style='font-family:sans-serif'>" + "".join(body) + "</body></html>"
    )
    p = Path(path)
    p.write_text(page, encoding="utf-8")
    return p
