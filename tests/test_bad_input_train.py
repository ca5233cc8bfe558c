"""`prisma-mm train` user mistakes: each ends in one clear line and a non-zero exit, before any
work (no run directory is created), and nothing already written changes. A checkpoint that
carries a pickled payload is refused without running it."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from bad_input import Case, Payload, RandomImages, check_case

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
FIT = ("train", "fit", "--config", "tiny-vit-topk", "--data.cache_dir={tmp}/cache", *QUIET)
RUNS = "--trainer.default_root_dir={tmp}/runs"
MARKER = "payload_ran"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """A tiny-vit cache (width 32), a text file, a directory and a checkpoint with a payload."""
    from prisma_mm.cache import write_cache

    root = tmp_path_factory.mktemp("bad_train")
    write_cache(
        "tiny-vit",
        RandomImages(16),
        root / "cache",
        ["blocks.1.hook_resid_post"],
        weights=None,
        shard_size=1000,
        progress=False,
    )
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "a_dir").mkdir()
    torch.save(
        {"state_dict": {}, "hyper_parameters": Payload(str(root / MARKER))}, root / "evil.ckpt"
    )
    (root / "raw.ckpt").write_bytes(pickle.dumps(Payload(str(root / MARKER))))
    torch.save({"weights": torch.zeros(2)}, root / "tensors.pt")
    return root


CASES = [
    Case("num-workers-negative", (*FIT, RUNS, "--data.num_workers=-1"), "data.num_workers"),
    Case("accelerator-gpu", (*FIT, RUNS, "--trainer.accelerator=gpu"), "no CUDA GPU"),
    Case("accelerator-cuda", (*FIT, RUNS, "--trainer.accelerator=cuda"), "no CUDA GPU"),
    Case("ckpt-missing", (*FIT, RUNS, "--ckpt_path={tmp}/none.ckpt"), "does not exist"),
    Case("ckpt-directory", (*FIT, RUNS, "--ckpt_path={tmp}/a_dir"), "is a directory"),
    Case("ckpt-text-file", (*FIT, RUNS, "--ckpt_path={tmp}/notes.txt"), "not a PyTorch checkpoint"),
    Case(
        "ckpt-pickle-payload",
        (*FIT, RUNS, "--ckpt_path={tmp}/evil.ckpt"),
        "refused",
        untouched=("evil.ckpt",),
    ),
    Case("ckpt-raw-pickle", (*FIT, RUNS, "--ckpt_path={tmp}/raw.ckpt"), "not a PyTorch checkpoint"),
    Case("ckpt-not-lightning", (*FIT, RUNS, "--ckpt_path={tmp}/tensors.pt"), "no state_dict"),
    Case(
        "validate-ckpt-missing",
        ("train", "validate", *FIT[2:], RUNS, "--ckpt_path={tmp}/none.ckpt"),
        "does not exist",
    ),
    Case(
        "recipe-file-missing",
        ("train", "fit", "--config", "{tmp}/missing.yaml", "--data.cache_dir={tmp}/cache", RUNS),
        "unknown recipe",
    ),
    Case(
        "dictionary-class-unknown",
        (*FIT, RUNS, "--model.dictionary.class_path=prisma_mm.sae.NoSuchSAE"),
        "NoSuchSAE",
    ),
    Case(
        "dictionary-class-not-a-dictionary",
        (*FIT, RUNS, "--model.dictionary.class_path=torch.nn.Linear"),
        "model.dictionary",
    ),
    Case(
        "d-in-disagrees-with-cache",
        (*FIT, RUNS, "--model.dictionary.init_args.d_in=64"),
        "has width 32",
    ),
    Case(
        "cache-dir-missing",
        ("train", "fit", "--config", "tiny-vit-topk", "--data.cache_dir={tmp}/no_cache", RUNS),
        "prisma-mm cache",
    ),
    Case(
        "hook-not-in-cache", (*FIT, RUNS, "--data.hooks=blocks.7.hook_resid_post"), "unknown hook"
    ),
    Case(
        "batch-size-indivisible-by-devices",
        (*FIT, RUNS, "--trainer.devices=3", "--trainer.strategy=ddp"),
        "not divisible by the 3",
    ),
    Case("max-steps-negative", (*FIT, RUNS, "--trainer.max_steps=-5"), "max_steps"),
    Case("batch-size-zero", (*FIT, RUNS, "--data.batch_size=0"), "data.batch_size"),
    Case("eval-fraction-one", (*FIT, RUNS, "--data.eval_fraction=1.0"), "eval_fraction"),
    Case("k-zero", (*FIT, RUNS, "--model.dictionary.init_args.k=0"), "k must be"),
    Case("lr-decay-unknown", (*FIT, RUNS, "--model.lr_decay=step"), "model.lr_decay"),
    Case("total-tokens-zero", (*FIT, RUNS, "--model.total_tokens=0"), "total_tokens"),
    Case(
        "root-dir-is-a-file",
        (*FIT, "--trainer.default_root_dir={tmp}/notes.txt"),
        "is a file",
        untouched=("notes.txt",),
    ),
    Case("unknown-option", (*FIT, RUNS, "--model.learning_rate=0.1"), "learning_rate"),
    Case("weights-only-false", (*FIT, RUNS, "--weights_only=false"), "weights_only"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_train_bad_input(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case.id.startswith("accelerator-") and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the accelerator is valid here")
    check_case(case, tmp, capsys)
    assert not (tmp / "runs").exists(), f"{case.id}: a run directory was created before the error"
    assert not (tmp / MARKER).exists(), f"{case.id}: the checkpoint's pickled code ran"


def test_a_real_checkpoint_passes_the_check(tmp: Path) -> None:
    """The checkpoint check refuses what it must and nothing more: a checkpoint as Lightning
    writes it (plain data and tensors only) loads with weights_only=True."""
    from prisma_mm.train.cli import check_checkpoint

    state = {"state_dict": {"dictionary.W_dec": torch.zeros(2, 2)}, "hyper_parameters": {"lr": 1.0}}
    torch.save(state, tmp / "good.ckpt")
    check_checkpoint(str(tmp / "good.ckpt"))
    assert os.path.getsize(tmp / "good.ckpt") > 0
