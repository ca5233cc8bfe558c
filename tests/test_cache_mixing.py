"""Training batches from a class-sorted data set are well mixed: a class-folder tree cached
with tiny-vit and read back gives batches whose number of classes and largest class share are
within 10% of uniform sampling (the reference is computed from random permutations of the
same rows); the same tree cached in its sorted order is not, so the measure can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import batch_mixing, random_image, read_samples, seeded_tiny_vit, uniform_mixing

from prisma_mm.cache import ActivationDataset, read_manifest, write_cache

N_CLASSES, PER_CLASS, SHARD_SIZE = 32, 32, 16  # 2 shards per class in sorted order
HOOK = "blocks.1.hook_resid_post"
# 64-row batches drawn from 4096 buffered rows (241 images of 17 tokens): the buffer holds
# well over n_tokens x batch rows, so rows of one image rarely share a batch
BATCH, BUFFER = 64, 4096


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for c in range(N_CLASSES):
        folder = root / f"class{c:02d}"
        folder.mkdir()
        for i in range(PER_CLASS):
            random_image(c * PER_CLASS + i, size=32).save(folder / f"{i:03d}.png")
    return root


def _mixing(cache) -> tuple[tuple[float, float], tuple[float, float]]:
    labels = {key: s["meta"]["label"] for key, s in read_samples(cache).items()}
    index = {name: i for i, name in enumerate(sorted(set(labels.values())))}
    batches = []
    for epoch in range(2):
        ds = ActivationDataset(cache, HOOK, batch_size=BATCH, shuffle_buffer=BUFFER,
                               provenance=True)  # fmt: skip
        ds.set_epoch(epoch)
        batches += [np.array([index[labels[k]] for k in keys]) for _, keys, _ in ds]
    return batch_mixing(batches, BATCH), uniform_mixing(np.concatenate(batches), BATCH)


def _write(tree, out, **kwargs):
    torch.set_num_threads(1)
    return write_cache(seeded_tiny_vit(0), str(tree), out, HOOK, shard_size=SHARD_SIZE,
                       batch_size=64, progress=False, **kwargs)  # fmt: skip


def test_batches_of_a_class_sorted_tree_mix_like_uniform_sampling(class_tree, tmp_path):
    manifest = _write(class_tree, tmp_path / "mixed")
    assert manifest["order"]["method"] == "permutation" and manifest["order"]["seed"] == 0
    # the writer's random order already mixes each shard: about 13 classes of 16 images
    first = [s["meta"]["label"] for s in read_samples(tmp_path / "mixed").values()][:SHARD_SIZE]
    assert len(set(first)) >= 10
    (classes, largest), (uniform_classes, uniform_largest) = _mixing(tmp_path / "mixed")
    assert uniform_classes > 27 and uniform_largest < 0.1  # 64 rows over 32 classes
    assert classes >= 0.9 * uniform_classes
    assert largest <= 1.1 * uniform_largest


def test_the_sorted_order_gives_batches_of_few_classes(class_tree, tmp_path):
    manifest = _write(class_tree, tmp_path / "sorted", order_seed=None)
    assert manifest["order"] == {"method": "source", "seed": None}
    assert read_manifest(tmp_path / "sorted")["order"] == manifest["order"]
    (classes, largest), (uniform_classes, uniform_largest) = _mixing(tmp_path / "sorted")
    # the reader's 16 open shards help, but cannot mix what the writer left sorted
    assert classes < 0.9 * uniform_classes
    assert largest > 1.2 * uniform_largest
