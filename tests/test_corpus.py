"""The hostile-input corpus of `tests/corpus.py` through cliviz's real entry points.

Every bad input must end as one `error:` line and exit code 2 (in the command line) or one
`CLIVizError` (in the library and the dashboard); every legal one must work. Model folders go through
the real `cliviz ask` (in this process, `cliviz.cli.main.main`, with a `y` waiting on stdin, as a user
piping `yes` would), so a folder's own Python would have its chance to run: it must never.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from corpus import EVIL_MARKER, image_cases, model_folder_cases, question_cases, remote_code_cases, trace_file_cases

from cliviz.errors import CLIVizError

from conftest import EXAMPLES, REPO, main_outcome, one_error_line

IMAGE = EXAMPLES / "color.png"


def ids(cases) -> list[str]:
    return [c.name for c in cases]


# ----------------------------------------------------------------------------------------- images

IMAGES = image_cases()


@pytest.mark.parametrize("case", IMAGES, ids=ids(IMAGES))
def test_image_corpus(case, tmp_path):
    from cliviz.app.state import decode_upload
    from cliviz.inputs import load_image

    path = case.build(tmp_path)
    if case.expect is None:
        image = load_image(path)
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        _, small = decode_upload("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), path.name)
        assert small.mode == "RGB" and small.size == image.size  # small legal images are not changed
        return
    with pytest.raises(CLIVizError) as err:
        load_image(path)
    assert case.expect in str(err.value) and "\n" not in str(err.value)
    if path.is_file():  # the dashboard refuses the same bytes with the same reason
        with pytest.raises(CLIVizError, match="upload|empty|image|large"):
            decode_upload("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), path.name)


def test_bad_images_through_the_command_line(monkeypatch, capsys, tmp_path):
    for case in [c for c in IMAGES if c.expect][:6]:
        path = case.build(tmp_path)
        code, _, err = main_outcome("ask", str(path), "what color is the circle ?", "--device", "cpu")
        one_error_line(code, err, case.expect)


# ----------------------------------------------------------------------------------------- questions

QUESTIONS = question_cases()


@pytest.fixture(scope="module")
def bundled_tokenizer():
    from cliviz.model.loading import check_model_dir, load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(None)
    return load_tokenizer(folder, check_model_dir(folder))


@pytest.mark.parametrize("name,question,expect", QUESTIONS, ids=[q[0] for q in QUESTIONS])
def test_question_corpus(name, question, expect, bundled_tokenizer):
    from cliviz.inputs import check_model_question

    if expect.startswith("="):
        assert check_model_question(question, bundled_tokenizer) == expect[1:]
        return
    with pytest.raises(CLIVizError) as err:
        check_model_question(question, bundled_tokenizer)
    message = str(err.value)
    assert expect in message and "\n" not in message
    message.encode("utf-8")  # printable: no lone surrogate copied into the message


def test_undecodable_question_is_one_line_from_the_shell(tmp_path):
    """Bytes that are not UTF-8 in argv (Python keeps them as surrogates) used to crash printing."""
    proc = subprocess.run(
        [sys.executable, "-m", "cliviz", "ask", str(IMAGE), b"what color is the \xff circle ?", "--device", "cpu"],
        capture_output=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["error: the question is not valid UTF-8 text (byte 0xff at character 19)"]


def test_question_without_question_mark_is_answered(monkeypatch, capsys):
    """The bundled models were trained on questions ending in " ?": without it they said nothing."""
    import json

    code, out, err = main_outcome("ask", str(IMAGE), "what color is the triangle", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["question"] == "what color is the triangle ?"
    assert result["answer"] == "blue"  # the reference answer in assets/examples/samples.jsonl
    code, out2, _ = main_outcome("ask", str(IMAGE), "what color is the triangle ?", "--device", "cpu", "--json")
    assert json.loads(out2)["answer"] == result["answer"]


# ----------------------------------------------------------------------------------------- model folders

FOLDERS = model_folder_cases()


@pytest.mark.parametrize("case", FOLDERS, ids=ids(FOLDERS))
def test_model_folder_corpus(case, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv(EVIL_MARKER, str(marker))
    folder = case.build(tmp_path)
    code, out, err = main_outcome(
        "ask",
        str(IMAGE),
        "what color is the triangle ?",
        "--model",
        str(folder),
        "--device",
        "cpu",
        stdin="y\n" * 8,
    )
    assert not marker.exists(), "the model folder's own code ran"
    if case.expect is None:
        assert code == 0 and out.strip(), (code, err)
        assert "blue" in out  # the same answer as the intact bundled model
        return
    one_error_line(code, err, case.expect)


@pytest.mark.parametrize("command", ["vocab", "ask"])
def test_piped_yes_never_runs_folder_code(command, tmp_path):
    """The issue's exact report: `yes | cliviz vocab --model FOLDER` executed the folder's .py file."""
    case = next(c for c in remote_code_cases() if c.name == "code:tokenizer-auto-map")
    folder = case.build(tmp_path)
    marker = tmp_path / "evil-ran"
    args = ["vocab"] if command == "vocab" else ["ask", str(IMAGE), "what color is the circle ?", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "cliviz", *args, "--model", str(folder)],
        input="y\n" * 20,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, EVIL_MARKER: str(marker), "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: model folder {folder} asks to run its own code (auto_map in tokenizer_config.json); "
        "cliviz never runs code from a model folder"
    ]


def test_attach_refuses_a_base_with_code(tmp_path, monkeypatch, capsys):
    case = next(c for c in remote_code_cases() if c.name == "code:tokenizer-auto-map-known-class")
    folder = case.build(tmp_path)
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv(EVIL_MARKER, str(marker))
    code, _, err = main_outcome("attach", "--base", str(folder), "--out", str(tmp_path / "out"), stdin="y\n")
    one_error_line(code, err, "auto_map in tokenizer_config.json")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- trace files

TRACES = trace_file_cases()


@pytest.mark.parametrize("case", TRACES, ids=ids(TRACES))
def test_trace_file_corpus(case, tmp_path):
    from cliviz.tracing.traceset import TraceSet

    path = case.build(tmp_path)
    if case.expect is None:
        ts = TraceSet.read(path)
        for trace in ts:
            trace.validate()
        return
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(CLIVizError) as err:
        TraceSet.read(path)
    message = str(err.value)
    assert case.expect in message and "\n" not in message
    assert before is None or path.read_bytes() == before  # reading never touches the file


def test_broken_trace_files_refused_by_figures_and_dashboard(tmp_path, monkeypatch, capsys):
    """`cliviz figures` on NaN gates was an sklearn traceback; the dashboard drew such files silently."""
    from cliviz.app.backend import load_backend

    for name in ("trace:gates-nan", "trace:gates-not-summing", "trace:shape-wraps-int64"):
        case = next(c for c in TRACES if c.name == name)
        folder = tmp_path / name.replace(":", "-")
        folder.mkdir()
        path = case.build(folder)
        code, _, err = main_outcome("figures", str(path), "--out", str(folder / "figs"), "-f", "svg")
        line = one_error_line(code, err, case.expect)
        assert "trace 1 (sample s1)" in line  # the trace and the field are named
        with pytest.raises(CLIVizError, match="trace 1"):
            load_backend(None, path, device="cpu")
