"""Plain progress bars in a Jupyter kernel without ipywidgets, and no warning about it.

transformers and huggingface_hub import `tqdm.auto` when they load. In a Jupyter kernel that picks
tqdm's notebook widget, which needs ipywidgets; without it, tqdm falls back to its plain text bar
but first prints `TqdmWarning: IProgress not found. Please update jupyter and ipywidgets` into the
first cell that imports them — an install hint about an optional package, shown in cliviz's
quickstart as if something were broken. `plain_bars_without_widgets()` makes that choice once,
before those libraries do: in a kernel without ipywidgets it imports `tqdm.autonotebook` (the
module `tqdm.auto` takes its class from) with that one warning silenced, so every later import gets
the plain bar it would have fallen back to. With ipywidgets installed, or outside a kernel, it does
nothing: the widget path, or the terminal bar, stays as tqdm chooses it.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

NO_WIDGETS_WARNING = "IProgress not found"  # the start of tqdm's `WARN_NOIPYW`


def plain_bars_without_widgets() -> bool:
    """Settle `tqdm.auto` on the plain bar in a Jupyter kernel that lacks ipywidgets; True when it
    did (False: not a kernel, ipywidgets present, or tqdm already chose)."""
    if "ipykernel.zmqshell" not in sys.modules or "tqdm.autonotebook" in sys.modules:
        return False
    if importlib.util.find_spec("ipywidgets") is not None or importlib.util.find_spec("tqdm") is None:
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_WIDGETS_WARNING)
        importlib.import_module("tqdm.autonotebook")
    return True
