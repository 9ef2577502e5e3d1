"""The result of an attribution: arrays, the words that say what they are, storage and tidy frames.

`AttributionResult` is what `attribute` returns and what a trace file gives back
(`AttributionResult.from_trace`). It says what was computed (`description`), where its maps cannot be
read as signal (`warnings`, `unreliable_steps`: judged per answer token and per method) and how well
integrated gradients add up (`completeness_lines`); it shows itself through `attribution_plots`.
The computation lives in `attribution_compute`; the definitions in `attributions` (module docstring).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cliviz.analyses.attribution_settings import (
    BASELINES,
    COMPLETENESS_TOL,
    DEFAULT_TARGET,
    METHOD_CODES,
    METHOD_NAMES,
    REL_FLOOR,
    SATURATION_P,
    TARGET_NAMES,
    TARGETS,
)
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import Trace

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
    target: str = DEFAULT_TARGET
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
        """Answer steps whose log-prob target is flat (p > SATURATION_P): gradients vanish there, so
        every gradient × input map of the step (patches, prompt tokens, gxi gate cells) is noise."""
        if self.target != "logprob":
            return []
        return [s for s, p in enumerate(self.answer_probs) if p > SATURATION_P]

    def incomplete_steps(self) -> list[int]:
        """IG steps whose sum misses f(x) - f(baseline) by more than COMPLETENESS_TOL (relative error,
        see `completeness_lines`): their gate cells are not an accounting. Empty for gxi."""
        if self.method != "ig":
            return []
        err = np.asarray(self.completeness_error, dtype=float)
        return [s for s in range(self.n_answer) if not err[s] <= COMPLETENESS_TOL]

    def empty_steps(self) -> list[int]:
        """IG steps with |f(x) - f(baseline)| below REL_FLOOR: almost nothing to split, so the gate
        cells are near zero whatever the model does. Empty for gxi."""
        if self.method != "ig":
            return []
        delta = np.abs(np.asarray(self.target_value, float) - np.asarray(self.baseline_value, float))
        return [s for s in range(self.n_answer) if delta[s] < REL_FLOOR]

    def cells_unreliable(self, step: int) -> bool:
        """Whether the gate-cell map of `step` cannot be read: gxi on a saturated target, or an IG that
        does not add up or has nothing to split. A complete IG is readable even when saturated."""
        s = self._step(step)
        if self.method == "gxi":
            return s in self.saturated_steps()
        return s in self.incomplete_steps() or s in self.empty_steps()

    def step_warnings(self, step: int) -> list[str]:
        """The warnings that concern answer token `step` alone (what the dashboard shows beside it)."""
        s = self._step(step)
        word, p = self.answer_tokens[s], self.answer_probs[s]
        out = []
        if s in self.saturated_steps():
            fix = "use --target margin or --target logit (target='margin' / 'logit')"
            if self.method == "gxi":
                biggest = float(np.nanmax(np.abs(self.gate_cells[s]))) if self.gate_cells[s].size else 0.0
                out.append(
                    f"saturated answer token {word!r} (p = {p:.4f} > {SATURATION_P}): the log-prob is flat there, "
                    f"so its gradient × input maps are numerical noise (largest gate-cell value {biggest:.1e}), "
                    f"not signal; {fix}."
                )
            else:
                out.append(
                    f"saturated answer token {word!r} (p = {p:.4f} > {SATURATION_P}): its patch and prompt-token "
                    f"maps (gradient × input at the real input) are numerical noise; its gate cells (integrated "
                    f"gradients) are judged by completeness instead; {fix}."
                )
        if s in self.empty_steps():
            delta = float(self.target_value[s]) - float(self.baseline_value[s])
            out.append(
                f"nothing to attribute for {word!r}: f(x) - f(baseline) = {delta:+.1e}, below {REL_FLOOR:g}, so "
                "its gate cells are near zero whatever the model reads; try another baseline or target."
            )
        elif s in self.incomplete_steps():
            out.append(
                f"integrated gradients of {word!r} miss f(x) - f(baseline) by {float(self.completeness_error[s]):.1%} "
                f"(more than {COMPLETENESS_TOL:.0%}): its gate cells are not an accounting; raise --steps."
            )
        return out

    def warnings(self) -> list[str]:
        """One line per problem that makes a map misleading: untrained gates (every map), then per answer
        token and per method:
        a saturated log-prob breaks gradient × input (patches, prompt tokens, gxi gate cells); an
        integrated-gradients map is flagged only when its completeness fails or it has nothing to split."""
        return self.general_warnings() + [w for s in range(self.n_answer) for w in self.step_warnings(s)]

    def general_warnings(self) -> list[str]:
        """Warnings about every map of this result at once: untrained gates (`untrained.untrained_note`)."""
        from cliviz.analyses.untrained import untrained_note

        note = untrained_note(self.trace)
        return [note] if note else []

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
            METHOD_CODES[self.method],
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
            method={v: k for k, v in METHOD_CODES.items()}[method_code],
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

    # -- display (attribution_plots) -------------------------------------------------------------
    def token_strip_figure(self):
        """Answer tokens coloured by their total gate-cell attribution, prompt tokens below (plotly)."""
        from cliviz.analyses.attribution_plots import token_strip_figure

        return token_strip_figure(self)

    def cell_heatmap_figure(self, step: int | None = 0):
        """(LLM layer x vision layer) gate-cell attributions of one answer token (None: summed)."""
        from cliviz.analyses.attribution_plots import cell_heatmap_figure

        return cell_heatmap_figure(self, step)

    def patch_overlay_figure(self, image, step: int = 0, layer: int | None = None, **kwargs):
        """The image under a diverging map of patch attributions (see `attribution_plots`)."""
        from cliviz.analyses.attribution_plots import patch_overlay_figure

        return patch_overlay_figure(self, image, step, layer, **kwargs)

    def write_html(self, image, path):
        """A self-contained page: token strip, then per answer token its cell map and patch overlay."""
        from cliviz.analyses.attribution_plots import write_attribution_html

        return write_attribution_html(self, image, path)


def _jsonable(a: np.ndarray) -> Any:
    return _nan_to_none(np.asarray(a, dtype=float).tolist())


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _prompt_positions(trace: Trace) -> np.ndarray:
    return np.flatnonzero(~trace.role_mask("image")).astype(np.int64)
