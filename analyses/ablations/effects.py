"""Effects and grids: per-sample scores reduced to changes versus the unablated run, with uncertainty.

`effects_frame` turns the scores of every (sample, condition) into tidy effects per condition and
question type (plus `all`): the mean change of the reference answer's and the own answer's
log-prob, the flip rate, the accuracy and its change, and — for single-cell conditions — the cell's
unablated gate mass at the answer positions. Each comes with a seeded percentile-bootstrap 95% CI
over samples (degenerate, equal to the mean, when a group has one sample). `knockout_grid` is the
study every figure and `faithfulness` reads: every (injection layer, vision layer) knockout at
once (the tests hold it equal to a naive loop, `tests/oracles.py`); `grid_matrix` turns one of its
metrics into the `[L, K]` matrix a heatmap shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.intervene.engine import run_conditions
from cliviz.intervene.spec import ALL, REFERENCE, Ablation, grid_conditions

# Per-sample quantities the effects frame averages, and what each row of a grid reports.
GRID_METRICS = (
    "delta_logprob_ref",
    "delta_logprob_ref_seq",
    "delta_logprob_own",
    "flip_rate",
    "accuracy",
    "delta_accuracy",
    "gate_mass",
)
# metric -> its human label (figures, tables)
METRIC_LABELS = {
    "delta_logprob_ref": "Δ log-prob (reference answer)",
    "delta_logprob_ref_seq": "Δ log-prob (whole reference answer)",
    "delta_logprob_own": "Δ log-prob (own answer)",
    "flip_rate": "flip rate",
    "accuracy": "accuracy",
    "delta_accuracy": "Δ accuracy",
    "gate_mass": "gate mass (unablated)",
}


def metric_label(metric: str) -> str:
    """A human label for a metric or effect column: `METRIC_LABELS`, else underscores as spaces."""
    return METRIC_LABELS.get(metric, str(metric).replace("_", " "))


def _layer_of(values: list[int] | None) -> Any:
    """The one layer a single-layer condition acts on, else NA (the frame's llm_layer / vision_layer)."""
    return values[0] if values is not None and len(values) == 1 else pd.NA


def effects_frame(
    scores: pd.DataFrame,
    conditions: Sequence[Ablation | None],
    *,
    gate_mass: np.ndarray | None = None,
    injection_layers: Sequence[int] | None = None,
    vision_layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy effects per condition and question type (plus `all`): columns condition, llm_layer,
    vision_layer, qtype, metric, value, ci_low, ci_high, n. Metrics: delta_logprob_ref,
    delta_logprob_own, flip_rate, accuracy (under the condition), delta_accuracy, and — for
    single-cell conditions when `gate_mass [N, L, K]` is given — gate_mass (the cell's mean
    unablated gate at the answer positions). CIs: percentile bootstrap over samples (seeded)."""
    labels = [REFERENCE if a is None else a.label for a in conditions]
    if len(set(labels)) != len(labels):
        raise CLIVizError("two conditions have the same name; give them distinct `name`s")
    n = int(scores["sample"].max()) + 1
    by = scores.set_index(["sample", "condition"])
    base_correct = by.xs(REFERENCE, level="condition")["correct"].to_numpy(float) if REFERENCE in labels else None
    qtype_col = scores.groupby("sample")["qtype"].first().reindex(range(n))
    groups: list[tuple[str, np.ndarray]] = [(ALL, np.arange(n))]
    if qtype_col.notna().any():
        for q in sorted(qtype_col.dropna().astype(str).unique()):
            groups.append((q, np.flatnonzero(qtype_col.astype(str).to_numpy() == q)))

    per_metric: dict[str, np.ndarray] = {}  # metric -> [N, C] per-sample values (nan = not defined)
    n_c = len(labels)
    for m in ("delta_logprob_ref", "delta_logprob_ref_seq", "delta_logprob_own"):
        if m in scores.columns:  # the whole-answer change: what free-text answers of real checkpoints are judged by
            per_metric[m] = np.stack([by.xs(lab, level="condition")[m].to_numpy(float) for lab in labels], axis=1)
    per_metric["flip_rate"] = np.stack([by.xs(lab, level="condition")["flipped"].to_numpy(float) for lab in labels], 1)
    acc = np.stack([by.xs(lab, level="condition")["correct"].to_numpy(float) for lab in labels], 1)
    per_metric["accuracy"] = acc
    if base_correct is None:
        raise CLIVizError("the effects need the unablated reference among the conditions (None)")
    per_metric["delta_accuracy"] = acc - base_correct[:, None]
    if gate_mass is not None and injection_layers is not None and vision_layers is not None:
        gm = np.full((n, n_c), np.nan)
        for c, a in enumerate(conditions):
            if a is None or a.llm_layers is None or a.vision_layers is None:
                continue
            if len(a.llm_layers) == 1 and len(a.vision_layers) == 1:
                j = list(injection_layers).index(a.llm_layers[0])
                k = list(vision_layers).index(a.vision_layers[0])
                gm[:, c] = gate_mass[:, j, k]
        per_metric["gate_mass"] = gm

    records = []
    for g_index, (group, idx) in enumerate(groups):
        boot = np.random.default_rng([seed, g_index]).integers(0, len(idx), size=(n_boot, len(idx))) if n_boot else None
        for metric, values in per_metric.items():
            x = values[idx]  # [n_g, C]
            mean = x.mean(axis=0)
            if boot is not None and len(idx) > 1:
                bm = x[boot].mean(axis=1)  # [B, C]
                lo, hi = np.percentile(bm, [2.5, 97.5], axis=0)
            else:
                lo = hi = mean
            for c, a in enumerate(conditions):
                if np.isnan(mean[c]) and metric == "gate_mass":
                    continue
                records.append(
                    {
                        "condition": labels[c],
                        "llm_layer": _layer_of(a.llm_layers) if a is not None else pd.NA,
                        "vision_layer": _layer_of(a.vision_layers) if a is not None else pd.NA,
                        "qtype": group,
                        "metric": metric,
                        "value": float(mean[c]),
                        "ci_low": float(lo[c]),
                        "ci_high": float(hi[c]),
                        "n": int(len(idx)),
                    }
                )
    frame = pd.DataFrame.from_records(records)
    frame["llm_layer"] = frame["llm_layer"].astype("Int64")
    frame["vision_layer"] = frame["vision_layer"].astype("Int64")
    return frame


def knockout_grid(
    model,
    tokenizer,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    *,
    qtypes: Sequence[str | None] | None = None,
    max_batch: int = 256,
    tokens: str = "all",
    n_boot: int = 1000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> pd.DataFrame:
    """Every injection layer x every vision layer knockout plus the reference, batched.

    Tidy rows (condition, llm_layer, vision_layer, qtype, metric, value, ci_low, ci_high, n); the
    effects are changes versus the reference (see `effects_frame`). Example::

        grid = knockout_grid(model, tok, images, questions, answers, qtypes=qtypes)
        grid_matrix(grid, model.config, "delta_logprob_ref")      # [L, K] for a heatmap
    """
    conditions = grid_conditions(model, "knockout", tokens)
    scores, ref = run_conditions(
        model,
        tokenizer,
        images,
        questions,
        references,
        conditions,
        qtypes=qtypes,
        max_batch=max_batch,
        progress=progress,
        share_prefix=share_prefix,
    )
    return effects_frame(
        scores,
        conditions,
        gate_mass=ref.gate_mass,
        injection_layers=model.config.injection_layers,
        vision_layers=model.config.vision_layers,
        n_boot=n_boot,
        seed=seed,
    )


def grid_matrix(
    grid: pd.DataFrame,
    vision_layers: Sequence[int] | Any,
    injection_layers: Sequence[int] | None = None,
    metric: str = "delta_logprob_ref",
    qtype: str = ALL,
) -> np.ndarray:
    """`[L, K]` matrix of one metric from a grid frame (rows: injection layers, cols: vision layers).
    Pass a model config instead of the two layer lists: `grid_matrix(grid, model.config, metric=...)`."""
    if injection_layers is None and hasattr(vision_layers, "injection_layers"):
        cfg = vision_layers
        vision_layers, injection_layers = cfg.vision_layers, cfg.injection_layers
    cells = grid[
        (grid["metric"] == metric) & (grid["qtype"] == qtype) & grid["llm_layer"].notna() & grid["vision_layer"].notna()
    ]
    if cells.empty:
        raise CLIVizError(f"no grid cells for metric {metric!r} and question type {qtype!r}")
    table = cells.pivot_table(index="llm_layer", columns="vision_layer", values="value", aggfunc="first")
    table = table.reindex(index=list(injection_layers), columns=list(vision_layers))
    return table.to_numpy(dtype=float)
