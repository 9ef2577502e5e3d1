"""The CLI model family: config, modules, loading and `attach`."""

from cliviz.model.configuration import FUSIONS, CLIConfig
from cliviz.model.modeling import CLIForConditionalGeneration

__all__ = ["CLIConfig", "CLIForConditionalGeneration", "FUSIONS", "load_model"]


def __getattr__(name: str):
    """`load_model` on first use (PEP 562): `loading` imports this package's modules itself."""
    if name == "load_model":
        from cliviz.model.loading import load_model

        return load_model
    raise AttributeError(f"module 'cliviz.model' has no attribute {name!r}")
