"""model.preprocess: every image mode and container becomes the model's normalized batch,
through the library's own transform for the card."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import prisma_mm
from prisma_mm import PrismaError


@pytest.fixture(scope="module")
def vit():
    return prisma_mm.load_model("tiny-vit", weights=None)


def _rgb(seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def test_matches_timm_transform_on_rgb(vit):
    image = Image.fromarray(_rgb())
    config = resolve_data_config({}, model=vit.module)
    config["input_size"] = (3, 32, 32)
    expected = create_transform(**config, is_training=False)(image)
    batch = vit.preprocess([image, image])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0], expected)


def test_every_mode_converts(vit):
    rgb = _rgb()
    gray = rgb[..., 0]
    modes = {
        "L": Image.fromarray(gray),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "LA": Image.fromarray(gray).convert("LA"),
    }
    reference_gray = vit.preprocess(Image.fromarray(gray).convert("RGB"))
    for mode, image in modes.items():
        assert image.mode == mode
        batch = vit.preprocess(image)
        assert batch.shape == (1, 3, 32, 32), mode
        assert torch.isfinite(batch).all()
    # opaque RGBA equals its RGB; 16-bit gray scaled to 8 bits equals the 8-bit gray
    assert torch.equal(vit.preprocess(modes["RGBA"]), vit.preprocess(Image.fromarray(rgb)))
    assert torch.equal(vit.preprocess(modes["I;16"]), reference_gray)
    assert torch.equal(vit.preprocess(modes["L"]), reference_gray)


def test_transparent_pixels_become_white(vit):
    clear = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.equal(vit.preprocess(clear), vit.preprocess(white))


def test_arrays_and_tensors(vit):
    rgb = _rgb(1)
    reference = vit.preprocess(Image.fromarray(rgb))
    chw_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    same = [rgb, torch.from_numpy(rgb).permute(2, 0, 1), chw_float, (rgb.astype(np.uint16) * 257)]
    for item in same:
        assert torch.equal(vit.preprocess(item), reference), type(item)
    batch = vit.preprocess(torch.stack([chw_float, chw_float]))
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], reference[0])
    gray_hw1 = rgb[..., :1]
    assert vit.preprocess(gray_hw1).shape == (1, 3, 32, 32)


def test_bad_images(vit):
    with pytest.raises(PrismaError, match="expected HW, HWC"):
        vit.preprocess(np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(PrismaError, match="cannot read an image from a dict"):
        vit.preprocess({"a": 1})
    with pytest.raises(PrismaError, match="no images"):
        vit.preprocess([])


def test_open_clip_transform_used_for_clip_cards():
    import open_clip

    clip = prisma_mm.load_model("tiny-clip", weights=None)
    image = Image.fromarray(_rgb(2, (50, 70)))
    expected = open_clip.image_transform(32, is_train=False)(image)
    assert torch.equal(clip.preprocess(image)[0], expected)


def test_missing_corrupt_and_directory_paths_are_prisma_errors(vit, tmp_path):
    with pytest.raises(PrismaError, match="does not exist"):
        vit.preprocess(str(tmp_path / "nope.jpg"))
    with pytest.raises(PrismaError, match="is not a file"):
        vit.preprocess(tmp_path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    with pytest.raises(PrismaError, match="corrupt.jpg: OSError"):
        vit.preprocess([corrupt])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(PrismaError, match="empty file"):
        vit.preprocess(empty)
    good = tmp_path / "good.png"
    Image.fromarray(_rgb()).save(good)
    assert vit.preprocess([good, str(good)]).shape == (2, 3, 32, 32)
