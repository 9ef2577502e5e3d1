"""One checked input path (issue 26.1, 29.6): the same hostile value gives the same one-line error
through the Python API, the command line (run in-process through `cliviz.cli.main.main`) and the
dashboard's callbacks; the API's own argument errors name the argument; the question rule (a
missing " ?" added, out-of-vocabulary words refused) is the same on every surface."""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cliviz
from cliviz.errors import CLIVizError, CLIVizIndexError, CLIVizWarning

from conftest import EXAMPLES, main_outcome, one_error_line

COLOR = EXAMPLES / "color.png"
QUESTION = "what color is the triangle ?"


@pytest.fixture(scope="module")
def bundled():
    return cliviz.load_model(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image():
    return cliviz.load_image(COLOR)


def run_command(argv: list[str], capsys) -> tuple[int, str, str]:
    """`cliviz ARGV` in this process: (exit code, stdout, stderr)."""
    from cliviz.cli.main import main

    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["cliviz", *argv]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def api_error(call) -> str:
    with pytest.raises(CLIVizError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ----------------------------------------------------------------- the same cases on every surface


@dataclass
class Case:
    name: str
    expect: str  # a fragment of the one message every surface gives
    question: object = QUESTION
    image: object = None  # callable(tmp_path) -> image file path; None: the bundled colour example
    options: dict = field(default_factory=dict)  # Python keyword -> value; the command line gets the flag

    def image_path(self, tmp_path: Path) -> Path:
        return COLOR if self.image is None else self.image(tmp_path)


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "folder.png").mkdir()
    return tmp_path / "folder.png"


def _text_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.png").write_text("not an image")
    return tmp_path / "notes.png"


SHARED = [
    Case("empty-question", "the question is empty", question=""),
    Case("blank-question", "the question is empty", question=" \t "),
    Case("5000-word-question", "the question is too long", question="what " * 5000),
    Case("lone-surrogate", "the question is not valid UTF-8 text (code point U+D800", question="what \ud800 color ?"),
    Case("control-character", "the question holds a control character (U+0007", question="what\x07 color ?"),
    Case(
        "out-of-vocabulary",
        "words not in the model's vocabulary: 'colour'",
        question="what colour is the triangle ?",
    ),
    Case("special-token", "words not in the model's vocabulary: '<'", question="<image> what color is the circle ?"),
    Case("missing-image", "image not found", image=lambda tmp: tmp / "missing.png"),
    Case("folder-image", "not a file", image=_folder),
    Case("text-image", "not a readable image", image=_text_file),
    Case("5000-char-file-name", "has a file name of 5004 bytes", image=lambda tmp: tmp / ("x" * 5000 + ".png")),
    Case(
        "max-new-tokens-negative",
        "max_new_tokens must be an integer in 1..1024, got -1",
        options={"max_new_tokens": -1},
    ),
    Case("max-new-tokens-zero", "max_new_tokens must be an integer in 1..1024, got 0", options={"max_new_tokens": 0}),
    Case(
        "max-new-tokens-huge",
        "max_new_tokens must be an integer in 1..1024, got 5000",
        options={"max_new_tokens": 5000},
    ),
]
FLAGS = {"max_new_tokens": "--max-new-tokens"}


def _cli_message(case: Case, message: str) -> str:
    for keyword, flag in FLAGS.items():
        if keyword in case.options:
            message = message.replace(keyword, flag)
    return message


@pytest.mark.parametrize("case", SHARED, ids=[c.name for c in SHARED])
@pytest.mark.parametrize("command", ["trace", "ask"])
def test_same_error_from_the_api_and_the_command_line(case, command, bundled, tmp_path, capsys):
    model, tok = bundled
    path = case.image_path(tmp_path)
    api = cliviz.trace if command == "trace" else cliviz.ask
    message = api_error(lambda: api(model, tok, path, case.question, **case.options))
    assert case.expect in message

    flags = [x for k, v in case.options.items() for x in (FLAGS[k], str(v))]
    code, out, err = run_command([command, str(path), case.question, *flags, "--device", "cpu"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {_cli_message(case, message)}"]


DASHBOARD = [c for c in SHARED if c.image is None and not c.options]  # the page takes a question, not a file


@pytest.fixture(scope="module")
def backend(bundled):
    from cliviz.app.backend import Backend, load_examples

    model, tok = bundled
    return Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="cli-tiny")


@pytest.mark.parametrize("case", DASHBOARD, ids=[c.name for c in DASHBOARD])
def test_same_error_from_the_api_and_the_dashboard(case, bundled, backend, image):
    from cliviz.app import callbacks_explore, callbacks_image

    model, tok = bundled
    message = api_error(lambda: cliviz.trace(model, tok, image, case.question))
    payload, *_ = callbacks_image.from_example(backend, "color")
    store, selection, cell, shown = callbacks_explore.ask(backend, case.question, payload)
    assert shown.children == message


# ----------------------------------------------------------------- one question rule, every surface


def test_a_missing_question_mark_is_added_on_every_surface(bundled, backend, image, capsys):
    """`trace(... "what color is the triangle")` answered '' (end of answer at once): the models were
    trained only on questions ending in " ?", which the command line has always added."""
    from cliviz.app import callbacks_explore, callbacks_image

    model, tok = bundled
    bare = QUESTION.removesuffix(" ?")
    with_mark = cliviz.trace(model, tok, image, QUESTION, causal_check=False)
    without = cliviz.trace(model, tok, image, bare, causal_check=False)
    assert without.meta.question == QUESTION and without.meta.answer == with_mark.meta.answer == "blue"
    np.testing.assert_array_equal(without.gates, with_mark.gates)
    assert cliviz.ask(model, tok, image, bare).text == "blue"
    [traced] = cliviz.trace_batch(model, tok, [image], [bare], causal_check=False)
    assert traced.meta.question == QUESTION

    code, out, _ = run_command(["ask", str(COLOR), bare, "--device", "cpu", "--json"], capsys)
    assert code == 0 and '"question": "what color is the triangle ?"' in out and '"answer": "blue"' in out
    payload, *_ = callbacks_image.from_example(backend, "color")
    store, *_ = callbacks_explore.ask(backend, bare, payload)
    assert store["trace"]["meta"]["question"] == QUESTION and store["trace"]["meta"]["answer"] == "blue"


def test_an_image_unlike_the_scenes_warns_on_every_surface(bundled, backend, tmp_path, capsys):
    """The bundled models know only 64 x 64 ShapesVQA scenes: the API warns as the command line does."""
    from cliviz.app import callbacks_explore, callbacks_image

    model, tok = bundled
    gray = Image.new("RGB", (100, 100), (200, 200, 200))
    with pytest.warns(CLIVizWarning, match="does not look like a ShapesVQA scene") as caught:
        cliviz.trace(model, tok, gray, QUESTION, causal_check=False)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    text = str(caught[0].message)

    gray.save(tmp_path / "gray.png")
    code, _, err = run_command(["trace", str(tmp_path / "gray.png"), QUESTION, "--device", "cpu"], capsys)
    assert code == 0 and err.splitlines() == [f"warning: {text}"]  # once, though two layers check

    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    payload, *_ = callbacks_image.from_upload(
        "data:image/png;base64," + __import__("base64").b64encode(buf.getvalue()).decode(), "gray.png"
    )
    store, *_ = callbacks_explore.ask(backend, QUESTION, payload)
    assert store["world_warning"] == text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scene gives no warning
        cliviz.trace(model, tok, cliviz.load_image(COLOR), QUESTION, causal_check=False)


# ----------------------------------------------------------------- the API's own arguments (issue 29.6)


def _tiny_png(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 64), (24, 24, 28)).save(tmp_path / "scene.png")
    return tmp_path / "scene.png"


API_CASES = [
    (
        "load_model(123)",
        lambda m, t, i: cliviz.load_model(123),
        "path must be a str or Path naming a model folder, got 123",
    ),
    (
        "load_model(missing)",
        lambda m, t, i: cliviz.load_model("/no/such/model"),
        "model folder not found: /no/such/model",
    ),
    ("load_model(device=1)", lambda m, t, i: cliviz.load_model(device=1), "device must be text (str), got 1"),
    ("load_image(None)", lambda m, t, i: cliviz.load_image(None), "image must be a path to an image file, its bytes"),
    ("load_image(0x0 PIL)", lambda m, t, i: cliviz.load_image(Image.new("RGB", (0, 0))), "image is empty (0x0 pixels)"),
    ("load_image(0x0 array)", lambda m, t, i: cliviz.load_image(np.zeros((0, 0, 3), np.uint8)), "image is empty"),
    ("load_image(CHW array)", lambda m, t, i: cliviz.load_image(np.zeros((3, 8, 8))), "must be an array of shape"),
    ("load_image(float>1)", lambda m, t, i: cliviz.load_image(np.full((4, 4), 7.0)), "floats must lie in 0..1"),
    ("load_image(NaN)", lambda m, t, i: cliviz.load_image(np.full((4, 4), np.nan)), "NaN or infinite"),
    ("trace(image=None)", lambda m, t, i: cliviz.trace(m, t, None, QUESTION), "image must be a path to an image file"),
    ("trace(image=0x0)", lambda m, t, i: cliviz.trace(m, t, Image.new("RGB", (0, 0)), QUESTION), "image is empty"),
    ("trace(question=None)", lambda m, t, i: cliviz.trace(m, t, i, None), "the question is empty"),
    ("trace(question=123)", lambda m, t, i: cliviz.trace(m, t, i, 123), "the question must be text, not int"),
    ("trace(question=bytes)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION.encode()), "the question must be text"),
    ("trace(model=None)", lambda m, t, i: cliviz.trace(None, t, i, QUESTION), "model must be a cliviz model"),
    ("trace(tokenizer=None)", lambda m, t, i: cliviz.trace(m, None, i, QUESTION), "tokenizer must be the model's"),
    ("trace(swapped)", lambda m, t, i: cliviz.trace(t, m, i, QUESTION), "model and tokenizer are swapped"),
    ("trace(pair)", lambda m, t, i: cliviz.trace((m, t), t, i, QUESTION), "model is the (model, tokenizer) pair"),
    ("trace(top_k=-3)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, top_k=-3), "top_k must be an integer in 1.."),
    ("trace(top_k=0)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, top_k=0), "top_k must be an integer in 1.."),
    ("trace(top_k=10**6)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, top_k=10**6), "got 1000000"),
    ("trace(top_k=2.5)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, top_k=2.5), "got float 2.5"),
    ("trace(max_new_tokens='4')", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, max_new_tokens="4"), "got str '4'"),
    ("trace(max_new_tokens=True)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, max_new_tokens=True), "bool True"),
    ("trace(causal_check='no')", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, causal_check="no"), "True or False"),
    ("trace(qtype=1)", lambda m, t, i: cliviz.trace(m, t, i, QUESTION, qtype=1), "qtype must be text"),
    ("trace_batch([])", lambda m, t, i: cliviz.trace_batch(m, t, [], []), "images is empty: give at least one"),
    ("trace_batch(str)", lambda m, t, i: cliviz.trace_batch(m, t, [i], QUESTION), "questions must be a list"),
    ("trace_batch(image)", lambda m, t, i: cliviz.trace_batch(m, t, i, [QUESTION]), "images must be a list"),
    (
        "trace_batch(lengths)",
        lambda m, t, i: cliviz.trace_batch(m, t, [i, i], [QUESTION]),
        "differ in length (2 images",
    ),
    (
        "trace_batch(bad row)",
        lambda m, t, i: cliviz.trace_batch(m, t, [i, i], [QUESTION, "zzz ?"]),
        "questions[1]: words not in the model's vocabulary: 'zzz'",
    ),
    ("trace_batch(bad image)", lambda m, t, i: cliviz.trace_batch(m, t, [i, None], [QUESTION] * 2), "images[1]: image"),
    (
        "trace_batch(qtypes)",
        lambda m, t, i: cliviz.trace_batch(m, t, [i], [QUESTION], qtypes=["a", "b"]),
        "qtypes has 2",
    ),
    ("ask(max_new_tokens=0)", lambda m, t, i: cliviz.ask(m, t, i, QUESTION, max_new_tokens=0), "got 0"),
    (
        "ablate(llm_layer='2')",
        lambda m, t, i: cliviz.ablate(m, t, i, QUESTION, llm_layer="2"),
        "llm_layer must be an integer, got str '2'",
    ),
    ("ablate(llm_layer=2.5)", lambda m, t, i: cliviz.ablate(m, t, i, QUESTION, llm_layer=2.5), "got float 2.5"),
    ("ablate(llm_layer=99)", lambda m, t, i: cliviz.ablate(m, t, i, QUESTION, llm_layer=99), "llm_layer 99 is not one"),
    ("ablate(vision_layer=99)", lambda m, t, i: cliviz.ablate(m, t, i, QUESTION, 2, 99), "vision_layer 99 is not one"),
    (
        "ablate(trace='x')",
        lambda m, t, i: cliviz.ablate(m, t, i, QUESTION, 2, 3, trace="x"),
        "trace must be a cliviz Trace",
    ),
    ("ablate(question)", lambda m, t, i: cliviz.ablate(m, t, i, "", 2, 3), "the question is empty"),
    ("attribute(image=None)", lambda m, t, i: cliviz.attribute(m, t, None, QUESTION), "image must be a path"),
    ("attribute(swapped)", lambda m, t, i: cliviz.attribute(t, m, i, QUESTION), "model and tokenizer are swapped"),
    ("attribute(max_new_tokens=0)", lambda m, t, i: cliviz.attribute(m, t, i, QUESTION, max_new_tokens=0), "got 0"),
    ("attribute(steps=0)", lambda m, t, i: cliviz.attribute(m, t, i, QUESTION, steps=0), "--steps must be an integer"),
    ("attribute(typo)", lambda m, t, i: cliviz.attribute(m, t, i, QUESTION, stepz=4), "unknown keyword 'stepz'"),
]


@pytest.mark.parametrize("name, call, expect", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_arguments_are_checked_at_the_boundary(name, call, expect, bundled, image):
    model, tok = bundled
    assert expect in api_error(lambda: call(model, tok, image))


def _word_level(words: list[str]):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")


def test_a_tokenizer_of_another_model_is_refused(bundled, image):
    model, tok = bundled
    rows = model.get_input_embeddings().num_embeddings
    bigger = _word_level(["[PAD]", "[UNK]", "<eos>", *(f"w{i}" for i in range(rows))])
    message = api_error(lambda: cliviz.trace(model, bigger, image, QUESTION))
    assert message == f"tokenizer does not belong to this model: it has {rows + 3} tokens, the model embeds {rows}"
    shifted = _word_level(["[PAD]", "[UNK]", "<eos>", "x", "y", "<image>", *QUESTION.split()])
    assert shifted.convert_tokens_to_ids("<image>") != model.image_token_id
    message = api_error(lambda: cliviz.trace(model, shifted, image, QUESTION))
    assert message.startswith("tokenizer does not belong to this model: its <image> token is 5")


def test_images_come_as_paths_pil_images_or_arrays(bundled, image, tmp_path):
    model, tok = bundled
    pixels = np.asarray(image)  # [64, 64, 3] uint8
    answers = {
        "path str": cliviz.trace(model, tok, str(COLOR), QUESTION, causal_check=False),
        "Path": cliviz.trace(model, tok, COLOR, QUESTION, causal_check=False),
        "PIL": cliviz.trace(model, tok, image, QUESTION, causal_check=False),
        "uint8 array": cliviz.trace(model, tok, pixels, QUESTION, causal_check=False),
        "float array": cliviz.trace(model, tok, pixels / 255.0, QUESTION, causal_check=False),
        "RGBA PIL": cliviz.trace(model, tok, image.convert("RGBA"), QUESTION, causal_check=False),
    }
    hashes = {k: t.meta.image_sha256 for k, t in answers.items()}
    assert len(set(hashes.values())) == 1, hashes  # the same pixels whatever the container
    assert {t.meta.answer for t in answers.values()} == {"blue"}
    assert cliviz.load_image(Image.new("L", (3, 2), 9)).mode == "RGB"
    assert cliviz.load_image(np.ones((3, 2), bool)).getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------- trace sets: the checks TraceSet calls


def test_trace_set_argument_checks():
    from cliviz.arguments import check_path, check_trace_index

    for bad, shown in ((None, "got None"), (123, "got 123"), (b"x.parquet", "got bytes")):
        with pytest.raises(CLIVizError, match=f"path must be a str or Path naming a trace file, {shown}"):
            check_path(bad, "path", "a trace file")
    assert check_path("a/b.parquet", "path", "a trace file") == Path("a/b.parquet")
    assert check_trace_index(-1, 3) == 2 and check_trace_index(slice(0, 2), 3) == slice(0, 2)
    assert check_trace_index(np.int64(1), 3) == 1
    with pytest.raises(IndexError, match=r"trace index 3 is out of range: the set holds 3 traces \(valid: 0..2"):
        check_trace_index(3, 3)
    with pytest.raises(CLIVizIndexError, match="the set is empty"):
        check_trace_index(0, 0)
    with pytest.raises(CLIVizError, match="trace index must be an integer, got str '1'"):
        check_trace_index("1", 3)


@pytest.mark.parametrize("bad", [None, 123, ""])
def test_traceset_read_names_a_bad_path(bad):
    from cliviz.tracing.traceset import TraceSet

    with pytest.raises(CLIVizError, match="path"):
        TraceSet.read(bad)


def test_traceset_index_out_of_range_is_an_index_error_with_cliviz_message():
    from cliviz.errors import CLIVizIndexError
    from cliviz.tracing.traceset import TraceSet

    from factories import good_trace

    traces = TraceSet([good_trace(seed=i) for i in range(3)])
    assert np.array_equal(traces[-1].gates, traces[2].gates)
    with pytest.raises(IndexError, match="out of range") as caught:
        traces[3]
    assert isinstance(caught.value, CLIVizIndexError)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["ablate", str(COLOR), "what color is the circle ?", "--llm-layers", "1,x"], "--llm-layers"),
        (["ablate", str(COLOR), "what color is the circle ?", "--vision-layers", "2;3"], "--vision-layers"),
        (["probe-layers", "--layers", "one"], "--layers"),
        (["attach", "--base", "llava-tiny-base", "--out", "{out}", "--vision-layers", "1.5"], "--vision-layers"),
        (["attach", "--base", "llava-tiny-base", "--out", "{out}", "--injection-layers", "a,b"], "--injection-layers"),
    ],
)
def test_layer_lists_have_one_rule_on_every_command(args, flag, tmp_path):
    """Every layer-list option parses through `cli.options.int_list`: one message, naming the flag,
    before anything is loaded or written."""
    out = tmp_path / "attached"
    code, _, err = main_outcome(*(a.format(out=out) for a in args))
    line = one_error_line(code, err, flag)
    assert line.endswith("wants comma-separated integers, e.g. 1,2; got " + repr(args[-1]))
    assert not out.exists()


def test_int_list_reads_spaces_and_treats_blank_as_default():
    from cliviz.cli.options import int_list

    assert int_list(" 1, 2 ,5", "--x") == [1, 2, 5]
    assert int_list("", "--x") is None and int_list(None, "--x") is None
    assert int_list("-1", "--x") == [-1]
