"""Shared by the benchmark scripts: the bundled model, loaded the way users load it."""

from __future__ import annotations


def bundled_model(device: str = "cpu"):
    """The bundled cli-tiny in fp32: `(model, tokenizer, label)`."""
    from cliviz.model.loading import load_model

    model, tok = load_model(device=device, dtype="float32")
    return model, tok, "bundled cli-tiny"
