"""One ablation study as one call: conditions scored over samples, effects, and for a grid its extras.

`run_study` is what `cliviz ablate` runs and what a notebook calls for the same result: it scores
the conditions (`scoring`), reduces them to tidy effects with bootstrap CIs (`effects`) and, for a
knockout grid (`run_grid`), adds the faithfulness report and an interactive heatmap page. The
`AblationReport` it returns knows how to show its largest effects and writes its files atomically
(`cliviz.atomic`). A percentile bootstrap over fewer than `MIN_CI_SAMPLES` samples has too few
distinct resamples to mean "95%" (one sample gives an interval of zero width), so reports say
whether their CIs are worth showing (`AblationReport.has_ci`) instead of printing degenerate ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cliviz.analyses.ablations.effects import METRIC_LABELS, effects_frame, grid_matrix
from cliviz.analyses.ablations.faithfulness import faithfulness
from cliviz.atomic import atomic_file, atomic_write_bytes
from cliviz.intervene.scoring import score_with_gate_mass
from cliviz.intervene.spec import ALL, REFERENCE, Ablation, check_conditions, grid_conditions

MIN_CI_SAMPLES = 10  # fewer samples: the bootstrap CI is not reported as a 95% interval


@dataclass
class AblationReport:
    """The result of `run_study` / `run_grid`.

    `scores`: one row per (sample, condition) (`score_conditions`); `effects`: the tidy effects
    frame (`effects_frame`); `faithfulness`: the grid's gate-mass/harm rank correlations (grid only).
    """

    conditions: list[Ablation | None]
    scores: pd.DataFrame
    effects: pd.DataFrame
    faithfulness: pd.DataFrame | None
    injection_layers: list[int]
    vision_layers: list[int]

    @property
    def is_grid(self) -> bool:
        return self.faithfulness is not None

    @property
    def n_samples(self) -> int:
        return int(self.scores["sample"].nunique())

    @property
    def has_ci(self) -> bool:
        """Whether the pooled CIs rest on enough samples to be shown as 95% intervals."""
        return self.n_samples >= MIN_CI_SAMPLES

    @property
    def reference(self) -> pd.DataFrame:
        """The unablated rows of `scores` (one per sample)."""
        return self.scores[self.scores["condition"] == REFERENCE]

    @property
    def reference_accuracy(self) -> float:
        return float(self.reference["correct"].mean())

    def largest_effects(self, top: int | None = 10) -> pd.DataFrame:
        """Conditions by |Δ log-prob of the reference answer| over all samples, largest first: one
        column per metric, plus `ci_low` / `ci_high` of that Δ (NaN unless `has_ci`)."""
        overall = self.effects[(self.effects["qtype"] == ALL) & (self.effects["condition"] != REFERENCE)]
        wide = overall.pivot_table(index="condition", columns="metric", values="value", aggfunc="first", sort=False)
        wide.columns.name = None
        ci = overall[overall["metric"] == "delta_logprob_ref"].set_index("condition")[["ci_low", "ci_high"]]
        wide = wide.join(ci if self.has_ci else ci * np.nan)
        wide = wide.reindex(wide["delta_logprob_ref"].abs().sort_values(ascending=False).index)
        return wide if top is None else wide.head(top)

    def outputs(self, out: str | os.PathLike) -> dict[str, Path]:
        """The files `write(out)` makes: effects (Parquet) and, for a grid, html and faithfulness CSV."""
        return report_paths(out, grid=self.is_grid)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write every output atomically (a crash leaves each file whole or untouched)."""
        paths = self.outputs(out)
        with atomic_file(paths["effects"], "effects file") as fh:
            self.effects.to_parquet(fh, index=False)
        if self.is_grid:
            page = grid_figure(self.effects, self.vision_layers, self.injection_layers)
            atomic_write_bytes(paths["html"], page.to_html(include_plotlyjs=True, full_html=True).encode(), "html file")
            atomic_write_bytes(
                paths["faithfulness"], self.faithfulness.to_csv(index=False).encode(), "faithfulness report"
            )
        return paths


def report_paths(out: str | os.PathLike, *, grid: bool) -> dict[str, Path]:
    """`out` (the effects Parquet) and, for a grid, `out` with .html and `<stem>.faithfulness.csv`."""
    out = Path(out)
    paths = {"effects": out}
    if grid:
        paths["html"] = out.with_suffix(".html")
        paths["faithfulness"] = out.with_name(out.stem + ".faithfulness.csv")
    return paths


def run_study(
    model,
    tokenizer,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    conditions: Sequence[Ablation | None],
    *,
    qtypes: Sequence[str | None] | None = None,
    grid: bool = False,
    max_batch: int = 256,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> AblationReport:
    """Score `conditions` (None = the unablated run, which must be among them) over the samples and
    reduce them to effects; `grid=True` (single-cell knockouts) adds the faithfulness report.
    `progress(n)` hears of every n (sample, condition) rows done, `len(questions) * len(conditions)`
    in all (the unablated rows are the reference pass). Example::

        report = run_study(model, tok, images, questions, answers,
                           [None, Ablation("injection_off")], qtypes=qtypes)
        report.largest_effects()
    """
    conditions = list(conditions)
    check_conditions(model, conditions)
    scores, gate_mass = score_with_gate_mass(
        model,
        tokenizer,
        images,
        questions,
        references,
        conditions,
        qtypes=qtypes,
        max_batch=max_batch,
        progress=progress,
    )
    cfg = model.config
    effects = effects_frame(
        scores,
        conditions,
        gate_mass=gate_mass,
        injection_layers=cfg.injection_layers,
        vision_layers=cfg.vision_layers,
        seed=seed,
    )
    return AblationReport(
        conditions,
        scores,
        effects,
        faithfulness(effects) if grid else None,
        list(cfg.injection_layers),
        list(cfg.vision_layers),
    )


def run_grid(
    model,
    tokenizer,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    references: Sequence[str | None] | None,
    *,
    qtypes: Sequence[str | None] | None = None,
    tokens: str = "all",
    max_batch: int = 256,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> AblationReport:
    """The knockout grid (every injection layer x vision layer, batched) with its faithfulness report.
    Example::

        report = run_grid(model, tok, images, questions, answers, qtypes=qtypes)
        report.faithfulness            # Spearman(gate mass, harm) per question type
        report.write("grid.parquet")   # + grid.html, grid.faithfulness.csv
    """
    return run_study(
        model,
        tokenizer,
        images,
        questions,
        references,
        grid_conditions(model, "knockout", tokens),
        qtypes=qtypes,
        grid=True,
        max_batch=max_batch,
        seed=seed,
        progress=progress,
    )


def study_conditions(
    model,
    kind: str = "knockout",
    llm_layers: Sequence[int] | None = None,
    vision_layers: Sequence[int] | None = None,
    *,
    tokens: str = "all",
    value: int | None = None,
) -> list[Ablation | None]:
    """The conditions of a study of one kind: the reference plus that ablation — or, for a knockout
    with no vision layers named, one knockout per vision layer of the model (each at `llm_layers`,
    default every injection layer): "which vision layer does the answer need?" needs no options."""
    if kind == "knockout" and vision_layers is None:
        return [None] + [Ablation("knockout", llm_layers, [k], tokens=tokens) for k in model.config.vision_layers]
    return [None, Ablation(kind, llm_layers, vision_layers, tokens=tokens, value=value)]


def grid_figure(effects: pd.DataFrame, vision_layers: Sequence[int], injection_layers: Sequence[int]):
    """The grid as one heatmap (Δ log-prob of the reference answer), a dropdown over the other effects."""
    from cliviz.analyses.heatmaps import DIVERGING, heatmap_figure

    mats = {
        m: grid_matrix(effects, vision_layers, injection_layers, metric=m)
        for m in METRIC_LABELS
        if m != "accuracy" and (effects["metric"] == m).any()
    }

    def bound(m):
        b = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        return b if b > 0 else 1e-6

    first = mats["delta_logprob_ref"]
    fig = heatmap_figure(
        first,
        vision_layers,
        injection_layers,
        zmid=0.0,
        zmin=-bound(first),
        zmax=bound(first),
        colorscale=DIVERGING,
        colorbar_title="effect",
        title="knockout of (LLM layer, vision layer): change vs the unablated run",
    )
    fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>value %{z:.4f}<extra></extra>")
    fig.update_layout(
        updatemenus=[
            {
                "buttons": [
                    {
                        "label": METRIC_LABELS[m],
                        "method": "restyle",
                        "args": [{"z": [mat.tolist()], "zmin": [-bound(mat)], "zmax": [bound(mat)]}],
                    }
                    for m, mat in mats.items()
                ],
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.15,
                "yanchor": "top",
            }
        ],
        margin={"t": 90},
    )
    return fig
