"""The CLI model family: config, modules, loading and `attach`."""

from cliviz.model.configuration import FUSIONS, CLIConfig
from cliviz.model.modeling import CLIForConditionalGeneration

__all__ = ["CLIConfig", "CLIForConditionalGeneration", "FUSIONS"]
