"""Caching activations from videos: one sample per clip window with its file and frames as
provenance, bad videos skipped with reasons, decoding in DataLoader workers, list files and
webdataset shards of videos, and a SIGKILLed run that resumes to the uninterrupted cache."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import kill_when, read_samples
from video_helpers import frame_index, write_video

from prisma_mm.cache import read_manifest, verify_cache, write_cache
from prisma_mm.data.video import parse_clip_source, parse_sampling, read_frames
from prisma_mm.errors import PrismaError

HOOK = "blocks.0.hook_resid_post"
CARD = "tiny-videomae"  # 4 frames of 32 px
CLIP = "windows:4:2:3"  # span 7, a new window every 3 frames
OPTIONS = {"dtype": "float32", "batch_size": 3, "shard_size": 4, "progress": False}
# good videos: name -> frames (first frame index drawn: 100 * k, so every clip is distinct)
GOOD = {"a.mp4": 16, "b.mkv": 10, "sub/c.webm": 13}


@pytest.fixture(scope="module")
def model():
    from prisma_mm.zoo.registry import load_model

    torch.set_num_threads(1)
    return load_model(CARD, weights=None, seed=0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    write_video(root / "a.mp4", 16, options={"bf": "2", "g": "6"}, first=0)
    write_video(root / "b.mkv", 10, "ffv1", pix_fmt="bgr0", first=100)
    write_video(root / "sub/c.webm", 13, "libvpx-vp9", options={"g": "5"}, first=200)
    write_video(root / "short.mp4", 5, first=300)  # shorter than one clip (span 7)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "empty.avi").write_bytes(b"")
    (root / "notes.txt").write_text("not a video")
    return root


def _windows(n: int) -> list[list[int]]:
    return parse_sampling(CLIP).windows(n)


def test_a_folder_gives_one_sample_per_window_with_file_and_frames(model, videos, tmp_path):
    manifest = write_cache(model, videos, tmp_path / "cache", HOOK, clip=CLIP, workers=2,
                           **OPTIONS)  # fmt: skip
    expected = {(str(videos / name), tuple(w)) for name, n in GOOD.items() for w in _windows(n)}
    assert manifest["n_samples"] == len(expected) == 4 + 2 + 3
    assert manifest["source"]["type"] == "video-folder"
    assert manifest["source"]["clip"] == CLIP and manifest["source"]["n_videos"] == 6
    samples = read_samples(tmp_path / "cache")
    got = {}
    for sample in samples.values():
        path, frames = parse_clip_source(sample["meta"]["source"])
        got[(path, tuple(frames))] = sample[HOOK]
    assert set(got) == expected
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"short.mp4", "corrupt.mp4", "empty.avi"}
    assert "5 frame(s), shorter than one clip" in reasons["short.mp4"]
    assert "not a readable video" in reasons["corrupt.mp4"]
    assert "empty file (0 bytes)" in reasons["empty.avi"]
    # a sample holds the activations of exactly the frames its provenance names
    path, frames = str(videos / "sub/c.webm"), (3, 5, 7, 9)
    clip = read_frames(path, frames)
    assert [frame_index(f) for f in clip] == [200 + i for i in frames]
    with torch.inference_mode():
        _, cache = model.run_with_cache(model.preprocess([clip]), [HOOK])
    np.testing.assert_allclose(got[(path, frames)], cache[HOOK][0].numpy(), atol=1e-5)


def test_decoding_in_workers_gives_the_main_process_cache(model, videos, tmp_path):
    one = write_cache(model, videos, tmp_path / "w0", HOOK, clip=CLIP, workers=0, **OPTIONS)
    two = write_cache(model, videos, tmp_path / "w2", HOOK, clip=CLIP, workers=2, **OPTIONS)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["skipped"] == two["skipped"]


def test_a_list_file_and_tar_shards_of_videos(model, videos, tmp_path):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two videos\n{videos / 'a.mp4'}\nmissing.mp4\n")
    listed = write_cache(model, str(listing), tmp_path / "list", HOOK, clip="uniform:4",
                         workers=0, **OPTIONS)  # fmt: skip
    assert listed["source"]["type"] == "video-list"
    assert listed["n_samples"] == 1 and listed["n_skipped"] == 1
    assert "file not found" in listed["skipped"][0]["reason"]

    for shard, (key, name, label) in enumerate((("clip-a", "a.mp4", 3), ("clip-b", "b.mkv", 7))):
        with tarfile.open(tmp_path / f"videos-{shard:03d}.tar", "w") as tar:
            # a json member first: a video shard is recognised by any of its first members
            for ext, data in (("json", b"{}"), (name.rsplit(".", 1)[1], (videos / name).read_bytes()),
                              ("cls", str(label).encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pattern = str(tmp_path / "videos-{000..001}.tar")
    manifest = write_cache(model, pattern, tmp_path / "tar", HOOK, clip=CLIP, workers=2,
                           order_seed=None, **OPTIONS)  # fmt: skip
    assert manifest["source"]["type"] == "video-tar"
    metas = [s["meta"] for s in read_samples(tmp_path / "tar").values()]
    got = sorted((m["label"], parse_clip_source(m["source"])[1]) for m in metas)
    assert got == sorted([(3, w) for w in _windows(16)] + [(7, w) for w in _windows(10)])
    assert {m["source"].split("#f=")[0] for m in metas} == {
        f"{tmp_path}/videos-000.tar#clip-a",
        f"{tmp_path}/videos-001.tar#clip-b",
    }


def test_clips_of_another_length_than_the_model_takes_are_refused_before_work(model, videos,
                                                                               tmp_path):  # fmt: skip
    with pytest.raises(PrismaError, match="clips of 8 frames but the model takes 4"):
        write_cache(model, videos, tmp_path / "c", HOOK, clip="uniform:8", **OPTIONS)
    assert not (tmp_path / "c").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"garbage")
    with pytest.raises(PrismaError, match="all 1 inputs were skipped"):
        write_cache(model, bad, tmp_path / "c2", HOOK, clip=CLIP, **OPTIONS)


SCRIPT = """
import torch
torch.set_num_threads(1)
from prisma_mm.cache import write_cache
from prisma_mm.zoo.registry import load_model
model = load_model({card!r}, weights=None, seed=0)
write_cache(model, {data!r}, {out!r}, {hook!r}, clip={clip!r}, workers=0, **{options!r})
"""


def _n_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_video_cache_resumes_to_the_uninterrupted_one(model, tmp_path):
    data = tmp_path / "many"
    data.mkdir()
    for k in range(4):
        write_video(data / f"v{k}.mp4", 20, options={"bf": "2", "g": "8"}, first=50 * k)
    clip = "windows:4:1:1"  # 17 overlapping windows per video: 68 clips, 34 shards
    options = {**OPTIONS, "batch_size": 1, "shard_size": 2}
    reference = write_cache(model, data, tmp_path / "reference", HOOK, clip=clip, workers=0,
                            **options)  # fmt: skip
    out = tmp_path / "killed"
    script = SCRIPT.format(card=CARD, data=str(data), out=str(out), hook=HOOK, clip=clip,
                           options=options)  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    kill_when(process, lambda: _n_shards(out) >= 3, "the video cache writer")
    done = _n_shards(out)
    assert 3 <= done < reference["n_shards"] and verify_cache(out).ok
    final = write_cache(model, data, out, HOOK, clip=clip, workers=2, **options)
    assert final["complete"] and final["n_samples"] == reference["n_samples"] == 68
    assert [s["sha256"] for s in final["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert read_manifest(out)["inputs_done"] == 68


def test_clips_in_memory_are_cached_as_given(model, tmp_path):
    from video_helpers import pattern

    from prisma_mm.data.video import ClipArraySource

    raw = [np.stack([pattern(10 * k + t) for t in range(4)]) for k in range(3)]
    prepared = [model.preprocess([clip])[0] for clip in raw]  # float [3, T, H, W]
    items = [(raw[0], 5), {"clip": raw[1], "label": 6}, (prepared[2], 7)]
    manifest = write_cache(model, ClipArraySource(items, name="clips"), tmp_path / "mem", HOOK,
                           workers=0, order_seed=None, **OPTIONS)  # fmt: skip
    assert manifest["n_samples"] == 3 and manifest["n_skipped"] == 0
    samples = sorted(read_samples(tmp_path / "mem").values(), key=lambda s: s["meta"]["index"])
    assert [s["meta"]["label"] for s in samples] == [5, 6, 7]
    assert [s["meta"]["source"] for s in samples] == ["clips[0]", "clips[1]", "clips[2]"]
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.stack(prepared), [HOOK])
    for k, sample in enumerate(samples):
        np.testing.assert_allclose(sample[HOOK], cache[HOOK][k].numpy(), atol=1e-5)
    with pytest.raises(PrismaError, match="holds clips already; drop --clip"):
        write_cache(model, ClipArraySource(items), tmp_path / "c", HOOK, clip="uniform:4",
                    **OPTIONS)  # fmt: skip


def test_two_parts_of_a_video_cache_merge_to_the_one_process_cache(model, videos, tmp_path):
    one = write_cache(model, videos, tmp_path / "one", HOOK, clip=CLIP, workers=0, **OPTIONS)
    for part in ("0/2", "1/2"):
        merged = write_cache(model, videos, tmp_path / "parts", HOOK, clip=CLIP, workers=0,
                             part=part, **OPTIONS)  # fmt: skip
    assert merged["complete"] and len(merged["parts"]) == 2
    assert merged["n_samples"] == one["n_samples"] and merged["n_skipped"] == one["n_skipped"]
    single, parted = read_samples(tmp_path / "one"), read_samples(tmp_path / "parts")
    assert set(single) == set(parted)
    for key, sample in single.items():
        assert sample["meta"]["source"] == parted[key]["meta"]["source"]
        np.testing.assert_allclose(sample[HOOK], parted[key][HOOK], atol=1e-5)
