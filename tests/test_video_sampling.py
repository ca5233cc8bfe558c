"""Clip sampling rules, pinned to hand-computed frame indices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prisma_mm.data.video import ClipSampling, clip_source, parse_clip_source, parse_sampling
from prisma_mm.errors import PrismaError


def test_uniform_takes_the_middle_of_equal_segments():
    sampling = parse_sampling("uniform:4")
    # segments of 7.5 frames: middles 3.75, 11.25, 18.75, 26.25 -> floor
    assert sampling.windows(30) == [[3, 11, 18, 26]]
    assert sampling.windows(4) == [[0, 1, 2, 3]]
    # a video shorter than the clip repeats frames (the rule, not a skip)
    assert sampling.windows(2) == [[0, 0, 1, 1]]
    assert sampling.windows(0) == []


def test_fixed_stride_is_one_clip_from_the_middle():
    sampling = parse_sampling("stride:4:3")
    assert sampling.span == 10
    assert sampling.windows(20) == [[5, 8, 11, 14]]  # (20 - 10) // 2 = 5
    assert sampling.windows(10) == [[0, 3, 6, 9]]
    assert sampling.windows(9) == []


def test_sliding_windows_overlap_by_the_hop():
    overlapping = parse_sampling("windows:3:2:2")  # span 5, a new window every 2 frames
    assert overlapping.windows(9) == [[0, 2, 4], [2, 4, 6], [4, 6, 8]]
    tiled = parse_sampling("windows:3:2")  # hop = span: no overlap, the tail is dropped
    assert tiled.windows(11) == [[0, 2, 4], [5, 7, 9]]
    assert tiled.windows(4) == []


def test_pad_repeats_the_last_frame_of_a_short_video():
    sampling = parse_sampling("windows:4:2+pad")
    assert sampling.pad and sampling.windows(4) == [[0, 2, 3, 3]]
    assert parse_sampling("stride:3:1+pad").windows(1) == [[0, 0, 0]]
    assert "add +pad" in parse_sampling("windows:4:2").short_reason(4)


def test_the_card_sampling_reads_frames_and_frame_stride():
    card = SimpleNamespace(name="tiny", preprocess={"frames": 4, "frame_stride": 2, "resize": 32})
    sampling = parse_sampling("card", card)
    assert sampling == ClipSampling("windows", 4, 2)
    assert sampling.windows(16) == [[0, 2, 4, 6], [7, 9, 11, 13]]
    with pytest.raises(PrismaError, match="card 'bare' gives no clip sampling"):
        parse_sampling("card", SimpleNamespace(name="bare", preprocess={}))


def test_specs_round_trip_and_bad_specs_are_one_line():
    for spec in ("uniform:8", "stride:16:4", "windows:16:4:8", "windows:2:1:2+pad"):
        assert parse_sampling(spec).spec() == spec
    assert parse_sampling("windows:16:4").spec() == "windows:16:4:61"
    for bad, fragment in (
        ("random:4", "use uniform:T"),
        ("uniform", "use uniform:T"),
        ("stride:4", "use uniform:T"),
        ("windows:4:0", "positive integers"),
        ("uniform:-2", "positive integers"),
        ("card:3", "use uniform:T"),
    ):
        with pytest.raises(PrismaError, match=fragment):
            parse_sampling(bad)


def test_clip_provenance_round_trips():
    source = clip_source("/data/a#b.mp4", [0, 2, 4])
    assert source == "/data/a#b.mp4#f=0,2,4"
    assert parse_clip_source(source) == ("/data/a#b.mp4", [0, 2, 4])
    with pytest.raises(PrismaError, match="names no frames"):
        parse_clip_source("/data/a.mp4")
