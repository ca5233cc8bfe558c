"""scripts/train_toyvit.py: its left-right mirror augmentation keeps images and labels exact."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from prisma_mm.data.toyworld import (
    POSITIONS,
    Scene,
    ToyObject,
    image_labels,
    patch_labels,
    render_scene,
)

ROOT = Path(__file__).resolve().parent.parent


def test_training_mirror_is_the_mirrored_scene():
    """scripts/train_toyvit.py's left-right mirror: the flipped image of a scene is the image
    of the mirrored scene (centres mirrored, angles negated), and the flipped labels are its
    labels (positions swap columns, the rest stays)."""
    spec = importlib.util.spec_from_file_location(
        "train_toyvit", ROOT / "scripts" / "train_toyvit.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def obj(shape, colour, centre, radius, angle, rotation, texture, size="medium"):
        col, row = min(2, int(3 * centre[0] / 64)), min(2, int(3 * centre[1] / 64))
        return ToyObject(shape, colour, size, POSITIONS[3 * row + col], rotation, texture,
                         centre, radius, angle)  # fmt: skip

    objects = (
        obj("triangle", "red", (12.3, 11.7), 8.6, 64.1, "turned", "solid"),
        obj("star", "blue", (50.2, 13.4), 9.1, 4.0, "upright", "dots"),
        obj("hexagon", "white", (13.9, 52.6), 9.5, 27.0, "turned", "stripes"),
        obj("diamond", "yellow", (52.8, 50.9), 8.8, 95.0, "turned", "dots"),
    )
    scene = Scene("gray", objects, (), ())

    def mirrored(o):
        col, row = min(2, int(3 * (64 - o.centre[0]) / 64)), min(2, int(3 * o.centre[1] / 64))
        return dataclasses.replace(o, centre=(64 - o.centre[0], o.centre[1]), angle=-o.angle,
                                   position=POSITIONS[3 * row + col])  # fmt: skip

    mirror_scene = Scene("gray", tuple(mirrored(o) for o in objects), (), ())
    image, owner = render_scene(scene)
    image_m, owner_m = render_scene(mirror_scene)
    labels = image_labels(scene)[None]
    patches = patch_labels(scene, owner, 8).reshape(1, 64, -1)
    flip = np.ones(1, bool)
    got_image, got_labels, got_patches = script.mirror(image[None], labels, patches, 8, flip)
    assert (got_image[0] == image_m).all()
    assert (got_labels[0] == image_labels(mirror_scene)).all()
    assert (got_patches[0] == patch_labels(mirror_scene, owner_m, 8).reshape(64, -1)).all()
    assert not (got_patches[0] == patches[0]).all()  # the objects did move
