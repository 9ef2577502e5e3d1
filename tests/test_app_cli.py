"""`cliviz dash` as a user runs it: one-line errors, and a server on localhost with debug off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, assert_clean_error, run_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_one_line_exit_2(random_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_main("dash", "--model", str(random_model_dir), "--port", str(port))
    assert_clean_error(proc, f"port {port} on 127.0.0.1 is already in use")


@pytest.mark.parametrize("flag, needle", [("--model", "model folder not found"), ("--traces", "does not exist")])
def test_bad_model_or_traces_is_one_line_exit_2(flag, needle, tmp_path):
    proc = run_main("dash", flag, str(tmp_path / "missing"), "--port", str(free_port()))
    assert_clean_error(proc, needle)


@pytest.mark.slow  # a real `python -m cliviz dash` process, served and stopped
def test_serves_on_localhost_with_debug_off(random_model_dir):
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cliviz", "dash", "--model", str(random_model_dir), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.communicate(timeout=10)
        assert "<title>cliviz</title>" in page
        assert '"ui": false' in page.replace('"ui":false', '"ui": false')  # Dash dev tools off: debug is off
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=10) as resp:
            assert b"upload" in resp.read()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out
    assert "Traceback" not in err
