"""Ablation results that show themselves: one cell (`ablate`) and a knockout grid (`knockout`).

`ablate` wraps the batched engine's `single_cell` as a `CellAblation`: the numbers are the
engine's, unchanged; it adds a plotly `heatmap()` (the builders of `analyses.heatmaps`) and
`_repr_html_` for Jupyter. `knockout` is the `run_grid` preset of `cliviz.analyses.ablations` under
a notebook's name: a grid's result is the study's one result type, `AblationReport` (`matrix`,
`heatmap`, `off_explains`, `_repr_html_`), so a notebook user needs neither the command line nor
the frame layout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from cliviz.analyses.ablations.report import AblationReport


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


KNOCKOUT_OPTIONS = ("max_batch", "n_boot", "seed", "progress", "tokens")


def knockout(
    model,
    tokenizer,
    images: Sequence,
    questions: Sequence[str],
    references: Sequence[str | None] | None = None,
    *,
    qtypes: Sequence[str | None] | None = None,
    **options: Any,
) -> AblationReport:
    """The knockout grid of a set of samples (`run_grid`, a preset of `run_study`): every (LLM layer,
    vision layer) knockout plus each LLM layer's injection off, batched, as an `AblationReport`.

    `references`: the answers to score (None: the model's own unablated answers); `qtypes`: question
    types, for per-type effects. Options: `max_batch`, `n_boot` (bootstrap resamples of the CIs, 0 for
    none), `seed` and `progress` go to `run_study`; `tokens` (all | prompt | image | answer) picks the
    token set of every condition (`grid_study_conditions`). `knockout_grid`'s `share_prefix` is not
    taken (a study always shares the unablated prefix; the numbers are the same): use `knockout_grid`
    for the frame of the unshared loop. Example::

        from cliviz import knockout, load_image, load_model
        model, tok = load_model()
        images = [load_image("assets/examples/color.png"), load_image("assets/examples/glyph.png")]
        grid = knockout(model, tok, images, ["what color is the triangle ?", "what digit is in the corner ?"], n_boot=0)
        grid.matrix("delta_logprob_own").shape    # (n injection layers, n vision layers)
        grid.off_explains()                       # share of each cell's harm that injection off explains
    """
    from cliviz.analyses.ablations import StudySamples, grid_study_conditions, run_study

    unknown = sorted(set(options) - set(KNOCKOUT_OPTIONS))
    if unknown:
        raise CLIVizError(
            f"knockout() takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(KNOCKOUT_OPTIONS)}"
        )
    tokens = options.pop("tokens", "all")
    samples = StudySamples(list(images), list(questions), references, qtypes)
    return run_study(model, tokenizer, samples, functools.partial(grid_study_conditions, tokens=tokens), **options)
