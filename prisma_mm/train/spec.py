"""A dictionary as plain data: ``{"class_path": ..., "init_args": {config fields}}``.

The form a recipe's ``model.dictionary`` takes and a checkpoint's hyper-parameters store, so a
checkpoint loads with ``torch.load(weights_only=True)`` and rebuilds its dictionary without a
CLI. Shared by the Lightning module and the callbacks (which export the trained dictionary).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary

__all__ = ["build_dictionary", "dictionary_spec"]


def dictionary_spec(dictionary: Dictionary) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {config fields}}`` of a dictionary (a recipe's form)."""
    cls = type(dictionary)
    init_args = {
        f.name: list(v) if isinstance(v := getattr(dictionary.cfg, f.name), tuple) else v
        for f in dataclasses.fields(dictionary.cfg)
        if f.init
    }
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_dictionary(spec: dict[str, Any]) -> Dictionary:
    """The dictionary of a :func:`dictionary_spec` (imports ``class_path``)."""
    module_name, _, class_name = str(spec.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise PrismaError(
            f"cannot import dictionary class {spec.get('class_path')!r}: {error}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Dictionary)):
        raise PrismaError(f"{spec.get('class_path')!r} is not a prisma_mm Dictionary class")
    return cls(**dict(spec.get("init_args") or {}))
