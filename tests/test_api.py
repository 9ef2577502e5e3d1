"""The public Python API: lazy top-level names, a light `import cliviz` and `cliviz --help`, typed,
every docstring example and the README's Python API block executed, and the example notebook run
end to end in a real Jupyter kernel (nbclient + ipykernel)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import EXAMPLES, REPO

HEAVY = ("torch", "transformers", "nnsight", "dash", "plotly", "pandas", "pyarrow", "sklearn", "captum", "PIL")


def _imported_heavy(code: str) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter; return the heavy top-level packages it imported and its output."""
    probe = (
        f"{code}\nimport sys\nprint('HEAVY=' + ','.join(sorted({{m.split('.')[0] for m in sys.modules}} "
        f"& set({HEAVY!r}))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("HEAVY=")]
    assert line, proc.stdout + proc.stderr
    return [m for m in line[-1][len("HEAVY=") :].split(",") if m], proc.stdout + proc.stderr


# ------------------------------------------------------------------------ lazy and light


def test_import_cliviz_loads_nothing_heavy():
    heavy, _ = _imported_heavy("import cliviz\nassert 'load_model' in dir(cliviz)")
    assert heavy == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["trace", "--help"],
        ["attribute", "--help"],
        ["ablate", "--help"],
        ["dash", "--help"],
        ["train", "--help"],
        ["sweep", "--help"],
        ["compare", "--help"],
        ["figures", "--help"],
        ["attach", "--help"],
        ["trace", "--bogus-option"],
        ["no-such-command"],
    ],
)
def test_help_and_bad_options_import_no_heavy_library(argv):
    """`cliviz --help` (and a typo) must not pay for torch & co.: the commands import them inside."""
    code = (
        f"import sys\nsys.argv = ['cliviz', *{argv!r}]\nfrom cliviz.cli.main import main\n"
        "try:\n    main()\n    print('EXIT=0')\nexcept SystemExit as e:\n    print('EXIT=' + str(e.code))"
    )
    heavy, out = _imported_heavy(code)
    assert heavy == [], (argv, heavy)
    exit_code = re.search(r"EXIT=(\S+)", out)
    assert exit_code and exit_code.group(1) == ("0" if argv[-1] == "--help" else "2"), out


# ------------------------------------------------------------------------ names, types


def _type_checking_names() -> set[str]:
    tree = ast.parse((REPO / "cliviz" / "__init__.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                names |= {a.asname or a.name for a in imp.names}
    return names


def test_public_names_resolve_to_their_home_objects():
    import cliviz

    exports = cliviz._EXPORTS
    assert {
        "load_model",
        "attach",
        "trace",
        "Trace",
        "TraceSet",
        "Ablation",
        "score_conditions",
        "knockout_grid",
        "attribute",
        "figures",
        "ablate",
        "CausalCheck",
    } <= set(exports)
    assert set(cliviz.__all__) == set(exports) | {"__version__"}
    assert set(cliviz.__all__) <= set(dir(cliviz))
    assert _type_checking_names() == set(exports)  # what IDEs see is exactly what runs
    for name, home in exports.items():
        module_name, _, kind = home.partition(":")
        module = importlib.import_module(module_name)
        assert getattr(cliviz, name) is (module if kind == "module" else getattr(module, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cliviz.nope  # noqa: B018


def test_package_is_typed():
    assert (REPO / "cliviz" / "py.typed").is_file()
    assert '"cliviz" = ["py.typed"]' in (REPO / "pyproject.toml").read_text()


# ------------------------------------------------------------------------ docstring examples

PACKAGE_DIRS = {"cliviz": REPO / "cliviz", "cliviz.analyses": REPO / "analyses", "cliviz.app": REPO / "app"}
# Examples in files owned by other work that cannot run as written; strict, so fixing them fails here.
NOT_RUNNABLE: dict[str, str] = {}  # name -> why its example cannot run as written (none today)


def _examples() -> list[tuple[str, str, str]]:
    """(module.qualname, module, source) of every `Example::` block in a package docstring."""
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            if ".venv" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            module = ".".join([package, *rel.parts]).removesuffix(".__init__")
            tree = ast.parse(path.read_text(encoding="utf-8"))
            nodes = [(module, tree)] + [
                (f"{module}.{n.name}", n)
                for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            ]
            for name, node in nodes:
                doc = ast.get_docstring(node)
                if doc and "Example::" in doc:
                    found.append((name, module, _literal_block(doc)))
    return found


def _literal_block(doc: str) -> str:
    """The lines after `Example::` indented at least as much as the first of them (reST literal block)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("Example::"))
    body = [line for line in lines[start + 1 :]]
    first = next(line for line in body if line.strip())
    indent = len(first) - len(first.lstrip())
    block = []
    for line in body:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


EXAMPLES_FOUND = _examples()


def test_examples_are_collected():
    names = {n for n, _, _ in EXAMPLES_FOUND}
    assert {
        "cliviz.tracing.record.trace",
        "cliviz.analyses.attributions",
        "cliviz.model.modeling.CLIForConditionalGeneration",
        "cliviz.analyses.ablations",
        "cliviz",
    } <= names, names


@pytest.fixture(scope="module")
def example_globals():
    """Like doctest's extraglobs: the names the engine's module examples take as given (the bundled
    model and the seven bundled example images with their questions and answers). As in doctest, an
    example also sees its own module's globals."""
    from cliviz import load_image, load_model

    model, tok = load_model(device="cpu", dtype="float32")
    rows = [json.loads(line) for line in (EXAMPLES / "samples.jsonl").read_text().splitlines() if line.strip()]
    images = [load_image(EXAMPLES / r["image"]) for r in rows]
    return {
        "model": model,
        "tok": tok,
        "tokenizer": tok,
        "image": images[0],
        "images": images,
        "questions": [r["question"] for r in rows],
        "answers": [r["answer"] for r in rows],
        "qtypes": [r["qtype"] for r in rows],
    }


# Examples that do a real job at a real size (thousands of probe fits): the second tier runs them.
SLOW_EXAMPLES = {"cliviz.analyses.probes"}


@pytest.mark.parametrize(
    "name, module, source",
    [pytest.param(*ex, marks=[pytest.mark.slow] if ex[0] in SLOW_EXAMPLES else []) for ex in EXAMPLES_FOUND],
    ids=[n for n, _, _ in EXAMPLES_FOUND],
)
def test_docstring_example_runs(name, module, source, example_globals, monkeypatch, tmp_path):
    # examples name files relative to the repository root, and some write files: run them in a
    # scratch folder that sees the repository's inputs, so nothing lands in the checkout
    for entry in ("assets", "examples"):
        (tmp_path / entry).symlink_to(REPO / entry)
    monkeypatch.chdir(tmp_path)
    namespace = {**vars(importlib.import_module(module)), "__name__": "__docexample__", **example_globals}
    code = compile(source, f"<example {name}>", "exec")
    if name in NOT_RUNNABLE:
        with pytest.raises(Exception):  # noqa: B017 - any failure: it cannot run as written
            exec(code, namespace)
        pytest.xfail(NOT_RUNNABLE[name])
    exec(code, namespace)


def test_readme_python_api_block_runs(monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks
    monkeypatch.chdir(REPO)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "<README Python API>", "exec"), namespace)
    assert namespace["t"].causal is not None and namespace["r"].target == "margin"


# ------------------------------------------------------------------------ the notebook


@pytest.mark.slow
def test_quickstart_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
    """examples/quickstart.ipynb, executed cell by cell in a real ipykernel: load, trace, show a
    heatmap, ablate a cell, attribute, save a figure (PDF through kaleido and the system Chromium)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # shipped clean
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    html_out = [
        o["data"]["text/html"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "data" in o and "text/html" in o["data"]
    ]
    joined = "\n".join(html_out)
    assert "injection off (all layers)" in joined  # the trace displayed itself with its causal check
    with_js = sum("plotly.js v" in h for h in html_out)  # plotly.js inlined: by cliviz once, by plotly's renderer once
    assert sum("Plotly.newPlot" in h for h in html_out) >= 4 and 1 <= with_js <= 2
    assert "Δ log-prob of the original answer token" in joined  # the ablation result
    assert "target f: margin" in joined  # the attribution result
    pdf = tmp_path / "gates.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"
