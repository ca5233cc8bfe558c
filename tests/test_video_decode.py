"""Every backend against tricky files the tests write themselves: each frame draws its own
index, so a read says which frame it returned. PyAV (the default) must be exact on all of
them; decord is routed only where it is measured exact, and the measured table is pinned."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from video_helpers import VFR_PTS, frame_index, pattern, tricky_files, write_video

from prisma_mm.data import video as video_module
from prisma_mm.data.video import (
    DECODERS,
    BadVideo,
    choose_backend,
    decord_exact,
    probe_video,
    read_frames,
)
from prisma_mm.errors import PrismaError

# What each backend returned on each file (docs/video.md, "Decoding and sampling"):
# exact = every frame right in any order, wrong = some frame silently wrong, error = refused.
MEASURED = {
    "pyav": dict.fromkeys(
        [
            "h264-mp4",
            "open-gop-mp4",
            "mpeg-ts",
            "avi-bframes",
            "avi-h264-bframes",
            "avi-h264-open-gop",
            "ffv1-mkv",
            "av1-mp4",
            "vp9-webm-no-cues",
            "vp8-webm-no-cues",
            "vfr-mp4",
            "truncated-mp4",
        ],
        "exact",
    ),  # fmt: skip
    "decord": {
        "h264-mp4": "exact",
        "open-gop-mp4": "wrong",
        "mpeg-ts": "wrong",
        "avi-bframes": "wrong",
        "avi-h264-bframes": "wrong",
        "avi-h264-open-gop": "wrong",
        "ffv1-mkv": "exact",
        "av1-mp4": "error",
        "vp9-webm-no-cues": "error",
        "vp8-webm-no-cues": "error",
        "vfr-mp4": "exact",
        "truncated-mp4": "error",
    },
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tricky_files(tmp_path_factory.mktemp("tricky"))


def _requests(n: int, seed: int) -> list[list[int]]:
    """Single frames in a shuffled order, then clips with repeats and jumps backwards."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    clips = [sorted(rng.sample(range(n), 4)) for _ in range(3)]
    return [[i] for i in order] + clips + [[n - 1, 0, n // 2, n // 2, 1]]


def _verdict(backend: str, index, n: int) -> str:
    try:
        for frames in _requests(n, seed=n):
            got = DECODERS[backend].read(index, frames)
            if [frame_index(f) for f in got] != frames:
                return "wrong"
    except BadVideo:
        return "error"
    return "exact"


def test_the_index_counts_the_frames_a_correct_reader_finds(files):
    for name, (path, n_frames) in files.items():
        index = probe_video(path)
        assert index.n_frames == n_frames, name
        assert list(index.pts) == sorted(index.pts), name
        assert index.keyframes[0] == 0, name
    # the structures the test set is meant to have
    assert probe_video(files["open-gop-mp4"][0]).open_gop
    assert probe_video(files["mpeg-ts"][0]).open_gop
    assert not probe_video(files["h264-mp4"][0]).open_gop
    assert probe_video(files["truncated-mp4"][0]).truncated
    assert len(probe_video(files["open-gop-mp4"][0]).keyframes) == 4
    # H.264 in AVI: timestamps in decode order, frames counted from IDR keyframes only
    closed = probe_video(files["avi-h264-bframes"][0])
    opened = probe_video(files["avi-h264-open-gop"][0])
    assert (closed.mode, closed.keyframes, closed.open_gop) == ("counted", (0, 8, 16), False)
    assert (opened.mode, opened.keyframes, opened.open_gop) == ("counted", (0,), True)
    # MPEG-4 Part 2 in AVI: FFmpeg restores presentation timestamps from the frame types
    assert probe_video(files["avi-bframes"][0]).mode == "pts"


def test_each_backend_is_as_exact_as_the_documented_table(files):
    measured = {
        backend: {
            name: _verdict(backend, probe_video(path), n) for name, (path, n) in files.items()
        }
        for backend in MEASURED
    }
    assert measured == MEASURED


def test_auto_routes_decord_only_where_it_was_measured_exact(files):
    for name, (path, _) in files.items():
        index = probe_video(path)
        chosen = choose_backend(index)
        assert chosen == ("decord" if decord_exact(index) else "pyav"), name
        if chosen == "decord":
            assert MEASURED["decord"][name] == "exact", name
            # the same pixels as PyAV: a fallback or a resume with --video-backend pyav
            # writes the same activations
            frames = list(range(0, index.n_frames, 3))
            np.testing.assert_array_equal(
                DECODERS["decord"].read(index, frames), DECODERS["pyav"].read(index, frames)
            )
    routed = {
        name for name, (path, _) in files.items() if choose_backend(probe_video(path)) == "decord"
    }
    assert routed == {"h264-mp4", "ffv1-mkv", "vfr-mp4"}


def test_auto_reads_every_file_exactly(files):
    for name, (path, n) in files.items():
        for frames in _requests(n, seed=1)[-4:]:
            got = read_frames(path, frames)
            assert [frame_index(f) for f in got] == frames, name


def test_a_failing_decord_read_falls_back_to_pyav(files, monkeypatch):
    calls = []

    def broken(self, index, frames):
        calls.append(list(frames))
        raise BadVideo(f"{index.name}: decord failed (simulated)")

    monkeypatch.setattr(video_module.DecordDecoder, "read", broken)
    path, _ = files["h264-mp4"]
    got = read_frames(path, [5, 17, 2])
    assert calls == [[5, 17, 2]]
    assert [frame_index(f) for f in got] == [5, 17, 2]


def test_any_decord_failure_falls_back_to_pyav(files, monkeypatch):
    import decord

    def crash(*args, **kwargs):
        raise RuntimeError("simulated decord crash")

    monkeypatch.setattr(decord, "VideoReader", crash)
    got = read_frames(files["ffv1-mkv"][0], [7, 1])
    assert [frame_index(f) for f in got] == [7, 1]


def test_lossless_frames_come_back_bit_exact_from_pyav_and_decord(files):
    path, n = files["ffv1-mkv"]
    index = probe_video(path)
    frames = [13, 0, 19, 12, 11]
    expected = np.stack([pattern(i) for i in frames])
    for backend in ("pyav", "decord"):
        got = DECODERS[backend].read(index, frames)
        assert got.dtype == np.uint8 and got.shape == (5, 32, 32, 3), backend
        np.testing.assert_array_equal(got, expected, err_msg=backend)


def test_variable_frame_rate_frames_are_located_by_timestamp(files):
    index = probe_video(files["vfr-mp4"][0])
    assert index.times(range(index.n_frames)) == pytest.approx([t / 1000 for t in VFR_PTS])
    # frames 10 and 16 follow long gaps: frame-rate arithmetic would land elsewhere
    got = read_frames(index, [10, 16, 3], backend="pyav")
    assert [frame_index(f) for f in got] == [10, 16, 3]


def test_a_seek_that_lands_after_its_keyframe_decodes_from_the_start(files):
    index = probe_video(files["open-gop-mp4"][0])
    # seek targets past the last keyframe: every seek lands too late and is detected
    late = dataclasses.replace(index, key_seek=tuple([index.pts[-1] * 2] * len(index.keyframes)))
    got = DECODERS["pyav"].read(late, [9, 3, 27])
    assert [frame_index(f) for f in got] == [9, 3, 27]
    # a keyframe that never comes by after the seek (no packet has its timestamp)
    never = dataclasses.replace(index, key_dts=tuple([10**12] * len(index.keyframes)))
    got = DECODERS["pyav"].read(never, [9, 3, 27])
    assert [frame_index(f) for f in got] == [9, 3, 27]


def test_frames_counted_in_decoder_order_when_timestamps_are_unusable(files):
    index = probe_video(files["avi-bframes"][0])
    counted = dataclasses.replace(index, mode="sequential", pts=tuple(range(index.n_frames)))
    got = DECODERS["pyav"].read(counted, [23, 4, 9])
    assert [frame_index(f) for f in got] == [23, 4, 9]


def test_rotation_metadata_is_applied_and_keeps_decord_away(tmp_path):
    path = write_video(tmp_path / "rotated.mkv", 4, "ffv1", pix_fmt="bgr0", size=(32, 48),
                       rotation=90)  # fmt: skip
    index = probe_video(path)
    assert (index.rotation, index.width, index.height) == (90, 32, 48)
    assert choose_backend(index) == "pyav"
    got = read_frames(index, [2, 0])
    assert got.shape == (2, 48, 32, 3)
    np.testing.assert_array_equal(got[0], np.rot90(pattern(2, 32, 48)))


def test_odd_dimensions_and_odd_frame_rates_decode(tmp_path):
    from fractions import Fraction

    path = write_video(tmp_path / "odd.mkv", 6, "ffv1", pix_fmt="bgr0", size=(33, 35),
                       rate=Fraction(30000, 1001))  # fmt: skip
    index = probe_video(path)
    assert (index.n_frames, index.height, index.width) == (6, 33, 35)
    assert index.fps == pytest.approx(30000 / 1001, rel=1e-3)
    np.testing.assert_array_equal(read_frames(index, [4])[0], pattern(4, 33, 35))


def test_bytes_decode_like_the_file(files):
    path, _ = files["mpeg-ts"]
    index = probe_video(path.read_bytes(), name="open.ts")
    assert index.n_frames == 30
    assert [frame_index(f) for f in read_frames(index, [29, 7, 8])] == [29, 7, 8]


def test_requests_outside_the_video_and_unknown_backends_are_one_line(files):
    path, _ = files["h264-mp4"]
    with pytest.raises(BadVideo, match="frame 24 is outside 0..23"):
        read_frames(path, [3, 24])
    with pytest.raises(PrismaError, match="unknown video backend 'ffmpeg'"):
        read_frames(path, [0], backend="ffmpeg")


def test_torchcodec_exact_mode_is_exact_on_every_file(files):
    reason = video_module.TorchCodecDecoder.unavailable()
    if reason is not None:
        pytest.skip(reason)
    for name, (path, n) in files.items():
        assert _verdict("torchcodec", probe_video(path), n) == "exact", name


def test_an_audio_stream_before_the_video_changes_nothing(tmp_path):
    import av

    path = tmp_path / "with-audio.mp4"
    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=16000)  # stream 0: audio
        video = out.add_stream("libx264", rate=25, options={"bf": "2", "g": "8"})
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        for i in range(20):
            for packet in video.encode(av.VideoFrame.from_ndarray(pattern(i), format="rgb24")):
                out.mux(packet)
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 640), np.float32), format="fltp",
                                               layout="mono")  # fmt: skip
            sound.sample_rate, sound.pts = 16000, 640 * i
            for packet in audio.encode(sound):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                out.mux(packet)
    index = probe_video(path)
    assert index.n_frames == 20
    for backend in ("pyav", "auto"):
        got = read_frames(index, [19, 3, 11], backend)
        assert [frame_index(f) for f in got] == [19, 3, 11], backend


def test_data_strings_open_video_sources_only_for_videos(tmp_path):
    from PIL import Image

    from prisma_mm.data.sources import FolderSource, open_source
    from prisma_mm.data.video import VideoFolderSource, VideoListSource

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    Image.new("RGB", (8, 8)).save(images / "b.gif")  # a GIF is an image here
    assert type(open_source(str(images))) is FolderSource
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "v.mp4", 4)
    assert type(open_source(str(videos))) is VideoFolderSource
    listing = tmp_path / "list.txt"
    listing.write_text("videos/v.mp4\n")
    assert type(open_source(str(listing))) is VideoListSource
    assert open_source(str(videos)).sample("uniform:2").record(0).label is None
    # a class tree root/<class>/<video> labels clips with their class folder
    tree = tmp_path / "kinetics"
    for name in ("dancing", "archery"):
        (tree / name).mkdir(parents=True)
        write_video(tree / name / "x.mp4", 4)
    source = open_source(str(tree)).sample("uniform:2")
    assert source.describe()["classes"] == ["archery", "dancing"]
    assert [source.record(i).label for i in range(2)] == ["archery", "dancing"]


def test_counted_avi_frames_seek_to_idr_keyframes_without_decoding_from_the_start(
    files, monkeypatch
):
    def from_the_start(*args):
        raise AssertionError("decoded from the start")

    monkeypatch.setattr(video_module.PyAVDecoder, "_sequential", staticmethod(from_the_start))
    index = probe_video(files["avi-h264-bframes"][0])
    got = DECODERS["pyav"].read(index, [20, 9, 17, 16])
    assert [frame_index(f) for f in got] == [20, 9, 17, 16]
