"""Hostile data for every reader (`train`'s sources, eval/compare/sweep's samples.jsonl, probe-layers'
scenes): each bad row is a counted skip or one error line, memory stays bounded, and no file outside
the image folder is ever read."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conversation_data import chatml_tokenizer, llava_dataset, llava_row, word_level, write_png
from PIL import Image

from cliviz.data.conversations import BadRow, Conversation
from cliviz.data.sources import LlavaJsonSource, open_source

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def reasons(source) -> Counter:
    return Counter(item.reason for item in source if isinstance(item, BadRow))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------- images stay inside the folder
def test_images_outside_the_image_folder_are_skipped_and_counted(tmp_path):
    rows, images = llava_dataset(tmp_path, 1)
    outside = write_png(tmp_path / "secret" / "s.png", 9)
    (images / "link.png").symlink_to(outside)
    (images / "inner.png").symlink_to(images / "0.png")  # a link that stays inside is fine
    rows += [
        llava_row(1, image="../secret/s.png"),
        llava_row(2, image=str(outside)),
        llava_row(3, image="link.png"),
        llava_row(4, image="../../../../etc/passwd"),
        llava_row(5, image="inner.png"),
    ]
    data = write_json(tmp_path / "d.json", rows)
    assert reasons(open_source(data, images)) == Counter({"outside_image_folder": 4})
    allowed = reasons(open_source(data, images, allow_absolute=True))
    assert allowed == Counter({"outside_image_folder": 3})  # the absolute path is admitted, nothing else


def test_a_shapes_folder_and_samples_jsonl_keep_the_same_rule(tmp_path):
    from cliviz.data.samples import read_jsonl

    write_png(tmp_path / "images" / "a.png", 1)
    outside = write_png(tmp_path.parent / f"{tmp_path.name}-outside.png", 2)
    rows = [
        {"image": "images/a.png", "question": "q ?", "answer": "red", "qtype": "color"},
        {"image": str(outside), "question": "q ?", "answer": "red", "qtype": "color"},
        {"image": "../" + outside.name, "question": "q ?", "answer": "red", "qtype": "color"},
    ]
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = read_jsonl(tmp_path)
    assert len(data.records) == 1 and data.skipped == {"outside image folder": 2}
    assert reasons(open_source(tmp_path)) == Counter({"outside_image_folder": 2})


# --------------------------------------------------------------------------- bounded, typed rows
HOSTILE_SAMPLES = {
    "deep": ("[" * 100_000 + "]" * 100_000, "too deep"),
    "qtype list": (json.dumps({"image": "images/a.png", "question": "q ?", "qtype": ["x"]}), "malformed line"),
    "surrogate": ('{"image": "images/a.png", "question": "what \\ud800 ?"}', "bad text"),
    "control": (json.dumps({"image": "images/a.png", "question": "what \x07 ?"}), "bad text"),
    "long name": (json.dumps({"image": "x" * 5000 + ".png", "question": "q ?"}), "bad image name"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAMPLES))
def test_hostile_samples_rows_are_counted_skips(tmp_path, case):
    from cliviz.data.samples import read_jsonl

    line, label = HOSTILE_SAMPLES[case]
    write_png(tmp_path / "images" / "a.png", 1)
    good = json.dumps({"image": "images/a.png", "question": "what color ?", "answer": "red", "qtype": "color"})
    (tmp_path / "samples.jsonl").write_text(line + "\n" + good + "\n")
    data = read_jsonl(tmp_path)
    assert len(data.records) == 1 and data.skipped == {label: 1}


def test_probe_scenes_refuse_foreign_digits_and_bombs(tmp_path):
    """An Arabic-Indic digit in a scene record (a KeyError in the glyph renderer) and a decompression
    bomb are counted skips of `probe-layers`' reader."""
    from cliviz.data.dataset import read_scenes, write_dataset

    write_dataset(tmp_path, 3, seed=1)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["scene"]["digit"] = "\u0663"
    bomb = tmp_path / "images" / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 M pixels, over the loader's limit
    extra = {"image": "images/bomb.png", "question": "q ?", "answer": "a", "scene": json.loads(lines[1])["scene"]}
    (tmp_path / "samples.jsonl").write_text("\n".join([json.dumps(first), *lines[1:], json.dumps(extra)]) + "\n")
    scenes, skipped = read_scenes(tmp_path)
    assert len(scenes) == 2 and skipped == {"bad scene record": 1, "unreadable image": 1}


def test_a_list_nested_100000_deep_is_one_skip_in_flat_memory(tmp_path):
    """Both readers: the JSONL line raised RecursionError, the JSON list grew to 18 GB."""
    import tracemalloc

    rows, images = llava_dataset(tmp_path, 2)
    deep = "[" * 100_000 + "]" * 100_000
    listed = tmp_path / "d.json"
    listed.write_text("[" + json.dumps(rows[0]) + "," + deep + "," + json.dumps(rows[1]) + "]")
    tracemalloc.start()
    got = list(LlavaJsonSource(listed, images))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [type(x).__name__ for x in got] == ["Conversation", "BadRow", "Conversation"]
    assert got[1].reason == "too_deep" and peak < 50 * 2**20
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(rows[0]) + "\n" + deep + "\n" + json.dumps(rows[1]) + "\n")
    assert reasons(LlavaJsonSource(lines, images)) == Counter({"too_deep": 1})


def test_text_no_tokenizer_takes_and_long_names_are_counted(tmp_path):
    rows, images = llava_dataset(tmp_path, 1)
    bad = [
        llava_row(0)
        | {"conversations": [{"from": "human", "value": "<image>\nq \ud800"}, {"from": "gpt", "value": "a"}]},
        llava_row(0) | {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a\x00"}]},
        llava_row(0, image="y" * 5000 + ".png"),
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows + bad))  # json.dumps escapes the surrogate
    assert reasons(LlavaJsonSource(data, images)) == Counter({"bad_text": 2, "bad_image_name": 1})


# --------------------------------------------------------------------------- bounded memory per row
def test_default_max_length_is_the_models_context_and_long_rows_skip_before_tokenising():
    from cliviz.data.collate import collator_for_model

    tok, config = word_level()
    collator = collator_for_model(config, tok)
    assert collator.max_length == config.base_config.text_config.max_position_embeddings
    calls = []
    encode = collator.encode_text
    collator.encode_text = lambda c: calls.append(sum(len(t) for _, t in c.turns)) or encode(c)
    huge = Conversation("huge", Image.new("RGB", (64, 64)), (("user", "what color ?"), ("assistant", "red " * 25_000)))
    short = Conversation("ok", Image.new("RGB", (64, 64)), (("user", "what color ?"), ("assistant", "red")))
    collated = collator([huge, short])
    assert collated.skipped == Counter({"too_long": 1}) and collated.ids == ["ok"]
    assert max(calls) < 100  # the 100,000 characters never reached the tokenizer


def test_many_turns_cost_linear_renders_and_keep_their_labels():
    """Tokenising a conversation rendered every prefix (quadratic in turns: 800 turns took 35 s)."""
    from cliviz.data.collate import IGNORE, ChatEncoder

    tok = chatml_tokenizer()
    encoder = ChatEncoder(tok, tok.convert_tokens_to_ids("<image>"))
    counted = {"renders": 0, "chars": 0}
    render = encoder._render

    def counting(messages, generation):
        out = render(messages, generation)
        counted["renders"] += 1
        counted["chars"] += len(out)
        return out

    encoder._render = counting
    work = {}
    for turns in (50, 200):
        counted.update(renders=0, chars=0)
        body = [t for i in range(turns) for t in (("user", f"what color is circle {i} ?"), ("assistant", f"red {i}"))]
        tokens = encoder(Conversation("c", b"", tuple(body)))
        work[turns] = counted["chars"]
        labelled = tok.decode([t for t, lab in zip(tokens.ids, tokens.labels) if lab != IGNORE])
        assert all(f"red {i}" in labelled for i in range(turns)) and "what" not in labelled
        assert len(tokens.answer_ends) == turns
    assert work[200] < 6 * work[50]  # 4x the turns: about 4x the rendering (quadratic would be 16x)


def test_unknown_words_of_a_word_level_chat_model_are_skipped_not_trained_as_unk():
    from cliviz.data.collate import ChatEncoder, collator_for_model
    from cliviz.train import TrainSettings
    from cliviz.train.setup import build_model

    settings = TrainSettings(init_from=str(Path(__file__).parents[1] / "assets/models/llava-tiny-base"), steps=1)
    model, tok = build_model(settings, torch.float32)  # a word-level tokenizer with a chat template
    assert tok.chat_template
    collator = collator_for_model(model.config, tok)
    assert isinstance(collator.encode_text, ChatEncoder)
    image = Image.new("RGB", (64, 64))
    unknown = Conversation("u", image, (("user", "what color is the circle ?"), ("assistant", "zorblax")))
    known = Conversation("k", image, (("user", "what color is the circle ?"), ("assistant", "red")))
    collated = collator([unknown, known])
    assert collated.skipped == Counter({"unknown_words": 1}) and collated.ids == ["k"]
    assert tok.unk_token_id not in collated.inputs["input_ids"].tolist()[0]


PEAK = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from PIL import Image
    from cliviz.data.collate import collator_for_model
    from cliviz.data.conversations import Conversation
    from cliviz.model.loading import load_model
    model, tok = load_model("assets/models/cli-attached-tiny", device="cpu")
    collator = collator_for_model(model.config, tok)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [Conversation(str(i), sys.argv[1], (("user", "what color is the circle ?"), ("assistant", "red")))
            for i in range(8)]
    out = collator(rows)
    assert len(out.ids) == 8, out.skipped
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_an_8_row_batch_of_6300_pixel_images_peaks_under_1_5_gb(tmp_path):
    """Decoded at full size before resizing, 8 rows of one 6300 x 6300 PNG peaked at 4.1 GB."""
    path = tmp_path / "big.png"
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(path)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=ENV, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr
    before, after = (int(v) for v in proc.stdout.split())
    assert after * 1024 < 1.5 * 2**30, after
    assert (after - before) * 1024 < 400 * 2**20  # the batch itself: one image decoded at a time


# --------------------------------------------------------------------------- no data, no training
def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from cliviz.cli.main import main

    monkeypatch.setattr(sys, "argv", ["cliviz", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", ["empty list", "whitespace", "every image missing"])
def test_no_usable_row_is_one_error_line_and_nothing_written(tmp_path, monkeypatch, capsys, case):
    rows, images = llava_dataset(tmp_path, 3)
    data = tmp_path / "d.json"
    data.write_text({"empty list": "[]", "whitespace": "  \n\t\n", "every image missing": json.dumps(rows)}[case])
    folder = images if case != "every image missing" else tmp_path  # a typo in --image-folder
    out = tmp_path / "out"
    args = ("train", "--init-from", "assets/models/cli-attached-tiny", "--data", str(data), "--image-folder")
    code, _, err = run_main(monkeypatch, capsys, *args, str(folder), "--steps", "2", "--out", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert ("missing_image 3" in lines[0]) if case == "every image missing" else ("no training rows" in lines[0])
    assert not out.exists()


def test_chat_tokenizer_is_unaffected_by_the_unknown_word_rule():
    """Subword tokenizers spell any word: no `unknown_words` skip for them."""
    from cliviz.data.collate import ChatEncoder

    tok = chatml_tokenizer()
    encoder = ChatEncoder(tok, tok.convert_tokens_to_ids("<image>"))
    assert encoder.unk_id is None
    tokens = encoder(Conversation("c", b"", (("user", "zorblax ?"), ("assistant", "quux"))))
    assert tokens.ids
