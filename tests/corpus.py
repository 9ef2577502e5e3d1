"""A corpus of hostile inputs, generated on the fly: bad images, questions, model folders, trace files.

Each generator returns `Case`s: a name, a `build(folder) -> path` that writes the input into a fresh
folder, and `expect`: a piece of the one-line error cliviz must give, or `None` when the input is
legal and must work. Everything is made here from the bundled model and a few bytes; nothing is
downloaded. The tests in `test_corpus.py` run every case through cliviz's real entry points.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from factories import good_trace

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "models" / "cli-tiny"
EVIL_MARKER = "CLIVIZ_TEST_EVIL_MARKER"
TOKENIZER_CONFIG = "tokenizer_config.json"  # an env var naming the file the folder's code would create


def _noise(n: int, seed: int) -> bytes:
    """`n` random-looking bytes, the same on every run: a failing corpus case can be run again."""
    return random.Random(seed).randbytes(n)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    expect: str | None  # substring of the one error line, or None: must be accepted


# ----------------------------------------------------------------------------------------- images


def _png(image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` and holds one tiny compressed row: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(fmt: str, image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return build


def image_cases() -> list[Case]:
    """Images the loader must refuse (one line) or accept (any mode -> RGB)."""
    rgb = Image.new("RGB", (64, 48), (10, 200, 30))
    good_png = _png(rgb)
    jpeg = _encoded("JPEG", rgb)
    bad: dict[str, tuple[str, bytes]] = {
        "empty.png": ("not a readable image", b""),
        "text.png": ("not a readable image", b"hello, I am not a picture\n" * 10),
        "random.bin": ("not a readable image", _noise(4096, seed=1)),
        "truncated-header.png": ("corrupt or truncated", good_png[:20]),
        "truncated-data.png": ("corrupt or truncated", good_png[: len(good_png) // 2]),
        "truncated.jpg": ("corrupt or truncated", jpeg[: len(jpeg) // 2]),
        "bad-crc.png": ("not a readable image", good_png[:30] + bytes([good_png[30] ^ 0xFF]) + good_png[31:]),
        "bomb-100k.png": ("image too large", _png_header_only(100_000, 100_000)),
        "bomb-wide.png": ("image too large", _png_header_only(2**31 - 1, 2)),
        "bomb-40mp-plus-one-row.png": ("image too large", _png_header_only(6325, 6325)),
        "zero-width.png": ("not a readable image", _png_header_only(0, 10)),
        "pickle.png": ("not a readable image", pickle.dumps({"a": 1})),
        "zip.png": ("not a readable image", _zip_bytes()),
        "svg.svg": ("not a readable image", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
        "pdf.pdf": ("not a readable image", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
        "html.png": ("not a readable image", b"<html><body><img src=x onerror=alert(1)></body></html>"),
        "bmp-huge.bmp": ("image too large", _bmp_header(100_000, 100_000)),
        "gif-huge.gif": ("image too large", _gif_header(65535, 65535)),
        "tiff-truncated.tif": ("corrupt or truncated", _encoded("TIFF", rgb)[:200]),
        "webp-truncated.webp": ("corrupt or truncated", _encoded("WEBP", rgb)[:60]),
        "ico-garbage.ico": ("not a readable image", b"\0\0\1\0" + _noise(64, seed=2)),
        "png-then-garbage-ihdr.png": ("not a readable image", b"\x89PNG\r\n\x1a\n" + _noise(64, seed=3)),
    }
    cases = [Case(f"bad:{name}", _write(name, data), expect) for name, (expect, data) in bad.items()]
    cases += [
        Case("bad:missing.png", lambda folder: folder / "missing.png", "image not found"),
        Case("bad:folder.png", _folder("folder.png"), "not a file"),
    ]
    good = {
        "rgb.png": good_png,
        "rgba.png": _png(Image.new("RGBA", (40, 30), (255, 0, 0, 0))),
        "palette-transparent.png": _png(Image.new("P", (20, 20)), transparency=0),
        "grey16.png": _png(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
        "float-nan.tif": _encoded("TIFF", Image.fromarray(np.array([[0, np.nan], [np.inf, 5]], np.float32), mode="F")),
        "one-bit.png": _png(Image.new("1", (33, 17), 1)),
        "cmyk.jpg": _encoded("JPEG", Image.new("CMYK", (30, 30), (0, 255, 0, 0))),
        "exif-rotated.jpg": _rotated_jpeg(),
        "animated.gif": _animated_gif(),
        "one-pixel.png": _png(Image.new("L", (1, 1), 7)),
        "la.png": _png(Image.new("LA", (12, 9), (100, 128))),
        "bmp.bmp": _encoded("BMP", rgb),
        "webp.webp": _encoded("WEBP", rgb),
        "tiff.tif": _encoded("TIFF", rgb, compression="tiff_deflate"),
    }
    cases += [Case(f"good:{name}", _write(name, data), None) for name, data in good.items()]
    return cases


def _folder(name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).mkdir()
        return folder / name

    return build


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", pickle.dumps([1, 2, 3]))
    return buf.getvalue()


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def _gif_header(width: int, height: int) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    return head + image


def _rotated_jpeg() -> bytes:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return _encoded("JPEG", image, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- questions


def question_cases() -> list[tuple[str, Any, str | None]]:
    """(name, question, expect) for the bundled word-level model: expect a substring of the error, or
    the normalised question that must be accepted (prefixed with "=")."""
    return [
        ("empty", "", "empty"),
        ("spaces", "   \t  \n ", "empty"),
        ("none", None, "empty"),
        ("too-many-chars", "what " * 90, "too long"),
        ("too-many-words", " ".join(["red"] * 60), "too long"),
        ("oov", "what colour is the square ?", "not in the model's vocabulary"),
        ("oov-many", "flibber jabber wocky ?", "not in the model's vocabulary"),
        ("invalid-utf8", "what color is the \udcff triangle ?", "not valid UTF-8"),
        ("lone-surrogate", "what \ud800 color ?", "not valid UTF-8"),
        ("nul", "what color\x00 is the circle ?", "control character"),
        ("escape", "what color is the \x1b[31m circle ?", "control character"),
        ("bell", "what\x07 color is the circle ?", "control character"),
        ("special-image", "<image> what color is the circle ?", "not in the model's vocabulary"),
        ("special-pad", "[PAD] what color is the circle ?", "not in the model's vocabulary"),
        ("special-bos", "<bos> what color ?", "not in the model's vocabulary"),
        ("emoji", "what color is the 🔺 ?", "not in the model's vocabulary"),
        ("rtl", "what color is the مثلث ?", "not in the model's vocabulary"),
        ("zero-width", "what color is the tri\u200bangle ?", "not in the model's vocabulary"),
        ("html", "<script>alert(1)</script>", "not in the model's vocabulary"),
        ("path", "../../etc/passwd", "not in the model's vocabulary"),
        ("number", 12345, "must be text"),
        ("list", ["what", "color"], "must be text"),
        ("dict", {"q": "what color ?"}, "must be text"),
        ("bytes", b"what color is the circle ?", "must be text"),
        ("no-question-mark", "what color is the triangle", "=what color is the triangle ?"),
        ("glued-question-mark", "what color is the triangle?", "=what color is the triangle?"),
        ("upper-case", "WHAT COLOR IS THE TRIANGLE ?", "=WHAT COLOR IS THE TRIANGLE ?"),
        ("extra-spaces", "  what   color is\tthe triangle ?  ", "=what color is the triangle ?"),
        ("nfkc-fullwidth", "ｗｈａｔ color is the triangle ?", "=ｗｈａｔ color is the triangle ?"),
        ("valid", "how many objects are there ?", "=how many objects are there ?"),
    ]


# ----------------------------------------------------------------------------------------- model folders


def _copy_bundled(folder: Path) -> Path:
    target = folder / "model"
    shutil.copytree(BUNDLED, target, ignore=shutil.ignore_patterns("training_log*.jsonl", "README.md"))
    return target


def _edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], Path]:
    """A copy of the bundled model whose JSON file `name` went through `change` (NaN written as NaN)."""

    def build(folder: Path) -> Path:
        target = _copy_bundled(folder)
        path = target / name
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(change(data)))
        return target

    return build


def _raw_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        target = _copy_bundled(folder)
        (target / name).write_bytes(content)
        return target

    return build


def _set(path: str, value: Any) -> Callable[[dict], dict]:
    """A change that sets the dotted `path` of a config dict to `value`."""

    def change(data: dict) -> dict:
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        return data

    return change


def _delete(path: str) -> Callable[[dict], dict]:
    def change(data: dict) -> dict:
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
        return data

    return change


EVIL_CODE = f'''import os
open(os.environ.get("{EVIL_MARKER}", "/tmp/cliviz-evil-ran"), "w").write("the folder's code ran")
from transformers import PreTrainedTokenizerFast, CLIPImageProcessor, PretrainedConfig, ProcessorMixin
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilImageProcessor(CLIPImageProcessor):
    pass
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def _with_code(name: str, change: Callable[[dict], dict]) -> Callable[[Path], Path]:
    """A folder holding `evil.py` (it writes a marker file when imported) and a JSON file pointing at it."""

    def build(folder: Path) -> Path:
        target = _edit_json(name, change)(folder)
        (target / "evil.py").write_text(EVIL_CODE)
        return target

    return build


def _auto_map(kind: str, cls: str) -> Callable[[dict], dict]:
    def change(data: dict) -> dict:
        data["auto_map"] = {kind: [f"evil.{cls}", None] if kind == "AutoTokenizer" else f"evil.{cls}"}
        return data

    return change


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def remote_code_cases() -> list[Case]:
    """Folders that ask transformers to import their own Python (item 1): all refused, none run."""
    return [
        Case(
            "code:tokenizer-auto-map",
            _with_code(
                TOKENIZER_CONFIG,
                lambda d: {**_auto_map("AutoTokenizer", "EvilTokenizer")(d), "tokenizer_class": "EvilTokenizer"},
            ),
            "auto_map in tokenizer_config.json",
        ),
        Case(
            "code:tokenizer-auto-map-known-class",
            _with_code(TOKENIZER_CONFIG, _auto_map("AutoTokenizer", "EvilTokenizer")),
            "auto_map in tokenizer_config.json",
        ),
        Case(
            "code:tokenizer-class-unknown",
            _with_code(TOKENIZER_CONFIG, _set("tokenizer_class", "EvilTokenizer")),
            "not a transformers class",
        ),
        Case(
            "code:tokenizer-class-dotted",
            _with_code(TOKENIZER_CONFIG, _set("tokenizer_class", "evil.EvilTokenizer")),
            "not a transformers class",
        ),
        Case(
            "code:config-auto-map",
            _with_code("config.json", _auto_map("AutoConfig", "EvilConfig")),
            "auto_map in config.json",
        ),
        Case(
            "code:preprocessor-auto-map",
            _with_code(
                "preprocessor_config.json",
                lambda d: {
                    "image_processor_type": "EvilImageProcessor",
                    "auto_map": {"AutoImageProcessor": "evil.EvilImageProcessor"},
                },
            ),
            "auto_map in preprocessor_config.json",
        ),
        Case(
            "code:preprocessor-class-unknown",
            _with_code("preprocessor_config.json", lambda d: {"image_processor_type": "EvilImageProcessor"}),
            "not a transformers class",
        ),
        Case(
            "code:processor-auto-map",
            _with_code(
                "processor_config.json",
                lambda d: {"processor_class": "EvilProcessor", "auto_map": {"AutoProcessor": "evil.EvilProcessor"}},
            ),
            "auto_map in processor_config.json",
        ),
        Case(
            "code:processor-nested-auto-map",
            _with_code(
                "processor_config.json",
                lambda d: {
                    "image_processor": {
                        "image_processor_type": "CLIPImageProcessor",
                        "auto_map": {"AutoImageProcessor": "evil.EvilImageProcessor"},
                    }
                },
            ),
            "auto_map in processor_config.json",
        ),
        Case(
            "code:custom-pipelines",
            _with_code("config.json", _set("custom_pipelines", {"vqa": {"impl": "x.Pipe"}})),
            "custom_pipelines in config.json",
        ),
    ]


def config_cases() -> list[Case]:
    """Broken config.json files (item 3): one line naming the field, before anything is built."""
    text, vision, base = "base_config.text_config", "base_config.vision_config", "base_config"
    raw = {
        "list": ("JSON object", b"[1, 2, 3]"),
        "null": ("JSON object", b"null"),
        "string": ("JSON object", b'"cliviz"'),
        "number": ("JSON object", b"42"),
        "empty": ("not valid JSON", b""),
        "truncated": ("not valid JSON", (BUNDLED / "config.json").read_bytes()[:100]),
        "not-utf8": ("not UTF-8", b'{"model_type": "\xff\xfe"}'),
        "deep-arrays": ("nested too deeply", _deep(100_000).encode()),
        "deep-objects": ("nested more than", ('{"a":' * 40 + "1" + "}" * 40).encode()),
        "huge": ("too large for a model config", b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'),
    }
    cases = [Case(f"config:{name}", _raw_file("config.json", data), expect) for name, (expect, data) in raw.items()]
    fields: list[tuple[str, Callable[[dict], dict], str]] = [
        ("model-type-llava", _set("model_type", "llava"), "not 'cliviz_cli'"),
        ("model-type-missing", _delete("model_type"), "not 'cliviz_cli'"),
        ("base-missing", _delete("base_config"), "base_config must be a JSON object"),
        ("base-list", _set("base_config", [1]), "base_config must be a JSON object"),
        ("base-type-gpt2", _set(f"{base}.model_type", "gpt2"), "base_config.model_type"),
        ("text-missing", _delete(f"{base}.text_config"), "text_config must be a JSON object"),
        ("text-type-unknown", _set(f"{text}.model_type", "skynet"), "not a model type transformers knows"),
        ("hidden-string", _set(f"{text}.hidden_size", "128"), "hidden_size must be an integer"),
        ("hidden-nan", _set(f"{text}.hidden_size", math.nan), "hidden_size is nan"),
        ("hidden-inf", _set(f"{text}.hidden_size", math.inf), "hidden_size is inf"),
        ("hidden-float", _set(f"{text}.hidden_size", 128.5), "hidden_size must be an integer"),
        ("hidden-bool", _set(f"{text}.hidden_size", True), "hidden_size must be an integer"),
        ("hidden-negative", _set(f"{text}.hidden_size", -128), "hidden_size is -128"),
        ("hidden-huge", _set(f"{text}.hidden_size", 10**9), "hidden_size is 1,000,000,000"),
        ("heads-zero", _set(f"{text}.num_attention_heads", 0), "num_attention_heads is 0"),
        ("heads-not-dividing", _set(f"{text}.num_attention_heads", 3), "multiple of num_key_value_heads"),
        ("kv-heads-not-dividing", _set(f"{text}.num_key_value_heads", 3), "multiple of num_key_value_heads"),
        ("layers-million", _set(f"{text}.num_hidden_layers", 1_000_000), "num_hidden_layers is 1,000,000"),
        ("layers-zero", _set(f"{text}.num_hidden_layers", 0), "num_hidden_layers is 0"),
        ("vocab-zero", _set(f"{text}.vocab_size", 0), "vocab_size is 0"),
        ("vocab-trillion", _set(f"{text}.vocab_size", 10**12), "vocab_size is"),
        ("image-token-out-of-range", _set(f"{base}.image_token_index", 999), "image_token_index is 999"),
        ("image-token-negative", _set(f"{base}.image_token_index", -1), "image_token_index is -1"),
        ("vision-hidden-zero", _set(f"{vision}.hidden_size", 0), "vision_config.hidden_size is 0"),
        ("vision-heads-zero", _set(f"{vision}.num_attention_heads", 0), "vision_config.num_attention_heads is 0"),
        ("patch-zero", _set(f"{vision}.patch_size", 0), "patch_size is 0"),
        ("patch-larger-than-image", _set(f"{vision}.patch_size", 128), "larger than image_size"),
        ("image-size-huge", _set(f"{vision}.image_size", 100_000), "image_size is 100,000"),
        (
            "patches-too-many",
            lambda d: _set(f"{vision}.patch_size", 1)(_set(f"{vision}.image_size", 8192)(d)),
            "patches",
        ),
        ("channels-one", _set(f"{vision}.num_channels", 1), "num_channels is 1"),
        ("feature-layer-out-of-range", _set(f"{base}.vision_feature_layer", 99), "vision_feature_layer 99"),
        (
            "feature-layer-list",
            _set(f"{base}.vision_feature_layer", [-2, -1]),
            "vision_feature_layer must be one integer",
        ),
        ("select-strategy", _set(f"{base}.vision_feature_select_strategy", "weird"), "vision_feature_select_strategy"),
        ("projector-act", _set(f"{base}.projector_hidden_act", "evil_act"), "projector_hidden_act"),
        ("text-act", _set(f"{text}.hidden_act", 7), "hidden_act"),
        ("rms-eps-zero", _set(f"{text}.rms_norm_eps", 0), "rms_norm_eps"),
        ("ln-eps-negative", _set(f"{vision}.layer_norm_eps", -1.0), "layer_norm_eps"),
        ("fusion-magic", _set("fusion", "magic"), "fusion must be one of"),
        ("vision-layers-out", _set("vision_layers", [99]), "vision_layers holds 99"),
        ("vision-layers-empty", _set("vision_layers", []), "vision_layers is empty"),
        ("vision-layers-string", _set("vision_layers", "1,2"), "vision_layers must be a list of integers"),
        ("vision-layers-repeated", _set("vision_layers", [1, 1, 2]), "lists a layer twice"),
        ("injection-negative", _set("injection_layers", [-1]), "injection_layers holds -1"),
        ("injection-out", _set("injection_layers", [4]), "injection_layers holds 4"),
        ("lora-zero", _set("lora_rank", 0), "lora_rank is 0"),
        ("lora-string", _set("lora_rank", "8"), "lora_rank must be an integer"),
        ("temperature-zero", _set("gate_temperature", 0), "gate_temperature"),
        ("temperature-negative", _set("gate_temperature", -1.0), "gate_temperature"),
        ("temperature-nan", _set("gate_temperature", math.nan), "gate_temperature is nan"),
        ("temperature-tiny", _set("gate_temperature", 1e-30), "gate_temperature"),
        ("read-heads-zero", _set("read_heads", 0), "read_heads is 0"),
        ("read-heads-not-dividing", _set("read_heads", 3), "read heads"),
        (
            "absurd-size",
            lambda d: _set(f"{text}.intermediate_size", 1 << 20)(
                _set(f"{text}.hidden_size", 65536)(
                    _set(f"{text}.num_attention_heads", 256)(
                        _set(f"{text}.num_key_value_heads", 256)(
                            _set(f"{text}.head_dim", 256)(_set(f"{text}.num_hidden_layers", 256)(d))
                        )
                    )
                )
            ),
            "parameters",
        ),
        # fields a later cliviz adds to its config must pass through untouched
        ("future-fields", lambda d: {**d, "a_future_field": {"x": 1}, "another_one": [1, 2]}, None),
    ]
    cases += [Case(f"config:{name}", _edit_json("config.json", change), expect) for name, change, expect in fields]
    return cases


def side_file_cases() -> list[Case]:
    """Tokenizer and processor files that are not what they should be."""
    return [
        Case("side:tokenizer-json-garbage", _raw_file("tokenizer.json", b"{not json"), "cannot load the tokenizer"),
        Case("side:tokenizer-json-list", _raw_file("tokenizer.json", b"[1,2]"), "cannot load the tokenizer"),
        Case("side:tokenizer-config-list", _raw_file("tokenizer_config.json", b"[1, 2]"), "must hold a JSON object"),
        Case("side:tokenizer-config-garbage", _raw_file("tokenizer_config.json", b"{{{"), "not valid JSON"),
        Case("side:tokenizer-config-deep", _raw_file(TOKENIZER_CONFIG, _deep(100_000).encode()), "nested too deeply"),
        Case("side:processor-config-garbage", _raw_file("processor_config.json", b"\xff\xfe"), "not UTF-8"),
        Case(
            "side:missing-tokenizer",
            lambda f: _delete_file(_copy_bundled(f), "tokenizer.json"),
            "missing tokenizer.json",
        ),
        Case("side:missing-config", lambda f: _delete_file(_copy_bundled(f), "config.json"), "missing config.json"),
        Case("side:pytorch-bin-only", _bin_only, "weights must be safetensors"),
        Case("side:generation-config-garbage", _raw_file("generation_config.json", b"{not json at all"), None),
        Case(
            "side:generation-config-hostile",
            _raw_file(
                "generation_config.json",
                json.dumps(
                    {
                        "num_beams": 1000,
                        "max_length": 10**9,
                        "do_sample": True,
                        "temperature": 1e-9,
                        "num_return_sequences": 50,
                        "max_new_tokens": 10**9,
                    }
                ).encode(),
            ),
            None,
        ),
    ]


def _delete_file(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _bin_only(folder: Path) -> Path:
    target = _copy_bundled(folder)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    return target


def _rewrite_weights(change: Callable[[dict], dict]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from safetensors.torch import load_file, save_file

        target = _copy_bundled(folder)
        path = target / "model.safetensors"
        tensors = change(load_file(path))
        save_file(tensors, path, metadata={"format": "pt"})
        return target

    return build


def _raw_weights(make: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        target = _copy_bundled(folder)
        path = target / "model.safetensors"
        path.write_bytes(make(path.read_bytes()))
        return target

    return build


def _torch_saved(zip_format: bool) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import torch

        target = _copy_bundled(folder)
        torch.save({"w": torch.zeros(2)}, target / "model.safetensors", _use_new_zipfile_serialization=zip_format)
        return target

    return build


def _first_key(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _header_lies(data: bytes) -> bytes:
    """A valid-looking header whose first tensor claims offsets past the end of the file."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def weight_cases() -> list[Case]:
    """Broken model.safetensors files (item 2) and non-finite weights (item 4)."""
    import torch

    def nan_in(part: str, value: float) -> Callable[[dict], dict]:
        def change(t: dict) -> dict:
            key = _first_key(t, part)
            t[key] = torch.full_like(t[key], value)
            return t

        return change

    def reshape(t: dict) -> dict:
        key = _first_key(t, "agf.0.injection.out_proj.weight")
        t[key] = torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])
        return t

    def drop(t: dict) -> dict:
        del t[_first_key(t, "lm_head")]
        return t

    def to_int(t: dict) -> dict:
        key = _first_key(t, "lm_head")
        t[key] = t[key].to(torch.int32)
        return t

    return [
        Case("weights:empty", _raw_weights(lambda d: b""), "is empty"),
        Case("weights:truncated-header", _raw_weights(lambda d: d[:5000]), "not a valid safetensors file"),
        Case("weights:truncated-data", _raw_weights(lambda d: d[:-1000]), "not a valid safetensors file"),
        Case("weights:extra-bytes", _raw_weights(lambda d: d + b"\0" * 64), "not a valid safetensors file"),
        Case("weights:random", _raw_weights(lambda d: _noise(4096, seed=4)), "not a valid safetensors file"),
        Case("weights:eight-bytes", _raw_weights(lambda d: b"\0" * 8), "not a valid safetensors file"),
        Case("weights:header-lies", _raw_weights(_header_lies), "not a valid safetensors file"),
        Case("weights:pickle-renamed", _torch_saved(zip_format=False), "pickled PyTorch file"),
        Case("weights:zip-renamed", _torch_saved(zip_format=True), "pickled PyTorch file"),
        Case("weights:missing-key", _rewrite_weights(drop), "1 missing"),
        Case("weights:extra-key", _rewrite_weights(lambda t: {**t, "zzz.extra": torch.zeros(3)}), "1 unexpected"),
        Case("weights:wrong-shape", _rewrite_weights(reshape), "wrong shape"),
        Case("weights:integer-dtype", _rewrite_weights(to_int), "not floating point"),
        Case("weights:no-tensors", _rewrite_weights(lambda t: {}), "missing"),
        Case("weights:nan", _rewrite_weights(nan_in("lm_head", math.nan)), "NaN or infinite"),
        Case("weights:inf", _rewrite_weights(nan_in("agf.0.gate", math.inf)), "NaN or infinite"),
    ]


def model_folder_cases() -> list[Case]:
    return [*remote_code_cases(), *config_cases(), *side_file_cases(), *weight_cases()]


# ----------------------------------------------------------------------------------------- trace files


def _good_trace_file(folder: Path, name: str = "traces.parquet", n: int = 3) -> Path:
    from cliviz.tracing.traceset import write_traces

    return write_traces(folder / name, [good_trace(seed=i) for i in range(n)])


def _table_edit(change: Callable[[Any], Any], row: int = 1) -> Callable[[Path], Path]:
    """A valid trace file whose Arrow table went through `change(table, row)` and was written back as is."""

    def build(folder: Path) -> Path:
        import pyarrow.parquet as pq

        path = _good_trace_file(folder)
        table = pq.read_table(path)
        pq.write_table(change(table, row), path)
        return path

    return build


def _set_cell(column: str, value: Any) -> Callable[[Any, int], Any]:
    def change(table: Any, row: int) -> Any:
        import pyarrow as pa

        i = table.schema.get_field_index(column)
        values = table.column(column).to_pylist()
        values[row] = value(values[row]) if callable(value) else value
        return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))

    return change


def _scale_gates(factor: float) -> Callable[[list], list]:
    return lambda gates: [g * factor for g in gates]


def _first(value: float) -> Callable[[list], list]:
    return lambda values: [value, *values[1:]]


def trace_file_cases() -> list[Case]:
    """Trace files a reader must refuse with one line (item 8), and ones it must read."""
    raw = {
        "empty": b"",
        "text": b"sample_id,gates\n1,2\n",
        "pickle": pickle.dumps({"gates": [1.0]}),
        "random": _noise(2048, seed=5),
        "parquet-magic-only": b"PAR1" + b"\0" * 32 + b"PAR1",
    }
    unreadable = "not a readable Parquet file"
    cases = [Case(f"trace:{name}", _write(f"{name}.parquet", data), unreadable) for name, data in raw.items()]
    cases += [
        Case("trace:truncated", lambda f: _truncate(_good_trace_file(f)), unreadable),
        Case("trace:missing", lambda f: f / "nope.parquet", "does not exist"),
        Case("trace:folder", _folder("dir.parquet"), "is not a file"),
        Case("trace:plain-parquet", _plain_parquet, "not a cliviz trace file"),
        Case("trace:schema-99", _schema_version(b"99"), "schema version 99"),
        Case("trace:schema-garbage", _schema_version(b"\xff"), "unreadable schema version"),
    ]
    cell = _set_cell
    edits: list[tuple[str, Callable[[Any, int], Any], str | None]] = [
        ("missing-column", lambda t, r: t.drop(["gates"]), "missing column"),
        (
            "wrong-type",
            lambda t, r: t.set_column(t.schema.get_field_index("image_width"), "image_width", _strings(t.num_rows)),
            "wrong type",
        ),
        ("gates-nan", cell("gates", _first(math.nan)), "gates holds NaN"),
        ("gates-inf", cell("gates", _first(math.inf)), "gates holds NaN or infinite"),
        ("norm-nan", cell("injection_norm", _first(math.nan)), "injection_norm holds NaN"),
        ("logprob-inf", cell("answer_logprobs", _first(-math.inf)), "answer_logprobs holds NaN"),
        ("topk-nan", cell("topk_logprobs", _first(math.nan)), "topk_logprobs holds NaN"),
        ("gates-not-summing", cell("gates", _scale_gates(0.5)), "do not sum to 1"),
        ("gates-above-one", cell("gates", _first(3.0)), "outside [0, 1]"),
        ("norm-negative", cell("injection_norm", _first(-1.0)), "negative norms"),
        ("logprob-positive", cell("answer_logprobs", _first(5.0)), "above 0"),
        ("shape-overflow", cell("gates_shape", [2**31 - 1, 2**31 - 1, 4]), "gates_shape"),
        # 2**21 * 2**21 * 2**22 = 2**64 wraps to 0 in int64: an empty gates list used to pass for it
        (
            "shape-wraps-int64",
            lambda t, r: cell("gates", [])(cell("gates_shape", [2**21, 2**21, 2**22])(t, r), r),
            "gates does not match gates_shape",
        ),
        ("shape-negative", cell("gates_shape", [-2, -6, 3]), "impossible size"),
        ("shape-two-entries", cell("gates_shape", [2, 18]), "does not have 3 entries"),
        ("shape-product-mismatch", cell("gates_shape", [2, 7, 3]), "gates does not match gates_shape"),
        ("gates-vs-injection-layers", cell("injection_layers", [1]), "len(injection_layers)"),
        ("gates-vs-vision-layers", cell("vision_layers", [1, 2]), "len(vision_layers)"),
        ("tokens-short", cell("token_texts", lambda v: v[:-1]), "token_texts and token_ids"),
        ("roles-bad", cell("token_roles", lambda v: ["villain", *v[1:]]), "role outside"),
        ("answer-position-out", cell("answer_positions", lambda v: [99, *v[1:]]), "outside the tokens"),
        ("answer-lengths", cell("answer_texts", lambda v: v[:-1]), "answer_texts and answer_ids"),
        (
            "norm-shape",
            lambda t, r: cell("injection_norm", lambda v: v[:6])(cell("injection_norm_shape", [1, 6])(t, r), r),
            "injection_norm_shape",
        ),
        (
            "topk-shape",
            lambda t, r: cell("topk_logprobs", lambda v: v[:2])(cell("topk_logprobs_shape", [2, 1])(t, r), r),
            "topk_logprobs and topk_ids",
        ),
        ("good-extra-column", lambda t, r: t.append_column("my_notes", _strings(t.num_rows)), None),
    ]
    cases += [Case(f"trace:{name}", _table_edit(change), expect) for name, change, expect in edits]
    cases += [
        Case("trace:good", lambda f: _good_trace_file(f), None),
        Case("trace:good-projector", _projector_file, None),
        Case("trace:good-empty", lambda f: _good_trace_file(f, n=0), None),
    ]
    return cases


def _strings(n: int):
    import pyarrow as pa

    return pa.array([f"x{i}" for i in range(n)], pa.string())


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _plain_parquet(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "plain.parquet"
    pq.write_table(pa.table({"gates": [1.0, 2.0]}), path)
    return path


def _schema_version(value: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import pyarrow.parquet as pq

        path = _good_trace_file(folder)
        table = pq.read_table(path)
        meta = dict(table.schema.metadata)
        meta[b"cliviz.schema_version"] = value
        pq.write_table(table.replace_schema_metadata(meta), path)
        return path

    return build


def _projector_file(folder: Path) -> Path:
    from cliviz.tracing.traceset import write_traces

    trace = good_trace(n_layers=0)
    trace.meta.fusion, trace.meta.injection_layers = "projector", []
    return write_traces(folder / "projector.parquet", [trace])
