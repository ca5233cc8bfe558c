"""The toy world: procedurally rendered scenes whose every factor is known.

Each image holds 1-4 objects on a background. An object has a shape, a colour, a size, a
position (the 3 x 3 region of the image its centre lies in), a rotation (upright or turned by
half its symmetry period; circles and rings have none) and a texture. Scenes also carry
compositional facts: how many objects there are, whether two objects share a colour, and
whether one shape sits inside another. Labels are exact, from the object masks themselves:

* image level: a multi-hot vector over :data:`VALUE_NAMES` (``"shape=circle"`` …);
* patch level: for a patch grid, which factor values have visible pixels in each patch.

Image ``i`` of ``ToyWorld(n, seed)`` depends only on ``(seed, i)``, never on the batch or on
``n``, so any slice of the world is reproducible on its own.

Patch-level rules (also in docs/toyworld.md): an object's values (shape, colour, size,
position, rotation, texture) are present in a patch when any visible pixel of the object lies
in it; ``background=<kind>`` when any background pixel does; ``count=<k>`` is a fact about the
whole image and is present in every patch; ``same_colour=yes`` in the patches of the objects
whose colour is shared; ``inside=yes`` in the patches of both the outer and the inner object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "top_left",
    "top",
    "top_right",
    "left",
    "centre",
    "right",
    "bottom_left",
    "bottom",
    "bottom_right",
)
ROTATIONS = ("upright", "turned")
TEXTURES = ("solid", "stripes", "dots", "checker")
BACKGROUNDS = ("black", "gray", "noise", "gradient")
MAX_OBJECTS = 4

#: The factors and their values, in label order. Everything downstream indexes labels by this.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "rotation": ROTATIONS,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "count": tuple(str(k) for k in range(1, MAX_OBJECTS + 1)),
    "same_colour": ("yes",),
    "inside": ("yes",),
}
#: ``(factor, value)`` for every binary label, in label order.
VOCAB: list[tuple[str, str]] = [(f, v) for f, values in FACTORS.items() for v in values]
#: ``"factor=value"`` names of the binary labels, in label order.
VALUE_NAMES: list[str] = [f"{f}={v}" for f, v in VOCAB]
VALUE_INDEX: dict[str, int] = {name: i for i, name in enumerate(VALUE_NAMES)}
#: The factor of each label, aligned with :data:`VALUE_NAMES`.
VALUE_FACTORS: list[str] = [f for f, _ in VOCAB]
OBJECT_FACTORS = ("shape", "colour", "size", "position", "rotation", "texture")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 200, 50),
    "cyan": (0, 215, 230),
    "blue": (40, 90, 255),
    "purple": (160, 60, 230),
    "white": (245, 245, 245),
}
# Radius ranges (pixels at 64 px; scaled with the image size). The radius bounds the shape.
SIZE_RADIUS = {"small": (5.0, 6.5), "medium": (8.0, 10.0), "large": (12.0, 15.0)}
# Rotational symmetry period in degrees; None: the shape looks the same at every angle.
SYMMETRY = {
    "circle": None,
    "ring": None,
    "square": 90.0,
    "triangle": 120.0,
    "star": 72.0,
    "cross": 90.0,
    "hexagon": 60.0,
    "diamond": 180.0,
}
# Radius of the largest circle about the centre inside each shape, as a fraction of its radius.
INNER_ROOM = {"circle": 1.0, "square": 0.72, "hexagon": math.cos(math.pi / 6), "ring": 0.55}
TEXTURE_PERIOD = 4.0  # pixels at 64 px
SHADE = 0.35  # brightness of a texture's dark pixels relative to the object colour
# Mid-tone grey levels (0-255) of each background kind.
BG_GRAY, BG_NOISE_MEAN, BG_NOISE_AMPLITUDE, BG_GRADIENT = 110, 45, 25, (0, 140)
# Image sides that keep every factor visible: at 32 px the smallest objects are 5 px across and
# textures have a 2 px period (below, stripes, dots and checkers alias and small shapes blur
# into blobs); 1024 px bounds the memory of one image.
MIN_SIZE, MAX_SIZE = 32, 1024


def check_size(size: int) -> int:
    """``size`` if it is a usable image side (``MIN_SIZE..MAX_SIZE`` pixels), else a PrismaError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise PrismaError(f"toy-world image size {size!r} must be a whole number of pixels")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise PrismaError(
            f"toy-world image size {size} is outside {MIN_SIZE}..{MAX_SIZE} pixels: below "
            f"{MIN_SIZE} the smallest shapes and the textures are no longer visible"
        )
    return int(size)


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene. ``centre`` is (x, y) in pixels; ``angle`` in degrees."""

    shape: str
    colour: str
    size: str
    position: str
    rotation: str | None
    texture: str
    centre: tuple[float, float]
    radius: float
    angle: float

    def values(self) -> list[int]:
        """Indices into :data:`VALUE_NAMES` of this object's factor values."""
        out = []
        for factor in OBJECT_FACTORS:
            value = getattr(self, factor)
            if value is not None:
                out.append(VALUE_INDEX[f"{factor}={value}"])
        return out


@dataclass(frozen=True)
class Scene:
    """A whole image's content; objects are drawn in order (later ones on top).

    ``inside`` holds ``(outer, inner)`` object index pairs; ``shared_colour`` the indices of
    objects whose colour another object also has.
    """

    background: str
    objects: tuple[ToyObject, ...]
    inside: tuple[tuple[int, int], ...]
    shared_colour: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (factor names, geometry and facts)."""
        return {
            "background": self.background,
            "count": self.count,
            "same_colour": bool(self.shared_colour),
            "inside": [list(p) for p in self.inside],
            "objects": [asdict(o) for o in self.objects],
        }


def image_seed(seed: int, index: int) -> np.random.Generator:
    """The random generator of image ``index`` in the world of ``seed``: independent of batching."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _position_of(x: float, y: float, size: int) -> str:
    col = min(2, int(3 * x / size))
    row = min(2, int(3 * y / size))
    return POSITIONS[3 * row + col]


def _rotation(shape: str, rng: np.random.Generator) -> tuple[str | None, float]:
    period = SYMMETRY[shape]
    if period is None:
        return None, float(rng.uniform(0.0, 360.0))
    turned = int(rng.integers(2))
    jitter = rng.uniform(-period / 12, period / 12)
    return ROTATIONS[turned], float(turned * period / 2 + jitter)


def sample_scene(
    rng: np.random.Generator, size: int = 64, inside_prob: float = 0.25, max_tries: int = 20
) -> Scene:
    """Draw a scene: 1-4 objects in distinct 3 x 3 regions whose bounding circles do not touch,
    except for an optional nested pair (a small object drawn on top of a large one's middle).

    The count is the number of objects actually placed (a crowded draw may place fewer).
    """
    scale = size / 64.0
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    n_wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    nested = n_wanted >= 2 and rng.random() < inside_prob
    cells = rng.permutation(9)
    cell = size / 3.0
    objects: list[ToyObject] = []
    circles: list[tuple[float, float, float]] = []
    inside: list[tuple[int, int]] = []
    n_free = n_wanted - 1 if nested else n_wanted
    for k in range(n_free):
        want_outer = nested and k == 0
        shape = (
            tuple(INNER_ROOM)[int(rng.integers(len(INNER_ROOM)))]
            if want_outer
            else SHAPES[int(rng.integers(len(SHAPES)))]
        )
        size_name = "large" if want_outer else SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = SIZE_RADIUS[size_name]
        radius = float(rng.uniform(lo, hi)) * scale
        placed = None
        for c in cells[len(objects) :]:
            row, col = divmod(int(c), 3)
            for _ in range(max_tries // 4 + 1):
                x = (col + 0.5 + rng.uniform(-0.25, 0.25)) * cell
                y = (row + 0.5 + rng.uniform(-0.25, 0.25)) * cell
                x = float(np.clip(x, radius, size - radius))
                y = float(np.clip(y, radius, size - radius))
                if all(
                    (x - a) ** 2 + (y - b) ** 2 >= (radius + r + scale) ** 2 for a, b, r in circles
                ):
                    placed = (x, y)
                    break
            if placed is not None:
                # keep the used cell out of later draws: move it to the front of the free part
                i = int(np.where(cells == c)[0][0])
                j = len(objects)
                cells[i], cells[j] = cells[j], cells[i]
                break
        if placed is None:
            if want_outer:
                nested = False
            continue
        rotation, angle = _rotation(shape, rng)
        obj = ToyObject(
            shape=shape,
            colour=COLOURS[int(rng.integers(len(COLOURS)))],
            size=size_name,
            position=_position_of(placed[0], placed[1], size),
            rotation=rotation,
            texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
            centre=placed,
            radius=radius,
            angle=angle,
        )
        objects.append(obj)
        circles.append((placed[0], placed[1], radius))
    if nested and objects:
        outer = objects[0]
        room = 0.8 * INNER_ROOM[outer.shape] * outer.radius
        lo, hi = SIZE_RADIUS["small"]
        radius = min(float(rng.uniform(lo, hi)) * scale, room)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        rotation, angle = _rotation(shape, rng)
        colours = [c for c in COLOURS if c != outer.colour]
        objects.append(
            ToyObject(
                shape=shape,
                colour=colours[int(rng.integers(len(colours)))],
                size="small",
                position=outer.position,
                rotation=rotation,
                texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                centre=outer.centre,
                radius=radius,
                angle=angle,
            )
        )
        inside.append((0, len(objects) - 1))
    colour_list = [o.colour for o in objects]
    shared = tuple(i for i, c in enumerate(colour_list) if colour_list.count(c) > 1)
    return Scene(background, tuple(objects), tuple(inside), shared)


def _polygon(ux: np.ndarray, uy: np.ndarray, n: int, r: float) -> np.ndarray:
    """Inside a regular n-gon of circumradius r with a vertex pointing up (screen -y)."""
    phi = np.arctan2(uy, ux) + math.pi / 2
    sector = 2 * math.pi / n
    reduced = np.mod(phi, sector) - sector / 2
    return np.hypot(ux, uy) * np.cos(reduced) <= r * math.cos(math.pi / n)


def _star(ux: np.ndarray, uy: np.ndarray, r: float, points: int = 5, inner: float = 0.45):
    """Inside a star with ``points`` tips at radius r (one pointing up), notches at inner*r."""
    phi = np.arctan2(uy, ux) + math.pi / 2
    half = math.pi / points
    reduced = np.abs(np.mod(phi + half, 2 * half) - half)
    ri = inner * r
    # distance to the edge joining the tip (r, 0) and the notch (ri, half) along angle `reduced`
    edge = (
        r
        * ri
        * math.sin(half)
        / (ri * math.sin(half) * np.cos(reduced) + (r - ri * math.cos(half)) * np.sin(reduced))
    )
    return np.hypot(ux, uy) <= edge


def shape_mask(
    shape: str, dx: np.ndarray, dy: np.ndarray, radius: float, angle: float
) -> np.ndarray:
    """Boolean mask of ``shape`` at pixel offsets ``(dx, dy)`` from its centre (y down).

    ``angle`` turns the shape clockwise on screen, in degrees. Shapes fit within ``radius``.
    """
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    ux = c * dx + s * dy
    uy = -s * dx + c * dy
    r = radius
    if shape == "circle":
        return ux * ux + uy * uy <= r * r
    if shape == "ring":
        d2 = ux * ux + uy * uy
        return (d2 <= r * r) & (d2 >= (INNER_ROOM["ring"] * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(ux), np.abs(uy)) <= 0.72 * r
    if shape == "triangle":
        return _polygon(ux, uy, 3, r)
    if shape == "hexagon":
        return _polygon(ux, uy, 6, r)
    if shape == "star":
        return _star(ux, uy, r)
    if shape == "cross":
        ax, ay = np.abs(ux), np.abs(uy)
        arm, half_width = 0.92 * r, 0.3 * r
        return ((ax <= half_width) & (ay <= arm)) | ((ay <= half_width) & (ax <= arm))
    if shape == "diamond":
        return np.abs(ux) / (0.55 * r) + np.abs(uy) / r <= 1.0
    raise PrismaError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")


def _texture_on(texture: str, px: np.ndarray, py: np.ndarray, period: float) -> np.ndarray | bool:
    """Which pixels (image coordinates) carry the bright colour of a texture."""
    u, v = px / period, py / period
    if texture == "solid":
        return True
    if texture == "stripes":
        return np.mod(v, 1.0) < 0.5
    if texture == "checker":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    if texture == "dots":
        return (np.mod(u, 1.0) - 0.5) ** 2 + (np.mod(v, 1.0) - 0.5) ** 2 < 0.3**2
    raise PrismaError(f"unknown texture {texture!r}: choose one of {', '.join(TEXTURES)}")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "black":
        return np.zeros((size, size, 3), np.uint8)
    if kind == "gray":
        return np.full((size, size, 3), BG_GRAY, np.uint8)
    if kind == "noise":
        gray = rng.integers(
            BG_NOISE_MEAN - BG_NOISE_AMPLITUDE, BG_NOISE_MEAN + BG_NOISE_AMPLITUDE + 1, (size, size)
        )
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    if kind == "gradient":
        lo, hi = BG_GRADIENT
        ramp = np.linspace(lo, hi, size).round().astype(np.uint8)
        return np.broadcast_to(ramp[:, None, None], (size, size, 3)).copy()
    raise PrismaError(f"unknown background {kind!r}: choose one of {', '.join(BACKGROUNDS)}")


def render_scene(
    scene: Scene, size: int = 64, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene.

    Returns ``image`` uint8 ``[size, size, 3]`` and ``owner`` int8 ``[size, size]``: the index
    of the object seen at each pixel, -1 for background. ``rng`` feeds the noise background.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    image = _background(scene.background, size, rng)
    owner = np.full((size, size), -1, np.int8)
    period = TEXTURE_PERIOD * size / 64.0
    for k, obj in enumerate(scene.objects):
        x, y = obj.centre
        x0, x1 = max(0, int(x - obj.radius) - 1), min(size, int(x + obj.radius) + 2)
        y0, y1 = max(0, int(y - obj.radius) - 1), min(size, int(y + obj.radius) + 2)
        px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        mask = shape_mask(obj.shape, px - x, py - y, obj.radius, obj.angle)
        on = _texture_on(obj.texture, px, py, period)
        bright = np.array(RGB[obj.colour], np.float32)
        colour = np.where(np.asarray(on)[..., None], bright, bright * SHADE).astype(np.uint8)
        colour = np.broadcast_to(colour, mask.shape + (3,))
        patch = image[y0:y1, x0:x1]
        patch[mask] = colour[mask]
        owner[y0:y1, x0:x1][mask] = k
    return image, owner


def image_labels(scene: Scene) -> np.ndarray:
    """Multi-hot uint8 ``[n_values]`` over :data:`VALUE_NAMES` for a whole scene."""
    hot = np.zeros(len(VALUE_NAMES), np.uint8)
    for obj in scene.objects:
        hot[obj.values()] = 1
    hot[VALUE_INDEX[f"background={scene.background}"]] = 1
    hot[VALUE_INDEX[f"count={scene.count}"]] = 1
    if scene.shared_colour:
        hot[VALUE_INDEX["same_colour=yes"]] = 1
    if scene.inside:
        hot[VALUE_INDEX["inside=yes"]] = 1
    return hot


def _grid(patch_grid: int | Sequence[int], size: int) -> tuple[int, int]:
    grid = (patch_grid, patch_grid) if isinstance(patch_grid, int) else tuple(patch_grid)
    if len(grid) != 2 or any(g <= 0 or size % g for g in grid):
        raise PrismaError(
            f"patch grid {patch_grid!r} does not tile a {size}x{size} image: give rows and "
            f"columns that divide {size} (e.g. {size // 8} for 8-pixel patches)"
        )
    return int(grid[0]), int(grid[1])


def patch_labels(scene: Scene, owner: np.ndarray, patch_grid: int | Sequence[int]) -> np.ndarray:
    """Per-patch multi-hot uint8 ``[rows, cols, n_values]`` from the exact pixel owners.

    ``owner``: int ``[size, size]`` from :func:`render_scene`; patches are row-major.
    """
    size = owner.shape[0]
    rows, cols = _grid(patch_grid, size)
    blocks = owner.reshape(rows, size // rows, cols, size // cols).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(rows, cols, -1)
    out = np.zeros((rows, cols, len(VALUE_NAMES)), np.uint8)
    out[:, :, VALUE_INDEX[f"background={scene.background}"]] = (blocks == -1).any(-1)
    out[:, :, VALUE_INDEX[f"count={scene.count}"]] = 1
    shared = set(scene.shared_colour)
    nested = {k for pair in scene.inside for k in pair}
    for k, obj in enumerate(scene.objects):
        seen = (blocks == k).any(-1)
        for v in obj.values():
            out[:, :, v] |= seen
        if k in shared:
            out[:, :, VALUE_INDEX["same_colour=yes"]] |= seen
        if k in nested:
            out[:, :, VALUE_INDEX["inside=yes"]] |= seen
    return out


def render(
    seed: int, index: int, size: int = 64, inside_prob: float = 0.25
) -> tuple[np.ndarray, np.ndarray, Scene]:
    """Image ``index`` of the world of ``seed``: ``(image [size,size,3] uint8, owner, scene)``."""
    rng = image_seed(seed, index)
    scene = sample_scene(rng, size, inside_prob)
    image, owner = render_scene(scene, size, rng)
    return image, owner, scene


class ToyWorld(torch.utils.data.Dataset):
    """``n`` toy-world images of ``seed``: ``world[i] -> (image, labels)``.

    ``image`` is uint8 ``[size, size, 3]`` (HWC) or a PIL image when ``pil=True``; ``labels``
    is a dict with ``"multi_hot"`` uint8 ``[n_values]``, ``"count"``, ``"background"``,
    ``"same_colour"``, ``"inside"``, ``"objects"`` (list of dicts), ``"index"``, and, when
    ``patch_grid`` is given, ``"patches"`` uint8 ``[rows, cols, n_values]``. Images
    ``start .. start + n - 1`` are drawn, so disjoint ranges give disjoint splits.
    Batch with :func:`collate`.
    """

    value_names = VALUE_NAMES

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = 64,
        patch_grid: int | Sequence[int] | None = None,
        pil: bool = False,
        start: int = 0,
        inside_prob: float = 0.25,
    ) -> None:
        if n < 0 or start < 0 or seed < 0:
            raise PrismaError(
                f"ToyWorld needs n >= 0, start >= 0 and seed >= 0, got n={n}, start={start}, "
                f"seed={seed}"
            )
        check_size(size)
        if not 0.0 <= inside_prob <= 1.0:
            raise PrismaError(f"inside_prob {inside_prob} is not a probability in [0, 1]")
        if patch_grid is not None:
            _grid(patch_grid, size)
        self.n, self.seed, self.size, self.start = int(n), int(seed), int(size), int(start)
        self.patch_grid = patch_grid
        self.pil = pil
        self.inside_prob = inside_prob

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if not -self.n <= i < self.n:
            raise IndexError(f"toy-world index {i} out of range for {self.n} images")
        return self.start + (i % self.n)

    def scene(self, i: int) -> Scene:
        """The scene of item ``i`` (no drawing)."""
        return sample_scene(image_seed(self.seed, self._index(i)), self.size, self.inside_prob)

    def __getitem__(self, i: int) -> tuple[np.ndarray | Image.Image, dict[str, Any]]:
        index = self._index(i)
        image, owner, scene = render(self.seed, index, self.size, self.inside_prob)
        labels: dict[str, Any] = {
            "index": index,
            "multi_hot": image_labels(scene),
            "count": scene.count,
            "background": scene.background,
            "same_colour": bool(scene.shared_colour),
            "inside": bool(scene.inside),
            "objects": [asdict(o) for o in scene.objects],
        }
        if self.patch_grid is not None:
            labels["patches"] = patch_labels(scene, owner, self.patch_grid)
        return (Image.fromarray(image) if self.pil else image), labels


def collate(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
    """Batch ToyWorld items: images to uint8 ``[B, H, W, 3]`` (PIL images stay a list),
    ``multi_hot`` to ``[B, n_values]``, ``patches`` to ``[B, rows, cols, n_values]``, the
    rest to lists."""
    images = [b[0] for b in batch]
    if isinstance(images[0], np.ndarray):
        images = torch.from_numpy(np.stack(images))
    labels: dict[str, Any] = {}
    for key in batch[0][1]:
        items = [b[1][key] for b in batch]
        labels[key] = (
            torch.from_numpy(np.stack(items)) if isinstance(items[0], np.ndarray) else items
        )
    return images, labels


def render_arrays(
    n: int,
    seed: int = 0,
    size: int = 64,
    start: int = 0,
    patch_grid: int | Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Render images ``start .. start+n-1`` into memory.

    Returns ``{"images": uint8 [n, size, size, 3], "labels": uint8 [n, n_values]}`` plus
    ``"patches": uint8 [n, rows, cols, n_values]`` when ``patch_grid`` is given.
    """
    check_size(size)
    if n < 0 or start < 0 or seed < 0:
        raise PrismaError(f"render_arrays needs n, start and seed >= 0, got {n}, {start}, {seed}")
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, len(VALUE_NAMES)), np.uint8)
    patches = None
    if patch_grid is not None:
        rows, cols = _grid(patch_grid, size)
        patches = np.empty((n, rows, cols, len(VALUE_NAMES)), np.uint8)
    for j in tqdm(range(n), desc="render toy world", unit="img", disable=not progress):
        image, owner, scene = render(seed, start + j, size)
        images[j] = image
        labels[j] = image_labels(scene)
        if patches is not None:
            patches[j] = patch_labels(scene, owner, patch_grid)
    out = {"images": images, "labels": labels}
    if patches is not None:
        out["patches"] = patches
    return out


def write_shards(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    shard_size: int = 1000,
    size: int = 64,
    patch_grid: int | Sequence[int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``n`` images as webdataset shards ``toyworld-000000.tar`` … in ``out_dir``.

    Each sample: ``__key__`` (``"{index:08d}"``), ``png`` (the image) and ``json``: the scene
    (:meth:`Scene.to_json`), ``"index"``, ``"values"`` (indices into ``VALUE_NAMES`` present in
    the image) and, with ``patch_grid``, ``"patch_grid"`` and ``"patch_values"`` (per patch,
    row-major, the value indices present). ``out_dir/toyworld.json`` records the vocabulary
    and parameters. Each shard is written under a temporary name and renamed when complete.
    Everything is checked before the first image is drawn: the sizes, and ``out_dir`` (not a
    file, and not holding a toy world written with other parameters, which would be mixed).
    """
    import webdataset as wds

    if n <= 0 or shard_size <= 0:
        raise PrismaError(f"write_shards needs n > 0 and shard_size > 0, got {n} and {shard_size}")
    if seed < 0:
        raise PrismaError(f"seed {seed}: use a seed >= 0")
    check_size(size)
    grid = _grid(patch_grid, size) if patch_grid is not None else None
    out = Path(out_dir)
    _check_shard_dir(out, {"n": n, "seed": seed, "size": size, "shard_size": shard_size,
                           "patch_grid": list(grid) if grid else None})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    bar = tqdm(total=n, desc="write toy world", unit="img", disable=not progress)
    for shard, first in enumerate(range(0, n, shard_size)):
        path = out / f"toyworld-{shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for index in range(first, min(n, first + shard_size)):
                image, owner, scene = render(seed, index, size)
                record = scene.to_json()
                record["index"] = index
                record["values"] = np.flatnonzero(image_labels(scene)).tolist()
                if grid is not None:
                    per_patch = patch_labels(scene, owner, grid).reshape(-1, len(VALUE_NAMES))
                    record["patch_grid"] = list(grid)
                    record["patch_values"] = [np.flatnonzero(p).tolist() for p in per_patch]
                sink.write({"__key__": f"{index:08d}", "png": image, "json": record})
                bar.update(1)
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    meta = {
        "n": n,
        "seed": seed,
        "size": size,
        "shard_size": shard_size,
        "patch_grid": list(grid) if grid else None,
        "value_names": VALUE_NAMES,
        "factors": {f: list(v) for f, v in FACTORS.items()},
        "shards": [p.name for p in paths],
    }
    (out / "toyworld.json").write_text(json.dumps(meta, indent=1))
    return paths


def _check_shard_dir(out: Path, params: dict[str, Any]) -> None:
    """``out`` can take toy-world shards of ``params``: refused when it (or a folder above it)
    is a file, or when it holds a toy world written with other parameters."""
    if out.exists() and not out.is_dir():
        raise PrismaError(f"{str(out)!r} is a file: give a directory for the toy-world shards")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrismaError(f"{str(out)!r}: {str(parent)!r} is a file, not a folder")
            break
    meta_path = out / "toyworld.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise PrismaError(
            f"{meta_path} is damaged: delete {str(out)!r} or choose another directory"
        )
    changed = [key for key, value in params.items() if meta.get(key) != value]
    if changed:
        key = changed[0]
        raise PrismaError(
            f"{str(out)!r} holds a toy world with other parameters ({key} {meta.get(key)} there, "
            f"{params[key]} now): choose another directory or delete it"
        )


def add_toyworld_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``prisma-mm toyworld`` (subcommands ``write`` and ``vocab``)."""
    sub = parser.add_subparsers(dest="action", required=True)
    write = sub.add_parser("write", help="render the toy world into webdataset shards")
    write.add_argument("out_dir", help="directory for toyworld-*.tar shards")
    write.add_argument("--n", type=int, default=10_000, help="number of images")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    write.add_argument(
        "--size",
        type=int,
        default=64,
        help=f"image side in pixels ({MIN_SIZE}-{MAX_SIZE}; toyvit was trained at 64)",
    )
    write.add_argument(
        "--patch-grid", type=int, default=None, help="also store per-patch labels on an NxN grid"
    )
    sub.add_parser("vocab", help="print the factor values, one 'index factor=value' a line")
    return parser


def main_toyworld(argv: Sequence[str] | None = None) -> int:
    """``prisma-mm toyworld write OUT_DIR [--n N --seed S ...]`` / ``prisma-mm toyworld vocab``."""
    parser = add_toyworld_arguments(argparse.ArgumentParser(prog="prisma-mm toyworld"))
    return run_toyworld(parser.parse_args(argv))


def run_toyworld(args: argparse.Namespace) -> int:
    """The handler of ``prisma-mm toyworld`` for parsed arguments."""
    if args.action == "vocab":
        for i, name in enumerate(VALUE_NAMES):
            print(i, name)
        return 0
    paths = write_shards(
        args.out_dir, args.n, args.seed, args.shard_size, args.size, args.patch_grid
    )
    print(f"wrote {args.n} images in {len(paths)} shards to {args.out_dir}")
    return 0
