"""The `prisma-mm` command: zoo subcommands and one-line errors with non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

from prisma_mm.cli import main


def test_zoo_list_and_show(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-vit" in out and "tiny-clip" in out
    assert out.strip().splitlines()[-1].endswith("models")
    assert main(["zoo", "list", "--family", "open_clip", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert {c["family"] for c in cards} == {"open_clip"}
    assert main(["zoo", "show", "tiny-dinov2-reg"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layout"]["n_prefix"] == 5 and shown["n_layers"] == 2 and shown["d_model"] == 32
    assert "hook_resid_post" in shown["hooks"]["per block"]
    assert "text tower" not in shown["hooks"]
    assert main(["zoo", "show", "tiny-clip"]) == 0
    text = json.loads(capsys.readouterr().out)["hooks"]["text tower"]
    assert "hook_resid_post" in text["per block"] and text["n_layers"] == 2
    assert text["model"] == ["text.hook_embed", "text.ln_final.hook_normalized", "text.hook_output"]


def test_bad_input_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "prisma_mm.cli", "zoo", "show", "tiny-vitt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'tiny-vitt'" in lines[0] and "'tiny-vit'" in lines[0]
    result = subprocess.run(
        [sys.executable, "-m", "prisma_mm.cli", "zoo", "list", "--family", "timmm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "did you mean 'timm'" in result.stderr
