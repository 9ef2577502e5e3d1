"""cliviz — see which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters.

Every public function checks its arguments first (`cliviz.arguments`, the checks the command
line and the dashboard run too): a wrong value is one `CLIVizError` naming the argument. The
public API is flat and lazy: `import cliviz` loads nothing heavy (no torch, transformers,
nnsight, plotly or dash); each name is imported from its home module on first use (PEP 562), so
the command line and `import cliviz` stay fast. Example::

    import cliviz
    model, tok = cliviz.load_model()                                   # the bundled cli-tiny
    image = cliviz.load_image("assets/examples/color.png")
    t = cliviz.trace(model, tok, image, "what color is the triangle ?")
    fig = t.heatmap()                                                  # plotly Figure; `t` shows itself in Jupyter
    cell = cliviz.ablate(model, tok, image, "what color is the triangle ?", llm_layer=2, vision_layer=3)
    r = cliviz.attribute(model, tok, image, "what color is the triangle ?", target="margin", steps=16)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cliviz._version import __version__ as __version__  # one source: pyproject.toml, via importlib.metadata
from cliviz.progress_bars import plain_bars_without_widgets

plain_bars_without_widgets()  # in Jupyter without ipywidgets: tqdm's plain bar, without its install warning

# public name -> home module (attribute of the same name there); a module path ending in ":module"
# names a module exported as a whole.
_EXPORTS: dict[str, str] = {
    # models
    "load_model": "cliviz.api",
    "attach": "cliviz.model.attach",
    "attach_folder": "cliviz.model.attach",
    "export_llava_base": "cliviz.model.export",
    "CLIConfig": "cliviz.model.configuration",
    "CLIForConditionalGeneration": "cliviz.model.modeling",
    # inputs and data
    "load_image": "cliviz.inputs",
    "iter_samples": "cliviz.data.dataset",
    "CLIVizError": "cliviz.errors",
    # tracing and trace files
    "trace": "cliviz.tracing.record",
    "trace_batch": "cliviz.tracing.record",
    "ask": "cliviz.inference",
    "Answer": "cliviz.inference",
    "CLIVizWarning": "cliviz.errors",
    "Trace": "cliviz.tracing.schema",
    "TraceMeta": "cliviz.tracing.schema",
    "TraceSet": "cliviz.tracing.traceset",
    "read_traces": "cliviz.tracing.traceset",
    "write_traces": "cliviz.tracing.traceset",
    "CausalCheck": "cliviz.tracing.causal",
    "causal_checks": "cliviz.tracing.causal",
    "reset_notebook": "cliviz.tracing.display",
    # gate maps
    "gate_matrix": "cliviz.analyses.heatmaps",
    "mean_gate_matrix": "cliviz.analyses.heatmaps",
    "heatmap_figure": "cliviz.analyses.heatmaps",
    # ablations: the batched engine and its displayable results
    "Ablation": "cliviz.analyses.ablations",
    "score_conditions": "cliviz.analyses.ablations",
    "knockout_grid": "cliviz.analyses.ablations",
    "grid_matrix": "cliviz.analyses.ablations",
    "single_cell": "cliviz.analyses.ablations",
    "effects_frame": "cliviz.analyses.ablations",
    "faithfulness": "cliviz.analyses.ablations",
    "mean_gates": "cliviz.analyses.ablations",
    "ablate": "cliviz.api",
    "knockout": "cliviz.analyses.ablation_results",
    "CellAblation": "cliviz.analyses.ablation_results",
    "AblationReport": "cliviz.analyses.ablations",
    # attributions
    "attribute": "cliviz.api",
    "AttributionResult": "cliviz.analyses.attributions",
    # figures and the app
    "figures": "cliviz.analyses.figures:module",
    "make_figures": "cliviz.analyses.figures",
    "create_app": "cliviz.app",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its home module the first time it is used (PEP 562)."""
    home = _EXPORTS.get(name)
    if home is None:
        raise AttributeError(f"module 'cliviz' has no attribute {name!r}")
    module_name, _, kind = home.partition(":")
    module = importlib.import_module(module_name)
    value = module if kind == "module" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what IDEs and type checkers see; never executed
    from cliviz.analyses import figures as figures
    from cliviz.analyses.ablation_results import CellAblation as CellAblation
    from cliviz.analyses.ablation_results import knockout as knockout
    from cliviz.analyses.ablations import Ablation as Ablation
    from cliviz.analyses.ablations import AblationReport as AblationReport
    from cliviz.analyses.ablations import effects_frame as effects_frame
    from cliviz.analyses.ablations import faithfulness as faithfulness
    from cliviz.analyses.ablations import grid_matrix as grid_matrix
    from cliviz.analyses.ablations import knockout_grid as knockout_grid
    from cliviz.analyses.ablations import mean_gates as mean_gates
    from cliviz.analyses.ablations import score_conditions as score_conditions
    from cliviz.analyses.ablations import single_cell as single_cell
    from cliviz.analyses.attributions import AttributionResult as AttributionResult
    from cliviz.analyses.figures import make_figures as make_figures
    from cliviz.analyses.heatmaps import gate_matrix as gate_matrix
    from cliviz.analyses.heatmaps import heatmap_figure as heatmap_figure
    from cliviz.analyses.heatmaps import mean_gate_matrix as mean_gate_matrix
    from cliviz.api import ablate as ablate
    from cliviz.api import attribute as attribute
    from cliviz.api import load_model as load_model
    from cliviz.app import create_app as create_app
    from cliviz.data.dataset import iter_samples as iter_samples
    from cliviz.errors import CLIVizError as CLIVizError
    from cliviz.errors import CLIVizWarning as CLIVizWarning
    from cliviz.inference import Answer as Answer
    from cliviz.inference import ask as ask
    from cliviz.inputs import load_image as load_image
    from cliviz.model.attach import attach as attach
    from cliviz.model.attach import attach_folder as attach_folder
    from cliviz.model.configuration import CLIConfig as CLIConfig
    from cliviz.model.export import export_llava_base as export_llava_base
    from cliviz.model.modeling import CLIForConditionalGeneration as CLIForConditionalGeneration
    from cliviz.tracing.causal import CausalCheck as CausalCheck
    from cliviz.tracing.causal import causal_checks as causal_checks
    from cliviz.tracing.display import reset_notebook as reset_notebook
    from cliviz.tracing.record import trace as trace
    from cliviz.tracing.record import trace_batch as trace_batch
    from cliviz.tracing.schema import Trace as Trace
    from cliviz.tracing.schema import TraceMeta as TraceMeta
    from cliviz.tracing.traceset import TraceSet as TraceSet
    from cliviz.tracing.traceset import read_traces as read_traces
    from cliviz.tracing.traceset import write_traces as write_traces
