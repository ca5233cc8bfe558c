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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from prisma_mm.data.sources import InputRecord, Labeled, Source, stable_key
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


def patch_owners(owner: np.ndarray, patch_grid: int | Sequence[int]) -> np.ndarray:
    """The pixel owners of each patch: ``[rows, cols, pixels per patch]`` (patches row-major).

    ``owner``: int ``[size, size]`` from :func:`render_scene`; ``(patch_owners(...) == k).any(-1)``
    is where object ``k`` is seen, the rule of every per-patch label.
    """
    size = owner.shape[0]
    rows, cols = _grid(patch_grid, size)
    blocks = owner.reshape(rows, size // rows, cols, size // cols).transpose(0, 2, 1, 3)
    return blocks.reshape(rows, cols, -1)


def patch_labels(scene: Scene, owner: np.ndarray, patch_grid: int | Sequence[int]) -> np.ndarray:
    """Per-patch multi-hot uint8 ``[rows, cols, n_values]`` from the exact pixel owners.

    ``owner``: int ``[size, size]`` from :func:`render_scene`; patches are row-major.
    """
    blocks = patch_owners(owner, patch_grid)
    rows, cols = blocks.shape[:2]
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


# ----- the moving toy world ---------------------------------------------------------------------
# Clips of the same objects in motion. Each object of a clip moves in a straight line at a
# constant velocity: one of 8 directions (screen axes, y down; "north" is up) and a speed, or
# stays still; some objects appear (absent before a frame) or disappear (absent from a frame).
# Frame t of a clip draws every object shown at t at ``centre + velocity * (t - (T - 1) / 2)``,
# so the sampled scene is the clip's middle, and the background is the same in every frame.
DIRECTIONS = (
    "east",
    "north_east",
    "north",
    "north_west",
    "west",
    "south_west",
    "south",
    "south_east",
)
SPEEDS = ("still", "slow", "fast")
# Pixels per frame at 64 px (scaled with the image side).
SPEED_PIXELS = {"still": 0.0, "slow": 2.0, "fast": 4.0}
#: The motion factors of an object and their values, after :data:`FACTORS` in clip label order.
MOTION_FACTORS: dict[str, tuple[str, ...]] = {
    "direction": DIRECTIONS,
    "speed": SPEEDS,
    "appears": ("yes",),
    "disappears": ("yes",),
}
#: Every factor of a clip: the image factors, then the motion factors.
CLIP_FACTORS: dict[str, tuple[str, ...]] = {**FACTORS, **MOTION_FACTORS}
CLIP_VALUE_NAMES: list[str] = [f"{f}={v}" for f, values in CLIP_FACTORS.items() for v in values]
CLIP_VALUE_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLIP_VALUE_NAMES)}
CLIP_VALUE_FACTORS: list[str] = [f for f, values in CLIP_FACTORS.items() for _ in values]
#: Indices into :data:`CLIP_VALUE_NAMES` of the motion values.
MOTION_VALUES: list[int] = [
    CLIP_VALUE_INDEX[f"{f}={v}"] for f in MOTION_FACTORS for v in MOTION_FACTORS[f]
]
CLIP_SIZE, CLIP_FRAMES, CLIP_OBJECTS = 32, 8, 2
EVENT_PROB = 0.15  # chance that an object appears during the clip, and that it disappears


@dataclass(frozen=True)
class Motion:
    """How one object of a clip moves. ``velocity`` (x, y) in pixels per frame (y down);
    ``direction`` None when still; the object is drawn on frames ``shown_from <= t <
    shown_until`` (``shown_from > 0``: it appears; ``shown_until < n_frames``: it disappears)."""

    direction: str | None
    speed: str
    velocity: tuple[float, float]
    shown_from: int
    shown_until: int

    def values(self, n_frames: int) -> list[int]:
        """Indices into :data:`CLIP_VALUE_NAMES` of this motion's values."""
        out = [CLIP_VALUE_INDEX[f"speed={self.speed}"]]
        if self.direction is not None:
            out.append(CLIP_VALUE_INDEX[f"direction={self.direction}"])
        if self.shown_from > 0:
            out.append(CLIP_VALUE_INDEX["appears=yes"])
        if self.shown_until < n_frames:
            out.append(CLIP_VALUE_INDEX["disappears=yes"])
        return out


@dataclass(frozen=True)
class Clip:
    """A clip's content: the scene at its middle, one :class:`Motion` per object, the length,
    and the seed of the (static) background's noise."""

    scene: Scene
    motions: tuple[Motion, ...]
    n_frames: int
    background_seed: int

    def frame_objects(self, t: int) -> list[int]:
        """Indices of the objects drawn on frame ``t`` (some may lie outside the image)."""
        return [k for k, m in enumerate(self.motions) if m.shown_from <= t < m.shown_until]

    def moved(self, k: int, t: int, size: int) -> ToyObject:
        """Object ``k`` where frame ``t`` draws it (centre and 3 x 3 position updated)."""
        obj, motion = self.scene.objects[k], self.motions[k]
        offset = t - (self.n_frames - 1) / 2
        x = obj.centre[0] + motion.velocity[0] * offset
        y = obj.centre[1] + motion.velocity[1] * offset
        clamped = (min(max(x, 0.0), size - 1e-3), min(max(y, 0.0), size - 1e-3))
        return replace(obj, centre=(x, y), position=_position_of(*clamped, size))

    def to_json(self) -> dict[str, Any]:
        """The scene's description plus the motions and the clip length."""
        out = self.scene.to_json()
        out["n_frames"] = self.n_frames
        out["motions"] = [asdict(m) for m in self.motions]
        return out


def clip_seed(seed: int, index: int) -> np.random.Generator:
    """The random generator of clip ``index`` of the moving world of ``seed`` (a stream apart
    from the images': clip i is not image i set in motion)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))


def check_clip(size: int, n_frames: int, max_objects: int) -> None:
    """A usable clip shape, else a PrismaError naming the bad argument."""
    check_size(size)
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 2:
        raise PrismaError(f"clip length {n_frames!r}: give at least 2 frames (motion needs two)")
    if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= MAX_OBJECTS:
        raise PrismaError(f"max_objects {max_objects!r}: give 1..{MAX_OBJECTS}")


def sample_clip(
    rng: np.random.Generator,
    size: int = CLIP_SIZE,
    n_frames: int = CLIP_FRAMES,
    max_objects: int = CLIP_OBJECTS,
    event_prob: float = EVENT_PROB,
) -> Clip:
    """Draw a clip: a scene of 1..``max_objects`` objects (no nested pairs: they would come
    apart) and a motion per object. Speeds are uniform over :data:`SPEEDS`, directions over
    :data:`DIRECTIONS`; an object appears with probability ``event_prob`` (first shown at a
    frame in ``1 .. T-2``) and, independently, disappears with it (last shown ``1 .. T-2``
    frames after it is first shown), so every object is on screen for at least one frame."""
    scene = sample_scene(rng, size, inside_prob=0.0)
    objects = scene.objects[:max_objects]
    colours = [o.colour for o in objects]
    shared = tuple(i for i, c in enumerate(colours) if colours.count(c) > 1)
    scene = Scene(scene.background, objects, (), shared)
    motions = []
    for _ in objects:
        speed = SPEEDS[int(rng.integers(len(SPEEDS)))]
        direction, velocity = None, (0.0, 0.0)
        if speed != "still":
            k = int(rng.integers(len(DIRECTIONS)))
            direction = DIRECTIONS[k]
            pixels = SPEED_PIXELS[speed] * size / 64.0
            angle = math.radians(45.0 * k)
            velocity = (pixels * math.cos(angle), -pixels * math.sin(angle))
        shown_from, shown_until = 0, n_frames
        if n_frames >= 3 and rng.random() < event_prob:
            shown_from = int(rng.integers(1, n_frames - 1))
        if n_frames >= 3 and rng.random() < event_prob:
            shown_until = int(rng.integers(shown_from + 1, n_frames))
        motions.append(Motion(direction, speed, velocity, shown_from, shown_until))
    return Clip(scene, tuple(motions), n_frames, int(rng.integers(2**62)))


def render_clip(clip: Clip, size: int = CLIP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Draw every frame of a clip.

    Returns ``frames`` uint8 ``[T, size, size, 3]`` and ``owner`` int8 ``[T, size, size]``:
    the index of the clip object seen at each pixel, -1 for background.
    """
    frames = np.empty((clip.n_frames, size, size, 3), np.uint8)
    owner = np.empty((clip.n_frames, size, size), np.int8)
    for t in range(clip.n_frames):
        shown = clip.frame_objects(t)
        frame_scene = replace(clip.scene, objects=tuple(clip.moved(k, t, size) for k in shown))
        image, seen = render_scene(frame_scene, size, np.random.default_rng(clip.background_seed))
        frames[t] = image
        owner[t] = np.where(seen >= 0, np.asarray(shown + [-1], np.int8)[seen], -1)
    return frames, owner


def _frame_values(clip: Clip, t: int, visible: Sequence[int], size: int) -> dict[int, list[int]]:
    """Per visible object of frame ``t``: its clip-label indices (static values as drawn at
    ``t``, then motion values)."""
    out = {}
    for k in visible:
        static = clip.moved(k, t, size).values()
        out[k] = static + clip.motions[k].values(clip.n_frames)
    return out


def clip_patch_labels(
    clip: Clip,
    owner: np.ndarray,
    patch_grid: int | Sequence[int],
    tubelet: int = 1,
) -> np.ndarray:
    """Per-frame, per-patch multi-hot uint8 ``[T // tubelet, rows, cols, n_clip_values]``.

    ``owner`` int ``[T, size, size]`` from :func:`render_clip`. Frame ``t`` follows the image
    rules (an object's values, now with its motion values, in the patches where a pixel of it
    is visible; ``background`` where a background pixel is; ``count`` = objects visible on
    the frame, in every patch; ``same_colour`` among them), and with ``tubelet > 1`` each
    label is the union over the ``tubelet`` frames a token covers (``T`` must divide).
    """
    n_frames, size = owner.shape[0], owner.shape[1]
    rows, cols = _grid(patch_grid, size)
    if tubelet < 1 or n_frames % tubelet:
        raise PrismaError(f"tubelet {tubelet} does not divide the clip's {n_frames} frames")
    out = np.zeros((n_frames, rows, cols, len(CLIP_VALUE_NAMES)), np.uint8)
    for t in range(n_frames):
        blocks = owner[t].reshape(rows, size // rows, cols, size // cols).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(rows, cols, -1)
        visible = [k for k in clip.frame_objects(t) if (owner[t] == k).any()]
        colours = [clip.scene.objects[k].colour for k in visible]
        background = CLIP_VALUE_INDEX[f"background={clip.scene.background}"]
        out[t, :, :, background] = (blocks == -1).any(-1)
        if visible:
            out[t, :, :, CLIP_VALUE_INDEX[f"count={len(visible)}"]] = 1
        for k, values in _frame_values(clip, t, visible, size).items():
            seen = (blocks == k).any(-1)
            for v in values:
                out[t, :, :, v] |= seen
            if colours.count(clip.scene.objects[k].colour) > 1:
                out[t, :, :, CLIP_VALUE_INDEX["same_colour=yes"]] |= seen
    return out.reshape(n_frames // tubelet, tubelet, rows, cols, -1).max(1)


def clip_labels(clip: Clip, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip-level multi-hot uint8 ``[n_clip_values]`` (the union over frames) and per-frame
    ``[T, n_clip_values]`` labels, from the exact pixel owners of :func:`render_clip`."""
    per_frame = clip_patch_labels(clip, owner, 1)[:, 0, 0]
    return per_frame.max(0), per_frame


def render_clip_index(
    seed: int,
    index: int,
    size: int = CLIP_SIZE,
    n_frames: int = CLIP_FRAMES,
    max_objects: int = CLIP_OBJECTS,
) -> tuple[np.ndarray, np.ndarray, Clip]:
    """Clip ``index`` of the moving world of ``seed``: ``(frames [T,size,size,3] uint8, owner
    [T,size,size], clip)``; depends only on ``(seed, index)`` and the shape arguments."""
    clip = sample_clip(clip_seed(seed, index), size, n_frames, max_objects)
    frames, owner = render_clip(clip, size)
    return frames, owner, clip


def render_clip_arrays(
    n: int,
    seed: int = 0,
    size: int = CLIP_SIZE,
    n_frames: int = CLIP_FRAMES,
    start: int = 0,
    patch_grid: int | Sequence[int] | None = None,
    tubelet: int = 1,
    max_objects: int = CLIP_OBJECTS,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Render clips ``start .. start+n-1`` into memory.

    Returns ``{"clips": uint8 [n, T, size, size, 3], "labels": uint8 [n, V], "frame_labels":
    uint8 [n, T, V]}`` (``V`` = ``len(CLIP_VALUE_NAMES)``) plus ``"patches": uint8
    [n, T // tubelet, rows, cols, V]`` when ``patch_grid`` is given.
    """
    check_clip(size, n_frames, max_objects)
    if n < 0 or start < 0 or seed < 0:
        raise PrismaError(f"render_clip_arrays needs n, start, seed >= 0, got {n}, {start}, {seed}")
    n_values = len(CLIP_VALUE_NAMES)
    out = {
        "clips": np.empty((n, n_frames, size, size, 3), np.uint8),
        "labels": np.empty((n, n_values), np.uint8),
        "frame_labels": np.empty((n, n_frames, n_values), np.uint8),
    }
    if patch_grid is not None:
        rows, cols = _grid(patch_grid, size)
        if tubelet < 1 or n_frames % tubelet:
            raise PrismaError(f"tubelet {tubelet} does not divide the clips' {n_frames} frames")
        out["patches"] = np.empty((n, n_frames // tubelet, rows, cols, n_values), np.uint8)
    for j in tqdm(range(n), desc="render moving toy world", unit="clip", disable=not progress):
        frames, owner, clip = render_clip_index(seed, start + j, size, n_frames, max_objects)
        out["clips"][j] = frames
        out["labels"][j], out["frame_labels"][j] = clip_labels(clip, owner)
        if patch_grid is not None:
            out["patches"][j] = clip_patch_labels(clip, owner, patch_grid, tubelet)
    return out


def shuffle_frames(frames: Any, seed: int = 0) -> tuple[Any, np.ndarray]:
    """The frame-shuffled control: the same frames ``[..., T, H, W, C]`` (or any array whose
    frame axis is -4) in a seeded random order that moves every frame (a derangement), so
    any coherent motion is gone while every frame's content is kept. Returns
    ``(shuffled, order)`` with ``shuffled[..., t, :, :, :] = frames[..., order[t], :, :, :]``."""
    n_frames = frames.shape[-4]
    if n_frames < 2:
        raise PrismaError(f"a clip of {n_frames} frame cannot be shuffled: give at least 2")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n_frames, 2]))
    while True:
        order = rng.permutation(n_frames)
        if (order != np.arange(n_frames)).all():
            break
    return frames[..., order, :, :, :], order


def repeat_frame(frames: Any, frame: int | None = None) -> Any:
    """The no-motion control: frame ``frame`` (default the middle one, ``T // 2``) of
    ``[..., T, H, W, C]`` repeated ``T`` times (same shape and dtype)."""
    n_frames = frames.shape[-4]
    t = n_frames // 2 if frame is None else int(frame)
    if not -n_frames <= t < n_frames:
        raise PrismaError(f"frame {frame} is outside the clip's 0..{n_frames - 1}")
    one = frames[..., t : t + 1, :, :, :] if t >= 0 else frames[..., t, None, :, :, :]
    if isinstance(one, torch.Tensor):
        return one.expand_as(frames).clone()
    return np.repeat(one, n_frames, axis=-4)


class MovingToyWorld(torch.utils.data.Dataset):
    """``n`` clips of the moving toy world: ``world[i] -> (frames, labels)``.

    ``frames`` uint8 ``[T, size, size, 3]``; ``labels`` a dict with ``"multi_hot"`` uint8
    ``[V]`` over :data:`CLIP_VALUE_NAMES`, ``"frames"`` ``[T, V]``, ``"clip"`` (its JSON
    description), ``"index"``, and with ``patch_grid`` ``"patches"``
    ``[T // tubelet, rows, cols, V]``. Clips ``start .. start + n - 1`` are drawn.
    """

    value_names = CLIP_VALUE_NAMES

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = CLIP_SIZE,
        n_frames: int = CLIP_FRAMES,
        patch_grid: int | Sequence[int] | None = None,
        tubelet: int = 1,
        start: int = 0,
        max_objects: int = CLIP_OBJECTS,
    ) -> None:
        if n < 0 or start < 0 or seed < 0:
            raise PrismaError(f"MovingToyWorld needs n, start, seed >= 0, got {n}, {start}, {seed}")
        check_clip(size, n_frames, max_objects)
        if patch_grid is not None:
            _grid(patch_grid, size)
            if tubelet < 1 or n_frames % tubelet:
                raise PrismaError(f"tubelet {tubelet} does not divide the {n_frames} frames")
        self.n, self.seed, self.size, self.start = int(n), int(seed), int(size), int(start)
        self.n_frames, self.max_objects = int(n_frames), int(max_objects)
        self.patch_grid, self.tubelet = patch_grid, int(tubelet)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        if not -self.n <= i < self.n:
            raise IndexError(f"moving toy-world index {i} out of range for {self.n} clips")
        index = self.start + (i % self.n)
        frames, owner, clip = render_clip_index(
            self.seed, index, self.size, self.n_frames, self.max_objects
        )
        multi_hot, per_frame = clip_labels(clip, owner)
        labels: dict[str, Any] = {
            "index": index,
            "multi_hot": multi_hot,
            "frames": per_frame,
            "clip": clip.to_json(),
        }
        if self.patch_grid is not None:
            labels["patches"] = clip_patch_labels(clip, owner, self.patch_grid, self.tubelet)
        return frames, labels


TOY_CLIPS_PREFIX = "toyclips:"


@dataclass(frozen=True)
class ToyClipSpec:
    """Which clips a ``toyclips:`` source holds: ``n`` clips from ``start`` of the moving
    world of ``seed`` at ``size`` pixels, ``frames`` long, with up to ``objects`` objects."""

    n: int
    seed: int = 0
    size: int = CLIP_SIZE
    frames: int = CLIP_FRAMES
    start: int = 0
    objects: int = CLIP_OBJECTS

    @classmethod
    def parse(cls, spec: str) -> ToyClipSpec:
        """``N[,seed=S][,size=P][,frames=T][,start=K][,objects=M]`` (the part after
        ``toyclips:``), checked before any clip is drawn."""
        head, *options = [part.strip() for part in spec.removeprefix(TOY_CLIPS_PREFIX).split(",")]
        names = ("seed", "size", "frames", "start", "objects")
        pairs = [option.partition("=")[::2] for option in options]
        unknown = [key for key, _ in pairs if key not in names]
        if unknown:
            raise PrismaError(
                f"toyclips:{spec}: unknown option {unknown[0]!r} (use {', '.join(names)})"
            )
        try:
            fields = {"n": int(head), **{key: int(value) for key, value in pairs}}
        except ValueError:
            raise PrismaError(
                f"toyclips:{spec}: expected N[,seed=S,size=P,frames=T,start=K,objects=M] "
                "with whole numbers"
            ) from None
        out = cls(**fields)
        if out.n <= 0 or out.seed < 0 or out.start < 0:
            raise PrismaError(f"toyclips:{spec}: give N >= 1, seed >= 0 and start >= 0")
        check_clip(out.size, out.frames, out.objects)
        return out

    def clip_source(self, index: int) -> str:
        """The provenance of clip ``index`` (of the world, not of the source): enough to draw
        it again (:func:`render_clip_source`)."""
        return (
            f"{TOY_CLIPS_PREFIX}seed={self.seed},size={self.size},frames={self.frames},"
            f"objects={self.objects}#{index}"
        )


def render_clip_source(source: str) -> np.ndarray:
    """The frames uint8 ``[T, size, size, 3]`` of a ``toyclips:...#index`` provenance."""
    head, _, index = source.removeprefix(TOY_CLIPS_PREFIX).rpartition("#")
    try:
        values = dict(part.split("=", 1) for part in head.split(","))
        spec = ToyClipSpec(1, **{k: int(v) for k, v in values.items()})
        clip_index = int(index)
    except (ValueError, TypeError):
        raise PrismaError(f"{source!r} is not a toy clip's provenance") from None
    return render_clip_index(spec.seed, clip_index, spec.size, spec.frames, spec.objects)[0]


def clip_label(clip: Clip) -> str:
    """A clip's provenance label: its first object's direction, or ``still``."""
    return clip.motions[0].direction or "still"


class ToyClipSource(Source):
    """The moving toy world as a cache source (``--data toyclips:N[,seed=S,...]``): input
    ``i`` is world clip ``start + i`` as uint8 ``[T, size, size, 3]``, labelled by
    :func:`clip_label`; its provenance (``toyclips:seed=..#index``) draws it again."""

    kind = "video"
    random_access = True

    def __init__(self, spec: str | ToyClipSpec) -> None:
        self.spec = spec if isinstance(spec, ToyClipSpec) else ToyClipSpec.parse(spec)

    def describe(self) -> dict[str, Any]:
        return {"type": "toyclips", **asdict(self.spec)}

    def count(self) -> int:
        return self.spec.n

    def record(self, index: int) -> InputRecord:
        source = self.spec.clip_source(self.spec.start + index)
        return InputRecord(index, stable_key(source), source)

    def load(self, index: int) -> Labeled:
        s = self.spec
        frames, _, clip = render_clip_index(s.seed, s.start + index, s.size, s.frames, s.objects)
        return Labeled(frames, clip_label(clip))
