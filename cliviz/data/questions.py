"""Question templates of ShapesVQA, one function per question type.

The types need different visual granularity, so the gates have something real to choose:
colour (low-level), shape, count (global), position (where in the image), relation (between
two objects), glyph (fine detail in a corner), size (comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cliviz.data.scenes import COLORS, IMAGE_SIZE, SHAPES, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


def _color(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return QA(f"what color is the {obj.shape} ?", obj.color, "color")


def _shape(scene: Scene, rng: np.random.Generator) -> QA:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return QA(f"what shape is the {obj.color} object ?", obj.shape, "shape")


def _count(scene: Scene, rng: np.random.Generator) -> QA:
    return QA("how many objects are there ?", NUMBER_WORDS[len(scene.objects)], "count")


def _position(scene: Scene, rng: np.random.Generator) -> QA:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if rng.random() < 0.5:
        return QA(
            f"is the {obj.color} object on the left or right ?",
            "left" if obj.x < IMAGE_SIZE / 2 else "right",
            "position",
        )
    return QA(
        f"is the {obj.color} object at the top or bottom ?", "top" if obj.y < IMAGE_SIZE / 2 else "bottom", "position"
    )


def _relation(scene: Scene, rng: np.random.Generator) -> QA | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b and abs(a.y - b.y) >= 6]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return QA(
        f"is the {a.color} object above or below the {b.color} object ?", "above" if a.y < b.y else "below", "relation"
    )


def _glyph(scene: Scene, rng: np.random.Generator) -> QA:
    return QA("what digit is in the corner ?", scene.digit, "glyph")


def _size(scene: Scene, rng: np.random.Generator) -> QA | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a.radius > b.radius]
    if not pairs:
        return None
    big, small = pairs[int(rng.integers(len(pairs)))]
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    return QA(f"which is bigger , the {first.color} object or the {second.color} object ?", big.color, "size")


QUESTION_TYPES: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "color": _color,
    "shape": _shape,
    "count": _count,
    "position": _position,
    "relation": _relation,
    "glyph": _glyph,
    "size": _size,
}


def vocabulary() -> list[str]:
    """Every word a ShapesVQA question or answer can hold, in a fixed order."""
    words = "what color is the shape object how many objects are there on left or right at top bottom"
    words += " above below digit in corner which bigger , ? and"
    vocab = words.split() + list(COLORS) + list(SHAPES) + list(NUMBER_WORDS) + [str(d) for d in range(10)]
    return list(dict.fromkeys(vocab))


def parse_extra_questions(spec: str) -> dict[str, int]:
    """`"relation:2,position:1"` -> `{"relation": 2, "position": 1}`; raises ValueError on nonsense."""
    extra: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in QUESTION_TYPES or not count.isdigit():
            raise ValueError(
                f"bad extra-questions entry {part!r}: want type:count with a type among {', '.join(QUESTION_TYPES)}"
            )
        extra[name] = int(count)
    return extra


def training_questions(scene: Scene, qas: list[QA], extra: dict[str, int], rng: np.random.Generator) -> list[QA]:
    """`qas` plus up to `extra[type]` further questions of each type about the same scene.

    A question asks the same thing as another when it holds the same set of words ("is the red
    object above or below the blue object ?" and its mirror, for instance): those are skipped,
    so extra relation questions are about other pairs of objects.
    """
    seen = {frozenset(qa.question.split()) for qa in qas}
    out = list(qas)
    for qtype, count in extra.items():
        added = 0
        for _ in range(4 * count):  # a few draws; small scenes simply have fewer pairs
            if added == count:
                break
            qa = QUESTION_TYPES[qtype](scene, rng)
            if qa is None or frozenset(qa.question.split()) in seen:
                continue
            seen.add(frozenset(qa.question.split()))
            out.append(qa)
            added += 1
    order = rng.permutation(len(out))
    return [out[i] for i in order]
