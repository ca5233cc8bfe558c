"""`prisma-mm train` from a model (ModelActivationDataModule) and several dictionaries
(MultiSAEModule): user mistakes end in one clear line and a non-zero exit before any training
(no run directory is created), and the data is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input import Case, check_case

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
DATA = "--data.init_args.data={tmp}/shards/toyworld-{000000..000001}.tar"
FIT = ("train", "fit", "--config", "toyvit-topk-from-model", DATA, *QUIET,
       "--trainer.default_root_dir={tmp}/runs")  # fmt: skip
MULTI = ("train", "fit", "--config", "toyvit-multi-from-model", DATA, *QUIET,
         "--trainer.default_root_dir={tmp}/runs")  # fmt: skip

CASES = [
    Case(
        "data-missing", (*FIT, "--data.init_args.data={tmp}/nowhere"), "does not exist", ("shards",)
    ),  # fmt: skip
    Case(
        "hook-unknown",
        (*FIT, "--data.init_args.hooks=blocks.9.hook_resid_post"),
        "blocks.9.hook_resid_post",
        ("shards",),
    ),  # fmt: skip
    Case("model-unknown", (*FIT, "--data.init_args.model=no-such-model"), "no-such-model"),
    Case("batch-size-zero", (*FIT, "--data.init_args.batch_size=0"), "data.batch_size"),
    Case(
        "input-batch-size-zero",
        (*FIT, "--data.init_args.input_batch_size=0"),
        "data.input_batch_size",
    ),  # fmt: skip
    Case("stats-inputs-zero", (*FIT, "--data.init_args.stats_inputs=0"), "data.stats_inputs"),
    Case("eval-fraction-one", (*FIT, "--data.init_args.eval_fraction=1.0"), "eval_fraction"),
    Case("tokens-bad", (*FIT, "--data.init_args.tokens=middle"), "--tokens"),
    Case(
        "hooks-of-different-shapes",
        (*FIT, "--data.init_args.hooks=[blocks.3.hook_resid_post,blocks.3.mlp.hook_post]"),
        "different shapes",
    ),  # fmt: skip
    Case(
        "member-hook-not-read",
        (*MULTI, "--data.init_args.hooks=[blocks.3.hook_resid_post]"),
        "blocks.1.hook_resid_post",
    ),  # fmt: skip
    Case("members-empty", (*MULTI, "--model.init_args.members={}"), "model.members"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """Two toy-world tar shards of 8 images."""
    from prisma_mm.data.toyworld import write_shards

    root = tmp_path_factory.mktemp("bad_train_from_model")
    write_shards(root / "shards", 16, shard_size=8, progress=False)
    return root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_train_from_model_bad_input(case: Case, tmp: Path, capsys) -> None:
    check_case(case, tmp, capsys)
    assert not (tmp / "runs").exists(), f"{case.id}: a run directory was created before the error"
