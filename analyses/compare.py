"""Fusion comparison and seed stability: a miniature of the paper's main table.

Accuracy: every model answers the same held-out set; the table has one row per (model,
question type) plus `overall`, the format `cliviz figures --compare` reads.

Stability: which vision layer a question type routes to can change from one training seed to the
next. For every pair of models of the same fusion variant, and every question type, we compare
the *vision-layer profile* (mean answer-step gate per vision layer, averaged over LLM layers) by
Spearman rank correlation, and the *top vision layer* of each LLM layer by agreement. High values
mean a heatmap shows the architecture; low values mean it shows one seed's accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cliviz.data.samples import DataSet
from cliviz.evaluation import evaluate
from cliviz.inputs import load_image

ALL_TYPES = "all types"  # the row of `stability_summary(..., with_mean=True)` that averages the question types


def accuracy_table(
    models: dict[str, tuple], data: DataSet, batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> pd.DataFrame:
    """`models`: label -> (model, tokenizer). Returns rows model, fusion, qtype, accuracy, ci_low,
    ci_high (95% Wilson interval), n; per model the question types in order, then `overall`.
    `progress(n)` hears of every n samples answered."""
    rows = []
    for label, (model, tok) in models.items():
        result = evaluate(model, tok, data, batch_size, on_batch=progress)
        for qtype, acc in result["per_type"].items():
            rows.append(
                {
                    "model": label,
                    "fusion": model.config.fusion,
                    "qtype": qtype,
                    "accuracy": acc,
                    "ci_low": result["accuracy_ci"]["per_type"][qtype][0],
                    "ci_high": result["accuracy_ci"]["per_type"][qtype][1],
                    "n": result["n_per_type"][qtype],
                }
            )
        rows.append(
            {
                "model": label,
                "fusion": model.config.fusion,
                "qtype": "overall",
                "accuracy": result["overall"],
                "ci_low": result["accuracy_ci"]["overall"][0],
                "ci_high": result["accuracy_ci"]["overall"][1],
                "n": result["n"],
            }
        )
    return pd.DataFrame(rows)


def _profiled(data: DataSet, limit: int | None) -> list:
    """The records a gate profile is averaged over: those with a question type, the first `limit`."""
    return [r for r in data.records if r.qtype][:limit]


def gate_profiles(
    model,
    tok,
    data: DataSet,
    batch_size: int = 32,
    limit: int | None = 140,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per question type, the mean answer-step gate matrix `[L, K]` of one model.
    `progress(n)` hears of every n samples traced."""
    from cliviz.tracing import trace_batch

    records = _profiled(data, limit)
    sums: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        traces = trace_batch(
            model, tok, [load_image(r.image_path) for r in chunk], [r.question for r in chunk], max_new_tokens=2
        )
        for record, t in zip(chunk, traces, strict=True):
            sums.setdefault(record.qtype, []).append(t.answer_gates().mean(axis=1))  # [L, K]
        if progress:
            progress(len(chunk))
    return {q: np.mean(v, axis=0) for q, v in sorted(sums.items())}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def seed_stability(
    profiles: dict[str, dict[str, np.ndarray]],
    fusions: dict[str, str],
    seeds: dict[str, int | None] | None = None,
) -> pd.DataFrame:
    """Pairwise agreement of gate maps between models of the same fusion variant with gates.

    `seeds` (label -> training seed, None when unknown) marks each pair `same_seed`: two checkpoints
    of one seed measure drift during training, not seed-to-seed variation, and must not be averaged in.
    """
    seeds = seeds or {}
    rows = []
    for a, b in combinations(profiles, 2):
        if fusions[a] != fusions[b] or fusions[a] not in ("cli",):
            continue
        known = seeds.get(a) is not None and seeds.get(b) is not None
        for qtype in sorted(set(profiles[a]) & set(profiles[b])):
            pa_, pb_ = profiles[a][qtype], profiles[b][qtype]
            rows.append(
                {
                    "fusion": fusions[a],
                    "model_a": a,
                    "model_b": b,
                    "qtype": qtype,
                    "profile_spearman": _spearman(pa_.mean(0), pb_.mean(0)),
                    "top_layer_agreement": float(np.mean(pa_.argmax(1) == pb_.argmax(1))),
                    "same_seed": (seeds[a] == seeds[b]) if known else None,
                }
            )
    columns = ["fusion", "model_a", "model_b", "qtype", "profile_spearman", "top_layer_agreement", "same_seed"]
    return pd.DataFrame(rows, columns=columns)


def stability_summary(stability: pd.DataFrame, *, with_mean: bool = False) -> pd.DataFrame:
    """Per question type: mean agreement across different seeds (pairs of unknown seed count as
    different) and, where the set holds checkpoints of one seed, within a seed for reference.
    `with_mean` adds a last row `ALL_TYPES`: the mean of the question-type rows above it."""
    same = stability.same_seed.eq(True)
    metrics = ["profile_spearman", "top_layer_agreement"]
    summary = stability[~same].groupby("qtype")[metrics].mean()
    if same.any():
        within = stability[same].groupby("qtype")[metrics].mean().add_prefix("same_seed_")
        summary = summary.join(within, how="outer")
    if with_mean and len(summary):
        summary.loc[ALL_TYPES] = summary.mean()
    return summary


def pair_summary(stability: pd.DataFrame) -> pd.DataFrame:
    """Per pair of models: mean profile Spearman and top-layer agreement over question types, with
    `same_seed` and the number of question types compared (`n_qtypes`)."""
    columns = ["model_a", "model_b", "same_seed", "profile_spearman", "top_layer_agreement", "n_qtypes"]
    if stability.empty:
        return pd.DataFrame(columns=columns)
    by = stability.groupby(["model_a", "model_b"], sort=False)
    out = by[["profile_spearman", "top_layer_agreement"]].mean()
    out["same_seed"] = by["same_seed"].first()
    out["n_qtypes"] = by["qtype"].nunique()
    return out.reset_index()[columns]


@dataclass
class Comparison:
    """What `cliviz compare` reports: accuracy per (model, question type) and seed stability."""

    accuracy: pd.DataFrame  # accuracy_table
    stability: pd.DataFrame  # seed_stability: one row per (pair, question type)

    @property
    def summary(self) -> pd.DataFrame:
        """`stability_summary` with its `ALL_TYPES` mean row (empty without a pair to compare)."""
        return stability_summary(self.stability, with_mean=True) if len(self.stability) else pd.DataFrame()

    @property
    def pairs(self) -> pd.DataFrame:
        return pair_summary(self.stability)


def comparison_work(models: dict[str, tuple], data: DataSet, stability_samples: int | None = 140) -> int:
    """How many samples `run_comparison` answers and traces in all (the progress total)."""
    answered = sum(1 for r in data.records if r.answer is not None) * len(models)
    profiled = len(_profiled(data, stability_samples)) * sum(m.config.fusion == "cli" for m, _ in models.values())
    return answered + profiled


def run_comparison(
    models: dict[str, tuple],
    data: DataSet,
    *,
    stability_samples: int | None = 140,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Accuracy of every model (label -> (model, tokenizer)) on `data`, and the gate-map stability of
    the cli models between training seeds (read from each model's training summary). `progress(n)`
    hears of every n samples done, `comparison_work(...)` in all."""
    from cliviz.train import recorded_seed

    table = accuracy_table(models, data, progress=progress)
    profiles = {
        label: gate_profiles(m, t, data, limit=stability_samples, progress=progress)
        for label, (m, t) in models.items()
        if m.config.fusion == "cli"
    }
    seeds = {label: recorded_seed(m.name_or_path) for label, (m, _) in models.items()}
    fusions = {label: m.config.fusion for label, (m, _) in models.items()}
    return Comparison(table, seed_stability(profiles, fusions, seeds))


def comparison_figure(table: pd.DataFrame, title: str = "accuracy per question type") -> go.Figure:
    """Grouped bars: accuracy per question type (`overall` last), one colour per model, each bar with
    its 95% Wilson interval as an error bar (when the table carries `ci_low` / `ci_high`)."""
    from cliviz.analyses.heatmaps import QUALITATIVE, wrap_html

    fig = go.Figure()
    with_ci = {"ci_low", "ci_high"} <= set(table.columns)
    for i, (label, part) in enumerate(table.groupby("model", sort=False)):
        part = part.iloc[np.argsort(part["qtype"].to_numpy() == "overall", kind="stable")]
        error = (
            {
                "type": "data",
                "symmetric": False,
                "array": (part.ci_high - part.accuracy).tolist(),
                "arrayminus": (part.accuracy - part.ci_low).tolist(),
            }
            if with_ci
            else None
        )
        fig.add_bar(
            x=part.qtype,
            y=part.accuracy,
            name=label,
            marker_color=QUALITATIVE[i % len(QUALITATIVE)],
            error_y=error,
            customdata=part[["n"]].to_numpy() if "n" in part else None,
            hovertemplate="%{x}: %{y:.3f} (n = %{customdata[0]})<extra>" + label + "</extra>",
        )
    heading, lines = wrap_html(title + (" — bars: 95% Wilson intervals" if with_ci else ""), 90)
    fig.update_layout(
        title=heading,
        barmode="group",
        yaxis={"title": "accuracy", "range": [0, 1]},
        template="simple_white",
        legend={"orientation": "h", "y": -0.15},
        margin={"t": 50 + 20 * lines},
    )
    return fig


def question_count(table: pd.DataFrame) -> str:
    """` (N questions each)` from the `overall` rows' `n` (` (N1 / N2 questions)` when the models' counts
    differ): what each accuracy of the page rests on; empty when the table does not say."""
    if "n" not in table or "qtype" not in table:
        return ""
    counts = list(dict.fromkeys(int(n) for n in table.loc[table["qtype"] == "overall", "n"]))
    if not counts:
        return ""
    return f" ({counts[0]} questions each)" if len(counts) == 1 else f" ({' / '.join(map(str, counts))} questions)"


def comparison_page(table: pd.DataFrame, stability: pd.DataFrame, data: str = "") -> str:
    """`compare.html`: a titled page — the models and data set, the accuracy table with intervals, the
    bar chart, and the seed-stability table when there is one."""
    import html as html_lib

    models = ", ".join(dict.fromkeys(table["model"]))
    where = (f" on {data}" if data else "") + question_count(table)
    head = f"Comparison of {models}{where}"
    shown = table.copy()
    if {"ci_low", "ci_high"} <= set(shown.columns):
        shown["95% CI"] = [f"{lo:.2f}–{hi:.2f}" for lo, hi in zip(shown.ci_low, shown.ci_high)]
        shown = shown.drop(columns=["ci_low", "ci_high"])
    shown["accuracy"] = shown["accuracy"].map(lambda v: f"{v:.3f}")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(head)}</title></head>",
        f"<body style='font-family:sans-serif'><h2>{html_lib.escape(head)}</h2>",
        "<p>Accuracy with 95% Wilson intervals: with a few questions per type, differences inside the "
        "intervals are not evidence.</p>",
        comparison_figure(table, f"accuracy of {models}{where}").to_html(full_html=False, include_plotlyjs=True),
        shown.to_html(index=False),
    ]
    if len(stability):
        parts += ["<h3>gate-map stability across seeds</h3>", stability.to_html(index=False, float_format="%.2f")]
    return "".join(parts) + "</body></html>"


def write_comparison(out: Path, table: pd.DataFrame, stability: pd.DataFrame, data: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.csv", out / "stability.csv", out / "compare.html"]
    table.to_csv(paths[0], index=False)
    stability.to_csv(paths[1], index=False)
    paths[2].write_text(comparison_page(table, stability, data), encoding="utf-8")
    return paths
