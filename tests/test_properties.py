"""Property-based tests (hypothesis) of the four input gates: image loader, question check, config
validation, trace reader. The property is the same for each: whatever comes in, the result is
either a valid value or one `CLIVizError` line, never another exception, and a valid value keeps
the promises its consumers rely on.
"""

from __future__ import annotations

import copy
import io
import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import good_trace
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cliviz.errors import CLIVizError

from conftest import BUNDLED

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------------------- image loader

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "I;16", "CMYK"]
FORMATS = {
    "PNG": {"1", "L", "P", "RGB", "RGBA", "LA", "I;16"},
    "TIFF": set(MODES) - {"I;16"},
    "BMP": {"1", "L", "P", "RGB"},
    "GIF": {"L", "P"},
    "JPEG": {"L", "RGB", "CMYK"},
    "WEBP": {"RGB", "RGBA"},
}


@st.composite
def encoded_images(draw) -> tuple[bytes, tuple[int, int]]:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = Image.new(mode, size)
    if mode in ("RGB", "RGBA", "CMYK", "L", "LA", "P", "1"):
        bands = len(image.getbands())
        data = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
        image = Image.fromarray(data[..., 0] if bands == 1 else data, mode="L" if bands == 1 else None)
        image = image.convert(mode)
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, KeyError):  # a mode this Pillow cannot write in this format: not an input to test
        assume(False)
    return buf.getvalue(), size


@FAST
@given(encoded_images(), st.sampled_from([None, 1, 7, 64]))
def test_any_legal_image_becomes_rgb_of_its_size(encoded, max_side):
    from cliviz.inputs import load_image

    data, size = encoded
    image = load_image(data, max_side=max_side)
    assert image.mode == "RGB"
    if max_side is None or max(size) <= max_side:
        assert image.size == size
    else:  # the longest side at the bound, the shape kept to a pixel
        assert max(image.size) == max_side
        expected = [max(1, round(n * max_side / max(size))) for n in size]
        assert all(abs(got - want) <= 1 for got, want in zip(image.size, expected)), (image.size, expected)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\0"]  # real formats' first bytes


@FAST
@given(st.binary(max_size=4096), st.sampled_from(MAGIC))
def test_any_bytes_are_an_image_or_one_error_line(data, magic):
    from cliviz.inputs import load_image

    try:
        image = load_image(magic + data)
    except CLIVizError as err:
        assert "\n" not in str(err)
        return
    assert image.mode == "RGB" and image.width * image.height >= 1


# ----------------------------------------------------------------------------------------- question check


@pytest.fixture(scope="module")
def tokenizer():
    from cliviz.model.loading import check_model_dir, load_tokenizer

    return load_tokenizer(BUNDLED, check_model_dir(BUNDLED))


@FAST
@given(st.text(max_size=500) | st.text(alphabet=string.printable + "\udcff\ud800\x00\x1b", max_size=80))
def test_any_text_is_a_clean_question_or_one_error_line(text):
    from cliviz.inputs import MAX_QUESTION_CHARS, check_question

    try:
        q = check_question(text)
    except CLIVizError as err:
        message = str(err)
        assert "\n" not in message
        message.encode("utf-8")  # printable on any terminal: nothing undecodable is echoed back
        return
    assert q and q == q.strip() and len(q) <= MAX_QUESTION_CHARS and "  " not in q
    q.encode("utf-8")
    assert not any(ch in q for ch in "\x00\x1b\n\t")


WORDS = [
    "what",
    "color",
    "is",
    "the",
    "circle",
    "square",
    "triangle",
    "how",
    "many",
    "objects",
    "are",
    "there",
    "?",
    "red",
    "left",
    "or",
    "right",
    ",",
    "flibber",
    "<image>",
    "[PAD]",
    "?",
]


@FAST
@given(words=st.lists(st.sampled_from(WORDS), min_size=0, max_size=60), sep=st.sampled_from(["", " ", "  ", "\t"]))
def test_accepted_word_level_questions_end_with_a_question_mark(words, sep, tokenizer):
    from cliviz.inputs import check_model_question, question_words

    try:
        q = check_model_question((sep or " ").join(words), tokenizer)
    except CLIVizError as err:
        assert "\n" not in str(err)
        return
    tokens = question_words(tokenizer, q)
    assert tokens[-1] == "?"
    assert all(t in tokenizer.get_vocab() for t in tokens)


# ----------------------------------------------------------------------------------------- config validation

BASE_CONFIG = json.loads((BUNDLED / "config.json").read_text())


def _paths(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, f"{prefix}.{key}" if prefix else key)
    elif not isinstance(node, list):
        yield prefix
    if prefix:
        yield prefix


PATHS = sorted(set(_paths(BASE_CONFIG)))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _set(config: dict, path: str, value) -> dict:
    out = copy.deepcopy(config)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_config_validation_never_fails_with_anything_but_one_named_field(changes):
    from cliviz.model.validation import ConfigProblem, validate_config

    config = BASE_CONFIG
    for path, value in changes:
        try:
            config = _set(config, path, value)
        except (KeyError, TypeError):  # an earlier change replaced a parent of this path
            continue
    try:
        validate_config(config)
    except ConfigProblem as err:
        assert "\n" not in str(err) and len(str(err)) < 400


SMALL_INTS = st.integers(-3, 300) | st.sampled_from([0, 1, 2, 3, 4, 8, 16, 57, 64, 128])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "base_config.text_config.hidden_size",
                    "base_config.text_config.num_attention_heads",
                    "base_config.text_config.num_key_value_heads",
                    "base_config.text_config.num_hidden_layers",
                    "base_config.text_config.vocab_size",
                    "base_config.text_config.intermediate_size",
                    "base_config.text_config.head_dim",
                    "base_config.vision_config.hidden_size",
                    "base_config.vision_config.num_attention_heads",
                    "base_config.vision_config.num_hidden_layers",
                    "base_config.vision_config.image_size",
                    "base_config.vision_config.patch_size",
                    "base_config.image_token_index",
                    "base_config.vision_feature_layer",
                    "lora_rank",
                    "read_heads",
                ]
            ),
            SMALL_INTS,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_a_validated_config_builds_or_fails_with_one_line(changes, tmp_path_factory):
    """What validation lets through never crashes the model builder (meta device: nothing allocated)."""
    from cliviz.model.loading import check_model_dir
    from cliviz.model.validation import ConfigProblem, validate_config
    from cliviz.model.weights import meta_model

    config = BASE_CONFIG
    for path, value in changes:
        config = _set(config, path, value)
    try:
        validate_config(config)
    except ConfigProblem:
        return
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "model.safetensors"):
        (folder / name).symlink_to(BUNDLED / name)
    try:
        meta_model(check_model_dir(folder))
    except CLIVizError as err:
        assert "\n" not in str(err)


# ----------------------------------------------------------------------------------------- trace reader

COLUMNS = [
    "gates",
    "gates_shape",
    "injection_norm",
    "injection_norm_shape",
    "token_ids",
    "token_texts",
    "token_roles",
    "answer_ids",
    "answer_texts",
    "answer_positions",
    "answer_logprobs",
    "topk_ids",
    "topk_ids_shape",
    "topk_texts",
    "topk_logprobs",
    "topk_logprobs_shape",
    "vision_layers",
    "injection_layers",
    "image_width",
]


def _value_for(arrow_type: pa.DataType):
    if pa.types.is_list(arrow_type):
        return st.none() | st.lists(_value_for(arrow_type.value_type), max_size=8)
    if pa.types.is_floating(arrow_type):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if pa.types.is_integer(arrow_type):
        bits = arrow_type.bit_width
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if pa.types.is_string(arrow_type):
        return st.none() | st.text(max_size=8) | st.sampled_from(["image", "prompt", "answer"])
    return st.none()


@pytest.fixture(scope="module")
def trace_table(tmp_path_factory) -> pa.Table:
    from cliviz.tracing.traceset import write_traces

    path = write_traces(tmp_path_factory.mktemp("t") / "t.parquet", [good_trace(seed=i) for i in range(3)])
    return pq.read_table(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_trace_file_reads_as_valid_traces_or_one_error_line(data, trace_table, tmp_path_factory):
    from cliviz.tracing.traceset import TraceSet

    table = trace_table
    for _ in range(data.draw(st.integers(1, 3))):
        column = data.draw(st.sampled_from(COLUMNS))
        row = data.draw(st.integers(0, table.num_rows - 1))
        field = table.schema.field(column)
        values = table.column(column).to_pylist()
        values[row] = data.draw(_value_for(field.type))
        table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, type=field.type))
    path = tmp_path_factory.mktemp("h") / "t.parquet"
    pq.write_table(table, path)
    try:
        ts = TraceSet.read(path)
    except CLIVizError as err:
        assert "\n" not in str(err)
        return
    for trace in ts:  # whatever the reader lets through keeps the Trace contract
        trace.validate()
        assert np.all(np.isfinite(trace.gates)) and np.allclose(trace.gates.sum(-1), 1, atol=1e-2)
    ts.to_long()
