"""cliviz — see which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters."""

from cliviz._version import __version__ as __version__  # one source: pyproject.toml, via importlib.metadata
