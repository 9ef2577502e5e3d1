"""Faithfulness: do the cells the gates weigh most matter most to the answer?

A gate that puts its weight on a vision layer says where the LLM layer reads from, not that the
answer uses what it reads. `faithfulness` ranks the (LLM layer, vision layer) cells of a knockout
grid twice — by their unablated gate mass at the answer positions, and by the harm knocking them
out does (a lower log-prob, flips, lost accuracy) — and reports the Spearman rank correlation,
per question type and overall. High gate mass with no effect means the gate's choice is not used:
faithfulness must be measured, not assumed.

The report holds many p-values at once (four effects per question type, over cells that are not
independent: one LLM layer's cells share a softmax), so each row also carries `p_holm`, the
Holm–Bonferroni adjusted p-value over every test of the report (`cliviz.intervals.holm`): read
`p_holm < 0.05` as significant, not the raw `p_value`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cliviz.errors import CLIVizError
from cliviz.intervene.spec import ALL

# effect metric -> sign that turns it into "how much removing the cell hurt" (larger = more harm)
_HARM = {
    "delta_logprob_ref": ("drop_logprob_ref", -1.0),
    "delta_logprob_own": ("drop_logprob_own", -1.0),
    "flip_rate": ("flip_rate", 1.0),
    "delta_accuracy": ("drop_accuracy", -1.0),
}


def _mass_table(gate_mass_frame: pd.DataFrame | None, grid_frame: pd.DataFrame) -> pd.DataFrame:
    """Columns llm_layer, vision_layer, gate_mass [, qtype] from either accepted gate-mass shape."""
    src = grid_frame if gate_mass_frame is None else gate_mass_frame
    if "metric" in src.columns:
        src = src[src["metric"] == "gate_mass"].rename(columns={"value": "gate_mass"})
    else:
        col = next((c for c in ("gate_mass", "gate", "value") if c in src.columns), None)
        if col is None:
            raise CLIVizError("the gate-mass frame needs a gate_mass, gate or value column")
        src = src.rename(columns={col: "gate_mass"})
    if src.empty:
        raise CLIVizError("no gate mass to correlate with (a grid from knockout_grid carries it as metric gate_mass)")
    cols = ["llm_layer", "vision_layer", "gate_mass"] + (["qtype"] if "qtype" in src.columns else [])
    out = src[cols].copy()
    out["llm_layer"] = out["llm_layer"].astype("int64")
    out["vision_layer"] = out["vision_layer"].astype("int64")
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(rho, p); nan for fewer than 3 cells or a constant side, where a rank correlation means nothing."""
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    try:
        from scipy.stats import spearmanr

        res = spearmanr(x, y)
        return float(res.statistic), float(res.pvalue)
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return float(pd.Series(x).rank().corr(pd.Series(y).rank())), float("nan")


def faithfulness(grid_frame: pd.DataFrame, gate_mass_frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Does a cell's gate mass predict what knocking it out costs? Spearman rank correlation over the
    (LLM layer, vision layer) cells, per question type and overall (`all`).

    `grid_frame`: a `knockout_grid` frame. `gate_mass_frame`: the cells' mean unablated gate at the
    answer positions — a tidy frame with `metric == "gate_mass"` (a grid carries it: the default),
    or columns llm_layer, vision_layer, gate|gate_mass [, qtype] (e.g.
    `heatmaps.gate_matrix_frame(mean_gate_matrix(traces), ...)`). Effects are oriented as harm
    (drop_logprob_ref = -delta_logprob_ref, flip_rate, drop_accuracy, ...): rho > 0 means the cells
    the gates weigh most are the ones the answer depends on most. Columns: qtype, effect, rho,
    p_value, p_holm (Holm-adjusted over every row of this frame), n_cells.
    """
    cells = grid_frame[
        grid_frame["llm_layer"].notna() & grid_frame["vision_layer"].notna() & grid_frame["metric"].isin(list(_HARM))
    ].copy()
    if cells.empty:
        raise CLIVizError("the grid frame has no knockout cells")
    cells["llm_layer"] = cells["llm_layer"].astype("int64")
    cells["vision_layer"] = cells["vision_layer"].astype("int64")
    mass = _mass_table(gate_mass_frame, grid_frame)
    rows = []
    qtypes = [ALL] + sorted(q for q in cells["qtype"].astype(str).unique() if q != ALL)
    for q in qtypes:
        eff = cells[cells["qtype"].astype(str) == q]
        if "qtype" in mass.columns and (mass["qtype"].astype(str) == q).any():
            m = mass[mass["qtype"].astype(str) == q].drop(columns="qtype")
        elif "qtype" in mass.columns and q == ALL and mass["qtype"].isna().all():
            m = mass.drop(columns="qtype")
        elif "qtype" in mass.columns and (mass["qtype"].astype(str) == ALL).any():
            m = mass[mass["qtype"].astype(str) == ALL].drop(columns="qtype")
        elif "qtype" not in mass.columns:
            m = mass
        else:
            continue
        for metric, (effect, sign) in _HARM.items():
            e = eff[eff["metric"] == metric][["llm_layer", "vision_layer", "value"]]
            joined = e.merge(m, on=["llm_layer", "vision_layer"]).dropna()
            if joined.empty:
                continue
            rho, p = _spearman(joined["gate_mass"].to_numpy(float), sign * joined["value"].to_numpy(float))
            rows.append({"qtype": q, "effect": effect, "rho": rho, "p_value": p, "n_cells": len(joined)})
    from cliviz.intervals import holm

    frame = pd.DataFrame(rows, columns=["qtype", "effect", "rho", "p_value", "n_cells"])
    frame.insert(4, "p_holm", holm(frame["p_value"].to_numpy(float)) if len(frame) else [])
    return frame


CORRECTION = "Holm–Bonferroni over every test of the report"
