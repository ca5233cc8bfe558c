"""The moving toy world: motion as drawn, exact per-frame labels, the controls, and the
temporal score and motion scoring of prisma_mm.analysis.motion on planted latents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prisma_mm.analysis.motion import motion_value_mask, score_motion, temporal_scores
from prisma_mm.data.toyworld import (
    CLIP_VALUE_INDEX,
    CLIP_VALUE_NAMES,
    DIRECTIONS,
    MOTION_VALUES,
    VALUE_NAMES,
    MovingToyWorld,
    clip_labels,
    clip_patch_labels,
    render_clip_arrays,
    render_clip_index,
    repeat_frame,
    shuffle_frames,
)
from prisma_mm.errors import PrismaError

pytestmark = pytest.mark.usefixtures("one_thread")
N_CLIPS = 160


@pytest.fixture(scope="module")
def rendered():
    """Clips 0..N_CLIPS-1 of seed 3 with their owners and descriptions."""
    return [render_clip_index(3, i) for i in range(N_CLIPS)]


def test_vocabulary_extends_the_image_one():
    assert CLIP_VALUE_NAMES[: len(VALUE_NAMES)] == VALUE_NAMES
    motion = [CLIP_VALUE_NAMES[i] for i in MOTION_VALUES]
    assert motion[:8] == [f"direction={d}" for d in DIRECTIONS]
    assert motion[8:] == [
        "speed=still",
        "speed=slow",
        "speed=fast",
        "appears=yes",
        "disappears=yes",
    ]
    assert motion_value_mask(CLIP_VALUE_NAMES).nonzero().flatten().tolist() == MOTION_VALUES


def test_clip_depends_only_on_seed_and_index(rendered):
    frames, owner, clip = render_clip_index(3, 17)
    assert np.array_equal(frames, rendered[17][0]) and np.array_equal(owner, rendered[17][1])
    batch = render_clip_arrays(3, seed=3, start=16, progress=False)
    assert np.array_equal(batch["clips"][1], frames)
    assert not np.array_equal(render_clip_index(4, 17)[0], frames)


def test_objects_move_by_their_velocity_in_their_direction(rendered):
    """The centroid of a fully visible object moves by its velocity between frames, and the
    velocity's heading is its direction (east = +x, north = -y on screen)."""
    checked = set()
    for frames, owner, clip in rendered:
        size = frames.shape[1]
        for k, motion in enumerate(clip.motions):
            if motion.speed == "still":
                assert motion.direction is None and motion.velocity == (0.0, 0.0)
            else:
                heading = math.degrees(math.atan2(-motion.velocity[1], motion.velocity[0])) % 360
                assert heading == pytest.approx(45.0 * DIRECTIONS.index(motion.direction))
            r = clip.scene.objects[k].radius

            def clear(t: int, k: int = k, r: float = r, clip=clip, size: int = size) -> bool:
                """Object k lies wholly inside frame t and touches no other object there."""
                (x, y) = clip.moved(k, t, size).centre
                if not all(r + 1 < c < size - r - 1 for c in (x, y)):
                    return False
                for j in clip.frame_objects(t):
                    (a, b), rj = clip.moved(j, t, size).centre, clip.scene.objects[j].radius
                    if j != k and math.hypot(x - a, y - b) < r + rj + 1:
                        return False
                return True

            inside = [t for t in range(motion.shown_from, motion.shown_until) if clear(t)]
            if len(inside) < 4:
                continue
            first, last = inside[0], inside[-1]
            ya, xa = np.nonzero(owner[first] == k)
            yb, xb = np.nonzero(owner[last] == k)
            step = (
                (xb.mean() - xa.mean()) / (last - first),
                (yb.mean() - ya.mean()) / (last - first),
            )
            # pixel masks quantise the centroid: within a pixel over the run
            assert step == pytest.approx(motion.velocity, abs=1 / (last - first))
            checked.add(motion.direction)
    assert checked == set(DIRECTIONS) | {None}


def test_appearing_and_disappearing_objects_are_absent_outside_their_frames(rendered):
    events = 0
    for _, owner, clip in rendered:
        for k, motion in enumerate(clip.motions):
            shown = np.array([(owner[t] == k).any() for t in range(clip.n_frames)])
            assert not shown[: motion.shown_from].any() and not shown[motion.shown_until :].any()
            events += (motion.shown_from > 0) + (motion.shown_until < clip.n_frames)
    assert events >= 10


def test_labels_per_frame_patch_and_tubelet(rendered):
    for _, owner, clip in rendered[:40]:
        per_patch = clip_patch_labels(clip, owner, 4)  # [T, 4, 4, V]
        multi_hot, per_frame = clip_labels(clip, owner)
        assert np.array_equal(per_patch.max((1, 2)), per_frame)
        assert np.array_equal(per_frame.max(0), multi_hot)
        pooled = clip_patch_labels(clip, owner, 4, tubelet=2)
        assert pooled.shape == (4, 4, 4, len(CLIP_VALUE_NAMES))
        assert np.array_equal(pooled, np.maximum(per_patch[0::2], per_patch[1::2]))
        for k, motion in enumerate(clip.motions):
            for t in range(clip.n_frames):
                seen = (owner[t] == k).reshape(4, 8, 4, 8).any((1, 3))
                speed = per_patch[t, :, :, CLIP_VALUE_INDEX[f"speed={motion.speed}"]]
                # the object's speed is present wherever it is seen (maybe from another too)
                assert (speed[seen] == 1).all()
                if len(clip.motions) == 1:
                    assert np.array_equal(speed.astype(bool), seen)
                    count = per_frame[t, CLIP_VALUE_INDEX["count=1"]]
                    assert count == seen.any()


def test_controls():
    clips = render_clip_arrays(2, seed=1, progress=False)["clips"]
    shuffled, order = shuffle_frames(clips, seed=5)
    assert (order != np.arange(8)).all() and sorted(order) == list(range(8))
    assert np.array_equal(shuffled, clips[:, order])
    assert np.array_equal(shuffle_frames(clips, seed=5)[0], shuffled)  # seeded
    frozen = repeat_frame(clips)
    assert frozen.shape == clips.shape and (frozen == clips[:, 4:5]).all()
    as_tensor = repeat_frame(torch.from_numpy(clips), 2)
    assert torch.equal(as_tensor, torch.from_numpy(clips[:, 2:3]).expand_as(as_tensor))
    with pytest.raises(PrismaError, match="outside"):
        repeat_frame(clips, 8)


def test_dataset_items_match_arrays():
    world = MovingToyWorld(3, seed=2, patch_grid=4, tubelet=2, start=5)
    arrays = render_clip_arrays(3, seed=2, start=5, patch_grid=4, tubelet=2, progress=False)
    frames, labels = world[1]
    assert np.array_equal(frames, arrays["clips"][1])
    assert np.array_equal(labels["patches"], arrays["patches"][1])
    assert np.array_equal(labels["multi_hot"], arrays["labels"][1])
    assert labels["index"] == 6 and len(labels["clip"]["motions"]) == labels["clip"]["count"]
    with pytest.raises(PrismaError, match="tubelet"):
        MovingToyWorld(3, patch_grid=4, tubelet=3)


def test_temporal_score_on_planted_latents():
    """Hand-computed: totals m, r, s per latent and score clamp(1 - (r + s) / 2m, 0, 1)."""
    moving = torch.zeros(2, 3, 5)
    repeated = torch.zeros(2, 3, 5)
    shuffled = torch.zeros(2, 3, 5)
    moving[:, :, 0] = repeated[:, :, 0] = shuffled[:, :, 0] = 2.0  # static: 0
    moving[0, 1, 1] = 4.0  # fires only with motion: 1
    moving[:, 0, 2] = 3.0  # 6 in all; 3 frozen, 1.5 shuffled: 1 - 4.5 / 12
    repeated[0, 0, 2] = 3.0
    shuffled[1, 2, 2] = 1.5
    shuffled[0, 0, 4] = 1.0  # latent 3 never fires; latent 4 fires only on a control
    moving[0, 0, 4] = 0.5
    scores = temporal_scores(moving, repeated, shuffled)
    assert scores.moving.tolist() == [12.0, 4.0, 6.0, 0.0, 0.5]
    assert scores.score[:3].tolist() == pytest.approx([0.0, 1.0, 1 - 4.5 / 12])
    assert math.isnan(scores.score[3]) and scores.score[4] == 0.0
    assert scores.frozen[2] == pytest.approx(0.5) and scores.order[2] == pytest.approx(0.75)
    assert scores.order[4] == pytest.approx(-1.0)
    with pytest.raises(PrismaError, match="non-negative"):
        temporal_scores(-moving, repeated, shuffled)
    with pytest.raises(PrismaError, match="one shape"):
        temporal_scores(moving, repeated[:1], shuffled)


def test_temporal_score_of_pixel_latents_on_real_clips():
    """A latent reading a patch's red pixels is static under shuffling (order exactly 0);
    a latent reading a patch's change since the previous frame dies when a frame repeats
    (frozen exactly 1) but grows when frames are shuffled (objects jump), so it is only half
    "temporal": it reads change, not coherent motion."""
    clips = render_clip_arrays(24, seed=7, progress=False)["clips"]  # [n, T, 32, 32, 3]

    def latents(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        red = (x[..., 0] > 200) & (x[..., 1] < 60)
        change = np.abs(np.diff(x, axis=1, prepend=x[:, :1])).sum(-1)
        per = lambda a: a.reshape(len(x), 8, 4, 8, 4, 8).sum((3, 5)).reshape(len(x), -1)  # noqa: E731
        return np.stack([per(red), per(change)], -1)  # [n, tokens, 2]

    moving = latents(clips)
    scores = temporal_scores(
        moving, latents(repeat_frame(clips)), latents(shuffle_frames(clips)[0])
    )
    assert scores.moving[0] > 0 and scores.order[0] == pytest.approx(0.0, abs=1e-12)
    assert scores.frozen[1] == 1.0 and scores.order[1] < 0
    assert 0.0 < scores.score[1] < 0.5
    assert scores.score[0] < 0.1


def test_score_motion_recovers_planted_motion_latents():
    """Latents equal to the token labels of the motion values recover motion fully and
    static values much less; each value's best latent carries that latent's temporal score."""
    arrays = render_clip_arrays(60, seed=11, patch_grid=4, tubelet=2, progress=False)
    labels = torch.from_numpy(arrays["patches"]).reshape(60, -1, len(CLIP_VALUE_NAMES)).float()
    planted = labels[:, :, MOTION_VALUES]  # one latent per motion value
    noise = torch.rand(60, labels.shape[1], 6, generator=torch.Generator().manual_seed(0))
    codes = torch.cat([planted, noise], -1)
    frozen = codes.clone()
    frozen[:, :, : len(MOTION_VALUES)] = 0  # the planted motion latents die without motion
    report = score_motion(codes, arrays["patches"], arrays["labels"], None, frozen, frozen)
    assert report.recovery(True) == pytest.approx(1.0)
    summary = report.summary()
    assert summary["motion_best_temporal_score"] == pytest.approx(1.0)
    # motion labels sit on the objects' patches, so they locate static values only partly
    assert summary["static_recovery"] < 0.5
    rows = {r["value"]: r for r in report.rows()}
    assert rows["direction=east"]["latent"] == 0 and rows["direction=east"]["auroc"] == 1.0
    assert rows["speed=fast"]["latent"] == MOTION_VALUES.index(CLIP_VALUE_INDEX["speed=fast"])
    assert report.ground_truth.image is not None  # clip level from the max over tokens
    with pytest.raises(PrismaError, match="token grid"):
        score_motion(codes[:, :32], arrays["patches"])


class _Identity(torch.nn.Module):
    """A 'dictionary' whose code is the activation itself (one latent per dimension)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.zeros(d, d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("card", ["tiny-videomae", "tiny-timesformer"])
def test_clip_codes_are_frame_major_whatever_the_token_order(card):
    """Row (t, h, w) of clip_codes is the activation of the token the layout maps to (t, h, w):
    for TimeSformer (CLS + time fastest) as for VideoMAE (tubelets, frame-major)."""
    import prisma_mm
    from prisma_mm.analysis.motion import clip_codes

    model = prisma_mm.load_model(card)
    hook = "blocks.1.hook_resid_post"
    clips = render_clip_arrays(2, seed=0, n_frames=4, progress=False)["clips"]
    codes = clip_codes(model, _Identity(model.d_model), hook, clips)
    layout = model.layout
    frames, height, width = layout.grid
    assert codes.shape == (2, frames * height * width, model.d_model)
    _, cache = model.run_with_cache(model.preprocess(list(clips)), names_filter=[hook])
    for token in range(layout.n_prefix, layout.n_tokens):
        t, r, c = layout.token_to_patch(token)
        torch.testing.assert_close(codes[:, (t * height + r) * width + c], cache[hook][:, token])


def test_shipped_toyvideo_matches_its_card_and_record():
    """The card builds the recorded architecture and loads the shipped weights (outputs equal
    the library's model on them); on held-out clips it tells backgrounds apart as its record
    says. (How well it reads motion is in the record; it is weak, see docs/video.md.)"""
    import json
    from pathlib import Path

    import prisma_mm
    from prisma_mm.analysis.ground_truth import average_precision
    from prisma_mm.zoo import registry

    record = json.loads((Path(__file__).resolve().parents[1] / "assets/toyvideo.json").read_text())
    assert registry.get_card("toyvideo").kwargs == record["config"]
    assert record["value_names"] == CLIP_VALUE_NAMES
    model = prisma_mm.load_model("toyvideo")
    assert model.layout.tubelet == record["config"]["tubelet_size"]
    first = record["heldout"]["first_index"]
    arrays = render_clip_arrays(96, seed=record["seed"], start=first, progress=False,
                                max_objects=record["max_objects"])  # fmt: skip
    labels = torch.from_numpy(arrays["labels"]).double()

    def ap(clips: np.ndarray, factor: str) -> float:
        with torch.no_grad():
            scores = model(model.preprocess(list(clips))).sigmoid().double()
        columns = [i for i, n in enumerate(CLIP_VALUE_NAMES) if n.startswith(factor + "=")]
        return float(average_precision(scores[:, columns], labels[:, columns]).nanmean())

    assert ap(arrays["clips"], "background") > 0.95
    # the zoo's model is the library's own on the shipped weights, bit for bit
    from safetensors.torch import load_file
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    native = VideoMAEForVideoClassification(VideoMAEConfig(**record["config"])).eval()
    native.load_state_dict(
        load_file(Path(__file__).resolve().parents[1] / "assets/toyvideo.safetensors")
    )
    x = model.preprocess(list(arrays["clips"][:8]))
    with torch.no_grad():
        assert torch.equal(model(x), native(pixel_values=x.transpose(1, 2)).logits)
    controls = record["heldout_metrics"]["controls_clip_motion_ap"]
    assert set(controls) == {"repeated_frame", "shuffled_frames"}  # the record says both


def test_clip_codes_follow_the_hooks_own_layout_on_a_shrinking_grid():
    """MViT's later stages pool the grid: codes there have that stage's patch count."""
    import prisma_mm
    from prisma_mm.analysis.motion import clip_codes
    from prisma_mm.sae import TopKSAE

    model = prisma_mm.load_model("tiny-mvit")
    hook = f"blocks.{model.n_layers - 1}.hook_resid_post"
    layout = model.layout_for(hook)
    assert layout.n_patches < model.layout.n_patches  # the stage really is smaller
    clips = np.random.default_rng(0).integers(
        0, 256, (2, model.spec.frames, *model.layout.input_size, 3), dtype=np.uint8
    )
    _, cache = model.run_with_cache(model.preprocess(list(clips)), hook)
    sae = TopKSAE(d_in=cache[hook].shape[-1], n_latents=8, k=2)
    codes = clip_codes(model, sae, hook, clips)
    assert codes.shape == (2, layout.n_patches, 8)
    expected = sae.encode(cache[hook][:, layout.n_prefix :].reshape(-1, cache[hook].shape[-1]))
    assert torch.allclose(codes.sum(), expected.detach().sum(), rtol=1e-4)
