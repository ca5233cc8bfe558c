"""The feature index: per-latent statistics of a dictionary over a cache, in one streaming pass.

:func:`build_index` reads a cache's shards in manifest order, encodes each batch of samples
with the dictionary and folds the codes into bounded state, ``O(n_latents x N)`` whatever the
data size: top-N samples by a score (:func:`token_scores`, the ONE function that both ranks
samples and gives the values a heatmap draws), interval samples per activation octave, firing
frequencies, a histogram of non-zero values, the mean value when active and the maximum; at
the end decoder-cosine neighbours (chunked) and the label mix of the top samples. State is
checkpointed atomically every few shards; a killed run resumes to the identical result.
See docs/viz.md for every rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor

from prisma_mm.cache import manifest as fmt
from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout

SCORES = ("max", "mean", "prefix")
INDEX_TENSORS = "index.safetensors"
INDEX_JSON = "index.json"
STATE_FILE = "index-state.safetensors"
SOURCE_CACHE = "cache"  # where build_index_from_source caches a data source, inside --out
FORMAT = "prisma-mm-feature-index"
VERSION = 1
_EMPTY_HASH = torch.iinfo(torch.int64).max
_NO_EXPONENT = -(1 << 20)  # "never fired": below any float32 exponent


# ----- the score: one function for ranking and heatmaps --------------------------------------
def token_scores(code: Tensor, score: str, layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Score samples from their per-token codes (non-negative, as every dictionary's are).

    ``code [S, T]`` (one latent) or ``[S, T, L]`` (several), over the cached tokens that
    ``layout`` describes. Returns ``(sample_score [S] / [S, L], peak_token [S] / [S, L],
    token_values)``: ``token_values`` (the code as float32, same shape as ``code``) is what a
    heatmap draws and ``sample_score`` the quantity that ranks: ``max`` = the maximum over
    patch tokens, ``mean`` = the mean over patch tokens (summed in float64), ``prefix`` = the
    maximum over the prefix tokens (CLS, registers). ``peak_token`` is the token (index into
    the cached tokens) where the values peak within that set; ties go to the first token.
    The reduction itself is :func:`entry_scores`, which the streaming index calls on the
    sparse code: one definition for ranking and drawing.
    """
    values = code.float()
    cube = values if values.ndim == 3 else values.unsqueeze(-1)
    n_samples, n_tokens, n_latents = cube.shape
    if n_tokens != layout.n_tokens:
        raise PrismaError(f"code has {n_tokens} tokens; the layout has {layout.n_tokens}")
    sample, token, latent = torch.nonzero(cube > 0, as_tuple=True)
    sample_score, peak = entry_scores(
        sample, token, latent, cube[sample, token, latent], n_samples, n_latents, score, layout
    )
    if values.ndim == 2:
        sample_score, peak = sample_score[:, 0], peak[:, 0]
    return sample_score, peak, values


def entry_scores(sample: Tensor, token: Tensor, latent: Tensor, value: Tensor, n_samples: int,
                 n_latents: int, score: str, layout: TokenLayout) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(sample_score [S, L], peak_token [S, L])`` from a code's positive entries (see
    :func:`token_scores`); samples where a latent has no entry among the scored tokens score 0
    and peak at the first of those tokens. Exact and independent of the entries' order."""
    if score not in SCORES:
        raise PrismaError(f"score {score!r}: use one of {', '.join(SCORES)}")
    if score == "prefix":
        if layout.n_prefix == 0:
            raise PrismaError("score 'prefix' needs prefix tokens (CLS): these tokens have none")
        inside, first, count = token < layout.n_prefix, 0, layout.n_prefix
    else:
        if layout.n_patches == 0:
            raise PrismaError(
                f"score {score!r} needs patch tokens: these tokens have none (use score 'prefix')"
            )
        inside, first, count = token >= layout.n_prefix, layout.n_prefix, layout.n_patches
    pair = (sample * n_latents + latent)[inside]
    value, token = value[inside].float(), token[inside]
    size = n_samples * n_latents
    peak_value = torch.zeros(size).scatter_reduce_(0, pair, value, reduce="amax")
    at_peak = value == peak_value[pair]
    peak = torch.full((size,), layout.n_tokens, dtype=torch.long)
    peak.scatter_reduce_(0, pair[at_peak], token[at_peak], reduce="amin")
    peak = torch.where(peak == layout.n_tokens, first, peak)
    if score == "mean":
        total = torch.zeros(size, dtype=torch.float64).index_add_(0, pair, value.double())
        sample_score = (total / count).float()
    else:
        sample_score = peak_value
    return sample_score.view(n_samples, n_latents), peak.view(n_samples, n_latents)


def cached_layout(manifest: dict[str, Any], hook: str) -> TokenLayout:
    """The TokenLayout of a cache's stored tokens of ``hook``: the model's layout when every
    token is kept, with no prefix for ``patches``, with no patches for the prefix only."""
    if not manifest.get("layout"):
        raise PrismaError(
            "the cache's manifest records no token layout: pass layout= to build_index"
        )
    model = TokenLayout.from_dict(manifest["layout"])
    kept = [int(t) for t in manifest["token_index"][hook]]
    layout = kept_layout(model, kept)
    if layout is not None:
        return layout
    raise PrismaError(
        f"the cache keeps tokens {manifest['tokens']!r} of {hook!r}: the index maps tokens "
        "through the layout, so use a cache written with --tokens all, patches or cls"
    )


def kept_layout(model: TokenLayout, kept: Sequence[int]) -> TokenLayout | None:
    """The layout of the model tokens ``kept`` (indices into the model's tokens): all of them,
    the patches only, or the first prefix tokens only (CLS); None for any other subset."""
    kept = list(kept)
    if kept == list(range(model.n_tokens)):
        return model
    if kept == list(range(model.n_prefix, model.n_tokens)):
        return TokenLayout(0, model.grid, model.patch_size, model.input_size, model.tubelet)
    if kept and kept == list(range(len(kept))) and len(kept) <= model.n_prefix:
        grid = (model.grid[0], 0, 0)
        return TokenLayout(len(kept), grid, model.patch_size, model.input_size, model.tubelet)
    return None


def key_hash(key: str) -> int:
    """A sample key's 63-bit hash: interval samples are the lowest hashes in each bin."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def octave(values: Tensor) -> Tensor:
    """``e`` with ``2^(e-1) <= v < 2^e`` for positive ``values`` (exact: ``frexp``)."""
    return torch.frexp(values.double()).exponent.long()


# ----- the index as saved ----------------------------------------------------------------------
_TABLES = (
    "top_value", "top_sample", "top_token", "interval_edges", "interval_value",
    "interval_sample", "interval_token", "freq_token", "freq_input", "hist_edges",
    "hist_counts", "mean_active", "max_value", "neighbours", "neighbour_cos",
)  # fmt: skip


@dataclass
class FeatureIndex:
    """Per-latent statistics of a dictionary over a cache (see the module docstring).

    Tables index ``keys`` (one per referenced sample; ``sample_labels``, ``sample_sources``,
    ``sample_shards`` and, over a prompt cache, ``sample_generated`` (prompt, seed, step,
    timestep, image key; see :data:`GENERATED_FIELDS`) align with it). ``top_* [L, N]``
    descending by score (NaN / -1 where fewer than N samples fired); ``interval_* [L, B, M]`` with ``interval_edges
    [L, B + 1]``; ``hist_counts [L, H]`` with ``hist_edges [L, H + 1]``; ``freq_token``,
    ``freq_input``, ``mean_active`` ``[L]`` float64; ``max_value [L]``; ``neighbours`` /
    ``neighbour_cos [L, K]``; ``label_mix [L, C]`` over ``label_names`` when labelled.
    """

    path: Path | None
    meta: dict[str, Any]
    keys: list[str]
    sample_labels: list[str | None]
    top_value: Tensor
    top_sample: Tensor
    top_token: Tensor
    interval_edges: Tensor
    interval_value: Tensor
    interval_sample: Tensor
    interval_token: Tensor
    freq_token: Tensor
    freq_input: Tensor
    hist_edges: Tensor
    hist_counts: Tensor
    mean_active: Tensor
    max_value: Tensor
    neighbours: Tensor
    neighbour_cos: Tensor
    label_names: list[str] | None = None
    label_mix: Tensor | None = None
    sample_sources: list[str] = field(default_factory=list)
    sample_shards: list[str] = field(default_factory=list)
    sample_generated: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        return int(self.top_value.shape[0])

    @property
    def layout(self) -> TokenLayout:
        """The layout of the cached tokens (the token axis of ``top_token`` and the maps)."""
        return TokenLayout.from_dict(self.meta["layout"])

    def top(self, latent: int) -> list[tuple[int, int, float]]:
        """``(sample, token, value)`` of a latent's top samples, best first."""
        return _entries(self.top_sample[latent], self.top_token[latent], self.top_value[latent])

    def intervals(self, latent: int) -> list[list[tuple[int, int, float]]]:
        """Per bin (lowest first) ``(sample, token, value)`` of a latent's interval samples."""
        return [
            _entries(s, t, v)
            for s, t, v in zip(
                self.interval_sample[latent],
                self.interval_token[latent],
                self.interval_value[latent],
                strict=True,
            )
        ]

    def save(self, path: str | Path) -> Path:
        """Write ``path/index.safetensors`` and ``path/index.json`` (JSON last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _TABLES}
        if self.label_mix is not None:
            tensors["label_mix"] = self.label_mix.contiguous()
        _atomic_bytes(path / INDEX_TENSORS, save(tensors))
        document = {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "keys": self.keys,
            "sample_labels": self.sample_labels,
            "sample_sources": self.sample_sources,
            "sample_shards": self.sample_shards,
            "sample_generated": self.sample_generated,
            "label_names": self.label_names,
        }
        _atomic_bytes(path / INDEX_JSON, (json.dumps(document, indent=1) + "\n").encode())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureIndex:
        """Read a directory written by :meth:`save` (safetensors + JSON; nothing unpickled)."""
        path = Path(path)
        if not (path / INDEX_JSON).is_file() or not (path / INDEX_TENSORS).is_file():
            raise PrismaError(
                f"{path} holds no feature index (no {INDEX_JSON} / {INDEX_TENSORS}): build one "
                "with `prisma-mm index DICT CACHE --out DIR`"
            )
        try:
            document = json.loads((path / INDEX_JSON).read_text())
            tensors = load_file(str(path / INDEX_TENSORS))
        except (OSError, ValueError) as error:
            raise PrismaError(f"cannot read the feature index in {path}: {error}") from error
        if document.get("format") != FORMAT:
            raise PrismaError(f"{path / INDEX_JSON} is not a prisma-mm feature index")
        return cls(
            path=path,
            meta=document["meta"],
            keys=list(document["keys"]),
            sample_labels=list(document["sample_labels"]),
            label_names=document.get("label_names"),
            label_mix=tensors.get("label_mix"),
            sample_sources=list(document.get("sample_sources", [])),
            sample_shards=list(document.get("sample_shards", [])),
            sample_generated=list(document.get("sample_generated", [])),
            **{name: tensors[name] for name in _TABLES},
        )


def _entries(samples: Tensor, tokens: Tensor, values: Tensor) -> list[tuple[int, int, float]]:
    return [
        (int(s), int(t), float(v))
        for s, t, v in zip(samples.tolist(), tokens.tolist(), values.tolist(), strict=True)
        if s >= 0
    ]


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, fsync and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fmt.fsync_dir(path.parent)


# ----- reading a cache sample by sample ----------------------------------------------------------
@dataclass
class CacheSample:
    """One cached input: its key, provenance and the activations of one hook ``[T, d]``;
    ``generated``: a prompt cache's provenance (prompt, seed, step, timestep and the key of
    the sample holding the generated image), else None."""

    key: str
    label: str | None
    source: str
    acts: Tensor
    generated: dict[str, Any] | None = None


GENERATED_FIELDS = ("prompt", "seed", "step", "timestep", "image")  # a prompt cache's meta.json


def iter_shard(cache_dir: Path, manifest: dict[str, Any], shard: str, hook: str,
               keys: set[str] | None = None) -> Iterator[CacheSample]:  # fmt: skip
    """The samples of one shard in tar order (only those in ``keys`` when given), with
    activations as float32 ``[T, d]``. Reads the documented shard format (docs/cache.md)."""
    member = f"{manifest['hook_keys'][hook]}.npy"
    path = cache_dir / shard
    current: str | None = None
    arrays: dict[str, bytes] = {}

    def sample() -> CacheSample:
        if member not in arrays or "meta.json" not in arrays:
            raise PrismaError(
                f"{path}: sample {current} lacks {member} or meta.json: the cache is damaged "
                "(run `prisma-mm cache verify`)"
            )
        meta = json.loads(arrays["meta.json"])
        array = fmt.decode_npy(arrays[member])
        acts = fmt.to_torch(np.array(array), manifest["dtype"]).float()
        label = None if meta.get("label") is None else str(meta["label"])
        generated = {k: meta[k] for k in GENERATED_FIELDS if k in meta} or None
        return CacheSample(str(current), label, str(meta.get("source")), acts, generated)

    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name, _, extension = info.name.rsplit("/", 1)[-1].partition(".")
                if name != current:
                    if current is not None and (keys is None or current in keys):
                        yield sample()
                    current, arrays = name, {}
                if extension in (member, "meta.json") and (keys is None or name in keys):
                    handle = tar.extractfile(info)
                    arrays[extension] = handle.read() if handle else b""
    except (tarfile.TarError, OSError) as error:
        raise PrismaError(
            f"cannot read shard {path} ({error.__class__.__name__}: {error}): the cache is "
            "damaged or incomplete (run `prisma-mm cache verify`)"
        ) from error
    if current is not None and (keys is None or current in keys):
        yield sample()


def _sparse_code(dictionary: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Non-zero entries ``(row, latent, value)`` of the code of ``x [rows, d]``: through
    ``encode_sparse`` (``(values [rows, m], indices [rows, m])``, zero-padded) where the
    dictionary has it, else the dense code in one piece."""
    encode_sparse = getattr(dictionary, "encode_sparse", None)
    if encode_sparse is not None:
        values, latents = encode_sparse(x)
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(values)
    else:
        code = dictionary.encode(x)
        rows, latents = torch.nonzero(code, as_tuple=True)
        values = code[rows, latents]
    values = values.float()
    keep = values > 0
    return rows[keep], latents[keep], values[keep]


# ----- streaming state ---------------------------------------------------------------------------
@dataclass
class IndexOptions:
    """What the index computes: ``score`` (see :func:`token_scores`), ``top_n`` samples,
    ``n_bins`` interval bins of ``interval_n`` samples each, ``hist_bins`` histogram bins (a
    power of two), ``n_neighbours`` decoder neighbours, ``batch_samples`` inputs per encode,
    ``checkpoint_every`` shards between checkpoints."""

    score: str = "max"
    top_n: int = 16
    n_bins: int = 5
    interval_n: int = 4
    hist_bins: int = 32
    n_neighbours: int = 8
    batch_samples: int = 16
    checkpoint_every: int = 1

    def check(self) -> None:
        if self.score not in SCORES:
            raise PrismaError(f"--score {self.score!r}: use one of {', '.join(SCORES)}")
        for name in ("top_n", "n_bins", "interval_n", "batch_samples", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PrismaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_neighbours < 0:
            raise PrismaError(f"n_neighbours must be >= 0, got {self.n_neighbours}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise PrismaError(f"hist_bins must be a power of two >= 2, got {self.hist_bins}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class IndexState:
    """The bounded state of a streaming index: ``O(n_latents x (N + B x M + H))``.

    Empty top entries hold value -inf and sample -1; empty interval entries hash INT64_MAX.
    ``samples`` maps the stream positions that the tables reference to (key, label, source,
    shard) and is pruned to those after every shard.
    """

    def __init__(self, n_latents: int, options: IndexOptions) -> None:
        n, b, m, h = options.top_n, options.n_bins, options.interval_n, options.hist_bins
        self.options = options
        self.tensors: dict[str, Tensor] = {
            "top_value": torch.full((n_latents, n), -math.inf),
            "top_sample": torch.full((n_latents, n), -1, dtype=torch.long),
            "top_token": torch.full((n_latents, n), -1, dtype=torch.long),
            "int_hash": torch.full((n_latents, b, m), _EMPTY_HASH, dtype=torch.long),
            "int_value": torch.full((n_latents, b, m), math.nan),
            "int_sample": torch.full((n_latents, b, m), -1, dtype=torch.long),
            "int_token": torch.full((n_latents, b, m), -1, dtype=torch.long),
            "int_exponent": torch.full((n_latents,), _NO_EXPONENT, dtype=torch.long),
            "hist_counts": torch.zeros((n_latents, h), dtype=torch.long),
            "hist_exponent": torch.full((n_latents,), _NO_EXPONENT, dtype=torch.long),
            "fire_tokens": torch.zeros(n_latents, dtype=torch.long),
            "fire_inputs": torch.zeros(n_latents, dtype=torch.long),
            "sum_active": torch.zeros(n_latents, dtype=torch.float64),
            "max_value": torch.zeros(n_latents),
        }
        self.samples: dict[int, tuple[Any, ...]] = {}  # key, label, source, shard, generated
        self.n_inputs = 0
        self.n_tokens = 0
        self.shards_done = 0

    def __getattr__(self, name: str) -> Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def nbytes(self) -> int:
        """Bytes the state holds (tensors plus the referenced samples' strings)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + sum(sum(len(str(s or "")) for s in v) + 8 for v in self.samples.values())

    # ---- updates ---------------------------------------------------------------------------
    def add_batch(self, ids: Tensor, hashes: Tensor, rows: Tensor, latents: Tensor,
                  values: Tensor, n_tokens: int, layout: TokenLayout) -> None:  # fmt: skip
        """Fold one batch in: ``ids [S]`` stream positions, ``hashes [S]`` key hashes, and the
        batch's non-zero code entries (``rows`` = sample * T + token, ``latents``, ``values``)."""
        n_samples = len(ids)
        self.n_inputs += n_samples
        self.n_tokens += n_samples * n_tokens
        if latents.numel() == 0:
            return
        self._token_stats(latents, values)
        n_latents = self.max_value.shape[0]
        sample, token = rows // n_tokens, rows % n_tokens
        fired = torch.zeros(n_samples * n_latents, dtype=torch.bool)
        fired[sample * n_latents + latents] = True
        self.fire_inputs += fired.view(n_samples, n_latents).sum(dim=0)
        scores, peaks = entry_scores(
            sample, token, latents, values, n_samples, n_latents, self.options.score, layout
        )
        sample, latent = torch.nonzero(scores > 0, as_tuple=True)
        score, peak = scores[sample, latent], peaks[sample, latent]
        self._merge_top(latent, ids[sample], score, peak)
        self._merge_intervals(latent, ids[sample], hashes[sample], score, peak)

    def _token_stats(self, latents: Tensor, values: Tensor) -> None:
        n_latents = self.max_value.shape[0]
        self.fire_tokens += torch.bincount(latents, minlength=n_latents)
        self.sum_active.index_add_(0, latents, values.double())
        self.max_value.scatter_reduce_(0, latents, values, reduce="amax")
        # histogram over [0, 2^e) in H bins: e grows by whole octaves, merging bins exactly
        exponent = self.hist_exponent.clone()
        exponent.scatter_reduce_(0, latents, octave(values), reduce="amax")
        grown = torch.nonzero(exponent != self.hist_exponent).flatten()
        bins = self.options.hist_bins
        if len(grown):
            old = self.hist_exponent[grown]
            shift = torch.where(old == _NO_EXPONENT, 0, exponent[grown] - old).clamp(max=62)
            target = torch.arange(bins).unsqueeze(0) >> shift.unsqueeze(1)
            merged = torch.zeros(len(grown), bins, dtype=torch.long)
            merged.scatter_add_(1, target, self.hist_counts[grown])
            self.hist_counts[grown] = merged
            self.hist_exponent[grown] = exponent[grown]
        log_bins = int(math.log2(bins))
        scaled = torch.ldexp(values.double(), (log_bins - exponent[latents]).double())
        index = scaled.floor().long().clamp(0, bins - 1)
        self.hist_counts.view(-1).index_add_(0, latents * bins + index, torch.ones_like(index))

    def _merge_top(self, latent: Tensor, sample: Tensor, score: Tensor, peak: Tensor) -> None:
        """Keep per latent the N best by (score desc, stream position asc)."""
        n = self.options.top_n
        better = score > self.top_value[latent, n - 1]  # ties with the N-th lose: they came later
        latent, sample, score, peak = latent[better], sample[better], score[better], peak[better]
        if latent.numel() == 0:
            return
        affected = torch.unique(latent)
        old_value = self.top_value[affected].flatten()
        old_keep = old_value > -math.inf
        all_latent = torch.cat([affected.repeat_interleave(n)[old_keep], latent])
        all_sample = torch.cat([self.top_sample[affected].flatten()[old_keep], sample])
        all_score = torch.cat([old_value[old_keep], score])
        all_peak = torch.cat([self.top_token[affected].flatten()[old_keep], peak])
        order, rank = _ranked(all_latent, [-all_score.double(), all_sample], n)
        self.top_value[affected] = -math.inf
        self.top_sample[affected] = -1
        self.top_token[affected] = -1
        where = (all_latent[order], rank)
        self.top_value[where] = all_score[order]
        self.top_sample[where] = all_sample[order]
        self.top_token[where] = all_peak[order]

    def _merge_intervals(self, latent: Tensor, sample: Tensor, hashes: Tensor, score: Tensor,
                         peak: Tensor) -> None:  # fmt: skip
        """Keep per latent and octave bin the M lowest key hashes (ties: stream position)."""
        n_bins, m = self.options.n_bins, self.options.interval_n
        exponent = self.int_exponent.clone()
        exponent.scatter_reduce_(0, latent, octave(score), reduce="amax")
        grown = exponent != self.int_exponent
        self.int_exponent.copy_(exponent)
        bin_ = _octave_bin(score, exponent[latent], n_bins)
        worst = self.int_hash[latent, bin_, m - 1]
        keep = (hashes < worst) | grown[latent]
        latent, sample, hashes, score, peak, bin_ = (
            t[keep] for t in (latent, sample, hashes, score, peak, bin_)
        )
        affected = torch.unique(torch.cat([latent, torch.nonzero(grown).flatten()]))
        if affected.numel() == 0:
            return
        per = n_bins * m
        old_hash = self.int_hash[affected].flatten()
        old_keep = old_hash != _EMPTY_HASH
        old_latent = affected.repeat_interleave(per)[old_keep]
        old_value = self.int_value[affected].flatten()[old_keep]
        all_latent = torch.cat([old_latent, latent])
        all_value = torch.cat([old_value, score])
        all_bin = torch.cat([_octave_bin(old_value, exponent[old_latent], n_bins), bin_])
        all_hash = torch.cat([old_hash[old_keep], hashes])
        all_sample = torch.cat([self.int_sample[affected].flatten()[old_keep], sample])
        all_peak = torch.cat([self.int_token[affected].flatten()[old_keep], peak])
        group = all_latent * n_bins + all_bin
        order, rank = _ranked(group, [all_hash, all_sample], m)
        for name, empty in (("int_hash", _EMPTY_HASH), ("int_value", math.nan),
                            ("int_sample", -1), ("int_token", -1)):  # fmt: skip
            self.tensors[name][affected] = empty
        where = (all_latent[order], all_bin[order], rank)
        self.int_hash[where] = all_hash[order]
        self.int_value[where] = all_value[order]
        self.int_sample[where] = all_sample[order]
        self.int_token[where] = all_peak[order]

    def referenced(self) -> Tensor:
        """Stream positions the tables reference, ascending."""
        ids = torch.cat([self.top_sample.flatten(), self.int_sample.flatten()])
        return torch.unique(ids[ids >= 0])

    def prune_samples(self) -> None:
        """Forget the provenance of samples no table references any more."""
        alive = set(self.referenced().tolist())
        self.samples = {i: v for i, v in self.samples.items() if i in alive}

    # ---- checkpoints -----------------------------------------------------------------------
    def to_bytes(self, identity: dict[str, Any]) -> bytes:
        record = {
            "identity": identity,
            "n_inputs": self.n_inputs,
            "n_tokens": self.n_tokens,
            "shards_done": self.shards_done,
            "samples": [[i, *v] for i, v in sorted(self.samples.items())],
        }
        return save(self.tensors, metadata={"state": json.dumps(record)})

    @classmethod
    def from_file(cls, path: Path, n_latents: int, options: IndexOptions,
                  identity: dict[str, Any]) -> IndexState | None:  # fmt: skip
        """The checkpoint at ``path`` (None when there is none); a checkpoint of another
        dictionary, cache or options is refused, not overwritten."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                record = json.loads(handle.metadata()["state"])
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise PrismaError(
                f"{path} is unreadable ({error.__class__.__name__}): delete it to start the "
                "index afresh"
            ) from error
        if record.get("identity") != identity:
            raise PrismaError(
                f"{path.parent} holds a partial index of another dictionary, cache or "
                "options: re-run that command to finish it, or choose a new --out"
            )
        state = cls(n_latents, options)
        state.tensors.update(tensors)
        state.n_inputs = int(record["n_inputs"])
        state.n_tokens = int(record["n_tokens"])
        state.shards_done = int(record["shards_done"])
        state.samples = {int(r[0]): tuple(r[1:]) for r in record["samples"]}
        return state


def _octave_bin(values: Tensor, exponent: Tensor, n_bins: int) -> Tensor:
    """Bin of positive ``values`` below a latent's top octave ``exponent``: bin B-1 holds
    ``[2^(e-1), 2^e)``, bin B-2 the octave below, ..., bin 0 everything under ``2^(e-B+1)``."""
    return (n_bins - 1 - (exponent - octave(values))).clamp(min=0)


def _ranked(group: Tensor, keys: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Positions of the first ``k`` entries of each group when sorted by ``keys`` (ascending,
    the first key most significant), and their rank in the group."""
    # numpy's lexsort: one stable multi-key sort, several times faster than chained torch sorts
    columns = [key.numpy() for key in reversed(keys)] + [group.numpy()]
    order = torch.from_numpy(np.lexsort(columns).astype(np.int64))
    sorted_group = group[order]
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(group)), 0), dim=0).values
    rank = torch.arange(len(group)) - first
    keep = rank < k
    return order[keep], rank[keep]


# ----- building --------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_hook(manifest: dict[str, Any], dictionary: Any, hook: str | None) -> str:
    cached = list(manifest["hooks"])
    wanted = hook or getattr(dictionary, "metadata", {}).get("hook")
    if wanted is not None and wanted in cached:
        return wanted
    if hook is not None:
        from prisma_mm.errors import unknown

        raise unknown("hook", hook, cached, hint=" in this cache")
    if len(cached) == 1:
        return cached[0]
    raise PrismaError(f"the cache holds hooks {cached}: pass --hook to choose one")


@dataclass
class _Loaded:
    """A dictionary already resolved with its provenance (so it is loaded once)."""

    dictionary: Any
    info: dict[str, Any]


def _load_dictionary(dictionary: Any) -> tuple[Any, dict[str, Any]]:
    """A dictionary (a saved directory, a published SAE's name or a Dictionary) and its
    provenance: the path and weights file's sha256, else the sha256 of its state's bytes."""
    from prisma_mm.sae.published import is_published, resolve_dictionary

    if isinstance(dictionary, _Loaded):
        return dictionary.dictionary, dictionary.info
    if isinstance(dictionary, str | Path) and not is_published(dictionary):
        path = Path(dictionary)
        loaded = resolve_dictionary(path)
        info = {"path": str(path.resolve()), "sha256": _sha256(path / "weights.safetensors")}
    else:
        loaded = (
            resolve_dictionary(dictionary) if isinstance(dictionary, str | Path) else dictionary
        )
        digest = hashlib.sha256()
        for _, value in sorted(loaded.state_dict().items()):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        info = {"path": None, "sha256": digest.hexdigest()}
        published = (getattr(loaded, "metadata", None) or {}).get("published")
        if published:
            info["published"] = published
    info.update(
        {
            "class": type(loaded).__name__,
            "n_latents": int(loaded.cfg.n_latents),
            "d_in": int(loaded.cfg.d_in),
        }
    )
    return loaded.eval(), info


def _prepare(dictionary: Any, cache_dir: str | Path, hook: str | None, options: IndexOptions,
             layout: TokenLayout | None) -> tuple[Any, dict, dict, str, TokenLayout,
                                                  list[int] | None, IndexOptions]:  # fmt: skip
    cache_dir = Path(cache_dir)
    if not (cache_dir / fmt.MANIFEST).is_file():
        raise PrismaError(
            f"{str(cache_dir)!r} is not an activation cache (no {fmt.MANIFEST}): write one "
            "with `prisma-mm cache`"
        )
    manifest = fmt.read_manifest(cache_dir)
    dictionary, info = _load_dictionary(dictionary)
    if getattr(dictionary, "_in_dims", 1) != 1 or getattr(dictionary.cfg, "d_out", None) not in (
        None,
        dictionary.cfg.d_in,
    ):
        raise PrismaError(
            f"{info['class']} reads or writes more than one activation: the index takes a "
            "single-hook SAE"
        )
    hook = _resolve_hook(manifest, dictionary, hook)
    d = int(manifest["shapes"][hook][1])
    if d != info["d_in"]:
        raise PrismaError(
            f"the dictionary reads d_in={info['d_in']} but hook {hook!r} in the cache has "
            f"d={d}: index it on the cache it was trained on"
        )
    if not manifest["shards"]:
        raise PrismaError(f"the cache {str(cache_dir)!r} holds no complete shard yet")
    from prisma_mm.sae.published import card_token_rows, check_cache_size

    check_cache_size(dictionary, manifest, cache_dir)
    # a published SAE trained on CLS or patch tokens only reads those of a cache keeping more
    tokens = (getattr(dictionary, "metadata", None) or {}).get("tokens")
    rows = None if layout else card_token_rows(manifest, hook, tokens)
    if rows is not None:
        model = TokenLayout.from_dict(manifest["layout"])
        kept = [int(manifest["token_index"][hook][i]) for i in rows]
        layout = kept_layout(model, kept)
    layout = layout or cached_layout(manifest, hook)
    stored = int(manifest["shapes"][hook][0]) if rows is None else len(rows)
    if layout.n_tokens != stored:
        raise PrismaError(
            f"layout has {layout.n_tokens} tokens but the cache stores "
            f"{manifest['shapes'][hook][0]} per sample of {hook!r}"
        )
    if layout.n_patches == 0 and options.score == "max":
        # prefix tokens only (a CLS-only SAE or cache): the default score ranks by them
        options = dataclasses.replace(options, score="prefix")
    token_scores(torch.zeros(1, layout.n_tokens), options.score, layout)  # score fits the tokens
    return dictionary, info, manifest, hook, layout, rows, options


def build_index(
    dictionary: Any,
    cache_dir: str | Path,
    out: str | Path,
    options: IndexOptions | None = None,
    hook: str | None = None,
    layout: TokenLayout | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[IndexState], None] | None = None,
    device: str | torch.device = "cpu",
) -> FeatureIndex:
    """Index ``dictionary`` (a saved directory or a Dictionary) over the cache ``cache_dir``
    and save it to ``out``; resumes from ``out``'s checkpoint when it holds this same index.
    The encode runs on ``device`` (a Dictionary passed in is moved there); the state stays on
    the CPU, so only the sparse code crosses.

    ``on_checkpoint(state)`` is called after each checkpoint is written (tests use it).
    """
    from tqdm.auto import tqdm

    options = options or IndexOptions()
    options.check()
    cache_dir, out = Path(cache_dir), Path(out)
    dictionary, info, manifest, hook, layout, rows, options = _prepare(
        dictionary, cache_dir, hook, options, layout
    )
    dictionary = dictionary.to(device)
    shards = [s["name"] for s in manifest["shards"]]
    identity = {
        "dictionary": info["sha256"],
        "hook": hook,
        "shards": [[s["name"], s["sha256"]] for s in manifest["shards"]],
        "options": {k: v for k, v in options.to_dict().items() if k != "checkpoint_every"},
        "layout": layout.to_dict(),
    }
    existing = _finished(out, identity)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    n_latents = info["n_latents"]
    state = IndexState.from_file(out / STATE_FILE, n_latents, options, identity)
    state = state or IndexState(n_latents, options)
    total = sum(int(s["samples"]) for s in manifest["shards"])
    bar = tqdm(
        total=total, initial=state.n_inputs, desc="index", unit="img", disable=not progress,
        dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip
    started = time.perf_counter()
    tokens_at_start = state.n_tokens
    with torch.inference_mode():
        for number in range(state.shards_done, len(shards)):
            _index_shard(dictionary, cache_dir, manifest, shards[number], hook, layout, state,
                         bar, rows)  # fmt: skip
            state.shards_done = number + 1
            state.prune_samples()
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tok_s=f"{(state.n_tokens - tokens_at_start) / elapsed:,.0f}")
            last = state.shards_done == len(shards)
            if not last and state.shards_done % options.checkpoint_every == 0:
                _atomic_bytes(out / STATE_FILE, state.to_bytes(identity))
                if on_checkpoint is not None:
                    on_checkpoint(state)
    bar.close()
    index = _finish(state, dictionary, info, manifest, cache_dir, hook, layout, identity, rows)
    index.save(out)
    (out / STATE_FILE).unlink(missing_ok=True)
    return index


def build_index_from_source(
    dictionary: Any,
    data: Any,
    out: str | Path,
    options: IndexOptions | None = None,
    *,
    model: str | None = None,
    weights: str | None = "pretrained",
    hook: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureIndex:
    """Index a data source run through the model: the cache writer streams ``data`` through
    ``model`` (default: the dictionary's ``metadata["model"]``) into ``out/cache`` at ``hook``
    (default ``metadata["hook"]``), then :func:`build_index` reads it. Both steps resume.
    A published SAE's ``metadata`` also sets what the writer keeps: its ``tokens`` (``cls``:
    the CLS token only) and its ``img_size`` (the model runs at the size it was trained at)."""
    from prisma_mm.cache import write_cache
    from prisma_mm.zoo.registry import get_card

    (options or IndexOptions()).check()
    loaded, info = _load_dictionary(dictionary)
    metadata = getattr(loaded, "metadata", {}) or {}
    model = model or metadata.get("model")
    hook = hook or metadata.get("hook")
    if not model or not hook:
        raise PrismaError(
            "to index a data source the model and hook are needed: the dictionary's metadata "
            "names none, so pass --model NAME and --hook HOOK (or index a cache directory)"
        )
    get_card(model)  # an unknown card fails here, before any work
    out = Path(out)
    if not (out / INDEX_JSON).is_file():  # a finished index needs no cache pass
        write_cache(model, data, out / SOURCE_CACHE, [hook], weights=weights, device=device,
                    batch_size=batch_size, progress=progress,
                    tokens=metadata.get("tokens") or "all",
                    img_size=metadata.get("img_size"))  # fmt: skip
    return build_index(_Loaded(loaded, info), out / SOURCE_CACHE, out, options, hook=hook,
                       progress=progress, device=device)  # fmt: skip


def _index_shard(dictionary: Any, cache_dir: Path, manifest: dict[str, Any], shard: str,
                 hook: str, layout: TokenLayout, state: IndexState, bar: Any,
                 token_rows: list[int] | None = None) -> None:  # fmt: skip
    """Encode one shard in batches of ``batch_samples`` inputs (never across shards, so a
    resumed run batches exactly as an uninterrupted one) and fold it into ``state``;
    ``token_rows``: the stored tokens the dictionary reads (``card_token_rows``; None: all)."""
    batch: list[CacheSample] = []
    samples = iter_shard(cache_dir, manifest, shard, hook)
    while True:
        sample = next(samples, None)
        if sample is not None:
            batch.append(sample)
        if batch and (sample is None or len(batch) == state.options.batch_samples):
            first = state.n_inputs
            ids = torch.arange(first, first + len(batch))
            for i, item in zip(ids.tolist(), batch, strict=True):
                state.samples[i] = (item.key, item.label, item.source, shard, item.generated)
            hashes = torch.tensor([key_hash(s.key) for s in batch], dtype=torch.long)
            device = dictionary.W_dec.device
            acts = [s.acts if token_rows is None else s.acts[token_rows] for s in batch]
            x = torch.cat(acts).to(device)
            rows, latents, values = (t.cpu() for t in _sparse_code(dictionary, x))
            state.add_batch(ids, hashes, rows, latents, values, layout.n_tokens, layout)
            bar.update(len(batch))
            batch = []
        if sample is None:
            return


def _finished(out: Path, identity: dict[str, Any]) -> FeatureIndex | None:
    """The complete index already in ``out`` for this identity; refuse a different one."""
    if not (out / INDEX_JSON).is_file():
        ours = {SOURCE_CACHE, STATE_FILE + ".tmp", INDEX_TENSORS + ".tmp", INDEX_JSON + ".tmp"}
        others = [p for p in out.iterdir() if p.name not in ours] if out.exists() else []
        if others and not (out / STATE_FILE).exists():
            raise PrismaError(
                f"--out {str(out)!r} is a non-empty directory holding no feature index: "
                "choose a new directory"
            )
        return None
    index = FeatureIndex.load(out)
    if index.meta.get("identity") != identity:
        raise PrismaError(
            f"--out {str(out)!r} holds an index of another dictionary, cache or options: "
            "choose a new directory or delete it"
        )
    return index


def decoder_neighbours(dictionary: Any, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """``(neighbours [L, k] int64, cosine [L, k] float32)``: each latent's nearest decoder
    directions by cosine, self excluded, computed ``chunk`` rows at a time (never L x L)."""
    weight = dictionary.W_dec.detach().float().reshape(dictionary.cfg.n_latents, -1)
    unit = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = unit.shape[0]
    k = min(k, n - 1)
    ids = torch.empty(n, k, dtype=torch.long)
    cos = torch.empty(n, k)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sims = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start, device=sims.device)
        sims[rows, rows + start] = -math.inf
        if k:
            top = sims.topk(k, dim=1)
            cos[start:stop], ids[start:stop] = top.values.cpu(), top.indices.cpu()
    return ids, cos


def _finish(state: IndexState, dictionary: Any, info: dict[str, Any], manifest: dict[str, Any],
            cache_dir: Path, hook: str, layout: TokenLayout,
            identity: dict[str, Any], rows: list[int] | None = None) -> FeatureIndex:  # fmt: skip
    """Turn the state into a FeatureIndex: compact sample ids, edges, frequencies, neighbours."""
    options = state.options
    referenced = state.referenced()
    records = [state.samples[i] for i in referenced.tolist()]

    def compact(ids: Tensor) -> Tensor:
        # a position's rank among the referenced ones (sorted): no table as long as the data
        return torch.where(ids >= 0, torch.searchsorted(referenced, ids), -1)

    top_value = state.top_value.clone()
    top_value[top_value == -math.inf] = math.nan
    fired = state.fire_tokens > 0
    int_exponent = torch.where(state.int_exponent == _NO_EXPONENT, 0, state.int_exponent)
    b = options.n_bins
    powers = int_exponent.unsqueeze(1) - b + torch.arange(1, b + 1)
    interval_edges = torch.cat(
        [torch.zeros(len(powers), 1), torch.ldexp(torch.ones(1), powers.float())], dim=1
    )
    hist_exponent = torch.where(state.hist_exponent == _NO_EXPONENT, 0, state.hist_exponent)
    steps = torch.arange(options.hist_bins + 1, dtype=torch.float64) / options.hist_bins
    hist_edges = (steps.unsqueeze(0) * torch.ldexp(torch.ones(1, dtype=torch.float64),
                  hist_exponent.double()).unsqueeze(1)).float()  # fmt: skip
    neighbours, neighbour_cos = decoder_neighbours(dictionary, options.n_neighbours)
    labels = [r[1] for r in records]
    label_names, label_mix = _label_mix(manifest, labels, compact(state.top_sample))
    meta = {
        "dictionary": info,
        "cache": {
            "path": str(cache_dir.resolve()),
            "hook": hook,
            "model": manifest.get("model", {}).get("name"),
            "manifest_sha256": _sha256(cache_dir / fmt.MANIFEST),
            "tokens": manifest.get("tokens"),
            "token_index": [manifest["token_index"][hook][i] for i in rows]
            if rows is not None
            else manifest["token_index"][hook],
            "rows": rows,  # the stored tokens indexed (None: all), re-read the same way by views
            "model_layout": manifest.get("layout") or None,
        },
        "score": options.score,
        "top_n": options.top_n,
        "n_bins": options.n_bins,
        "interval_n": options.interval_n,
        "hist_bins": options.hist_bins,
        "n_neighbours": int(neighbours.shape[1]),
        "n_inputs": state.n_inputs,
        "n_tokens": state.n_tokens,
        "layout": layout.to_dict(),
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "interval_rule": "octave bins below the top octave; lowest key hashes per bin",
    }
    return FeatureIndex(
        path=None,
        meta=meta,
        keys=[r[0] for r in records],
        sample_labels=labels,
        sample_sources=[r[2] for r in records],
        sample_shards=[r[3] for r in records],
        sample_generated=[r[4] if len(r) > 4 else None for r in records],
        top_value=top_value,
        top_sample=compact(state.top_sample),
        top_token=state.top_token.clone(),
        interval_edges=interval_edges,
        interval_value=state.int_value.clone(),
        interval_sample=compact(state.int_sample),
        interval_token=state.int_token.clone(),
        freq_token=state.fire_tokens.double() / max(state.n_tokens, 1),
        freq_input=state.fire_inputs.double() / max(state.n_inputs, 1),
        hist_edges=hist_edges,
        hist_counts=state.hist_counts.clone(),
        mean_active=torch.where(
            fired, state.sum_active / state.fire_tokens.clamp(min=1).double(), 0.0
        ),
        max_value=state.max_value.clone(),
        neighbours=neighbours,
        neighbour_cos=neighbour_cos,
        label_names=label_names,
        label_mix=label_mix,
    )


def _label_mix(manifest: dict[str, Any], labels: list[str | None],
               top_sample: Tensor) -> tuple[list[str] | None, Tensor | None]:  # fmt: skip
    """Label counts ``[L, C]`` over each latent's top samples, where the samples have labels
    (class names from the manifest's source when it lists them, else the labels seen)."""
    if not any(label is not None for label in labels):
        return None, None
    names = [str(c) for c in manifest.get("source", {}).get("classes") or []]
    names = names or sorted({label for label in labels if label is not None})
    position = {name: i for i, name in enumerate(names)}
    sample_label = torch.tensor(
        [position.get(label, -1) if label is not None else -1 for label in labels] or [-1]
    )
    label = torch.where(top_sample >= 0, sample_label[top_sample.clamp(min=0)], -1)
    mix = torch.zeros(top_sample.shape[0], len(names) + 1, dtype=torch.long)
    mix.scatter_add_(1, label.clamp(min=-1) + 1, torch.ones_like(label))
    return names, mix[:, 1:].contiguous()


# ----- re-reading samples for views -------------------------------------------------------------
def sample_codes(index: FeatureIndex, dictionary: Any, samples: Sequence[int],
                 latents: Sequence[int], cache_dir: str | Path | None = None) -> dict[int, Tensor]:  # fmt: skip
    """``{sample: token_values [T, len(latents)]}`` for samples of the index (positions in
    ``index.keys``), re-read from the cache (each needed shard read once) and encoded."""
    if isinstance(dictionary, str | Path):  # only the weights: no provenance hash per call
        from prisma_mm.sae.published import resolve_dictionary

        dictionary = resolve_dictionary(dictionary)
    dictionary = dictionary.eval()
    cache_dir = Path(cache_dir or index.meta["cache"]["path"])
    manifest = fmt.read_manifest(cache_dir)
    hook = index.meta["cache"]["hook"]
    rows = index.meta["cache"].get("rows")
    wanted: dict[str, dict[str, int]] = {}
    for sample in dict.fromkeys(int(s) for s in samples if s >= 0):
        wanted.setdefault(index.sample_shards[sample], {})[index.keys[sample]] = sample
    columns = torch.tensor(list(latents), dtype=torch.long)
    out: dict[int, Tensor] = {}
    with torch.inference_mode():
        for shard, by_key in wanted.items():
            for item in iter_shard(cache_dir, manifest, shard, hook, set(by_key)):
                acts = item.acts if rows is None else item.acts[rows]
                code = dictionary.encode(acts.to(dictionary.W_dec.device)).cpu()
                selected = code[:, columns].unsqueeze(0)  # [1, T, n_latents]
                _, _, values = token_scores(selected, index.meta["score"], index.layout)
                out[by_key[item.key]] = values[0].contiguous()
    return out


def latent_token_maps(index: FeatureIndex, dictionary: Any, cache_dir: str | Path | None,
                      latent: int, which: str = "top") -> list[tuple[str, str | None, float, Tensor]]:  # fmt: skip
    """``(key, label, value, token_values [T])`` of a latent's ``top`` or ``interval``
    samples (intervals: highest bin first), re-encoded from the cache. ``value`` is the
    sample's score and equals ``token_scores`` of ``token_values``."""
    if not 0 <= latent < index.n_latents:
        raise PrismaError(f"latent {latent} is outside 0..{index.n_latents - 1}")
    if which == "top":
        entries = index.top(latent)
    elif which == "interval":
        entries = [e for group in reversed(index.intervals(latent)) for e in group]
    else:
        raise PrismaError(f"which={which!r}: use 'top' or 'interval'")
    codes = sample_codes(index, dictionary, [e[0] for e in entries], [latent], cache_dir)
    return [
        (index.keys[s], index.sample_labels[s], value, codes[s][:, 0]) for s, _, value in entries
    ]


# ----- images ---------------------------------------------------------------------------------
class SampleImages:
    """Images of an index's samples as the model saw them (the card's resize and crop, not
    its normalisation), resolved through each sample's recorded source: a file path, a
    ``shard.tar#key`` member, or ``Name[i]`` of a ``dataset`` you pass."""

    def __init__(self, index: FeatureIndex, dataset: Any = None) -> None:
        self.index = index
        self.dataset = dataset
        self.layout = TokenLayout.from_dict(
            index.meta["cache"].get("model_layout") or index.meta["layout"]
        )
        self._transform = _display_transform(index.meta["cache"].get("model"))

    def raw(self, sample: int) -> Any:
        """The input as stored by its source (a PIL image; a clip: uint8 ``[T, H, W, 3]``)."""
        from prisma_mm.data.images import decode_image_bytes, load_image, to_pil_rgb
        from prisma_mm.data.toyworld import TOY_CLIPS_PREFIX, render_clip_source

        source = self.index.sample_sources[sample]
        generated = self.generated(sample)
        if generated is not None:
            if not generated.get("image"):
                raise PrismaError(
                    f"sample {self.index.keys[sample]} was generated from a prompt without "
                    "keeping its image: re-cache with --keep-images to draw it"
                )
            cache_dir = Path(self.index.meta["cache"]["path"])
            source = f"{cache_dir / self.index.sample_shards[sample]}#{generated['image']}"
        if source.startswith(TOY_CLIPS_PREFIX):  # a moving toy-world clip: drawn again
            return render_clip_source(source)
        video, _, frames = source.rpartition("#f=")
        if video and Path(video).is_file():  # a clip of a video file: its frames decoded
            from prisma_mm.data.video import parse_clip_source, read_frames

            return read_frames(*parse_clip_source(source))
        if "#" in source and not Path(source).exists():
            url, _, member = source.rpartition("#")
            with tarfile.open(url) as tar:
                for info in tar:
                    name, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                    if name == member and ext.lower() in ("png", "jpg", "jpeg", "webp", "bmp"):
                        handle = tar.extractfile(info)
                        return decode_image_bytes(handle.read() if handle else b"", source)
            raise PrismaError(f"sample source {source!r}: no image member {member!r} in {url}")
        if source.endswith("]") and "[" in source:
            if self.dataset is None:
                raise PrismaError(
                    f"sample source {source!r} is an item of a Python Dataset: pass dataset= "
                    "to SampleImages to draw it"
                )
            item = self.dataset[int(source.rsplit("[", 1)[1][:-1])]
            image = item[0] if isinstance(item, tuple | list) else item
            if np.asarray(image).ndim == 4:  # a clip [T, H, W, 3]
                return np.asarray(image)
            return to_pil_rgb(image)
        return load_image(source)

    def generated(self, sample: int) -> dict[str, Any] | None:
        """A prompt cache's provenance of ``sample`` (prompt, seed, step, image key), or None."""
        table = self.index.sample_generated
        return table[sample] if sample < len(table) else None

    def __call__(self, sample: int) -> Any:
        """The image of ``sample`` (position in ``index.keys``) at the model's input size; a
        clip as a list of its frames (PIL), each at the input size."""
        from PIL import Image

        image = self.raw(sample)
        if isinstance(image, np.ndarray) and image.ndim == 4:
            return self._clip(image)
        if self._transform is not None:
            return self._transform(image)
        height, width = self.layout.input_size
        return image.resize((width, height), Image.BICUBIC)

    def _clip(self, clip: np.ndarray) -> list[Any]:
        """The frames of a clip ``[T, H, W, 3]`` as the model saw them: through the card's
        clip transform (resize, crop) with its normalisation undone, else resized."""
        from PIL import Image

        transform = getattr(self._transform, "clip_transform", None)
        if transform is not None:
            x = transform(clip)  # [3, T, H, W], normalised
            mean = torch.as_tensor(transform.mean).view(3, 1, 1, 1)
            std = torch.as_tensor(transform.std).view(3, 1, 1, 1)
            pixels = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0)
            return [Image.fromarray(np.ascontiguousarray(f)) for f in pixels.numpy()]
        height, width = self.layout.input_size
        frames = [Image.fromarray(np.ascontiguousarray(f)).convert("RGB") for f in clip]
        return [f if f.size == (width, height) else f.resize((width, height), Image.BICUBIC)
                for f in frames]  # fmt: skip


def _display_transform(card_name: str | None) -> Callable[[Any], Any] | None:
    """The card's transform with its normalisation undone (PIL in, PIL out), or None."""
    if not card_name:
        return None
    try:
        from prisma_mm.zoo.registry import build_on_meta

        transform = build_on_meta(card_name).spec.transform
    except (PrismaError, KeyError, AttributeError):
        return None
    if hasattr(transform, "frames") and hasattr(transform, "mean"):  # a video card's clips
        return _ClipDisplay(transform)
    steps = list(getattr(transform, "transforms", []))
    normalize = next((s for s in steps if type(s).__name__ == "Normalize"), None)

    def display(image: Any) -> Any:
        from PIL import Image

        from prisma_mm.data.images import to_pil_rgb

        tensor = transform(to_pil_rgb(image))
        if normalize is not None:
            mean = torch.as_tensor(normalize.mean).view(-1, 1, 1)
            std = torch.as_tensor(normalize.std).view(-1, 1, 1)
            tensor = tensor * std + mean
        pixels = (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(pixels))

    return display


class _ClipDisplay:
    """The display transform of a video card: clips go through ``clip_transform``."""

    def __init__(self, clip_transform: Any) -> None:
        self.clip_transform = clip_transform

    def __call__(self, image: Any) -> Any:
        raise PrismaError("this index's model takes clips: its samples are drawn as frames")


__all__ = [
    "SCORES",
    "CacheSample",
    "FeatureIndex",
    "IndexOptions",
    "IndexState",
    "SampleImages",
    "build_index",
    "build_index_from_source",
    "cached_layout",
    "decoder_neighbours",
    "entry_scores",
    "iter_shard",
    "key_hash",
    "latent_token_maps",
    "sample_codes",
    "token_scores",
]
