"""The seam between the trace classes and the plotting layer: the only library module that reaches
`cliviz.analyses`.

`Trace.heatmap`, `TraceSet.heatmap` and their `_repr_html_` (Jupyter) draw with plotly code that
lives in `cliviz.analyses` (heatmaps, display), which is built on top of the trace classes. Each
function here imports its drawing code when called, so the library keeps importing downward only
(`tests/test_layers.py`) and reading a trace file never loads plotly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cliviz.tracing.schema import Trace
    from cliviz.tracing.traceset import TraceSet


def trace_heatmap_figure(trace: Trace, *args: Any, **kwargs: Any) -> Any:
    """One trace's gate map as a plotly `Figure` (see `cliviz.analyses.heatmaps.trace_heatmap_figure`)."""
    from cliviz.analyses.heatmaps import trace_heatmap_figure as draw

    return draw(trace, *args, **kwargs)


def trace_html(trace: Trace) -> str:
    """One trace as HTML for Jupyter (see `cliviz.analyses.display.trace_html`)."""
    from cliviz.analyses.display import trace_html as render

    return render(trace)


def traceset_heatmap_figure(traces: TraceSet, *args: Any, **kwargs: Any) -> Any:
    """A trace set's mean gate map (see `cliviz.analyses.heatmaps.traceset_heatmap_figure`)."""
    from cliviz.analyses.heatmaps import traceset_heatmap_figure as draw

    return draw(traces, *args, **kwargs)


def traceset_html(traces: TraceSet) -> str:
    """A trace set as HTML for Jupyter (see `cliviz.analyses.display.traceset_html`)."""
    from cliviz.analyses.display import traceset_html as render

    return render(traces)


def reset_notebook() -> None:
    """Inline plotly.js (~4.8 MB) again in the next figure a notebook display shows.

    Displays (`Trace`, `TraceSet`, ablation and attribution results) inline plotly.js once per Python
    process — the first one carries it, later ones (~32 kB for a 31 x 25 layer trace) draw with the
    `window.Plotly` it loaded — so call this after clearing the output that carried it (a later figure
    then says so), and re-run the cell (see `cliviz.analyses.display.figure_html`).
    """
    from cliviz.analyses.display import reset_plotlyjs

    reset_plotlyjs()
