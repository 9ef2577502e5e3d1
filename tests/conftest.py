"""Shared fixtures: tiny models built from configs (no downloads) and the bundled model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "models" / "cli-tiny"
EXAMPLES = REPO / "assets" / "examples"


def build_tiny(fusion: str = "cli", seed: int = 0, open_alpha: float = 0.7):
    """The bundled architecture with random weights; alpha opened so that injection matters."""
    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model import CLIForConditionalGeneration
    from cliviz.train import tiny_config

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = tiny_config(fusion, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    model = CLIForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.fill_(open_alpha)
    return model, tok


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


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m cliviz ...` as a user would; returns the finished process."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "cliviz", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
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
