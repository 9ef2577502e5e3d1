"""The package version, from one source: `version` in pyproject.toml, as installed (`importlib.metadata`)."""

from importlib import metadata

try:
    __version__ = metadata.version("cliviz")
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never pip-installed
    __version__ = "0+unknown"
