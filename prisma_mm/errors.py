"""User-facing errors: one clear line saying what was wrong and what to do.

The CLI prints ``str(error)`` alone and exits non-zero; Python callers can catch
:class:`PrismaError` (a ``ValueError``) without importing anything else.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrismaError(ValueError):
    """A mistake in the user's input (a name, a path, a shape), explained in one line."""


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates closest to ``name`` by edit similarity, best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.0)


def unknown(kind: str, name: str, candidates: Iterable[str], hint: str = "") -> PrismaError:
    """An error for an unknown name that lists the nearest valid ones."""
    close = nearest(name, candidates)
    suggestion = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return PrismaError(f"unknown {kind} {name!r}{hint}{suggestion}")
