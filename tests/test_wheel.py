"""A non-editable wheel install works: one `cliviz` namespace and the bundled model inside it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

# built and local state that is not the project: never copied into the clean source tree
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "tmp"
)
FOLDER_OF = {"cliviz/analyses/": "analyses/", "cliviz/app/": "app/", "cliviz/assets/": "assets/"}


def _source_of(name: str) -> str:
    """The checkout path a wheel member comes from (`cliviz.analyses` lives in analyses/ ...)."""
    return next((src + name[len(prefix) :] for prefix, src in FOLDER_OF.items() if name.startswith(prefix)), name)


@pytest.mark.slow  # builds a wheel and installs it into a new virtualenv: a real process concern
def test_wheel_installs_and_answers_with_the_bundled_model(tmp_path):
    # build from a clean copy: a stale build/ in the checkout would ship modules that no longer exist
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    assert "would be ignored" not in build.stdout + build.stderr  # asset folders are data, not packages
    wheel = next(tmp_path.glob("cliviz-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    stray = [n for n in names if n.endswith(".py") and not (REPO / _source_of(n)).is_file()]
    assert not stray, stray
    for expected in (
        "cliviz/analyses/heatmaps.py",
        "cliviz/analyses/ablations/effects.py",
        "cliviz/intervene/engine.py",
        "cliviz/tracing/display.py",
        "cliviz/app/__init__.py",
        "cliviz/assets/models/cli-tiny/model.safetensors",
        "cliviz/assets/examples/color.png",
        "cliviz/tracing/record.py",
        "cliviz/py.typed",
        "cliviz/train/loop.py",
        "cliviz/assets/models/llava-tiny-base/preprocessor_config.json",
    ):
        assert expected in names, expected
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True
    )
    # Dependencies come from the test environment (no downloads); a path added by a .pth line
    # does not run that folder's own .pth files, so the editable checkout stays invisible.
    target = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(target, "_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    code = (
        "import cliviz, cliviz.intervene, cliviz.analyses.ablations, cliviz.app; cliviz.load_model; cliviz.ablate; "
        "print(cliviz.__file__, cliviz.__version__)"
    )
    where = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    location, version = where.stdout.split()
    assert location.startswith(str(venv)), where.stdout
    assert wheel.name.startswith(f"cliviz-{version}-"), (version, wheel.name)  # one version, pyproject's
    image = REPO / "assets" / "examples" / "color.png"
    proc = subprocess.run(
        [str(venv / "bin" / "cliviz"), "ask", str(image), "what color is the triangle ?", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"answer"' in proc.stdout
