"""ShapesVQA as a deterministic iterator and as files on disk (`images/*.png` + `samples.jsonl`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cliviz.atomic import atomic_write_bytes
from cliviz.data.questions import QA, QUESTION_TYPES
from cliviz.data.scenes import Scene, make_scene


@dataclass
class Sample:
    """One question about one image; what `cliviz data` writes as a JSONL row."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    image_id: str


def scene_with_questions(seed: int, index: int, qtypes: tuple[str, ...] | None = None) -> tuple[Scene, list[QA]]:
    """Scene `index` of the stream `seed`, with one question per applicable type (random order).

    Seeded by `(seed, index)` so any scene can be drawn alone — sharding and resuming need that.
    """
    rng = np.random.default_rng([seed, index])
    scene = make_scene(rng)
    qas = [qa for name, fn in QUESTION_TYPES.items() if qtypes is None or name in qtypes if (qa := fn(scene, rng))]
    order = rng.permutation(len(qas))
    return scene, [qas[i] for i in order]


def iter_samples(n: int, seed: int = 0) -> Iterator[Sample]:
    """`n` samples cycling over question types, each from its own scene: balanced per type."""
    names = tuple(QUESTION_TYPES)
    index = 0
    produced = 0
    while produced < n:
        qtype = names[produced % len(names)]
        scene, qas = scene_with_questions(seed, index, (qtype,))
        index += 1
        if qas:
            qa = qas[0]
            yield Sample(scene.image, qa.question, qa.answer, qa.qtype, f"{seed}-{index - 1:06d}")
            produced += 1


def write_dataset(out: Path, n: int, seed: int) -> Path:
    """Write `out/images/*.png` and `out/samples.jsonl`; the JSONL is replaced atomically."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in iter_samples(n, seed):
        name = f"images/{sample.image_id}.png"
        sample.image.save(out / name)
        rows.append({"image": name, "question": sample.question, "answer": sample.answer, "qtype": sample.qtype})
    target = out / "samples.jsonl"
    atomic_write_bytes(target, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"), "samples file")
    return target
