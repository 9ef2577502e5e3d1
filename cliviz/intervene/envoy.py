"""The nnsight view of a CLI model, shared by recording (`cliviz.tracing`) and interventions.

Wrapping a model with `nnsight.NNsight` walks its module tree, so it is done once per model object
and kept while the model lives (a weak reference: dropping the model drops its wrapper).
"""

from __future__ import annotations

import weakref

import nnsight

from cliviz.model.modeling import CLIForConditionalGeneration

_ENVOYS: weakref.WeakKeyDictionary[CLIForConditionalGeneration, nnsight.NNsight] = weakref.WeakKeyDictionary()


def envoy(model: CLIForConditionalGeneration) -> nnsight.NNsight:
    """The nnsight wrapper of `model`, built once per model object (wrapping is not free)."""
    if model not in _ENVOYS:
        _ENVOYS[model] = nnsight.NNsight(model)
    return _ENVOYS[model]
