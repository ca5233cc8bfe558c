"""scripts/train_toyvit.py: its left-right mirror augmentation keeps images and labels exact."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

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


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_toyvit", ROOT / "scripts" / "train_toyvit.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_chain_of_runs_is_recorded(tmp_path):
    """A run stopped with --stop-after, then continued with --init: each record says what was
    done (steps done vs planned, the start's sha256 and record), the saved weights are the
    ones scored, and a continuation that would train on the start's held-out images is
    refused."""
    import hashlib
    import json
    import signal

    import safetensors.torch

    script = _script()
    handler = signal.getsignal(signal.SIGINT)
    tiny = ["--n-train", "48", "--n-val", "16", "--size", "32", "--depth", "1", "--width", "16",
            "--heads", "2", "--batch-size", "8", "--threads", "1"]  # fmt: skip
    first = tmp_path / "a.safetensors"
    record = script.main([*tiny, "--steps", "5", "--stop-after", "3", "--out", str(first)])
    assert (record["steps"], record["steps_planned"], record["init"]) == (3, 5, None)
    assert signal.getsignal(signal.SIGINT) is handler  # the run gave Ctrl-C back
    assert json.loads(first.with_suffix(".json").read_text())["steps"] == 3
    second = tmp_path / "b.safetensors"
    more = ["--steps", "2", "--factor-weight", "shape=4", "--init", str(first)]
    record_b = script.main([*tiny, *more, "--out", str(second)])
    assert record_b["steps"] == 2 and record_b["factor_weight"]["shape"] == 4.0
    assert record_b["init"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert record_b["init"]["record"]["steps"] == 3
    assert record_b["init"]["record"]["heldout_mean_ap"] == record["heldout_metrics"]["mean_ap"]
    start = safetensors.torch.load_file(str(first))
    after = safetensors.torch.load_file(str(second))
    assert start.keys() == after.keys()
    assert any(not (start[k] == after[k]).all() for k in start)  # it trained on
    with pytest.raises(SystemExit):  # images 0..47 trained the start: 0..39 hold no new held-out
        script.main([*tiny[:1], "40", *tiny[2:], "--steps", "1", "--init", str(first),
                     "--out", str(tmp_path / "c.safetensors")])  # fmt: skip
    with pytest.raises(SystemExit):
        script.main([*tiny, "--steps", "2", "--stop-after", "3", "--out", str(tmp_path / "d")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stop-after", "9", "--steps", "5"], "--stop-after 9"),
        (["--factor-weight", "shape=abc"], "give FACTOR=NUMBER"),
        (["--factor-weight", "hue=2"], "unknown factor"),
        (["--init", "{tmp}/nowhere.safetensors"], "not readable as weights"),
        (["--init", "{tmp}/junk.safetensors"], "not readable as weights"),
        (["--out", "{tmp}"], "is a folder"),
    ],
)
def test_bad_arguments_stop_before_any_image_is_drawn(tmp_path, monkeypatch, capsys, argv, message):
    script = _script()
    (tmp_path / "junk.safetensors").write_text("not safetensors")

    def drawn(*args, **kwargs):
        raise AssertionError("images were drawn before the arguments were checked")

    monkeypatch.setattr(script, "render_arrays", drawn)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "w.st")])])
    said = f"{exit_info.value.code} {capsys.readouterr().err}"
    assert message in said
    assert not (tmp_path / "w.st").exists()
