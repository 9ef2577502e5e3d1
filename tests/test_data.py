"""ShapesVQA: determinism, balance, answers that match the drawn scene, files on disk."""

from __future__ import annotations

import json

import numpy as np

from cliviz.data import QUESTION_TYPES, iter_samples, scene_with_questions, vocabulary, write_dataset
from cliviz.data.questions import NUMBER_WORDS
from cliviz.data.scenes import COLORS, GLYPH_BOX, patch_labels
from cliviz.data.tokenizer import build_tokenizer


def test_same_seed_same_scenes_other_seed_other_scenes():
    a = [scene_with_questions(7, i) for i in range(20)]
    b = [scene_with_questions(7, i) for i in range(20)]
    c = [scene_with_questions(8, i) for i in range(20)]
    assert all(np.array_equal(np.asarray(x[0].image), np.asarray(y[0].image)) and x[1] == y[1] for x, y in zip(a, b))
    assert sum(np.array_equal(np.asarray(x[0].image), np.asarray(y[0].image)) for x, y in zip(a, c)) == 0


def test_at_least_six_types_balanced():
    samples = list(iter_samples(140, seed=3))
    counts = {t: sum(s.qtype == t for s in samples) for t in QUESTION_TYPES}
    assert len(QUESTION_TYPES) >= 6
    assert set(counts.values()) == {140 // len(QUESTION_TYPES)}


def test_answers_agree_with_the_scene():
    for i in range(200):
        scene, qas = scene_with_questions(11, i)
        for qa in qas:
            if qa.qtype == "count":
                assert qa.answer == NUMBER_WORDS[len(scene.objects)]
            elif qa.qtype == "glyph":
                assert qa.answer == scene.digit
            elif qa.qtype == "color":
                shape = qa.question.split()[-2]
                assert [o.color for o in scene.objects if o.shape == shape] == [qa.answer]
            elif qa.qtype == "size":
                named = [w for w in qa.question.split() if w in COLORS]
                objs = {o.color: o for o in scene.objects}
                assert objs[qa.answer].radius == max(objs[c].radius for c in named)


def test_glyph_is_drawn_in_its_box_and_labelled():
    scene, _ = scene_with_questions(2, 0)
    pixels = np.asarray(scene.image)
    x0, y0, x1, y1 = GLYPH_BOX
    box = pixels[y0 : y1 + 1, x0 : x1 + 1]
    assert (box.min(axis=-1) < 10).any() and (box.min(axis=-1) > 200).any()  # black strokes on white
    labels = patch_labels(scene, 8)
    assert labels["digit"][0, 0] == int(scene.digit) + 1
    assert labels["color"].max() > 0


def test_patch_labels_carry_each_objects_centre():
    from cliviz.data.scenes import CENTER_BIN

    for index in range(30):
        scene, _ = scene_with_questions(11, index)
        labels = patch_labels(scene, 8)
        by_colour = {list(COLORS).index(o.color) + 1: o for o in scene.objects}
        marked = labels["color"] > 0
        assert marked.any()
        for row, col in zip(*np.nonzero(marked)):
            obj = by_colour[labels["color"][row, col]]
            assert labels["center_y"][row, col] == obj.y // CENTER_BIN + 1
            assert labels["center_x"][row, col] == obj.x // CENTER_BIN + 1
        assert (labels["center_y"][~marked] == 0).all()


def test_tokenizer_covers_every_question_and_answer():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    for s in iter_samples(70, seed=5):
        assert all(w in vocab for w in tok.tokenize(s.question)), s.question
        assert s.answer in vocab
    assert len(set(vocabulary())) == len(vocabulary())


def test_write_dataset(tmp_path):
    target = write_dataset(tmp_path, 21, seed=4)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 21
    assert {"image", "question", "answer", "qtype"} <= set(rows[0])
    assert all((tmp_path / r["image"]).is_file() for r in rows)
