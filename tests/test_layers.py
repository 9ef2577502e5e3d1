"""The packages import downward only.

From the bottom: the library (`cliviz/`: model, data, inference, the intervention engine
`cliviz.intervene`, tracing and trace files, training) → the analyses (`cliviz.analyses`) → the
dashboard (`cliviz.app`) → the command line (`cliviz.cli`) and the lazy top-level facade
(`cliviz/__init__.py` with its checked wrappers in `cliviz/api.py`), which sit above everything.
The one way up from the library is the display seam `cliviz/tracing/display.py`
(`Trace.heatmap`, `_repr_html_`), which imports its drawing code when called. Imports are read
from the source with `ast`, function-local and `TYPE_CHECKING` ones included, so a cycle cannot
hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the one `cliviz` namespace lives in the source tree (pyproject's package-dir).
PACKAGE_DIRS = {"cliviz": ROOT / "cliviz", "cliviz.analyses": ROOT / "analyses", "cliviz.app": ROOT / "app"}
SEAM = "cliviz.tracing.display"


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            found[module_name(package, folder, path)] = path
    return found


def imported(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                out.append((base, child.lineno, in_function))
                out.extend((f"{base}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, local)

    visit(tree, False)
    return out


def under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def violations(importers, forbidden: tuple[str, ...]) -> list[str]:
    """'file:line imports target' for each import of a `forbidden` package by a module `importers` accepts."""
    bad = []
    for name, path in sorted(modules().items()):
        if importers(name):
            for target, line, _ in imported(name, path):
                if any(under(target, f) for f in forbidden):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return sorted(set(bad))


def library(name: str) -> bool:
    """Every module under cliviz/ but the facade, the commands and the display seam."""
    above = ("cliviz.analyses", "cliviz.app", "cliviz.cli")
    facade = ("cliviz", "cliviz.api", SEAM)
    return under(name, "cliviz") and not any(under(name, p) for p in above) and name not in facade


def test_the_library_never_imports_the_analyses_or_the_app():
    assert violations(library, ("cliviz.analyses", "cliviz.app")) == []


def test_the_intervention_engine_sits_below_tracing_and_training():
    forbidden = ("cliviz.tracing", "cliviz.train", "cliviz.analyses", "cliviz.app", "cliviz.cli")
    assert violations(lambda name: under(name, "cliviz.intervene"), forbidden) == []


def test_the_analyses_never_import_the_app_or_the_commands():
    assert violations(lambda name: under(name, "cliviz.analyses"), ("cliviz.app", "cliviz.cli")) == []
    assert violations(lambda name: under(name, "cliviz.app"), ("cliviz.cli",)) == []


def test_the_library_rule_sees_the_modules_it_guards():
    guarded = {name for name in modules() if library(name)}
    assert {"cliviz.tracing.causal", "cliviz.tracing.schema", "cliviz.intervene.engine"} <= guarded
    assert not guarded & {SEAM, "cliviz", "cliviz.cli.main", "cliviz.analyses.heatmaps"}


def test_the_display_seam_reaches_the_analyses_only_when_called():
    seam = imported(SEAM, modules()[SEAM])
    upward = [(target, in_function) for target, _, in_function in seam if under(target, "cliviz.analyses")]
    assert upward, "the seam is where Trace/TraceSet reach the plotting code"
    assert all(in_function for _, in_function in upward)


def test_the_scanner_sees_function_local_and_relative_imports(tmp_path):
    # The rules above are only as good as the scanner: it must see an import hidden in a function.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = pkg / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from cliviz.app import state\n"
        "def f():\n    from cliviz.analyses import heatmaps\n"
        "from . import sibling\n"
    )
    found = {(target, in_function) for target, _, in_function in imported("pkg.mod", source)}
    assert ("cliviz.analyses.heatmaps", True) in found
    assert ("cliviz.app.state", False) in found
    assert ("pkg.sibling", False) in found
