"""Shared fixtures and helpers: tiny models (built by `factories`), checkpoints attached once per
session, and the command line run in-process (`run_main`) or as a real process (`run_cli`).

Tiers: plain `pytest` runs the fast tier (`-m "not slow and not browser"`, set in pyproject's
addopts); `pytest -m "slow or browser"` runs the rest, and `.ci/run` runs both.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from factories import build_tiny, llava15_folder, onevision_folder  # noqa: E402, F401  (build_tiny: re-exported)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one test per core (`pytest -n N`): torch gets one thread each
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "models" / "cli-tiny"
EXAMPLES = REPO / "assets" / "examples"


@pytest.fixture(scope="session")
def tiny_cli():
    return build_tiny("cli")


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A saved random-init CLI model folder, for command-line tests that need no accuracy."""
    model, tok = build_tiny("cli")
    out = tmp_path_factory.mktemp("random-cli")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _attached(tmp_path_factory, name: str, build) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(name)
    base = build(root / "base", dtype=torch.float16)
    proc = run_main("attach", "--base", str(base), "--out", str(root / "cli"))
    assert proc.returncode == 0, proc.stderr
    return {"base": base, "cli": root / "cli"}


@pytest.fixture(scope="session")
def llava15_attached(tmp_path_factory) -> dict[str, Path]:
    """A float16 llava-hf-style LLaVA-1.5 folder (`base`) and the CLI model `cliviz attach` makes of it
    (`cli`), built once per session: treat both as read-only."""
    return _attached(tmp_path_factory, "llava15", llava15_folder)


@pytest.fixture(scope="session")
def onevision_attached(tmp_path_factory) -> dict[str, Path]:
    """The same for LLaVA-OneVision (anyres crops): `base` and `cli`, read-only."""
    return _attached(tmp_path_factory, "onevision", onevision_folder)


def run_main(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`cliviz ARGS` through the command line's `main()`, in this process: the exit code, stdout and
    stderr as `run_cli` returns them, at a fraction of a process start (imports are already paid).

    For what only a real process shows (the entry point, signals, torchrun, an installed wheel) use
    `run_cli`. Global state a command may set (torch's thread count, the random generators a
    training run seeds, the working directory) is put back afterwards."""
    from cliviz.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv, stdin_was, threads, here = sys.argv, sys.stdin, torch.get_num_threads(), Path.cwd()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    sys.argv, sys.stdin = ["cliviz", *args], io.StringIO(stdin)
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv, sys.stdin = argv, stdin_was
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return subprocess.CompletedProcess(["cliviz", *args], code, out.getvalue(), err.getvalue())


def main_outcome(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """`run_main` as (exit code, stdout, stderr), for tests that unpack the three."""
    proc = run_main(*args, stdin=stdin)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(code: int, err: str, needle: str) -> str:
    """Exit 2 and one `error:` line naming `needle` (a training progress bar's lines aside); the line."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("train ")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m cliviz ...` as a user would, in a new process (seconds of start-up each)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "cliviz", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cliviz ARGS` under `torchrun` with two processes (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cliviz", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def system_chromium() -> str:
    """The Chromium the figure export uses too: `$BROWSER_PATH`, else the first on PATH."""
    found = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no Chromium on PATH: install it (.ci/run does) or set BROWSER_PATH"
    return found


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test of the session (Playwright's sync API allows one
    running instance per thread: two test files starting their own would collide)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=system_chromium(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
