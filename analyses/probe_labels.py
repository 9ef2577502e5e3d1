"""What a layer probe is asked: ShapesVQA scene properties, per patch and per image, as probe tasks.

A property is something a question type needs to read off the image. Patch properties ask a patch
token what lies under it; image properties ask the whole image (mean-pooled patch tokens, or the
CLS token) about a scene fact. Questions name objects by their colour ("is the red object on the
left or right ?") or by a shape that occurs once ("what color is the circle ?"), so the
object-level image properties are probed the same way: one probe per naming colour (or shape),
pooled into one accuracy. Averaged over the whole image a linear read cannot be told which object
is meant, so the same targets are also asked of the named object's own patches (`object_cells`:
the feature `object` in `probes`, the perfect selection a position-aware read could make).

Every label comes from the scene record and the rendered pixels (`scenes.grid_labels`), never
from the model, and every task keeps the image of each row so that cross-validation can hold
whole images out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliviz.data.scenes import COLORS, IMAGE_SIZE, SHAPES, Scene, grid_labels, make_scene
from cliviz.errors import CLIVizError

HALF = IMAGE_SIZE / 2


@dataclass(frozen=True)
class Property:
    level: str  # "patch" (a patch token) or "image" (a pooled or CLS token)
    name: str
    qtypes: tuple[str, ...]  # the question types that need it
    description: str

    @property
    def key(self) -> str:
        return f"{self.level}:{self.name}"


PROPERTIES: tuple[Property, ...] = (
    Property("patch", "color", ("color",), "colour of the object under the patch (patches on an object)"),
    Property("patch", "shape", ("shape",), "shape of the object under the patch (patches on an object)"),
    Property("patch", "size", ("size",), "size class of the object under the patch (patches on an object)"),
    Property(
        "patch",
        "position",
        ("position", "relation"),
        "quadrant of the centre of the object under the patch (patches on an object)",
    ),
    Property("patch", "digit", ("glyph",), "digit under the patch (patches on the glyph)"),
    Property("image", "count", ("count",), "number of objects"),
    Property("image", "digit", ("glyph",), "digit in the corner"),
    Property(
        "image", "color", ("color",), "colour of the object named by its shape (one probe per shape that occurs once)"
    ),
    Property("image", "shape", ("shape",), "shape of the object of a colour (one probe per colour)"),
    Property("image", "x", ("position",), "left or right: the object of a colour (one probe per colour)"),
    Property("image", "y", ("position", "relation"), "top or bottom: the object of a colour (one probe per colour)"),
    Property("image", "size", ("size",), "small or large: the object of a colour (one probe per colour)"),
)


def select_properties(spec: str | Sequence[str] | None) -> list[Property]:
    """`None` -> every property; else names (`digit` = both levels) or `level:name` keys."""
    if spec is None:
        return list(PROPERTIES)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    chosen: list[Property] = []
    for item in items:
        hits = [p for p in PROPERTIES if item in (p.name, p.key)]
        if not hits:
            known = sorted({p.name for p in PROPERTIES} | {p.key for p in PROPERTIES})
            raise CLIVizError(f"unknown property {item!r}; known: {', '.join(known)}")
        chosen += [p for p in hits if p not in chosen]
    if not chosen:
        raise CLIVizError("no property given")
    return [p for p in PROPERTIES if p in chosen]  # canonical order


@dataclass
class ProbeTask:
    """One linear probe: rows of a feature matrix, their labels and their images (for grouped folds)."""

    prop: Property
    subset: str  # "" or the naming colour / shape of an object-level image probe
    rows: np.ndarray  # [n] row indices into the level's feature matrix
    labels: np.ndarray  # [n] str
    images: np.ndarray  # [n] image index of each row
    objects: np.ndarray | None = None  # [n] row of the named object in `ObjectCells` (object-level tasks)


@dataclass
class ObjectCells:
    """Every object of every scene and the patch cells it covers: row r is object `index[r]` of image
    `image[r]`, covering the flat patch indices `cells[r]` (row-major over the grid)."""

    image: np.ndarray  # [O] image index
    index: np.ndarray  # [O] position in scene.objects
    cells: list[np.ndarray]  # O arrays of flat patch indices

    def row(self, image: int, index: int) -> int:
        return self._rows[(image, index)]

    def __post_init__(self) -> None:
        self._rows = {(int(i), int(j)): r for r, (i, j) in enumerate(zip(self.image, self.index))}


def object_cells(scenes: Sequence[Scene], grid: int) -> ObjectCells:
    """The patch cells of every object (each scene's colours are distinct: the colour map names it)."""
    image, index, cells = [], [], []
    for i, scene in enumerate(scenes):
        colour = grid_labels(scene, grid)["color"].reshape(-1)  # [grid * grid], 0 = no object
        for j, o in enumerate(scene.objects):
            image.append(i)
            index.append(j)
            cells.append(np.flatnonzero(colour == list(COLORS).index(o.color) + 1))
    return ObjectCells(np.asarray(image, np.int64), np.asarray(index, np.int64), cells)


@dataclass
class PatchSample:
    """The patch cells whose tokens are kept (a seeded subsample: a token per row)."""

    image: np.ndarray  # [R] image index
    patch: np.ndarray  # [R] flat patch index (row-major over the grid)


def generated_scenes(n: int, seed: int) -> list[tuple[str, Scene]]:
    """Scenes `0..n-1` of stream `seed`: the same pictures as `cliviz data --seed seed` draws from
    (`scene_with_questions(seed, i)` starts with `make_scene` on the same generator)."""
    return [(f"{seed}-{i:06d}", make_scene(np.random.default_rng([seed, i]))) for i in range(n)]


def folder_scenes(folder: str | Path) -> tuple[list[tuple[str, Scene]], dict[str, int]]:
    """Scenes of a `cliviz data` folder (see `cliviz.data.dataset.read_scenes`), with clear errors."""
    from cliviz.data.dataset import read_scenes

    path = Path(folder)
    if path.is_file() and path.name == "samples.jsonl":
        path = path.parent
    if not (path / "samples.jsonl").is_file():
        raise CLIVizError(f"not a ShapesVQA folder (no samples.jsonl): {folder}")
    try:
        scenes, skipped = read_scenes(path)
    except UnicodeDecodeError:
        raise CLIVizError(f"{path / 'samples.jsonl'} is not UTF-8 text") from None
    if not scenes:
        why = f" (skipped: {', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        raise CLIVizError(f"no ShapesVQA scene can be labelled in {folder}{why}")
    return scenes, skipped


def _quadrant(x: int, y: int) -> str:
    return ("top" if y < HALF else "bottom") + "-" + ("left" if x < HALF else "right")


def patch_tasks(
    scenes: Sequence[Scene], grid: int, props: Sequence[Property], max_patches: int, rng: np.random.Generator
) -> tuple[PatchSample, list[ProbeTask]]:
    """Per-patch tasks on a seeded subsample of the object patches and of the glyph patches.

    Colour, shape, size and position share one sample of object patches (the same tokens, four
    questions); the digit has its own sample of glyph patches.
    """
    props = [p for p in props if p.level == "patch"]
    object_cells, glyph_cells = [], []
    labels: dict[str, list[str]] = {"color": [], "shape": [], "size": [], "position": []}
    digits: list[str] = []
    for i, scene in enumerate(scenes):
        maps = grid_labels(scene, grid)  # each [grid, grid]
        by_colour = {list(COLORS).index(o.color) + 1: o for o in scene.objects}
        for flat in np.flatnonzero(maps["color"].reshape(-1)):
            obj = by_colour[int(maps["color"].reshape(-1)[flat])]
            object_cells.append((i, flat))
            labels["color"].append(obj.color)
            labels["shape"].append(obj.shape)  # the object the colour names, so all four labels agree
            labels["size"].append(obj.size)
            labels["position"].append(_quadrant(obj.x, obj.y))
        for flat in np.flatnonzero(maps["digit"].reshape(-1)):
            glyph_cells.append((i, flat))
            digits.append(str(int(maps["digit"].reshape(-1)[flat]) - 1))
    keep_obj = _subsample(len(object_cells), max_patches, rng) if any(p.name != "digit" for p in props) else []
    keep_gly = _subsample(len(glyph_cells), max_patches, rng) if any(p.name == "digit" for p in props) else []
    cells = [object_cells[j] for j in keep_obj] + [glyph_cells[j] for j in keep_gly]
    sample = PatchSample(np.array([c[0] for c in cells], np.int64), np.array([c[1] for c in cells], np.int64))
    obj_rows = np.arange(len(keep_obj))
    tasks = []
    for p in props:
        if p.name == "digit":
            rows = len(keep_obj) + np.arange(len(keep_gly))
            y = np.array([digits[j] for j in keep_gly], dtype=object)
        else:
            rows, y = obj_rows, np.array([labels[p.name][j] for j in keep_obj], dtype=object)
        tasks.append(ProbeTask(p, "", rows, y, sample.image[rows]))
    return sample, tasks


def _subsample(n: int, limit: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n, size=limit, replace=False).tolist()) if n > limit else list(range(n))


def image_tasks(
    scenes: Sequence[Scene], props: Sequence[Property], objects: ObjectCells | None = None
) -> list[ProbeTask]:
    """Per-image tasks: plain ones (count, digit) and object ones, one task per naming colour/shape.
    With `objects`, object tasks keep only named objects that cover at least one patch, and carry
    the object's row (`ProbeTask.objects`) for the per-object feature."""
    tasks = []
    for p in (p for p in props if p.level == "image"):
        if p.name in ("count", "digit"):
            y = [str(len(s.objects)) if p.name == "count" else s.digit for s in scenes]
            rows = np.arange(len(scenes))
            tasks.append(ProbeTask(p, "", rows, np.array(y, dtype=object), rows))
            continue
        namers = SHAPES if p.name == "color" else tuple(COLORS)
        for namer in namers:
            rows, y, obj_rows = [], [], []
            for i, scene in enumerate(scenes):
                named = [j for j, o in enumerate(scene.objects) if (o.shape if p.name == "color" else o.color) == namer]
                if len(named) != 1:
                    continue
                o = scene.objects[named[0]]
                if objects is not None:
                    r = objects.row(i, named[0])
                    if not len(objects.cells[r]):
                        continue  # hidden under other objects: nothing of it to read
                    obj_rows.append(r)
                value = {
                    "color": o.color,
                    "shape": o.shape,
                    "size": o.size,
                    "x": "left" if o.x < HALF else "right",
                    "y": "top" if o.y < HALF else "bottom",
                }[p.name]
                rows.append(i)
                y.append(value)
            idx = np.array(rows, dtype=np.int64)
            obj = np.array(obj_rows, dtype=np.int64) if objects is not None else None
            tasks.append(ProbeTask(p, namer, idx, np.array(y, dtype=object), idx, obj))
    return tasks
