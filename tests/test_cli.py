"""The command line end to end, as a user runs it: answers, files, and one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from conftest import EXAMPLES, assert_clean_error, run_cli, run_main


@pytest.fixture(scope="module")
def example_image(tmp_path_factory):
    return EXAMPLES / "color.png"


def test_ask_json(random_model_dir, example_image):
    proc = run_cli(
        "ask", str(example_image), "what color is the triangle ?", "--model", str(random_model_dir), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"answer", "probability", "question"} and 0 <= out["probability"] <= 1


def test_trace_writes_parquet_html_and_json(random_model_dir, example_image, tmp_path):
    parquet, html = tmp_path / "t.parquet", tmp_path / "t.html"
    args = (
        "trace",
        str(example_image),
        "what color is the triangle ?",
        "--model",
        str(random_model_dir),
        "--max-new-tokens",
        "2",
    )
    proc = run_main(*args, "--out", str(parquet), "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    assert "LLM layer" in proc.stdout and "answer:" in proc.stdout and "L1" in proc.stdout
    frame = pd.read_parquet(parquet)  # plain pandas, no cliviz
    assert len(frame) == 1 and frame.loc[0, "question"] == "what color is the triangle ?"
    page = html.read_text()
    assert "Plotly.newPlot" in page and '<script src="http' not in page and len(page) > 1_000_000  # plotly.js inlined
    proc = run_main(*args, "--out", str(parquet))  # appends
    assert proc.returncode == 0 and len(pd.read_parquet(parquet)) == 2
    proc = run_main(*args, "--json")
    payload = json.loads(proc.stdout)
    assert len(payload["gates"]) == 3 and len(payload["gates"][0]) == len(payload["token_texts"])


def test_trace_bad_outputs_touch_nothing(random_model_dir, example_image, tmp_path):
    args = ("trace", str(example_image), "what color is the triangle ?", "--model", str(random_model_dir))
    assert_clean_error(run_main(*args, "--out", str(tmp_path / "missing" / "t.parquet")), "does not exist")
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"not parquet at all")
    assert_clean_error(run_main(*args, "--out", str(corrupt)), "parquet")
    assert corrupt.read_bytes() == b"not parquet at all"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("ask", "nope.png", "what color is the triangle ?"), "not found"),
        (("ask", "{img}", ""), "empty"),
        (("ask", "{img}", "what color is the zebra ?", "--model", "{model}"), "vocabulary"),
        (("ask", "{img}", "what " * 200), "too long"),
        (("ask", "{img}", "what color is the triangle ?", "--model", "{tmp}/nomodel"), "not found"),
        (("ask", "{img}", "what color is the triangle ?", "--model", "{tmp}"), "incomplete"),
        (("ask", "{img}", "what color is the triangle ?", "--device", "cuda", "--model", "{model}"), "cuda"),
        (("ask", "{img}", "what color is the triangle ?", "--dtype", "int3", "--model", "{model}"), "dtype"),
        (("ask", "{txt}", "what color is the triangle ?"), "not a readable image"),
        (("eval", "--data", "{tmp}/nodata"), "not found"),
        (("train", "--out", "{tmp}/m", "--fusion", "magic", "--steps", "1"), "fusion"),
        (("train", "--out", "{tmp}/m", "--steps", "1", "--extra-questions", "relation:lots"), "extra-questions"),
        (("train", "--out", "{tmp}/m", "--steps", "1", "--aux-layer", "9"), "aux-layer"),
        (("train", "--out", "{tmp}/m", "--steps", "5", "--start-step", "2"), "--init-from"),
        (("train", "--out", "{tmp}/m", "--steps", "5", "--stop-step", "9"), "--stop-step"),
        (("train", "--out", "{tmp}/m", "--steps", "1", "--save-dtype", "int8"), "save-dtype"),
        (("train", "--resume", "{tmp}"), "train_state"),
        (("train", "--resume", "{tmp}", "--steps", "5", "--fusion", "shallow"), "drop --fusion, --steps"),
        (("train", "--steps", "5"), "--out"),
        (("attach", "--base", "{tmp}", "--out", "{tmp}/o"), "config.json"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle, tmp_path, example_image, random_model_dir):
    (tmp_path / "notes.txt").write_text("text")
    filled = [
        a.format(img=example_image, tmp=tmp_path, txt=tmp_path / "notes.txt", model=random_model_dir) for a in args
    ]
    assert_clean_error(run_main(*filled), needle)


def test_mismatched_model_folder(random_model_dir, tmp_path, example_image):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["base_config"]["text_config"]["hidden_size"] = 64
    (broken / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_main("ask", str(example_image), "what color is the triangle ?", "--model", str(broken)), "")
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_clean_error(
        run_main("ask", str(example_image), "what color is the triangle ?", "--model", str(broken)), "not a cliviz"
    )


def test_broken_tokenizer_is_a_one_line_error_for_every_command(random_model_dir, tmp_path, example_image):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_model_dir, broken)
    (broken / "tokenizer.json").write_text("{broken")
    assert_clean_error(run_main("vocab", "--model", str(broken)), "tokenizer")
    assert_clean_error(
        run_main("ask", str(example_image), "what color is the triangle ?", "--model", str(broken)), "tokenizer"
    )


def test_loading_from_python_does_not_warn(random_model_dir, caplog):
    """AutoTokenizer gets the model's config; without it transformers warns that `cliviz_cli` is
    not the model type it expected, on every load, in every notebook."""
    import logging

    from cliviz.model.loading import load_model

    with caplog.at_level(logging.WARNING, logger="transformers"):
        model, tokenizer = load_model(random_model_dir, device="cpu")
    assert len(tokenizer) <= model.config.base_config.text_config.vocab_size
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_data_then_eval(random_model_dir, tmp_path):
    proc = run_main("data", "--n", "14", "--seed", "3", "--out", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "d" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 14
    with open(tmp_path / "d" / "samples.jsonl", "a") as f:
        f.write("{broken json\n")
        f.write(json.dumps({"image": "images/none.png", "question": "q", "answer": "a", "qtype": "color"}) + "\n")
    proc = run_main("eval", "--data", str(tmp_path / "d"), "--model", str(random_model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 14 and len(result["per_type"]) == 7
    assert result["skipped"] == {"malformed line": 1, "missing image": 1}


def test_train_a_few_steps_then_use_the_model(tmp_path):
    proc = run_main("train", "--fusion", "cli", "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "training_log.jsonl").exists()
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    assert run_main("ask", str(img), "how many objects are there ?", "--model", str(tmp_path / "m")).returncode == 0


def test_train_stop_then_resume_from_the_command_line(tmp_path):
    """A run stopped partway keeps its training state; --resume finishes it elsewhere in bfloat16."""
    half, full = tmp_path / "half", tmp_path / "full"
    proc = run_main("train", "--steps", "4", "--stop-step", "2", "--batch-size", "2", "--out", str(half))
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(run_main("train", "--resume", str(half), "--stop-step", "1"), "after the saved step 2")
    with open(half / "training_log.jsonl", "a") as log:
        log.write('{"step": 3, "seco')  # the half-written line a crash leaves
    proc = run_main("train", "--resume", str(half), "--out", str(full), "--save-dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((full / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_at"] == [2] and summary["saved_dtype"] == "bfloat16"
    assert (half / "train_state.safetensors").is_file() and not (full / "train_state.safetensors").exists()
    (half / "train_state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert_clean_error(run_main("train", "--resume", str(half)), "cannot read training state")


def test_attach_command(tmp_path):
    from factories import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "base")
    proc = run_main(
        "attach", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "cli"), "--vision-layers", "1,3"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["vision_layers"] == [1, 3]
    assert_clean_error(
        run_main("attach", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "x"), "--vision-layers", "a,b"),
        "integers",
    )


def test_attach_takes_a_bundled_model_name(tmp_path):
    """`--base projector-staged-tiny` names the bundled folder, as `--model cli-tiny` does."""
    proc = run_main("attach", "--base", "projector-staged-tiny", "--out", str(tmp_path / "cli"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["fusion"] == "cli" and config["read_position_code"] is True
    assert_clean_error(run_main("attach", "--base", "no-such-model", "--out", str(tmp_path / "x")), "no config.json")
