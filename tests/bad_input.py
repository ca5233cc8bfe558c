"""Harness for the bad-input tables (``tests/test_bad_input_*.py``).

Each row is one user mistake: the ``prisma-mm`` arguments, a fragment the one-line error
must contain, and the paths whose contents must survive untouched. The command runs in
process (fast: no interpreter start per row); a Python traceback fails the row, as does a
zero exit, a multi-line message, or any change to the protected paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from prisma_mm.cli import main


@dataclass(frozen=True)
class Case:
    """One row: ``argv`` (``{tmp}`` is replaced by the test's folder), the expected fragment."""

    id: str
    argv: tuple[str, ...]
    expect: str
    untouched: tuple[str, ...] = field(default_factory=tuple)  # paths under {tmp}


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative name and bytes below ``path`` (or of the file)."""
    digest = hashlib.sha256()
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def error_line(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``prisma-mm argv``; assert a non-zero exit with one error line, and return it.

    argparse's own mistakes (an unknown flag, a bad choice) print the usage before their one
    ``error:`` line, as every argparse program does; the line checked is the last one.
    """
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse and LightningCLI exit themselves
        code = stop.code if isinstance(stop.code, int) else 2
    captured = capsys.readouterr()
    assert code not in (0, None), f"exit 0 for {list(argv)}; stdout: {captured.out[-500:]}"
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert lines, f"no error message for {list(argv)}"
    assert "Traceback" not in captured.err, captured.err[-2000:]
    last = lines[-1]
    assert "error" in last.lower(), f"last line is not an error: {captured.err[-1000:]}"
    # our own errors are exactly one line; argparse prefixes its usage lines
    if not any(line.startswith("usage:") for line in lines):
        assert len(lines) == 1, f"more than one line for {list(argv)}:\n{captured.err}"
    return last


def check_case(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run one row with ``{tmp}`` substituted and check its message and its protected paths."""
    argv = [part.replace("{tmp}", str(tmp)) for part in case.argv]
    protected = [tmp / rel for rel in case.untouched]
    before = [tree_digest(path) for path in protected]
    line = error_line(argv, capsys)
    assert case.expect.lower() in line.lower(), f"{case.id}: expected {case.expect!r} in {line!r}"
    after = [tree_digest(path) for path in protected]
    assert before == after, f"{case.id}: the command changed {case.untouched}"


class Payload:
    """Unpickling this writes a marker file: what a malicious weights file or checkpoint would
    do. A loader that refuses pickles leaves the marker absent."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class RandomImages(torch.utils.data.Dataset):
    """``n`` seeded random 32 px images, as a torch Dataset source for tiny caches."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index))
