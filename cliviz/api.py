"""Checked entry points for public functions whose home modules trust their arguments.

`cliviz.load_model`, `cliviz.ablate` and `cliviz.attribute` are these functions: each runs the
boundary checks of `cliviz.arguments` (the same ones the command line and the dashboard run), then
calls the function that does the work, so a wrong value is one `CLIVizError` naming the argument
instead of whatever the layers below would raise.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cliviz.arguments import check_layer, check_path, check_request, check_text, check_trace, shown, warn
from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cliviz.analyses.ablation_results import CellAblation
    from cliviz.model.modeling import CLIForConditionalGeneration


def load_model(path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """`(model, tokenizer)` from a model folder (None: the bundled cli-tiny; a bundled name such as
    `"projector-tiny"` also works), in eval mode; see `cliviz.model.loading.load_model`."""
    from cliviz.model.loading import load_model as load

    if path is not None:
        path = check_path(path, "path", "a model folder")
    check_text(device, "device")
    check_text(dtype, "dtype")
    return load(path, device=device, dtype=dtype)


def ablate(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image: Any,
    question: str,
    llm_layer: int,
    vision_layer: int | None = None,
    kind: str = "knockout",
    trace: Any = None,
) -> CellAblation:
    """Intervene on one gate cell and re-score the answer (`cliviz.analyses.ablation_results.ablate`),
    after checking every argument: the image (PIL, array or path) and question as `cliviz.trace`
    takes them, layers as real indices the model has, `trace` a `cliviz.Trace` or None."""
    from cliviz.analyses.ablation_results import ablate as run

    request = check_request(model, tokenizer, image, question)
    llm_layer = check_layer(llm_layer, "llm_layer", model.config.injection_layers, "injection layers")
    if vision_layer is not None:
        vision_layer = check_layer(vision_layer, "vision_layer", model.config.vision_layers, "vision layers")
    check_text(kind, "kind")
    check_trace(trace, "trace", optional=True)
    warn(request.warnings)
    return run(model, tokenizer, request.image, request.question, llm_layer, vision_layer, kind=kind, trace=trace)


def attribute(
    model: CLIForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image,
    question: str,
    **options: Any,
):
    """Attribute every answer token to gate cells, image patches and prompt tokens
    (`cliviz.analyses.attributions.attribute`; its keywords: method, steps, baseline,
    internal_batch_size, answer, max_new_tokens, target), after the checks `cliviz.trace` runs."""
    from cliviz.analyses.attributions import attribute as run
    from cliviz.arguments import check_max_new_tokens

    request = check_request(model, tokenizer, image, question)
    if "max_new_tokens" in options:
        check_max_new_tokens(options["max_new_tokens"])
        if options["max_new_tokens"] is None:
            del options["max_new_tokens"]
    if "answer" in options:
        check_text(options["answer"], "answer", optional=True)
    known = {"method", "steps", "baseline", "internal_batch_size", "answer", "max_new_tokens", "target"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CLIVizError(f"attribute() got an unknown keyword {unknown[0]!r}; use one of {', '.join(sorted(known))}")
    for key in ("method", "baseline", "target"):
        if key in options and not isinstance(options[key], str):
            raise CLIVizError(f"{key} must be text (str), got {shown(options[key])}")
    warn(request.warnings)
    return run(model, tokenizer, request.image, request.question, **options)
