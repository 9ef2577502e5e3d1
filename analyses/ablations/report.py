"""One ablation study as one call: `run_study(model, tok, samples, conditions) -> AblationReport`.

`run_study` is the one entry point (what `cliviz ablate` runs and what a notebook calls): it scores
the conditions over the samples (`scoring`), reduces them to tidy effects with bootstrap CIs
(`effects`) and, when the conditions hold the knockout grid, adds the faithfulness report. Studies
people run often are presets, `functools.partial`s of it (TransformerLens' `patching.py` style):
`run_grid` (every knockout cell plus each LLM layer's injection off), `run_injection_off`. The
`AblationReport` it returns is the one result type of a study, a grid included: it renders itself —
per-question-type flips and Δ log-prob, the grid with the share of each cell's harm that switching
its LLM layer's injection off explains, a heatmap page — lays any metric of the grid out as an
`[L, K]` matrix (`matrix`) and a diverging map (`heatmap`), and writes its files atomically
(`cliviz.atomic`). `cliviz.knockout` is the notebook's name for `run_grid`.

Why the injection-off row sits beside the grid: a knockout sets one gate to 0 and *renormalises*
the others (`spec`), so the LLM layer reads more from the other vision layers. A knockout cell is
therefore not "that vision layer's importance": part of its harm can come from the reads that
renormalisation inflates. Switching the layer's injection off removes everything that layer reads
and inflates nothing; `AblationReport.off_explains()` is, per cell, the injection-off harm over the
knockout harm (clipped to [0, 1]): near 1, removing the layer's injection does as much harm as the
knockout (the vision layer's own contribution can explain it); near 0, the harm comes with the
renormalisation, not from losing what that vision layer gave.

A percentile bootstrap over fewer than `MIN_CI_SAMPLES` samples has too few distinct resamples
to mean "95%" (one sample gives an interval of zero width), so reports say whether their CIs are
worth showing (`AblationReport.has_ci`) instead of printing degenerate ones.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cliviz.analyses.ablations.effects import effects_frame, grid_matrix
from cliviz.analyses.ablations.faithfulness import faithfulness
from cliviz.atomic import atomic_file, atomic_write_bytes
from cliviz.intervene.scoring import score_with_gate_mass
from cliviz.intervene.spec import ALL, REFERENCE, Ablation, check_conditions, grid_conditions

MIN_CI_SAMPLES = 10  # fewer samples: the bootstrap CI is not reported as a 95% interval
HARM_FLOOR = 1e-3  # |Δ log-prob| below this is no harm to explain: `off_explains` gives NaN there
RENORMALISE_NOTE = (
    "knockout sets the cell's gate to 0 and renormalises the remaining gates of that LLM layer, so a "
    "cell's harm is not that vision layer's importance: part of it can come from the other reads growing."
)
# metric -> what `AblationReport.heatmap` writes in its title (with the unit)
GRID_UNITS = {
    "delta_logprob_ref": "Δ log-prob (reference answer), nats",
    "delta_logprob_ref_seq": "Δ log-prob (whole reference answer), nats",
    "delta_logprob_own": "Δ log-prob (own answer), nats",
    "flip_rate": "share of answers flipped",
    "accuracy": "accuracy under the knockout",
    "delta_accuracy": "Δ accuracy",
    "gate_mass": "mean gate",
}
KNOCKOUT_NOTE = (
    RENORMALISE_NOTE + " 'off explains' = the harm of switching that LLM layer's injection off / the cell's harm "
    "(clipped to 0..1)."
)


@dataclass
class StudySamples:
    """What a study runs on: images and questions, with optional reference answers (None: the model's
    own unablated answer) and question types (for per-type effects)."""

    images: Sequence[Image.Image]
    questions: Sequence[str]
    references: Sequence[str | None] | None = None
    qtypes: Sequence[str | None] | None = None

    def __len__(self) -> int:
        return len(self.questions)

    @classmethod
    def from_records(cls, records) -> StudySamples:
        """From `cliviz.data` records (`read_jsonl(...).records`, `iter_samples(...)`): image, question,
        answer, qtype."""
        from cliviz.inputs import load_image

        records = list(records)
        images = [r.image if getattr(r, "image", None) is not None else load_image(r.image_path) for r in records]
        qtypes = [r.qtype for r in records]
        return cls(images, [r.question for r in records], [r.answer for r in records], qtypes if any(qtypes) else None)


@dataclass
class AblationReport:
    """The result of `run_study` and its presets (`run_grid`, `run_injection_off`, `cliviz.knockout`).

    `scores`: one row per (sample, condition) (`score_conditions`); `effects`: the tidy effects
    frame (`effects_frame`); `faithfulness`: the grid's gate-mass/harm rank correlations (grid only).
    The single-cell knockouts among the conditions lay out as `[L, K]` grids: `matrix(metric)`,
    `heatmap(metric)`.
    """

    conditions: list[Ablation | None]
    scores: pd.DataFrame
    effects: pd.DataFrame
    faithfulness: pd.DataFrame | None
    injection_layers: list[int]
    vision_layers: list[int]
    model_name: str = ""

    @property
    def subject(self) -> str:
        """What the study ran on, for titles: the model and the question (one sample) or the sample count."""
        qs = self.scores["question"].unique() if "question" in self.scores else []
        what = f"'{qs[0]}'" if len(qs) == 1 else f"{self.n_samples} samples"
        return f"{Path(self.model_name).name or 'model'}, {what}"

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

    def per_type(self) -> pd.DataFrame:
        """Flip rate and Δ log-prob of the reference answer per condition and question type (with `all`),
        one row each: condition, qtype, n, flip_rate, delta_logprob_ref, accuracy."""
        e = self.effects[self.effects["condition"] != REFERENCE]
        wide = e.pivot_table(
            index=["condition", "qtype"], columns="metric", values="value", aggfunc="first", sort=False
        )
        n = e.groupby(["condition", "qtype"], sort=False)["n"].first()
        wide = wide.join(n).reset_index()
        wide.columns.name = None
        keep = ["condition", "qtype", "n", "flip_rate", "delta_logprob_ref", "accuracy"]
        wide = wide[[c for c in keep if c in wide.columns]]
        order = {q: i for i, q in enumerate([ALL] + sorted(q for q in wide["qtype"].unique() if q != ALL))}
        return wide.sort_values("qtype", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)

    def matrix(self, metric: str = "delta_logprob_own", qtype: str = ALL) -> np.ndarray:
        """`[L, K]` matrix of one metric of the single-cell knockouts (rows: injection layers, columns:
        vision layers; NaN for a cell the study did not knock out), as `grid_matrix` lays it out."""
        return grid_matrix(self.effects, self.vision_layers, self.injection_layers, metric=metric, qtype=qtype)

    def heatmap(self, metric: str = "delta_logprob_own", qtype: str = ALL):
        """Diverging map of `matrix(metric, qtype)`, symmetric around 0, its absolute range in the colour
        bar and the renormalisation in the title (`analyses.heatmaps.difference_figure`)."""
        from cliviz.analyses.heatmaps import difference_figure

        m = self.matrix(metric, qtype)
        top = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        rows = self.effects[(self.effects["qtype"] == qtype) & (self.effects["metric"] == metric)]
        n = int(rows["n"].max()) if len(rows) else 0
        return difference_figure(
            m,
            self.vision_layers,
            self.injection_layers,
            label=f"{metric}<br>±{top:.2g}",
            title=f"knockout of each gate cell (the rest renormalised): {GRID_UNITS.get(metric, metric)} "
            f"({qtype}, n={n})",
            zmax=top if top > 0 else None,
        )

    def off_rows(self) -> pd.Series:
        """Δ log-prob of the reference answer when one LLM layer's injection is off, per layer (qtype `all`)."""
        e = self.effects
        off = e[
            (e["metric"] == "delta_logprob_ref")
            & (e["qtype"] == ALL)
            & e["condition"].str.startswith("injection_off")
            & e["llm_layer"].notna()
        ]
        return off.set_index(off["llm_layer"].astype(int))["value"]

    def off_explains(self) -> np.ndarray | None:
        """Per grid cell `[L, K]`: the harm of switching that LLM layer's injection off over the harm of
        the knockout (both as −Δ log-prob of the reference answer), clipped to [0, 1]; NaN where the
        knockout does no harm (|Δ| < HARM_FLOOR). None without a grid or its injection-off rows."""
        if not self.is_grid:
            return None
        off = self.off_rows()
        if off.empty:
            return None
        cells = grid_matrix(self.effects, self.vision_layers, self.injection_layers, "delta_logprob_ref")
        off_col = np.array([off.get(i, np.nan) for i in self.injection_layers], dtype=float)[:, None]  # [L, 1]
        harm, off_harm = -cells, -off_col
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.clip(off_harm / harm, 0.0, 1.0)
        share[~(harm > HARM_FLOOR)] = np.nan
        return share

    def render(self, top: int = 10):
        """The report as rich renderables: largest effects, per-type flips and Δ log-prob, and for a grid
        the cells with the injection-off share and the faithfulness table (Holm-corrected p)."""
        from cliviz.analyses.ablations.display import report_renderables

        return report_renderables(self, top)

    def _repr_html_(self) -> str:
        from cliviz.analyses.ablations.display import report_html

        return report_html(self)

    def outputs(self, out: str | os.PathLike) -> dict[str, Path]:
        """The files `write(out)` makes: effects (Parquet) and, for a grid, html and faithfulness CSV."""
        return report_paths(out, grid=self.is_grid)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write every output atomically (a crash leaves each file whole or untouched)."""
        paths = self.outputs(out)
        with atomic_file(paths["effects"], "effects file") as fh:
            self.effects.to_parquet(fh, index=False)
        if self.is_grid:
            atomic_write_bytes(paths["html"], self.grid_page().encode(), "html file")
            atomic_write_bytes(
                paths["faithfulness"], self.faithfulness.to_csv(index=False).encode(), "faithfulness report"
            )
        return paths

    def grid_page(self, title: str | None = None) -> str:
        """The grid's self-contained HTML page: a title naming the question(s) and model, the knockout
        note, the grid heatmap (metric menu) and the injection-off share per cell."""
        from cliviz.analyses.ablations.display import grid_page

        return grid_page(self, title)


def report_paths(out: str | os.PathLike, *, grid: bool) -> dict[str, Path]:
    """`out` (the effects Parquet) and, for a grid, `out` with .html and `<stem>.faithfulness.csv`."""
    out = Path(out)
    paths = {"effects": out}
    if grid:
        paths["html"] = out.with_suffix(".html")
        paths["faithfulness"] = out.with_name(out.stem + ".faithfulness.csv")
    return paths


Conditions = Sequence[Ablation | None] | Callable[..., Sequence[Ablation | None]]


def run_study(
    model,
    tokenizer,
    samples: StudySamples,
    conditions: Conditions,
    *,
    max_batch: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> AblationReport:
    """Score `conditions` over `samples` and reduce them to effects: the one ablation entry point.

    `conditions`: a list (None = the unablated run, which must be among them) or a function
    `model -> list` (the presets: `grid_study_conditions`, ...). When the list holds the knockout
    grid (every single-cell knockout of the model), the report adds the faithfulness table.
    `n_boot` bootstrap resamples give the CIs (0: none, the CI equals the mean); `seed` seeds them.
    `progress(n)` hears of every n (sample, condition) rows done. Example::

        samples = StudySamples(images, questions, answers, qtypes)  # or StudySamples.from_records(...)
        report = run_study(model, tok, samples, [None, Ablation("injection_off")])
        report.per_type()                 # flips and Δ log-prob per question type
        grid = run_grid(model, tok, samples)
        grid.off_explains()               # [L, K]: the share of each cell's harm injection-off explains
    """
    conditions = list(conditions(model) if callable(conditions) else conditions)
    check_conditions(model, conditions)
    scores, gate_mass = score_with_gate_mass(
        model,
        tokenizer,
        samples.images,
        samples.questions,
        samples.references,
        conditions,
        qtypes=samples.qtypes,
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
        n_boot=n_boot,
        seed=seed,
    )
    return AblationReport(
        conditions,
        scores,
        effects,
        faithfulness(effects) if _holds_grid(model, conditions) else None,
        list(cfg.injection_layers),
        list(cfg.vision_layers),
        str(getattr(model, "name_or_path", "")),
    )


def _holds_grid(model, conditions: Sequence[Ablation | None]) -> bool:
    """Whether every single-cell knockout of the model is among the conditions."""
    labels = {a.label for a in conditions if a is not None}
    return all(a is None or a.label in labels for a in grid_conditions(model, "knockout", "all")) and any(
        a is not None and a.kind == "knockout" for a in conditions
    )


def grid_study_conditions(model, tokens: str = "all") -> list[Ablation | None]:
    """The knockout grid (reference + every cell) plus one injection-off condition per LLM layer,
    the row that says how much of each cell's harm needs no renormalisation (`off_explains`)."""
    off = [Ablation("injection_off", [i], tokens=tokens) for i in model.config.injection_layers]
    return list(grid_conditions(model, "knockout", tokens)) + off


def injection_off_conditions(model) -> list[Ablation | None]:
    """The reference and the injection switched off at every LLM layer: is the injection used at all?"""
    return [None, Ablation("injection_off")]


run_grid = functools.partial(run_study, conditions=grid_study_conditions)
run_grid.__doc__ = "`run_study` over the knockout grid plus each LLM layer's injection off (a preset)."
run_injection_off = functools.partial(run_study, conditions=injection_off_conditions)
run_injection_off.__doc__ = "`run_study` with the injection off at every LLM layer (a preset)."


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


def grid_figure(effects: pd.DataFrame, vision_layers: Sequence[int], injection_layers: Sequence[int], title=None):
    """The grid as one heatmap (Δ log-prob of the reference answer), a menu over the other effects."""
    from cliviz.analyses.ablations.display import grid_figure as figure

    return figure(effects, vision_layers, injection_layers, title)
