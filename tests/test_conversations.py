"""Conversation sources: LLaVA JSON/JSONL (a JSON list streamed), Parquet/Arrow (as `datasets` writes
them), ShapesVQA folders and scenes; every bad-row reason counted and skipped, never raised."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conversation_data import llava_dataset, llava_row, word_level, write_jsonl, write_png
from PIL import Image

from cliviz.data.conversations import REASONS, BadRow, Conversation, load_conversation_image
from cliviz.data.sources import ArrowSource, LlavaJsonSource, ShapesFolderSource, ShapesSceneSource, open_source
from cliviz.errors import CLIVizError


def parsed(source) -> tuple[list[Conversation], Counter]:
    good, bad = [], Counter()
    for item in source:
        if isinstance(item, BadRow):
            bad[item.reason] += 1
        else:
            good.append(item)
    return good, bad


def test_llava_jsonl_and_json_list_give_the_same_conversations(tmp_path):
    rows, images = llava_dataset(tmp_path, 4, turns=2)
    rows[0]["conversations"][0]["value"] = "what color is the circle ?\n<image>"  # image after the question
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    from_lines, bad_lines = parsed(open_source(tmp_path / "d.jsonl", images))
    from_list, bad_list = parsed(open_source(tmp_path / "d.json", images))
    assert not bad_lines and not bad_list
    assert from_lines == from_list and len(from_list) == 4
    first = from_list[0]
    assert first.id == "row-0" and first.image == images / "0.png"
    assert first.turns == (
        ("user", "what color is the circle ?"),
        ("assistant", "red"),
        ("user", "how many objects are there ?"),
        ("assistant", "two"),
    )
    assert first.pairs() == [("what color is the circle ?", "red"), ("how many objects are there ?", "two")]
    assert np.array_equal(np.asarray(load_conversation_image(first)), np.asarray(Image.open(images / "0.png")))


def test_json_list_is_streamed_not_loaded_whole(tmp_path):
    """Three good items then garbage: a whole-file parser yields nothing, the stream yields the three
    rows and one `malformed_json` for the unreadable rest."""
    rows, images = llava_dataset(tmp_path, 3)
    text = json.dumps(rows)[:-1] + ', {"id": "x", "conversations": [ }, {"id": "y"}]'
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(ValueError):
        json.loads(text)
    good, bad = parsed(LlavaJsonSource(tmp_path / "d.json", images))
    assert [c.id for c in good] == ["row-0", "row-1", "row-2"]
    assert bad == Counter({"malformed_json": 1})


def test_default_image_folder_is_the_data_files_folder(tmp_path):
    write_png(tmp_path / "pics" / "a.png", 0)
    write_jsonl(tmp_path / "d.jsonl", [llava_row(0, image="pics/a.png")])
    (conversation,), _ = parsed(open_source(tmp_path / "d.jsonl"))
    assert load_conversation_image(conversation).size == (8, 8)


def test_parquet_and_arrow_written_by_datasets(tmp_path):
    """Files as researchers get them from `datasets`: an Image feature (bytes inside the file) via
    `to_parquet`, the same via `save_to_disk` (Arrow stream files + state.json)."""
    import datasets

    rows, images = llava_dataset(tmp_path, 5)
    pil = [Image.open(images / f"{i}.png").convert("RGB") for i in range(5)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    table = datasets.Dataset.from_dict(
        {"id": [r["id"] for r in rows], "image": pil, "conversations": [r["conversations"] for r in rows]},
        features=features,
    )
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        source = open_source(path)
        assert isinstance(source, ArrowSource) and source.num_rows() == 5
        good, bad = parsed(source)
        assert not bad and [c.id for c in good] == [r["id"] for r in rows]
        assert isinstance(good[3].image, bytes)
        assert np.array_equal(np.asarray(load_conversation_image(good[3])), np.asarray(pil[3]))
        assert good[3].turns == (("user", "what color is the circle ?"), ("assistant", "red"))


def test_parquet_with_paths_json_conversations_and_row_groups(tmp_path):
    """Image paths resolved against --image-folder, conversations stored as a JSON string, and a
    start row that skips whole row groups."""
    rows, images = llava_dataset(tmp_path, 7)
    table = pa.table(
        {"image": [r["image"] for r in rows], "conversations": [json.dumps(r["conversations"]) for r in rows]}
    )
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    source = ArrowSource(tmp_path / "d.parquet", images)
    good, bad = parsed(source)
    assert not bad and len(good) == 7 and good[4].image == images / "4.png" and good[4].id == "d.parquet:4"
    tail = [source.parse(raw, 5 + k) for k, raw in enumerate(source.raw_rows(5))]
    assert [c.image for c in tail] == [images / "5.png", images / "6.png"]
    with pytest.raises(CLIVizError, match="no 'conversations' column"):
        pq.write_table(pa.table({"image": ["a"]}), tmp_path / "bad.parquet")
        ArrowSource(tmp_path / "bad.parquet")


def test_shapes_folder_one_conversation_per_image(tmp_path):
    from cliviz.data.dataset import write_dataset

    write_dataset(tmp_path / "shapes", 6, seed=3)
    source = open_source(tmp_path / "shapes")
    assert isinstance(source, ShapesFolderSource)
    good, bad = parsed(source)
    lines = [json.loads(line) for line in (tmp_path / "shapes" / "samples.jsonl").read_text().splitlines()]
    assert not bad and len(good) == 6
    assert good[0].turns == (("user", lines[0]["question"]), ("assistant", lines[0]["answer"]))
    # several questions about one image (consecutive rows) become one multi-turn conversation
    pairs = (("what digit is in the corner ?", "7"), ("how many objects are there ?", "two"))
    rows = [dict(lines[0], question=q, answer=a) for q, a in pairs]
    write_jsonl(tmp_path / "shapes" / "samples.jsonl", rows + lines[1:2])
    good, _ = parsed(ShapesFolderSource(tmp_path / "shapes"))
    assert [len(c.pairs()) for c in good] == [2, 1]
    assert good[0].pairs()[1] == ("how many objects are there ?", "two")


def test_shapes_scene_source_matches_the_generator():
    from cliviz.data.dataset import scene_with_questions

    source = ShapesSceneSource(seed=4, offset=10)
    conversation = source.parse(next(iter(source.raw_rows(2))), 2)
    scene, qas = scene_with_questions(4, 12)
    assert conversation.pairs() == [(qa.question, qa.answer) for qa in qas]
    assert np.array_equal(np.asarray(conversation.image), np.asarray(scene.image))
    assert conversation.extra["digit"].shape == (64,)


def bad_rows(tmp_path) -> tuple[list, dict[str, int]]:
    """One JSONL line per reason a source detects, plus two good rows."""
    _, images = llava_dataset(tmp_path, 3)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ok = llava_row(0)
    rows = [
        ok,
        '{"id": "half", "conversations": [',  # malformed_json
        ["not", "a", "record"],  # malformed_row
        dict(ok, conversations=[{"from": "human", "value": 3}]),  # malformed_row
        dict(ok, conversations=ok["conversations"][::-1]),  # wrong_roles
        dict(ok, conversations=ok["conversations"][:1]),  # wrong_roles: no answer
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, ok["conversations"][1]]},  # no_image
        dict(ok, image=["0.png", "1.png"]),  # multiple_images
        dict(ok, conversations=[{"from": "human", "value": "what ?"}, ok["conversations"][1]]),  # no_image_token
        dict(ok, conversations=[{"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "red"}]),
        dict(ok, conversations=[ok["conversations"][0], {"from": "gpt", "value": "  "}]),  # empty_answer
        dict(ok, image="nowhere.png"),  # missing_image
        dict(ok, image="broken.png"),  # unreadable_image
        llava_row(1),
    ]
    expected = {
        "malformed_json": 1,
        "malformed_row": 2,
        "wrong_roles": 2,
        "no_image": 1,
        "multiple_images": 1,
        "no_image_token": 1,
        "extra_image_tokens": 1,
        "empty_answer": 1,
        "missing_image": 1,
        "unreadable_image": 1,
    }
    return rows, expected


def test_every_bad_row_is_counted_and_skipped(tmp_path):
    """Through the stream, as the trainer sees it: good rows batched, each bad one counted once."""
    from cliviz.data.collate import collator_for_model
    from cliviz.data.loader import ConversationStream, DataSummary, make_loader

    rows, expected = bad_rows(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", rows)
    tok, config = word_level()
    stream = ConversationStream(
        open_source(tmp_path / "d.jsonl", tmp_path / "images"), collator_for_model(config, tok), batch_size=4, epochs=1
    )
    summary = DataSummary()
    for batch in make_loader(stream):
        summary.add(batch)
    assert dict(summary.skipped) == expected and summary.samples == 2 and summary.batches == 4
    assert set(expected) <= set(REASONS)
    line = summary.describe()
    assert "2 samples in 4 batches" in line and "skipped 12 rows" in line and "malformed_row 2" in line


def test_unknown_or_missing_data_is_a_clean_error(tmp_path):
    with pytest.raises(CLIVizError, match="data not found"):
        open_source(tmp_path / "nothing.json")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(CLIVizError, match="unknown data format"):
        open_source(tmp_path / "d.csv")
    with pytest.raises(CLIVizError, match="no .parquet or .arrow"):
        open_source(tmp_path)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(CLIVizError, match="data file is empty"):
        open_source(tmp_path / "empty.json")
    write_jsonl(tmp_path / "d.jsonl", [llava_row(0)])
    with pytest.raises(CLIVizError, match="image folder not found"):
        open_source(tmp_path / "d.jsonl", tmp_path / "no-such-folder")
