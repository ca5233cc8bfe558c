"""Conjunction ground truth ("red circle"): labels per patch on constructed scenes whose pixel
owners are drawn by hand, the one-object rule on rendered toy-world scenes, and the detector
rule (better than either part) on hand-made AUROCs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_mm.analysis.ground_truth import (
    CONJUNCTION_PAIRS,
    carried_values,
    conjunction_detectors,
    conjunction_names,
    conjunction_parts,
    patch_conjunctions,
)
from prisma_mm.data.toyworld import (
    FACTORS,
    VALUE_INDEX,
    VALUE_NAMES,
    Scene,
    ToyObject,
    patch_labels,
    render,
)
from prisma_mm.errors import PrismaError

RED_CIRCLE = "shape=circle & colour=red"
RED_SQUARE = "shape=square & colour=red"
BLUE_SQUARE = "shape=square & colour=blue"
PARTS = conjunction_parts([("shape", "colour"), ("colour", "position")])
NAMES = conjunction_names(PARTS)


def _object(shape: str, colour: str, position: str) -> ToyObject:
    return ToyObject(shape, colour, "small", position, None, "solid", (0.0, 0.0), 1.0, 0.0)


def _scene() -> tuple[Scene, np.ndarray]:
    """An 8 x 8 image on a 2 x 2 grid of 4-pixel patches: a red circle (object 0) fills the
    top-left patch and reaches into the top-right one, where a blue square (object 1) also is;
    the blue square fills the bottom-right patch; the bottom-left patch is background."""
    scene = Scene(
        "black",
        (_object("circle", "red", "top_left"), _object("square", "blue", "bottom_right")),
        (),
        (),
    )
    owner = np.full((8, 8), -1, np.int8)
    owner[:4, :5] = 0  # top-left patch, and column 4 of the top-right one
    owner[:4, 6:] = 1  # the rest of the top-right patch
    owner[4:, 4:] = 1
    return scene, owner


def test_conjunction_vocabulary():
    parts = conjunction_parts()
    sizes = {f: len(v) for f, v in FACTORS.items()}
    assert len(parts) == sum(sizes[a] * sizes[b] for a, b in CONJUNCTION_PAIRS) == 459
    assert len(CONJUNCTION_PAIRS) == 15
    names = conjunction_names(parts)
    assert len(set(names)) == len(names)
    assert names[0] == RED_CIRCLE
    assert parts[0] == (VALUE_INDEX["shape=circle"], VALUE_INDEX["colour=red"])
    assert NAMES.index(RED_CIRCLE) == 0 and len(NAMES) == 8 * 8 + 8 * 9
    with pytest.raises(PrismaError, match="unknown factor"):
        conjunction_parts([("shape", "hue")])


def test_patch_conjunctions_on_a_constructed_scene():
    scene, owner = _scene()
    got = patch_conjunctions(scene, owner, 2, PARTS)  # [2, 2, C]
    assert got.shape == (2, 2, len(PARTS)) and got.dtype == np.uint8
    on = {name: got[:, :, i].tolist() for i, name in enumerate(NAMES) if got[:, :, i].any()}
    assert on == {
        RED_CIRCLE: [[1, 1], [0, 0]],
        BLUE_SQUARE: [[0, 1], [0, 1]],
        "colour=red & position=top_left": [[1, 1], [0, 0]],
        "colour=blue & position=bottom_right": [[0, 1], [0, 1]],
    }
    # the value labels of the top-right patch hold red AND square; the conjunction does not
    values = patch_labels(scene, owner, 2)
    assert values[0, 1, VALUE_INDEX["colour=red"]] == values[0, 1, VALUE_INDEX["shape=square"]] == 1
    assert got[0, 1, NAMES.index(RED_SQUARE)] == 0
    with pytest.raises(PrismaError, match="does not tile"):
        patch_conjunctions(scene, owner, 3, PARTS)


def test_patch_conjunctions_follow_objects_on_rendered_scenes():
    """On real renders: a conjunction is never present where one of its parts is absent, and
    in scenes of one object it is exactly the AND of its parts."""
    parts = conjunction_parts()
    a = np.array([p[0] for p in parts])
    b = np.array([p[1] for p in parts])
    single, total = 0, 0
    for index in range(24):
        _, owner, scene = render(3, index, 64)
        values = patch_labels(scene, owner, 8).reshape(-1, len(VALUE_NAMES))
        conj = patch_conjunctions(scene, owner, 8, parts).reshape(-1, len(parts))
        both = values[:, a] & values[:, b]
        assert (conj <= both).all()
        total += int(conj.sum())
        if scene.count == 1:
            single += 1
            np.testing.assert_array_equal(conj, both)
    assert single > 0 and total > 0


def test_conjunction_detectors_need_to_beat_both_parts():
    parts = [(0, 1), (0, 2)]
    # latent 0: a plain "value 0" detector; 1: a conjunction (0, 1) detector; 2: weak on all;
    # 3: beats its parts by less than the margin; 4: NaN conjunction (unscorable)
    values = torch.tensor(
        [[0.99, 0.6, 0.5], [0.55, 0.6, 0.5], [0.6, 0.6, 0.6], [0.90, 0.5, 0.5], [0.5, 0.5, 0.5]],
        dtype=torch.float64,
    )
    conj = torch.tensor(
        [[0.95, 0.94], [0.98, 0.6], [0.7, 0.7], [0.93, 0.5], [float("nan"), 0.5]],
        dtype=torch.float64,
    )
    got = conjunction_detectors(values, conj, parts, threshold=0.9, margin=0.05)
    assert got.tolist() == [
        [False, False],
        [True, False],
        [False, False],
        [False, False],
        [False, False],
    ]
    carried = carried_values(values, got, parts, threshold=0.9)
    # latent 0 carries value 0 (its own AUROC), latent 1 both parts of the conjunction it detects
    assert carried.tolist() == [
        [True, False, False],
        [True, True, False],
        [False, False, False],
        [True, False, False],
        [False, False, False],
    ]
    assert conjunction_detectors(values, conj[:, :0], [], 0.9).shape == (5, 0)
