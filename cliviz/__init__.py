"""cliviz — see which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters."""

__version__ = "0.1.0"
