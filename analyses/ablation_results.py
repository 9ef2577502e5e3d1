"""Ablation results that show themselves: one cell (`ablate`) and a knockout grid (`knockout`).

Thin, displayable wrappers over the batched engine in `cliviz.analyses.ablations`
(`single_cell`, `knockout_grid`, `grid_matrix`): the numbers are the engine's, unchanged; these
classes add a plotly `heatmap()` (the builders of `analyses.heatmaps`) and `_repr_html_` for
Jupyter, so a notebook user needs neither the command line nor the frame layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cliviz.errors import CLIVizError

GRID_UNITS = {
    "delta_logprob_ref": "Δ log-prob (reference answer), nats",
    "delta_logprob_own": "Δ log-prob (own answer), nats",
    "flip_rate": "share of answers flipped",
    "accuracy": "accuracy under the knockout",
    "delta_accuracy": "Δ accuracy",
    "gate_mass": "mean gate",
}


@dataclass
class CellAblation:
    """One intervention on one gate cell of one question, against the unablated run.

    `answer` / `prob`: the first answer token and its probability under the intervention;
    `base_answer` / `base_prob`: unablated; `delta_logprob`: change of the base answer's log-prob
    (nats); `flipped`: the answer token changed. `trace`: the unablated trace, when given, for the map.
    """

    question: str
    kind: str
    llm_layer: int
    vision_layer: int | None
    answer: str
    prob: float
    base_answer: str
    base_prob: float
    delta_logprob: float
    base_answer_prob: float
    flipped: bool
    condition: str
    trace: Any = None

    def heatmap(self):
        """The unablated gate map with the intervened cell outlined (needs `trace`)."""
        if self.trace is None:
            raise CLIVizError("this ablation has no trace to draw; pass trace= to ablate()")
        fig = self.trace.heatmap()
        vis, inj = self.trace.meta.vision_layers, self.trace.meta.injection_layers
        if self.llm_layer in inj:
            y = inj.index(self.llm_layer)
            x0, x1 = (
                (vis.index(self.vision_layer) - 0.5, vis.index(self.vision_layer) + 0.5)
                if self.vision_layer in vis
                else (-0.5, len(vis) - 0.5)
            )
            fig.add_shape(type="rect", x0=x0, x1=x1, y0=y - 0.5, y1=y + 0.5, line={"color": "#D55E00", "width": 3})
        return fig

    def _repr_html_(self) -> str:
        from cliviz.analyses.display import esc, figure_html

        cell = "style='padding:2px 10px;text-align:left'"
        change = "the answer changed" if self.flipped else "the answer stayed the same"
        table = (
            f"<div style='font-family:sans-serif'><b>{esc(self.condition)}</b> on "
            f"<i>{esc(self.question)}</i></div><table style='border-collapse:collapse;font-size:13px'>"
            f"<tr><th {cell}></th><th {cell}>original</th><th {cell}>{esc(self.condition)}</th></tr>"
            f"<tr><th {cell}>answer token</th><td {cell}>{esc(self.base_answer)}</td><td {cell}>"
            f"{esc(self.answer)}</td></tr><tr><th {cell}>its probability</th><td {cell}>{self.base_prob:.3f}</td>"
            f"<td {cell}>{self.prob:.3f}</td></tr></table>"
            f"<div style='font-size:12.5px'>Δ log-prob of the original answer token: {self.delta_logprob:+.4f} "
            f"(its probability now {self.base_answer_prob:.3f}) — {change}.</div>"
        )
        return table + (figure_html(self.heatmap()) if self.trace is not None and self.trace.has_gates else "")


def ablate(
    model,
    tokenizer,
    image,
    question: str,
    llm_layer: int,
    vision_layer: int | None = None,
    kind: str = "knockout",
    trace=None,
) -> CellAblation:
    """Intervene on one gate cell (real layer indices) and re-score the answer (`single_cell`).

    `kind`: knockout | zero | onehot | uniform | injection_off (the last two act on the whole
    LLM layer). Pass the unablated `trace` to get the map with the cell outlined. Example::

        from cliviz import ablate, load_image, load_model
        model, tok = load_model()
        image = load_image("assets/examples/color.png")
        cell = ablate(model, tok, image, "what color is the triangle ?", llm_layer=2, vision_layer=3)
        cell.delta_logprob, cell.flipped          # change of the answer's log-prob, answer changed?
    """
    from cliviz.analyses.ablations import single_cell

    out = single_cell(model, tokenizer, image, question, llm_layer, vision_layer, kind=kind)
    return CellAblation(
        question=question,
        kind=kind,
        llm_layer=int(llm_layer),
        vision_layer=None if vision_layer is None else int(vision_layer),
        trace=trace,
        **out,
    )


@dataclass
class KnockoutGrid:
    """Every (LLM layer, vision layer) knockout of a set of samples: the engine's tidy `frame`
    (see `knockout_grid`) plus the layer lists needed to lay it out as `[L, K]` matrices."""

    frame: pd.DataFrame
    vision_layers: list[int]
    injection_layers: list[int]

    @property
    def n_samples(self) -> int:
        rows = self.frame[(self.frame["qtype"] == "all")]
        return int(rows["n"].max()) if len(rows) else 0

    def matrix(self, metric: str = "delta_logprob_own", qtype: str = "all") -> np.ndarray:
        """`[L, K]` matrix of one metric (rows: injection layers, columns: vision layers)."""
        from cliviz.analyses.ablations import grid_matrix

        return grid_matrix(self.frame, self.vision_layers, self.injection_layers, metric=metric, qtype=qtype)

    def heatmap(self, metric: str = "delta_logprob_own", qtype: str = "all"):
        """Diverging map of one metric, symmetric around 0, with its absolute range in the colour bar."""
        from cliviz.analyses.heatmaps import difference_figure

        m = self.matrix(metric, qtype)
        top = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        unit = GRID_UNITS.get(metric, metric)
        return difference_figure(
            m,
            self.vision_layers,
            self.injection_layers,
            label=f"{metric}<br>±{top:.2g}",
            title=f"knockout of each gate cell (the rest renormalised): {unit} ({qtype}, n={self.n_samples})",
            zmax=top if top > 0 else None,
        )

    def _repr_html_(self) -> str:
        from cliviz.analyses.display import figure_html

        m = self.matrix("delta_logprob_own")
        i, k = np.unravel_index(int(np.nanargmin(m)), m.shape)
        flips = self.matrix("flip_rate")
        head = (
            f"<div style='font-family:sans-serif'><b>Knockout grid</b>: {len(self.injection_layers)} LLM x "
            f"{len(self.vision_layers)} vision layers, {self.n_samples} samples. Most harmful cell: "
            f"L{self.injection_layers[i]} × V{self.vision_layers[k]} (Δ log-prob {m[i, k]:+.4f}); largest flip "
            f"rate {np.nanmax(flips):.0%}.</div>"
        )
        from cliviz.analyses.ablations.report import RENORMALISE_NOTE

        note = f"<div style='font-size:12px'>{RENORMALISE_NOTE}</div>"
        return (
            head + note + figure_html(self.heatmap()) + "<div style='font-size:12px'>numbers: <code>.frame</code></div>"
        )


def knockout(
    model,
    tokenizer,
    images: Sequence,
    questions: Sequence[str],
    references: Sequence[str | None] | None = None,
    *,
    qtypes: Sequence[str | None] | None = None,
    **options: Any,
) -> KnockoutGrid:
    """`knockout_grid` (every cell, batched) wrapped as a displayable `KnockoutGrid`. Example::

    from cliviz import knockout, load_image, load_model
    model, tok = load_model()
    images = [load_image("assets/examples/color.png"), load_image("assets/examples/glyph.png")]
    grid = knockout(model, tok, images, ["what color is the triangle ?", "what digit is in the corner ?"], n_boot=0)
    grid.matrix("delta_logprob_own").shape    # (n injection layers, n vision layers)
    """
    from cliviz.analyses.ablations import knockout_grid

    frame = knockout_grid(model, tokenizer, list(images), list(questions), references, qtypes=qtypes, **options)
    return KnockoutGrid(frame, list(model.config.vision_layers), list(model.config.injection_layers))
