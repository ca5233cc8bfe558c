"""Reading the files dictionaries are stored in, with one clear error per problem.

The low layer under ``base.py`` (our format) and ``io.py`` (converters): JSON configs and
safetensors weights, checked key by key and shape by shape. Nothing here unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from prisma_mm.errors import PrismaError

__all__ = [
    "CFG_FILE",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "check_tensors",
    "load_safetensors",
    "read_json",
    "require",
]

FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a PrismaError naming the file when missing or malformed)."""
    if not path.is_file():
        raise PrismaError(f"{path}: file not found (expected a dictionary config)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrismaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise PrismaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(cfg: dict[str, Any], keys: Iterable[str], path: Path) -> None:
    """A PrismaError naming ``path`` and the missing keys of ``cfg``, if any."""
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise PrismaError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)}")


def load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file (never unpickles; a PrismaError when unreadable)."""
    if not path.is_file():
        raise PrismaError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise PrismaError(f"{path}: not a readable safetensors file ({err})") from None


def check_tensors(
    tensors: dict[str, Tensor],
    expected: dict[str, tuple[int, ...]],
    path: Path,
    optional: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> None:
    """Raise a PrismaError naming the file, key, expected and actual shape on any mismatch."""
    optional, ignore = set(optional), set(ignore)
    missing = [k for k in expected if k not in tensors and k not in optional]
    if missing:
        raise PrismaError(
            f"{path}: missing tensor(s) {', '.join(repr(k) for k in missing)} "
            f"(has {', '.join(sorted(tensors)) or 'none'})"
        )
    extra = [k for k in tensors if k not in expected and k not in ignore]
    if extra:
        raise PrismaError(f"{path}: unexpected tensor(s) {', '.join(repr(k) for k in extra)}")
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            raise PrismaError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(shape)}"
            )
