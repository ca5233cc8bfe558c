"""Prompt sources: the inputs of a cache written by generating images from prompts.

A prompt source is a :class:`~prisma_mm.data.sources.Source` of kind ``"prompt"``: each input
is one (prompt, seed) pair, loaded as ``{"prompt": str, "seed": int}``. With ``seeds=[0, 1]``
every prompt is generated twice, the two seeds of one prompt at consecutive source indices.

- a text file: one prompt per line (blank lines skipped; every other line is a prompt as
  written, ``#`` included);
- a CSV / TSV file with a header: the ``column`` (default: the first of ``prompt``,
  ``caption``, ``text`` that the header has);
- a JSONL file: one JSON object per line with the ``column`` (same default), or one JSON
  string per line;
- webdataset tar shards (``captions-{000..009}.tar``): each sample's ``txt`` / ``caption``
  member, or the ``column`` of its ``json`` member (streamed, split over parts by shard).

Keys are stable: the sha1 of the prompt text, its occurrence (a prompt listed twice is two
inputs) and the seed; tar samples: of ``<shard file name>/<sample key>`` and the seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prisma_mm.data.images import BadImage
from prisma_mm.data.sources import (
    InputRecord,
    Loader,
    Source,
    _is_local,
    _is_tar_spec,
    _local_path,
    _raise,
    register_source,
    stable_key,
    tar_samples,
)
from prisma_mm.errors import PrismaError

COLUMN_DEFAULTS = ("prompt", "caption", "text")
TAR_TEXT_KEYS = ("txt", "caption", "text")
DEFAULT_SEEDS = (0,)


def parse_seeds(seeds: int | str | Sequence[int] | None) -> list[int]:
    """``--seeds``: ``"0,1,2"``, ``"0-3"`` (0, 1, 2, 3), an int or a list; default ``[0]``."""
    if seeds is None:
        return list(DEFAULT_SEEDS)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        values = [seeds]
    elif isinstance(seeds, str):
        text = seeds.replace(" ", "")
        try:
            if "-" in text.lstrip("-") and "," not in text:
                low, high = text.split("-")
                values = list(range(int(low), int(high) + 1))
            else:
                values = [int(part) for part in text.split(",") if part]
        except ValueError:
            raise PrismaError(
                f"--seeds {seeds!r}: give seeds like 0,1,2 or a range like 0-3"
            ) from None
    else:
        values = list(seeds)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise PrismaError(f"--seeds {seeds!r}: give non-negative integer seeds, e.g. 0,1,2")
    if len(set(values)) != len(values):
        raise PrismaError(f"--seeds {seeds!r} lists a seed twice")
    return values


def _pick_column(columns: Sequence[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in columns:
            raise PrismaError(
                f"--prompt-column {column!r} is not a column of {where} (it has "
                f"{', '.join(repr(c) for c in columns) or 'none'})"
            )
        return column
    for name in COLUMN_DEFAULTS:
        if name in columns:
            return name
    raise PrismaError(
        f"{where} has no prompt, caption or text column (it has "
        f"{', '.join(repr(c) for c in columns) or 'none'}): name it with --prompt-column"
    )


def read_prompts(path: str | Path, column: str | None = None) -> tuple[list[str], str | None]:
    """The prompts of a text, CSV / TSV or JSONL file, and the column read (None for text)."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise PrismaError(f"prompts file {str(path)!r} {what}: give a .txt, .csv or .jsonl file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrismaError(f"prompts file {str(path)!r} is not UTF-8 text") from None
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        chosen = _pick_column(reader.fieldnames or [], column, f"prompts file {str(path)!r}")
        prompts = [(row.get(chosen) or "").strip() for row in reader]
    elif suffix in (".jsonl", ".ndjson"):
        prompts, chosen = [], None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise PrismaError(
                    f"prompts file {str(path)!r} line {number} is not JSON: give one JSON "
                    "object (or string) per line"
                ) from None
            if isinstance(item, str):
                prompts.append(item.strip())
                continue
            if not isinstance(item, dict):
                raise PrismaError(
                    f"prompts file {str(path)!r} line {number} is a {type(item).__name__}: give "
                    "one JSON object (or string) per line"
                )
            chosen = chosen or _pick_column(list(item), column, f"prompts file {str(path)!r}")
            if chosen not in item:
                raise PrismaError(f"prompts file {str(path)!r} line {number} has no {chosen!r} key")
            prompts.append(str(item[chosen]).strip())
    else:
        if column is not None:
            raise PrismaError(
                f"--prompt-column {column!r} applies to CSV / JSONL prompts; {str(path)!r} is "
                "read as text, one prompt per line"
            )
        prompts, chosen = [line.strip() for line in text.splitlines()], None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PrismaError(f"prompts file {str(path)!r} has no prompts (every line is empty)")
    return prompts, chosen


class PromptSource(Source):
    """The prompts of a file (see :func:`read_prompts`), each with every seed of ``seeds``."""

    kind = "prompt"

    def __init__(self, path: str | Path, column: str | None = None,
                 seeds: Sequence[int] | None = None) -> None:  # fmt: skip
        self.file = Path(path).expanduser().resolve()
        self.prompts, self.column = read_prompts(path, column)
        self.seeds = parse_seeds(seeds)
        seen: dict[str, int] = {}
        self.identities = []
        for prompt in self.prompts:
            seen[prompt] = seen.get(prompt, 0) + 1
            self.identities.append(prompt if seen[prompt] == 1 else f"{prompt}#{seen[prompt]}")

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()
        return {"type": "prompts", "file": str(self.file), "column": self.column,
                "seeds": self.seeds, "count": self.count(), "sha256": digest}  # fmt: skip

    def count(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def _split(self, index: int) -> tuple[int, int]:
        return index // len(self.seeds), self.seeds[index % len(self.seeds)]

    def record(self, index: int) -> InputRecord:
        which, seed = self._split(index)
        key = stable_key(f"prompt/{self.identities[which]}/seed={seed}")
        return InputRecord(index, key, f"{self.file}#{which}")

    def load(self, index: int) -> dict[str, Any]:
        which, seed = self._split(index)
        return {"prompt": self.prompts[which], "seed": seed}


class TarPromptSource(Source):
    """Captions of webdataset tar shards: each sample's ``txt`` / ``caption`` / ``text``
    member, or the ``column`` of its ``json`` member; every caption with every seed."""

    kind = "prompt"
    random_access = False

    def __init__(self, urls: str, column: str | None = None,
                 seeds: Sequence[int] | None = None) -> None:  # fmt: skip
        from prisma_mm.data.sources import TarSource

        self.tar = TarSource(urls)  # expands and checks the shard list
        self.column = column
        self.seeds = parse_seeds(seeds)

    def describe(self) -> dict[str, Any]:
        return {**self.tar.describe(), "type": "tar-prompts", "column": self.column,
                "seeds": self.seeds}  # fmt: skip

    def count(self) -> int | None:
        n = self.tar.count()
        return None if n is None else n * len(self.seeds)

    def n_parts(self) -> int:
        return self.tar.n_parts()

    def stream(self, parts: Sequence[int] | None = None) -> Iterator[tuple[InputRecord, Loader]]:
        index = 0
        for url, shard_name, sample in tar_samples(self.tar.urls, parts):
            if isinstance(sample, Exception):
                reason = f"{url}: unreadable tar shard ({sample.__class__.__name__}: {sample})"
                yield (
                    InputRecord(index, stable_key(f"{shard_name}/#error"), url),
                    _raise(BadImage(reason)),
                )
                index += 1
                continue
            key = sample["__key__"]
            caption = self._caption(sample, f"{url}#{key}")
            for seed in self.seeds:
                record = InputRecord(
                    index, stable_key(f"{shard_name}/{key}/seed={seed}"), f"{url}#{key}"
                )
                index += 1
                if isinstance(caption, BadImage):
                    yield record, _raise(caption)
                else:
                    yield record, (lambda c=caption, s=seed: {"prompt": c, "seed": s})

    def _caption(self, sample: dict[str, Any], name: str) -> str | BadImage:
        """The sample's caption, or the reason it has none (the input is then skipped)."""
        if self.column is None:
            for member in TAR_TEXT_KEYS:
                if member in sample:
                    text = sample[member].decode("utf-8", "replace").strip()
                    return text or BadImage(f"{name}: empty caption")
        if "json" in sample:
            try:
                item = json.loads(sample["json"])
            except ValueError:
                return BadImage(f"{name}: its json member is not JSON")
            if isinstance(item, dict):
                keys = [self.column] if self.column else list(COLUMN_DEFAULTS)
                for column in keys:
                    if isinstance(item.get(column), str) and item[column].strip():
                        return item[column].strip()
        members = sorted(k for k in sample if not k.startswith("__"))
        wanted = f"json key {self.column!r}" if self.column else "a txt / caption member"
        return BadImage(f"{name}: no caption ({wanted}; it has {members})")


def open_prompts(data: Any, column: str | None = None,
                 seeds: Sequence[int] | None = None) -> Source:  # fmt: skip
    """A prompt :class:`Source` from ``--data``: a prompt source as is; tar shards of captions;
    or a text / CSV / JSONL file (a ``prompts:`` prefix is accepted)."""
    if isinstance(data, Source):
        if data.kind != "prompt":
            raise PrismaError(f"--data holds {data.kind} inputs; a diffusion model needs prompts")
        return data
    if isinstance(data, Path):
        data = str(data)
    if not isinstance(data, str):
        raise PrismaError(
            f"prompts: give a prompts file or caption tar shards, not a {type(data).__name__}"
        )
    data = data.removeprefix("prompts:")
    if data.startswith("tar:") or (_is_tar_spec(data) and not Path(data).suffix == ".txt"):
        spec = data.removeprefix("tar:")
        if _is_local(spec) and "{" not in spec and not _local_path(spec).exists():
            raise PrismaError(f"caption shards {spec!r} do not exist: check the --data path")
        return TarPromptSource(spec, column, seeds)
    return PromptSource(data, column, seeds)


register_source("prompts", lambda spec: open_prompts(spec))
