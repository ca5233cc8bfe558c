"""Image sources for the cache writer: folder, list file, tar shards (brace patterns, URLs),
class-folder tree, torch Dataset; stable keys; bad inputs skipped, odd modes converted."""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest
import torch
from cache_helpers import image_folder, random_image, read_samples, seeded_tiny_vit
from PIL import Image

from prisma_mm.cache import write_cache
from prisma_mm.data import sources
from prisma_mm.data.images import BadImage
from prisma_mm.data.sources import (
    ClassFolderSource,
    FolderSource,
    Labeled,
    ListSource,
    Source,
    TarSource,
    TorchDatasetSource,
    open_source,
    register_source,
)
from prisma_mm.errors import PrismaError


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _records(source):
    return [record for record, _ in source.stream()]


def test_folder_is_recursive_over_every_format_with_stable_keys(tmp_path):
    root = tmp_path / "images"
    names = ["a.jpg", "b.png", "deep/c.webp", "deep/er/d.bmp", "e.tiff", "f.TIF", "g.JPEG"]
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(i).save(path)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    source = open_source(str(root))
    assert isinstance(source, FolderSource) and source.random_access
    relative = sorted(names)
    assert source.count() == len(names) and source.ignored == 1
    records = _records(source)
    assert [r.index for r in records] == list(range(len(names)))
    assert [r.key for r in records] == [sha1(n) for n in relative]
    assert all(source.load(i).mode == "RGB" for i in range(len(names)))
    # keys are the relative path's hash: moving the folder keeps them
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert [r.key for r in _records(FolderSource(moved))] == [r.key for r in records]
    assert source.describe() == {"type": "folder", "root": str(root.resolve()), "count": 7}


def test_list_file_paths_comments_duplicates_and_missing(tmp_path):
    paths = image_folder(tmp_path / "imgs", 3, nested=False)
    listing = tmp_path / "files.txt"
    listing.write_text(
        f"# images\nimgs/{paths[0].name}\n\n{paths[1]}\nimgs/{paths[0].name}\nimgs/gone.png\n"
    )
    source = open_source(str(listing))
    assert isinstance(source, ListSource) and source.count() == 4
    records = _records(source)
    first = f"imgs/{paths[0].name}"
    assert [r.key for r in records] == [
        sha1(first),
        sha1(str(paths[1])),
        sha1(first + "#2"),
        sha1("imgs/gone.png"),
    ]
    assert np.array_equal(np.asarray(source.load(0)), np.asarray(source.load(2)))
    with pytest.raises(BadImage, match="file not found"):
        source.load(3)


def test_class_folder_tree_labels_are_class_names(tmp_path):
    root = tmp_path / "train"
    for c, name in enumerate(["n02", "n01"]):
        for i in range(2):
            (root / name).mkdir(parents=True, exist_ok=True)
            random_image(10 * c + i).save(root / name / f"x{i}.jpg")
    source = open_source(str(root))
    assert isinstance(source, ClassFolderSource)
    assert source.classes == ["n01", "n02"]
    records = _records(source)
    assert [r.label for r in records] == ["n01", "n01", "n02", "n02"]
    assert records[0].key == sha1("n01/x0.jpg")
    # an explicit prefix opens the same tree as a plain folder (no labels)
    plain = open_source(f"folder:{root}")
    assert isinstance(plain, FolderSource) and {r.label for r in _records(plain)} == {None}
    with pytest.raises(PrismaError, match="no class sub-folders"):
        ClassFolderSource(root / "n01")


def _tar_shards(tmp_path, n_shards=2, per_shard=3):
    from webdataset import TarWriter

    shards = []
    for s in range(n_shards):
        path = tmp_path / f"train-{s:03d}.tar"
        with TarWriter(str(path), encoder=False) as writer:
            for i in range(per_shard):
                buffer = io.BytesIO()
                fmt = "JPEG" if i % 2 else "PNG"
                random_image(100 * s + i).save(buffer, format=fmt)
                member = "jpg" if i % 2 else "png"
                writer.write(
                    {"__key__": f"s{i:04d}", member: buffer.getvalue(), "cls": str(s + i).encode()}
                )
        shards.append(path)
    return shards


def test_tar_shards_by_brace_pattern_and_by_url(tmp_path):
    shards = _tar_shards(tmp_path)
    pattern = str(tmp_path / "train-{000..001}.tar")
    source = open_source(pattern)
    assert isinstance(source, TarSource) and not source.random_access
    assert source.count() == 6
    loaded = [(record, load()) for record, load in source.stream()]
    assert [r.index for r, _ in loaded] == list(range(6))
    assert [r.label for r, _ in loaded] == [0, 1, 2, 1, 2, 3]
    assert loaded[4][0].key == sha1("train-001.tar/s0001")
    assert loaded[4][0].source == f"{shards[1]}#s0001"
    assert all(image.mode == "RGB" and image.size == (40, 40) for _, image in loaded)
    # the same shards through URLs webdataset opens: file: and pipe:
    for spec in (
        f"file:{shards[0]}::file:{shards[1]}",
        f"pipe:cat {shards[0]}::pipe:cat {shards[1]}",
    ):
        other = open_source(spec)
        assert isinstance(other, TarSource)
        assert [r.key for r in _records(other)] == [r.key for r, _ in loaded]
    assert open_source(f"pipe:cat {shards[0]}").count() is None  # unknown without reading
    with pytest.raises(PrismaError, match="does not exist"):
        open_source(str(tmp_path / "train-{000..002}.tar"))


def test_tar_sample_without_image_and_damaged_shard_are_skipped(tmp_path):
    from webdataset import TarWriter

    path = tmp_path / "odd.tar"
    with TarWriter(str(path), encoder=False) as writer:
        writer.write({"__key__": "a", "txt": b"caption only"})
        buffer = io.BytesIO()
        random_image(0).save(buffer, format="PNG")
        writer.write({"__key__": "b", "png": buffer.getvalue()})
    good = path.read_bytes()
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(good[:700])  # header of "a", then garbage where "b" should be
    loads = list(TarSource(str(path)).stream())
    with pytest.raises(BadImage, match="no image member"):
        loads[0][1]()
    assert loads[1][1]().size == (40, 40)
    records = list(TarSource(str(damaged)).stream())
    with pytest.raises(BadImage, match="unreadable tar shard|no image member"):
        for _, load in records:
            load()


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        image = np.asarray(random_image(i))
        return (image, torch.tensor(i + 5)) if i < 2 else {"image": image, "label": "cat"}


def test_torch_dataset_items_and_labels():
    source = open_source(Pairs())
    assert isinstance(source, TorchDatasetSource)
    assert source.describe() == {"type": "dataset", "class": "Pairs", "count": 3}
    assert source.record(1).key == sha1("Pairs[1]")
    loaded = [source.load(i) for i in range(3)]
    assert all(isinstance(item, Labeled) for item in loaded)
    assert [item.label for item in loaded] == [5, 6, "cat"]
    with pytest.raises(PrismaError, match="not a map-style Dataset"):
        open_source(object())


def test_open_source_errors_and_registry(tmp_path, monkeypatch):
    with pytest.raises(PrismaError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))
    image = tmp_path / "one.png"
    random_image(0).save(image)
    with pytest.raises(PrismaError, match="single image"):
        open_source(str(image))

    class Prompts(Source):
        kind = "prompt"

        def __init__(self, spec):
            self.lines = spec.split("|")

        def describe(self):
            return {"type": "prompts", "count": len(self.lines)}

        def count(self):
            return len(self.lines)

    # the registry is process-wide: this test's source must not outlive it
    monkeypatch.setattr(sources, "_FACTORIES", dict(sources._FACTORIES))
    monkeypatch.setattr(sources, "_DETECTORS", list(sources._DETECTORS))
    register_source("said", Prompts, detect=lambda spec: spec.startswith("say|"))
    assert open_source("said:a|b").count() == 2
    assert open_source("say|x|y").count() == 3
    # prompts are generated from by a diffusion card: an image model refuses them in one line
    with pytest.raises(PrismaError, match="caching from prompts needs a diffusion card"):
        write_cache("tiny-vit", "said:a|b", tmp_path / "out", "blocks.0.hook_resid_post")


def _bad_and_odd_images(root):
    """Four unreadable files and five images in unusual modes."""
    root.mkdir()
    jpeg = io.BytesIO()
    random_image(1, size=64).save(jpeg, format="JPEG")
    (root / "a_corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "b_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "c_empty.png").write_bytes(b"")
    (root / "d_text.png").write_text("this is not a picture")
    random_image(2, mode="L").save(root / "e_gray.png")
    random_image(3, mode="RGBA").save(root / "f_rgba.png")
    palette = random_image(4).convert("P")
    palette.save(root / "g_palette.png", transparency=0)
    random_image(5).convert("CMYK").save(root / "h_cmyk.jpg")
    deep = np.random.default_rng(6).integers(0, 65535, (40, 40), dtype=np.uint16)
    Image.fromarray(deep).save(root / "i_16bit.png")


def test_bad_inputs_are_skipped_with_reasons_and_odd_modes_converted(tmp_path):
    from prisma_mm.data.images import load_image

    root = tmp_path / "mixed"
    _bad_and_odd_images(root)
    assert Image.open(root / "h_cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "i_16bit.png").mode.startswith("I")
    model = seeded_tiny_vit()
    manifest = write_cache(
        model, str(root), tmp_path / "out", "blocks.1.hook_resid_post", dtype="float32",
        workers=2, batch_size=3, shard_size=4, progress=False,
    )  # fmt: skip
    assert manifest["n_samples"] == 5 and manifest["n_skipped"] == 4
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"a_corrupt.jpg", "b_truncated.jpg", "c_empty.png", "d_text.png"}
    assert "cannot identify image" in reasons["a_corrupt.jpg"]
    assert "truncated" in reasons["b_truncated.jpg"]
    assert "empty file" in reasons["c_empty.png"]
    assert "cannot identify image" in reasons["d_text.png"]
    samples = read_samples(tmp_path / "out")
    by_name = {s["meta"]["source"].rsplit("/", 1)[-1]: s for s in samples.values()}
    assert sorted(by_name) == [
        "e_gray.png",
        "f_rgba.png",
        "g_palette.png",
        "h_cmyk.jpg",
        "i_16bit.png",
    ]
    with torch.inference_mode():
        for name, sample in by_name.items():
            image = load_image(root / name)
            _, cache = model.run_with_cache(model.preprocess([image]), ["blocks.1.hook_resid_post"])
            expected = cache["blocks.1.hook_resid_post"][0].numpy()
            np.testing.assert_allclose(sample["blocks.1.hook_resid_post"], expected, atol=1e-5)


def test_tar_shards_are_visited_in_seeded_shard_order_each_through_a_buffer(tmp_path):
    from prisma_mm.cache.inputs import stream_in_order

    _tar_shards(tmp_path, n_shards=4, per_shard=5)
    pattern = str(tmp_path / "train-{000..003}.tar")
    source = open_source(pattern)
    assert source.n_parts() == 4
    natural = [r.key for r in _records(source)]
    shard_of = {key: i // 5 for i, key in enumerate(natural)}
    first = [r.key for r, _, _ in stream_in_order(source, 0, buffer=4)]
    assert sorted(first) == sorted(natural) and first != natural
    # each tar shard's inputs take 5 consecutive positions, shuffled within the shard
    runs = [shard_of[k] for k in first]
    assert [runs[i] for i in range(0, 20, 5)] == [runs[i + 4] for i in range(0, 20, 5)]
    assert len({runs[i] for i in range(0, 20, 5)}) == 4 and runs != sorted(runs)
    assert [r.key for r, _, _ in stream_in_order(source, 0, buffer=4)] == first  # reproducible
    assert [r.key for r, _, _ in stream_in_order(source, 1, buffer=4)] != first
    assert [r.key for r, _, _ in stream_in_order(source, None)] == natural
    # the writer: the order is recorded, and decode workers do not change it
    model = seeded_tiny_vit(0)
    options = {"dtype": "float32", "batch_size": 3, "shard_size": 4, "progress": False}
    one = write_cache(model, pattern, tmp_path / "w0", "blocks.1.hook_resid_post", **options)
    two = write_cache(model, pattern, tmp_path / "w2", "blocks.1.hook_resid_post", workers=2,
                      **options)  # fmt: skip
    assert one["order"] == {"method": "shards+shard-buffer", "seed": 0, "buffer": 1000}
    keys = list(read_samples(tmp_path / "w0"))
    assert keys == list(read_samples(tmp_path / "w2")) and two["n_samples"] == 20
    assert keys == [r.key for r, _, _ in stream_in_order(source, 0)] and keys != natural
    assert sorted(t[0] for t in one["tar_shards_done"]) == [0, 1, 2, 3]


def test_a_resumed_tar_cache_skips_the_tar_shards_it_finished_unopened(tmp_path, monkeypatch):
    import webdataset.tariterators as tariterators

    _tar_shards(tmp_path, n_shards=4, per_shard=5)
    pattern = str(tmp_path / "train-{000..003}.tar")
    model = seeded_tiny_vit(0)
    options = {"dtype": "float32", "batch_size": 3, "shard_size": 4, "progress": False}
    hook = "blocks.1.hook_resid_post"
    whole = write_cache(model, pattern, tmp_path / "whole", hook, **options)
    grown = write_cache(model, pattern, tmp_path / "grown", hook, limit=12, **options)
    # inputs 0..11: the first two tar shards of the order were read to their end (0..9)
    assert [t[1:] for t in grown["tar_shards_done"]] == [[0, 5], [5, 10]]
    finished = {t[0] for t in grown["tar_shards_done"]}
    opened = []
    real_opener = tariterators.url_opener

    def spy(data, *args, **kwargs):
        for item in real_opener(data, *args, **kwargs):
            opened.append(int(item["url"].rsplit("-", 1)[1][:3]))
            yield item

    monkeypatch.setattr(tariterators, "url_opener", spy)
    final = write_cache(model, pattern, tmp_path / "grown", hook, **options)
    assert sorted(opened) == sorted({0, 1, 2, 3} - finished)  # finished shards left unread
    assert list(read_samples(tmp_path / "grown")) == list(read_samples(tmp_path / "whole"))
    assert final["n_samples"] == whole["n_samples"] == 20
