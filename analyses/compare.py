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

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cliviz.evaluation import DataSet, evaluate
from cliviz.inputs import load_image


def accuracy_table(models: dict[str, tuple], data: DataSet, batch_size: int = 64) -> pd.DataFrame:
    """`models`: label -> (model, tokenizer). Returns rows model, fusion, qtype, accuracy, n."""
    rows = []
    for label, (model, tok) in models.items():
        result = evaluate(model, tok, data, batch_size)
        for qtype, acc in result["per_type"].items():
            rows.append({"model": label, "fusion": model.config.fusion, "qtype": qtype, "accuracy": acc, "n": result["n_per_type"][qtype]})
        rows.append({"model": label, "fusion": model.config.fusion, "qtype": "overall", "accuracy": result["overall"], "n": result["n"]})
    return pd.DataFrame(rows)


def gate_profiles(model, tok, data: DataSet, batch_size: int = 32, limit: int | None = 140) -> dict[str, np.ndarray]:
    """Per question type, the mean answer-step gate matrix `[L, K]` of one model."""
    from cliviz.tracing import trace_batch

    records = [r for r in data.records if r.qtype][:limit]
    sums: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        traces = trace_batch(model, tok, [load_image(r.image_path) for r in chunk], [r.question for r in chunk], max_new_tokens=2)
        for record, t in zip(chunk, traces):
            sums.setdefault(record.qtype, []).append(t.answer_gates().mean(axis=1))  # [L, K]
    return {q: np.mean(v, axis=0) for q, v in sorted(sums.items())}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def seed_stability(
    profiles: dict[str, dict[str, np.ndarray]], fusions: dict[str, str], seeds: dict[str, int | None] | None = None,
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
            rows.append({
                "fusion": fusions[a], "model_a": a, "model_b": b, "qtype": qtype,
                "profile_spearman": _spearman(pa_.mean(0), pb_.mean(0)),
                "top_layer_agreement": float(np.mean(pa_.argmax(1) == pb_.argmax(1))),
                "same_seed": (seeds[a] == seeds[b]) if known else None,
            })
    columns = ["fusion", "model_a", "model_b", "qtype", "profile_spearman", "top_layer_agreement", "same_seed"]
    return pd.DataFrame(rows, columns=columns)


def stability_summary(stability: pd.DataFrame) -> pd.DataFrame:
    """Per question type: mean agreement across different seeds (pairs of unknown seed count as
    different) and, where the set holds checkpoints of one seed, within a seed for reference."""
    same = stability.same_seed.eq(True)
    metrics = ["profile_spearman", "top_layer_agreement"]
    summary = stability[~same].groupby("qtype")[metrics].mean()
    if same.any():
        within = stability[same].groupby("qtype")[metrics].mean().add_prefix("same_seed_")
        summary = summary.join(within, how="outer")
    return summary


def comparison_figure(table: pd.DataFrame) -> go.Figure:
    """Grouped bars: accuracy per question type, one colour per model."""
    from cliviz.analyses.heatmaps import QUALITATIVE

    fig = go.Figure()
    for i, (label, part) in enumerate(table.groupby("model", sort=False)):
        fig.add_bar(x=part.qtype, y=part.accuracy, name=label, marker_color=QUALITATIVE[i % len(QUALITATIVE)])
    fig.update_layout(barmode="group", yaxis={"title": "accuracy", "range": [0, 1]}, template="simple_white",
                      legend={"orientation": "h", "y": 1.1})
    return fig


def write_comparison(out: Path, table: pd.DataFrame, stability: pd.DataFrame) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.csv", out / "stability.csv", out / "compare.html"]
    table.to_csv(paths[0], index=False)
    stability.to_csv(paths[1], index=False)
    comparison_figure(table).write_html(str(paths[2]), include_plotlyjs=True)
    return paths
