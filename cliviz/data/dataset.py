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
from cliviz.data.scenes import Scene, make_scene, scene_from_record, scene_record


@dataclass
class Sample:
    """One question about one image; what `cliviz data` writes as a JSONL row."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    image_id: str
    scene: Scene | None = None  # what is drawn: written beside the row so that probes can label the image


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
            yield Sample(scene.image, qa.question, qa.answer, qa.qtype, f"{seed}-{index - 1:06d}", scene)
            produced += 1


def write_dataset(out: Path, n: int, seed: int) -> Path:
    """Write `out/images/*.png` and `out/samples.jsonl`; the JSONL is replaced atomically.

    Each row also holds the `scene` drawn in its image (`scenes.scene_record`), which readers of
    question/answer rows ignore and `read_scenes` (the layer probes) uses.
    """
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in iter_samples(n, seed):
        name = f"images/{sample.image_id}.png"
        sample.image.save(out / name)
        assert sample.scene is not None  # iter_samples draws every sample from its scene
        rows.append(
            {
                "image": name,
                "question": sample.question,
                "answer": sample.answer,
                "qtype": sample.qtype,
                "scene": scene_record(sample.scene),
            }
        )
    target = out / "samples.jsonl"
    atomic_write_bytes(target, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"), "samples file")
    return target


def read_scenes(folder: Path) -> tuple[list[tuple[str, Scene]], dict[str, int]]:
    """The scenes of a `cliviz data` folder, one per image in file order: `([(image path, scene)], skipped)`.

    A row's `scene` record is redrawn; folders written before rows carried one are read by redrawing
    scene `index` of stream `seed` from the image name `<seed>-<index>.png`. Either way the redrawn
    picture must equal the stored PNG pixel for pixel, so the labels can never disagree with the
    image; images that fail are skipped and counted by reason.
    """
    listing = Path(folder) / "samples.jsonl"
    scenes: list[tuple[str, Scene]] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    from cliviz.data.conversations import BadRow
    from cliviz.data.rows import image_path, json_row, text

    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json_row(line)
            if not isinstance(row, dict):
                raise BadRow("malformed_row")
            name = text(row.get("image"), "image")
            path = image_path(name, Path(folder))
        except BadRow as bad:
            label = "malformed line" if bad.reason.startswith("malformed") else bad.reason.replace("_", " ")
            skipped[label] = skipped.get(label, 0) + 1
            continue
        if name in seen:
            continue
        seen.add(name)
        scene, reason = _scene_of_row(path, name, row.get("scene"))
        if scene is None:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            scenes.append((name, scene))
    return scenes, skipped


def _scene_of_row(path: Path, name: str, record: object) -> tuple[Scene | None, str]:
    try:
        if not path.is_file():
            return None, "missing image"
    except OSError:
        return None, "bad image name"
    if record is not None:
        try:
            scene = scene_from_record(record)
        except ValueError:
            return None, "bad scene record"
    else:
        seed, _, index = Path(name).stem.partition("-")
        if not (seed.isascii() and seed.isdigit() and index.isascii() and index.isdigit()):
            return None, "no scene record"
        scene = make_scene(np.random.default_rng([int(seed), int(index)]))
    from cliviz.errors import CLIVizError
    from cliviz.inputs import load_image

    try:
        pixels = np.asarray(load_image(path))  # the safe loader: pixel limit, truncation, odd modes
    except CLIVizError:
        return None, "unreadable image"
    if not np.array_equal(pixels, np.asarray(scene.image)):
        return None, "scene does not match the image"
    return scene, ""
