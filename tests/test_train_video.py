"""Dictionaries on a video cache: moving toy-world clips cached through tiny-videomae by the
cache writer (``toyclips:`` source), then the tiny video recipes (SAE, transcoder,
crosscoder) train on it through `prisma-mm train` exactly as on image caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prisma_mm.sae
from prisma_mm.cache import ActivationDataset, write_cache
from prisma_mm.cache.manifest import read_manifest
from prisma_mm.data.toyworld import render_clip_index
from prisma_mm.errors import PrismaError
from prisma_mm.train.cli import list_recipes, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_post",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.hook_mlp_out",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
N_CLIPS = 40


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory) -> Path:
    """40 toy clips of 4 frames through tiny-videomae: 2 x 4 x 4 = 32 tokens a clip, d 32."""
    out = tmp_path_factory.mktemp("video") / "tiny-videomae"
    write_cache("tiny-videomae", f"toyclips:{N_CLIPS},frames=4,seed=5", out, HOOKS,
                shard_size=16, progress=False)  # fmt: skip
    return out


def test_toy_clips_are_cached_with_their_layout_and_provenance(clip_cache):
    manifest = read_manifest(clip_cache)
    assert manifest["n_samples"] == N_CLIPS and manifest["complete"]
    assert manifest["layout"]["grid"] == [2, 4, 4] and manifest["layout"]["tubelet"] == 2
    assert manifest["source"]["type"] == "toyclips" and manifest["source"]["frames"] == 4
    rows = ActivationDataset(clip_cache, HOOKS[1], batch_size=32, shuffle_buffer=0)
    first = next(iter(rows))
    assert first.shape == (32, 32)  # rows of [d]: one clip's 32 tokens
    # a cached clip's activations are the model's on that very clip (drawn again here)
    model = prisma_mm.load_model("tiny-videomae")
    from prisma_mm.viz.index import iter_shard

    shard = manifest["shards"][0]["name"]
    item = next(iter_shard(clip_cache, manifest, shard, HOOKS[1]))
    index = int(item.source.rpartition("#")[2])
    frames, _, clip = render_clip_index(5, index, size=32, n_frames=4)
    assert item.label == (clip.motions[0].direction or "still")
    _, cache = model.run_with_cache(model.preprocess([frames]), names_filter=[HOOKS[1]])
    torch.testing.assert_close(item.acts.float(), cache[HOOKS[1]][0].half().float())


@pytest.mark.parametrize("family", ["topk", "transcoder", "crosscoder"])
def test_tiny_video_recipe_trains_on_the_clip_cache(family, clip_cache, tmp_path):
    recipe = f"tiny-videomae-{family}"
    assert recipe in list_recipes()
    cli = train_cli(["fit", "--config", recipe, f"--data.cache_dir={clip_cache}",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4",
                     "--trainer.val_check_interval=2", *QUIET])  # fmt: skip
    assert cli.trainer.global_step == 4 and int(cli.model.tokens_seen) == 4 * 256
    saved = prisma_mm.sae.load(tmp_path / recipe / "version_0" / "dictionary")
    assert saved.metadata["model"] == "tiny-videomae" and saved.cfg.d_in == 32
    assert saved.architecture == {"topk": "topk", "transcoder": "transcoder",
                                  "crosscoder": "crosscoder"}[family]  # fmt: skip
    hooks = cli.datamodule.hooks
    raw = next(iter(ActivationDataset(clip_cache, hooks, batch_size=64, shuffle_buffer=0)))
    x = raw if family == "crosscoder" else raw[:, 0]
    with torch.no_grad():
        out = saved.eval()(x)
    target = raw if family == "crosscoder" else raw[:, -1]
    fvu = ((out.recon - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert 0.0 < float(fvu) < 10.0  # 4 steps: finite and bounded on raw video rows


def test_toy_clip_source_is_checked_before_work(tmp_path):
    with pytest.raises(PrismaError, match="unknown option 'fps'"):
        write_cache("tiny-videomae", "toyclips:8,fps=4", tmp_path / "c", HOOKS[:1], progress=False)
    assert not (tmp_path / "c").exists()
