"""`prisma-mm cache` and `prisma-mm cache verify` refuse bad input in one line, before any
work, and leave what is already written as it was; a refused all-unreadable run leaves no
cache behind, so the same command works once the data is fixed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bad_input import Case, check_case, error_line
from cache_helpers import image_folder, random_image

from prisma_mm.cache import read_manifest
from prisma_mm.cli import main

WRITE = (
    "cache", "--model", "tiny-vit", "--weights", "none", "--hooks", "blocks.0.hook_resid_post",
    "--workers", "0", "--quiet",
)  # fmt: skip
GOOD = (*WRITE, "--data", "{tmp}/images")
NEW = (*GOOD, "--out", "{tmp}/new")
CACHE = ("cache",)  # kept untouched by every row that names it

CASES = [
    Case("shard-size-0", (*NEW, "--shard-size", "0"), "--shard-size 0: give a positive number"),
    Case("shard-size-negative", (*NEW, "--shard-size", "-4"), "--shard-size -4"),
    Case("shard-size-not-a-number", (*NEW, "--shard-size", "many"), "invalid int value"),
    Case("batch-size-0", (*NEW, "--batch-size", "0"), "--batch-size 0: give a positive number"),
    Case("workers-negative", (*NEW, "--workers", "-1"), "--workers -1"),
    Case("num-workers-negative", (*NEW, "--num-workers", "-1"), "--workers -1"),
    Case("flag-unknown", (*NEW, "--shards"), "unrecognized arguments: --shards"),
    Case("limit-0", (*NEW, "--limit", "0"), "--limit 0"),
    Case("tokens-garbage", (*NEW, "--tokens", "firsts"), "use all, cls, patches"),
    Case("tokens-empty", (*NEW, "--tokens", ","), "--tokens is empty"),
    Case("tokens-out-of-range", (*NEW, "--tokens", "0,99"), "outside 0..16"),
    Case("dtype-garbage", (*NEW, "--dtype", "float8"), "unknown cache dtype 'float8'"),
    Case("order-seed-garbage", (*NEW, "--order-seed", "shuffle"), "--order-seed 'shuffle'"),
    Case("order-seed-negative", (*NEW, "--order-seed", "-1"), "non-negative integer"),
    Case("device-unknown", (*NEW, "--device", "gpu"), "unknown device 'gpu'"),
    Case("img-size-not-a-patch-multiple", (*NEW, "--img-size", "30"), "not a multiple"),
    Case("img-size-0", (*NEW, "--img-size", "0"), "give a positive number of pixels"),
    Case(
        "model-unknown",
        (
            "cache",
            "--model",
            "tiny-vitt",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
        ),
        "unknown model",
    ),  # fmt: skip
    Case(
        "hooks-unknown",
        (
            *WRITE,
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
            "--hooks",
            "blocks.7.hook_resid_post",
        ),
        "unknown hook",
    ),  # fmt: skip
    Case(
        "hooks-twice",
        (
            *WRITE,
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
            "--hooks",
            "blocks.0.hook_resid_post,blocks.0.hook_resid_post",
        ),
        "listed twice",
    ),  # fmt: skip
    Case(
        "hooks-pattern",
        (
            *WRITE,
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
            "--hooks",
            "blocks.0.attn.hook_pattern",
        ),
        "attention pattern",
    ),  # fmt: skip
    Case(
        "hooks-text-tower",
        (
            *WRITE,
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
            "--hooks",
            "text.blocks.0.hook_resid_post",
        ),
        "is on the text tower",
    ),  # fmt: skip
    Case(
        "data-missing", (*WRITE, "--data", "{tmp}/nowhere", "--out", "{tmp}/new"), "does not exist"
    ),
    Case(
        "data-one-image",
        (*WRITE, "--data", "{tmp}/images/img000.png", "--out", "{tmp}/new"),
        "is a single image",
    ),  # fmt: skip
    Case(
        "data-empty-folder",
        (*WRITE, "--data", "{tmp}/empty", "--out", "{tmp}/new"),
        "has no inputs",
    ),
    Case(
        "data-missing-tar",
        (*WRITE, "--data", "{tmp}/train-{000..002}.tar", "--out", "{tmp}/new"),
        "does not exist",
    ),  # fmt: skip
    Case("out-is-a-file", (*GOOD, "--out", "{tmp}/notes.txt"), "is a file", ("notes.txt",)),
    Case(
        "out-under-a-file", (*GOOD, "--out", "{tmp}/notes.txt/cache"), "is a file", ("notes.txt",)
    ),
    Case("out-holds-other-files", (*GOOD, "--out", "{tmp}/thesis"), "holds no cache", ("thesis",)),
    Case(
        "out-holds-another-cache",
        (*GOOD, "--out", "{tmp}/cache", "--tokens", "cls"),
        "already holds a different cache: tokens",
        CACHE,
    ),  # fmt: skip
    Case(
        "out-written-in-another-order",
        (*GOOD, "--out", "{tmp}/cache", "--order-seed", "7"),
        "the visiting order differs",
        CACHE,
    ),  # fmt: skip
    Case("write-without-out", GOOD, "writing a cache needs --out"),
    Case("verify-missing-dir", ("cache", "verify", "{tmp}/nowhere"), "does not exist"),
    Case("verify-a-file", ("cache", "verify", "{tmp}/notes.txt"), "has no manifest.json"),
    Case(
        "verify-no-manifest",
        ("cache", "verify", "{tmp}/thesis"),
        "has no manifest.json",
        ("thesis",),
    ),  # fmt: skip
    Case(
        "verify-not-json", ("cache", "verify", "{tmp}/not-json"), "is not valid JSON", ("not-json",)
    ),  # fmt: skip
    Case(
        "verify-missing-fields",
        ("cache", "verify", "{tmp}/no-shards"),
        "lacks the field(s) ['shards', 'n_samples']",
        ("no-shards",),
    ),  # fmt: skip
    Case(
        "verify-shard-without-sha256",
        ("cache", "verify", "{tmp}/no-sha"),
        "shards[0] lacks or mistypes ['sha256']",
        ("no-sha",),
    ),  # fmt: skip
    Case(
        "verify-not-a-cache-manifest",
        ("cache", "verify", "{tmp}/foreign"),
        "is not a prisma-mm cache manifest",
        ("foreign",),
    ),  # fmt: skip
]
SPLIT = ("split",)  # part 0/2 of a cache written in 2 parts, kept untouched
CASES += [
    Case("part-index-past-n", (*NEW, "--part", "3/2"), "--part '3/2': the part index must be"),
    Case("part-garbage", (*NEW, "--part", "x"), "--part 'x': give i/N"),
    Case("part-of-zero", (*NEW, "--part", "0/0"), "N at least 1"),
    Case("parts-more-than-inputs", (*NEW, "--part", "0/9"), "cannot be split into 9 parts"),
    Case(
        "part-other-hooks-than-its-sibling",
        (*GOOD, "--out", "{tmp}/split", "--part", "1/2", "--hooks", "blocks.1.hook_resid_post"),
        "part 1/2 differs from part 0/2",
        SPLIT,
    ),  # fmt: skip
    Case(
        "part-other-dtype-than-its-sibling",
        (*GOOD, "--out", "{tmp}/split", "--part", "1/2", "--dtype", "bfloat16"),
        "differs from part 0/2 already in",
        SPLIT,
    ),  # fmt: skip
    Case(
        "part-of-another-split",
        (*GOOD, "--out", "{tmp}/split", "--part", "1/3"),
        "holds parts of a split into 2",
        SPLIT,
    ),  # fmt: skip
    Case(
        "merge-a-part-missing",
        ("cache", "merge", "--out", "{tmp}/split"),
        "part 1/2 is missing",
        SPLIT,
    ),  # fmt: skip
    Case("merge-no-parts", ("cache", "merge", "--out", "{tmp}/cache"), "has no parts/", CACHE),
    Case(
        "one-process-into-a-split-cache",
        (*GOOD, "--out", "{tmp}/split"),
        "holds a cache written in 2 parts",
        SPLIT,
    ),  # fmt: skip
    Case(
        "parts-into-a-one-process-cache",
        (*GOOD, "--out", "{tmp}/cache", "--part", "0/2"),
        "holds a cache written by one process",
        CACHE,
    ),  # fmt: skip
    Case("tokens-random-zero", (*NEW, "--tokens", "random:0"), "give random:K"),
    Case("tokens-random-too-many", (*NEW, "--tokens", "random:99"), "has 16 patch tokens"),
]
if not torch.cuda.is_available():
    CASES.append(Case("device-cuda-without-gpu", (*NEW, "--device", "cuda"), "no CUDA GPU"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-cache")
    image_folder(tmp / "images", 4, nested=False)
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("not a directory")
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "chapter1.tex").write_text("precious")
    assert main([*(a.replace("{tmp}", str(tmp)) for a in GOOD), "--out", str(tmp / "cache")]) == 0
    split = (*(a.replace("{tmp}", str(tmp)) for a in GOOD), "--out", str(tmp / "split"))
    assert main([*split, "--part", "0/2"]) == 0
    manifest = json.loads((tmp / "cache" / "manifest.json").read_text())
    damaged = {
        "not-json": "{ not json",
        "no-shards": json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "n_samples")}),
        "no-sha": json.dumps({**manifest, "shards": [{k: v for k, v in manifest["shards"][0].items()
                                                       if k != "sha256"}]}),
        "foreign": json.dumps({"hello": "world"}),
    }  # fmt: skip
    for name, text in damaged.items():
        (tmp / name).mkdir()
        (tmp / name / "manifest.json").write_text(text)
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cache_refuses(case, inputs, capsys):
    check_case(case, inputs, capsys)
    assert not (inputs / "new").exists(), f"{case.id}: the refused run created --out"


def test_a_refused_all_unreadable_run_leaves_no_cache_and_the_fixed_data_reruns(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"not a png")
    argv = [*WRITE, "--data", str(data), "--out", str(tmp_path / "out")]
    line = error_line(argv, capsys)
    assert "all 3 inputs were skipped" in line and "nothing was written" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert error_line(argv, capsys) == line  # the same refusal, not "the cache is complete"
    for i in range(3):  # the data fixed under the same names
        random_image(i).save(data / f"{i}.png")
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["complete"] and manifest["n_samples"] == 3 and manifest["n_skipped"] == 0


def test_an_empty_complete_cache_left_by_an_older_version_does_not_block(tmp_path, inputs):
    out = tmp_path / "out"
    shutil.copytree(inputs / "cache", out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (out / shard["name"]).unlink()
    blocked = {**manifest, "shards": [], "n_shards": 0, "n_samples": 0, "complete": True,
               "exhausted": True, "inputs_done": 4}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(blocked))
    assert main([*(a.replace("{tmp}", str(inputs)) for a in GOOD), "--out", str(out)]) == 0
    assert read_manifest(out)["n_samples"] == 4
