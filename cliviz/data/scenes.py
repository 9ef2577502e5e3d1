"""Procedural scenes for ShapesVQA: a few coloured shapes and a digit glyph in the top-left corner.

Everything is drawn with PIL from a seeded numpy generator, so a (seed, index) pair always gives
the same picture. Each scene also carries per-patch labels used as an auxiliary training signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "large": 9}
GLYPH_BOX = (1, 1, 11, 15)  # x0, y0, x1, y1 (inclusive) of the white box holding the digit
BACKGROUND = (24, 24, 28)

# 3x5 bitmap digits, drawn at 2x: fine detail that only early vision layers see clearly.
_DIGITS = {
    "0": ["111", "101", "101", "101", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"],
    "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"],
    "7": ["111", "001", "010", "010", "010"],
    "8": ["111", "101", "111", "101", "111"],
    "9": ["111", "101", "111", "001", "111"],
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def radius(self) -> int:
        return SIZES[self.size]


@dataclass
class Scene:
    objects: list[SceneObject]
    digit: str
    image: Image.Image = field(repr=False)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    r, x, y, fill = obj.radius, obj.x, obj.y, COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        s = round(r * 0.85)
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=fill)


def _draw_glyph(draw: ImageDraw.ImageDraw, digit: str) -> None:
    x0, y0, x1, y1 = GLYPH_BOX
    draw.rectangle([x0, y0, x1, y1], fill=(245, 245, 245))
    for row, bits in enumerate(_DIGITS[digit]):
        for col, bit in enumerate(bits):
            if bit == "1":
                px, py = x0 + 2 + 2 * col, y0 + 2 + 2 * row
                draw.rectangle([px, py, px + 1, py + 1], fill=(0, 0, 0))


def _place_objects(rng: np.random.Generator, n: int) -> list[SceneObject] | None:
    colors = rng.choice(list(COLORS), size=n, replace=False)
    placed: list[SceneObject] = []
    for color in colors:
        for _ in range(100):
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size]
            x, y = int(rng.integers(r + 1, IMAGE_SIZE - r - 1)), int(rng.integers(r + 1, IMAGE_SIZE - r - 1))
            if x - r <= GLYPH_BOX[2] + 2 and y - r <= GLYPH_BOX[3] + 2:
                continue  # keep the glyph corner clear
            if abs(x - IMAGE_SIZE / 2) < 4 or abs(y - IMAGE_SIZE / 2) < 4:
                continue  # left/right and top/bottom must be unambiguous
            if any((x - o.x) ** 2 + (y - o.y) ** 2 < (r + o.radius + 3) ** 2 for o in placed):
                continue
            placed.append(SceneObject(str(rng.choice(SHAPES)), str(color), size, x, y))
            break
        else:
            return None
    return placed


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: 1-4 objects of distinct colours and a digit glyph."""
    while True:
        objects = _place_objects(rng, int(rng.integers(1, 5)))
        if objects is not None:
            break
    digit = str(rng.integers(0, 10))
    return Scene(objects=objects, digit=digit, image=render_scene(objects, digit))


def render_scene(objects: list[SceneObject], digit: str) -> Image.Image:
    """The picture of a scene: its objects in order, then the digit glyph."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    _draw_glyph(draw, digit)
    return image


def scene_record(scene: Scene) -> dict:
    """A scene as plain JSON (what `cliviz data` stores beside each image): digit and objects, in drawing order."""
    return {
        "digit": scene.digit,
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y} for o in scene.objects],
    }


def scene_from_record(record: object) -> Scene:
    """The scene a `scene_record` describes, redrawn; ValueError when the record is not one."""
    if not isinstance(record, dict) or not isinstance(record.get("objects"), list):
        raise ValueError("want an object with 'digit' and a list of 'objects'")
    digit = record.get("digit")
    if not (isinstance(digit, str) and len(digit) == 1 and digit in "0123456789"):  # not "٣": no glyph for it
        raise ValueError(f"bad digit {digit!r}")
    objects = []
    for o in record["objects"]:
        if (
            not isinstance(o, dict)
            or o.get("shape") not in SHAPES
            or o.get("color") not in COLORS
            or o.get("size") not in SIZES
            or not all(type(o.get(k)) is int for k in ("x", "y"))
        ):
            raise ValueError(f"bad object {o!r}")
        objects.append(SceneObject(o["shape"], o["color"], o["size"], o["x"], o["y"]))
    if not objects:
        raise ValueError("a scene holds at least one object")
    return Scene(objects=objects, digit=digit, image=render_scene(objects, digit))


CENTER_BIN = 2  # pixels per bin of the object-centre targets: finer than the 6 px relation gap


def patch_labels(scene: Scene, patch: int) -> dict[str, np.ndarray]:
    """Per-patch targets `[grid, grid]` from the pixels (0 = no object / no digit there):
    colour id, shape id, digit id, and the centre (x and y, in `CENTER_BIN`-pixel bins) of the
    object under the patch.

    Computed from the rendered image itself, so they can never disagree with what is drawn. The
    centre targets make every patch of an object carry where the *whole object* is, at a finer
    grain than the patch grid: comparing two objects' heights ("above or below") then needs one
    read per object instead of an aggregation over its patches.
    """
    pixels = np.asarray(scene.image, dtype=np.int16)  # [H, W, 3]
    grid = IMAGE_SIZE // patch
    color_ids = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
    shape_ids, center_x, center_y = (np.zeros_like(color_ids) for _ in range(3))
    for obj in scene.objects:
        hit = np.all(np.abs(pixels - np.array(COLORS[obj.color])) < 3, axis=-1)
        color_ids[hit] = list(COLORS).index(obj.color) + 1
        shape_ids[hit] = SHAPES.index(obj.shape) + 1
        center_x[hit] = obj.x // CENTER_BIN + 1
        center_y[hit] = obj.y // CENTER_BIN + 1
    maps = (("color", color_ids), ("shape", shape_ids), ("center_x", center_x), ("center_y", center_y))
    out = {name: _patch_mode(ids, patch) for name, ids in maps}
    digit = np.zeros((grid, grid), np.int64)
    x0, y0, x1, y1 = GLYPH_BOX
    digit[y0 // patch : y1 // patch + 1, x0 // patch : x1 // patch + 1] = int(scene.digit) + 1
    out["digit"] = digit
    return out


def grid_labels(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """`patch_labels` on any `grid` x `grid` patch grid over the whole image `[grid, grid]`.

    Real checkpoints resize the 64 px scene to their tower's size, so their patch grid (24 x 24 for
    LLaVA-1.5, 27 x 27 for OneVision's base crop) need not divide 64: then the pixel-level labels are
    resized (nearest) to a multiple of the grid and each cell takes its most frequent non-zero label.
    """
    if IMAGE_SIZE % grid == 0:
        return patch_labels(scene, IMAGE_SIZE // grid)
    cell = -(-IMAGE_SIZE // grid)  # ceil: output pixels per grid cell
    src = (np.arange(grid * cell) + 0.5) * IMAGE_SIZE / (grid * cell)  # output pixel centre -> source pixel
    index = np.minimum(src.astype(np.int64), IMAGE_SIZE - 1)
    return {name: _patch_mode(ids[np.ix_(index, index)], cell) for name, ids in patch_labels(scene, 1).items()}


def _patch_mode(ids: np.ndarray, patch: int) -> np.ndarray:
    """Most frequent non-zero id in each `patch` x `patch` cell (0 when the cell is empty)."""
    grid = ids.shape[0] // patch
    n_ids = int(ids.max()) + 1
    onehot = np.eye(max(n_ids, 2), dtype=np.int32)[ids]  # [H, W, C]
    counts = onehot.reshape(grid, patch, grid, patch, -1).sum(axis=(1, 3))  # [grid, grid, C]
    counts[..., 0] = 0
    mode = counts.argmax(-1)
    return np.where(counts.max(-1) > 0, mode, 0).astype(np.int64)


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Image-level semantic targets, what a CLIP-like tower learns about a whole picture: which shape
    has each colour (`scene_shape_of_color [len(COLORS)]`, 0 = colour absent, else shape id + 1) and
    how many objects there are (`scene_count [1]`). Nothing about where things are, how big, or
    the digit: detail the tower need not keep."""
    shape_of_color = np.zeros(len(COLORS), dtype=np.int64)
    for obj in scene.objects:
        shape_of_color[list(COLORS).index(obj.color)] = SHAPES.index(obj.shape) + 1
    return {"scene_shape_of_color": shape_of_color, "scene_count": np.array([len(scene.objects)], dtype=np.int64)}
