"""Toy world: determinism, hand-checked pixels and labels, shards, and the shipped toy ViT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import prisma_mm
from prisma_mm.data.toyworld import (
    FACTORS,
    INNER_ROOM,
    RGB,
    SHADE,
    VALUE_INDEX,
    VALUE_NAMES,
    Scene,
    ToyObject,
    ToyWorld,
    collate,
    image_labels,
    main_toyworld,
    patch_labels,
    render_arrays,
    render_scene,
    write_shards,
)
from prisma_mm.errors import PrismaError

ROOT = Path(__file__).resolve().parents[1]


def obj(shape="square", colour="red", centre=(20.0, 20.0), radius=6.0, angle=0.0, **kw):
    values = dict(size="small", position="top_left", rotation="upright", texture="solid")
    values.update(kw)
    return ToyObject(
        shape=shape, colour=colour, centre=centre, radius=radius, angle=angle, **values
    )


def names(hot: np.ndarray) -> set[str]:
    return {VALUE_NAMES[i] for i in np.flatnonzero(hot)}


def test_vocabulary():
    assert len(FACTORS["shape"]) >= 8 and len(FACTORS["colour"]) >= 8
    assert len(VALUE_NAMES) == len(set(VALUE_NAMES)) == sum(len(v) for v in FACTORS.values())
    assert VALUE_NAMES[VALUE_INDEX["texture=dots"]] == "texture=dots"


def test_image_depends_only_on_seed_and_index():
    a_img, a_lab = ToyWorld(10, seed=5)[3]
    b_img, b_lab = ToyWorld(500, seed=5)[3]
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab["multi_hot"], b_lab["multi_hot"])
    batch = render_arrays(4, seed=5, start=2, progress=False)  # images 2..5 of the same world
    np.testing.assert_array_equal(batch["images"][1], a_img)
    shifted, _ = ToyWorld(5, seed=5, start=3)[0]
    np.testing.assert_array_equal(shifted, a_img)
    other, _ = ToyWorld(10, seed=6)[3]
    assert not np.array_equal(other, a_img)
    assert a_img.dtype == np.uint8 and a_img.shape == (64, 64, 3)


def test_single_square_pixels_and_patch_labels():
    # half side 0.72 * 6 = 4.32 about x = 20: pixel centres 16.5 .. 23.5, i.e. exactly patch (2, 2)
    scene = Scene("black", (obj(),), (), ())
    image, owner = render_scene(scene, 64)
    assert set(np.unique(owner)) == {-1, 0}
    ys, xs = np.nonzero(owner == 0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (16, 23, 16, 23)
    assert tuple(image[20, 20]) == RGB["red"] and tuple(image[10, 10]) == (0, 0, 0)
    patches = patch_labels(scene, owner, 8)
    square_values = {
        "shape=square",
        "colour=red",
        "size=small",
        "position=top_left",
        "rotation=upright",
        "texture=solid",
    }
    assert names(patches[2, 2]) == square_values | {"count=1"}  # no background pixel left
    for r in range(8):
        for c in range(8):
            if (r, c) != (2, 2):
                assert names(patches[r, c]) == {"background=black", "count=1"}
    assert names(image_labels(scene)) == square_values | {"background=black", "count=1"}


def test_circle_across_four_patches_and_coarser_grid():
    scene = Scene("gray", (obj("circle", "blue", (32.0, 32.0), 5.0, rotation=None),), (), ())
    image, owner = render_scene(scene, 64)
    hit = patch_labels(scene, owner, 8)[:, :, VALUE_INDEX["shape=circle"]]
    assert sorted(zip(*np.nonzero(hit))) == [(3, 3), (3, 4), (4, 3), (4, 4)]
    assert "rotation=upright" not in names(image_labels(scene))
    assert set(np.unique(owner)) == {-1, 0}
    assert abs((owner == 0).sum() - math.pi * 25) < 8  # area of a radius-5 disc
    coarse = patch_labels(scene, owner, (2, 4))  # rows x cols, 32 x 16 pixel patches
    assert coarse.shape == (2, 4, len(VALUE_NAMES))
    hit = coarse[:, :, VALUE_INDEX["colour=blue"]]
    assert sorted(zip(*np.nonzero(hit))) == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_rotation_and_texture_pixels():
    upright = render_scene(Scene("black", (obj(radius=10.0, centre=(32.0, 32.0)),), (), ()))[1]
    turned = render_scene(
        Scene(
            "black", (obj(radius=10.0, centre=(32.0, 32.0), angle=45.0, rotation="turned"),), (), ()
        )
    )[1]
    # a 45-degree square reaches 0.72 * 10 * sqrt(2) = 10.2 px along the axes, an upright one 7.2
    assert upright[32, 40] == -1 and turned[32, 40] == 0
    assert upright[25, 25] == 0 and turned[25, 25] == -1  # the corner is cut off when turned
    striped = Scene("black", (obj(radius=10.0, centre=(32.0, 32.0), texture="stripes"),), (), ())
    image = render_scene(striped)[0]
    red = np.array(RGB["red"])
    dark = (red * SHADE).astype(np.uint8)
    column = image[26:38, 32]
    for y, pixel in zip(range(26, 38), column):
        np.testing.assert_array_equal(pixel, red if y % 4 < 2 else dark)


def test_nested_pair_labels():
    outer = obj("ring", "green", (32.0, 32.0), 14.0, rotation=None, size="large", position="centre")
    inner = obj("star", "white", (32.0, 32.0), 5.0, size="small", position="centre")
    scene = Scene("noise", (outer, inner), ((0, 1),), ())
    image, owner = render_scene(scene, 64, np.random.default_rng(0))
    assert owner[32, 32] == 1 and owner[32, 32 + 11] == 0  # star in the ring's hole
    assert 0 in owner and 1 in owner
    labels = names(image_labels(scene))
    assert {"inside=yes", "count=2", "shape=ring", "shape=star"} <= labels
    assert "same_colour=yes" not in labels
    patches = patch_labels(scene, owner, 8)
    inside = patches[:, :, VALUE_INDEX["inside=yes"]]
    ring = patches[:, :, VALUE_INDEX["shape=ring"]]
    star = patches[:, :, VALUE_INDEX["shape=star"]]
    np.testing.assert_array_equal(inside, ring | star)
    assert star.sum() == 4 and star[3:5, 3:5].all()
    # noise background: grey pixels that vary
    background = image[owner == -1]
    assert (background[:, 0] == background[:, 1]).all() and background[:, 0].std() > 5


def test_sampled_scenes_are_consistent():
    world = ToyWorld(300, seed=1, patch_grid=8)
    seen = np.zeros(len(VALUE_NAMES), int)
    for i in range(len(world)):
        scene = world.scene(i)
        image, labels = world[i]
        hot = labels["multi_hot"]
        seen += hot
        # the union of the patch labels is the image label vector
        np.testing.assert_array_equal(labels["patches"].max((0, 1)), hot)
        assert 1 <= scene.count <= 4 and hot[VALUE_INDEX[f"count={scene.count}"]]
        colours = [o.colour for o in scene.objects]
        assert bool(hot[VALUE_INDEX["same_colour=yes"]]) == (len(set(colours)) < len(colours))
        free = [o for k, o in enumerate(scene.objects) if all(k not in p for p in scene.inside)]
        for a in range(len(free)):  # free objects never touch
            for b in range(a):
                ax, ay = free[a].centre
                bx, by = free[b].centre
                assert math.hypot(ax - bx, ay - by) >= free[a].radius + free[b].radius
        for outer, inner in scene.inside:
            assert scene.objects[outer].centre == scene.objects[inner].centre
            room = INNER_ROOM[scene.objects[outer].shape] * scene.objects[outer].radius
            assert scene.objects[inner].radius <= 0.8 * room + 1e-9
            assert scene.objects[inner].colour != scene.objects[outer].colour
        for o in scene.objects:
            x, y = o.centre
            assert (
                o.position
                == FACTORS["position"][3 * min(2, int(y / 64 * 3)) + min(2, int(x / 64 * 3))]
            )
            assert (o.rotation is None) == (o.shape in ("circle", "ring"))
    assert (seen > 0).all(), [VALUE_NAMES[i] for i in np.flatnonzero(seen == 0)]


def test_dataset_batches_and_pil_and_size():
    loader = torch.utils.data.DataLoader(
        ToyWorld(6, seed=0, patch_grid=4), batch_size=3, collate_fn=collate
    )
    images, labels = next(iter(loader))
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.uint8
    assert labels["multi_hot"].shape == (3, len(VALUE_NAMES))
    assert labels["patches"].shape == (3, 4, 4, len(VALUE_NAMES))
    assert labels["index"] == [0, 1, 2]
    image, _ = ToyWorld(2, seed=0, size=96, pil=True)[1]
    assert image.size == (96, 96) and image.mode == "RGB"
    with pytest.raises(PrismaError, match="does not tile"):
        ToyWorld(2, patch_grid=7)
    with pytest.raises(IndexError):
        ToyWorld(2)[2]


def test_write_shards_round_trip(tmp_path):
    import webdataset as wds

    paths = write_shards(tmp_path, 7, seed=4, shard_size=3, patch_grid=8, progress=False)
    assert [p.name for p in paths] == [f"toyworld-00000{i}.tar" for i in range(3)]
    meta = json.loads((tmp_path / "toyworld.json").read_text())
    assert meta["value_names"] == VALUE_NAMES and meta["n"] == 7
    world = ToyWorld(7, seed=4, patch_grid=8)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(7)]
    for s in samples:
        i = int(s["__key__"])
        image, labels = world[i]
        np.testing.assert_array_equal(s["png"], image)
        record = s["json"]
        assert record["values"] == np.flatnonzero(labels["multi_hot"]).tolist()
        per_patch = labels["patches"].reshape(64, -1)
        assert record["patch_values"] == [np.flatnonzero(p).tolist() for p in per_patch]
        assert record["count"] == labels["count"] and len(record["objects"]) == labels["count"]


def test_cli(tmp_path, capsys):
    assert main_toyworld(["write", str(tmp_path / "w"), "--n", "3", "--shard-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").glob("*.tar")) == [
        "toyworld-000000.tar",
        "toyworld-000001.tar",
    ]
    assert main_toyworld(["vocab"]) == 0
    out = capsys.readouterr().out
    assert "0 shape=circle" in out and f"{len(VALUE_NAMES) - 1} inside=yes" in out


TOYVIT = ROOT / "assets" / "toyvit.safetensors"


def test_shipped_toyvit_carries_every_factor():
    """The shipped toyvit, scored again on every held-out image its record names (images the
    training chain never saw): its record's scores are these, and every factor's mean AP is
    at least 0.9 (the model must carry a factor for SAE latents to find it)."""
    # a committed asset that is missing is a failure, not a skip
    assert TOYVIT.is_file() and TOYVIT.with_suffix(".json").is_file(), f"{TOYVIT} is missing"
    import safetensors.torch
    import timm

    from prisma_mm.analysis.ground_truth import average_precision
    from prisma_mm.data.toyworld import VALUE_FACTORS

    record = json.loads(TOYVIT.with_suffix(".json").read_text())
    assert record["value_names"] == VALUE_NAMES
    assert TOYVIT.stat().st_size < 8 * 2**20  # a few MB
    model = timm.create_model(record["arch"], pretrained=False, **record["kwargs"])
    state = safetensors.torch.load_file(str(TOYVIT))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    first, n = record["heldout"]["first_index"], record["heldout"]["n"]
    assert first >= record["n_train"] and n >= 1000
    chain = record
    while chain.get("init"):  # every run of the chain trained below the held-out range
        chain = chain["init"]["record"] or {}
        assert (chain.get("n_train") or 0) <= first
    held = render_arrays(n, seed=record["seed"], start=first, progress=False)
    pre = record["preprocess"]
    x = torch.from_numpy(held["images"]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        scores = torch.cat([model(part).sigmoid() for part in x.split(250)])
    labels = torch.from_numpy(held["labels"])
    accuracy = ((scores >= 0.5) == labels.bool()).double().mean().item()
    ap = average_precision(scores.double(), labels.double())
    metrics = record["heldout_metrics"]
    assert accuracy == pytest.approx(metrics["value_accuracy"], abs=2e-3)
    assert ap.nanmean().item() == pytest.approx(metrics["mean_ap"], abs=2e-3)
    for factor in FACTORS:
        cols = [i for i, f in enumerate(VALUE_FACTORS) if f == factor]
        factor_ap = ap[cols].nanmean().item()
        assert factor_ap == pytest.approx(metrics["per_factor"][factor]["mean_ap"], abs=2e-3)
        assert factor_ap >= 0.9, f"toyvit carries {factor} with held-out AP {factor_ap:.3f}"
    # the zoo path loads the same weights and applies the same preprocessing
    zoo_model = prisma_mm.load_model("toyvit")
    images = [held["images"][i] for i in range(8)]
    with torch.no_grad():
        torch.testing.assert_close(zoo_model(zoo_model.preprocess(images)).sigmoid(), scores[:8])


def test_sizes_and_output_folder_are_checked_before_drawing(tmp_path):
    from prisma_mm.data.toyworld import MIN_SIZE, check_size

    assert MIN_SIZE == 32 and check_size(32) == 32
    for size in (4, 16, 31, 1025):
        with pytest.raises(PrismaError, match=r"outside 32\.\.1024"):
            ToyWorld(2, size=size)
        with pytest.raises(PrismaError, match=r"outside 32\.\.1024"):
            write_shards(tmp_path / "w", 2, size=size, progress=False)
    assert not (tmp_path / "w").exists()  # refused before the folder was made
    image, _ = ToyWorld(1, size=32)[0]
    assert image.shape == (32, 32, 3)

    # the same world again is rewritten with the same samples; another world is refused
    def members(paths):
        import tarfile

        out = []
        for path in paths:
            with tarfile.open(path) as tar:
                out += [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        return out

    first = write_shards(tmp_path / "w", 3, seed=2, shard_size=2, progress=False)
    samples = members(first)
    assert members(write_shards(tmp_path / "w", 3, seed=2, shard_size=2, progress=False)) == samples
    shard_bytes = [p.read_bytes() for p in first]
    with pytest.raises(PrismaError, match=r"other parameters \(n 3 there, 4 now\)"):
        write_shards(tmp_path / "w", 4, seed=2, shard_size=2, progress=False)
    assert [p.read_bytes() for p in first] == shard_bytes  # untouched
