"""Write an activation cache: stream a data source through a hooked model into resumable
webdataset shards and a manifest. This module is the run; its parts live beside it:
:mod:`~prisma_mm.cache.inputs` (the seeded visiting order and the decoding workers),
:mod:`~prisma_mm.cache.shards` (samples -> shards -> manifest commits, in a background
thread) and :mod:`~prisma_mm.cache.stats` (running moments).

Inputs are visited in a seeded random order (see :mod:`~prisma_mm.cache.inputs`), recorded in
the manifest. DataLoader workers decode them (a damaged input becomes a skip marker with its
reason, never a crash); the main thread runs ``model.run_with_cache`` with
``stop_at_layer="auto"`` (the forward stops after the last hook needed); a background thread
packs samples into shards, so the forward never waits on the disk. A shard is written under a
temporary name and renamed when complete; the manifest is then rewritten atomically and
records that the first ``inputs_done`` inputs of the visiting order are in complete shards.
Re-running the same call after a crash at any moment discards partial shards and resumes
from there, so the finished cache holds exactly the inputs of an uninterrupted run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from prisma_mm.cache import manifest as fmt
from prisma_mm.cache.inputs import (
    DEFAULT_ORDER_SEED,
    PREPARERS,
    InputBatches,
    describe_order,
    parse_order_seed,
    probe_input,
)
from prisma_mm.cache.parts import (
    PARTS_DIR,
    block,
    check_siblings,
    part_dirs,
    part_name,
    resolve_part,
    try_merge,
)
from prisma_mm.cache.shards import BackgroundSink, CacheSink, Job, ShardFile
from prisma_mm.cache.stats import sample_moments
from prisma_mm.data.sources import Source, open_source
from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout

# Names other modules import from here (the writer before it was split by concern).
__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PREPARERS",
    "CacheSink",
    "ShardFile",
    "new_manifest",
    "parse_hooks",
    "parse_tokens",
    "random_tokens",
    "token_index",
    "weights_fingerprint",
    "write_cache",
]

DEFAULT_SHARD_SIZE = 256
TOKEN_CHOICES = ("all", "cls", "patches")
# Inputs per forward when --batch-size is not given, by device type.
DEFAULT_BATCH_SIZES = {"cuda": 256, "cpu": 32}
# Prompts per generation (a whole pipeline run per batch, VAE decode included).
DEFAULT_PROMPT_BATCH_SIZES = {"cuda": 16, "cpu": 4}
RANDOM_TOKEN = -1  # the manifest's token_index under --tokens random:K (each sample's own)


# ----- model, hooks, tokens ---------------------------------------------------------------------
def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and all bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.device.type == "meta":
            raise PrismaError(f"model tensor {name!r} is on the meta device: it has no weights")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def parse_hooks(hooks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (duplicates refused)."""
    names = [h.strip() for h in hooks.split(",")] if isinstance(hooks, str) else list(hooks)
    names = [h for h in names if h]
    if not names:
        raise PrismaError("no hooks given: pass --hooks, e.g. blocks.11.hook_resid_post")
    duplicates = sorted({h for h in names if names.count(h) > 1})
    if duplicates:
        raise PrismaError(f"hook {duplicates[0]!r} is listed twice in --hooks")
    return names


def parse_tokens(tokens: str | Sequence[int]) -> str | list[int]:
    """``all`` | ``cls`` | ``patches`` | ``random:K`` (K patch tokens per input, see
    :func:`random_tokens`) | an explicit list of token indices (``"0,5,9"``)."""
    if isinstance(tokens, str):
        spec = tokens.strip().lower()
        if spec in TOKEN_CHOICES:
            return spec
        if spec.startswith("random"):
            count = spec.partition(":")[2].strip()
            if not count.isdigit() or int(count) < 1:
                raise PrismaError(
                    f"--tokens {tokens!r}: give random:K with K a positive number of patch "
                    "tokens per input, e.g. random:16"
                )
            return f"random:{int(count)}"
        try:
            indices = [int(t) for t in spec.replace(" ", "").split(",") if t]
        except ValueError:
            raise PrismaError(
                f"--tokens {tokens!r}: use all, cls, patches or a list of token indices like 0,5,9"
            ) from None
        if not indices:
            raise PrismaError("--tokens is empty: use all, cls, patches or indices like 0,5,9")
        return indices
    indices = [int(t) for t in tokens]
    if not indices:
        raise PrismaError("tokens is an empty list: give at least one token index")
    return indices


def random_count(spec: Any) -> int | None:
    """K of a ``random:K`` token spec, else None."""
    if isinstance(spec, str) and spec.startswith("random:"):
        return int(spec.partition(":")[2])
    return None


def random_tokens(key: str, count: int, n_prefix: int, n_tokens: int) -> list[int]:
    """``count`` distinct patch token positions (in ``n_prefix .. n_tokens-1``, sorted) for the
    input whose cache key is ``key``: seeded by the key alone, so the same on every run,
    resume, part and batch."""
    seed = int.from_bytes(
        hashlib.blake2b(f"tokens/{key}".encode(), digest_size=8).digest(), "little"
    )
    chosen = np.random.default_rng(seed).choice(n_tokens - n_prefix, size=count, replace=False)
    return sorted(int(t) + n_prefix for t in chosen)


def token_index(spec: str | list[int], hook: str, n_tokens: int, layout: Any,
                per_sample: bool = False) -> list[int]:  # fmt: skip
    """The token positions kept for a hook whose activation has ``n_tokens`` tokens.
    ``random:K`` (only for a caller that picks each input's tokens, ``per_sample=True``, as
    the writer does with :func:`random_tokens`): K entries of ``RANDOM_TOKEN``."""
    if spec == "all":
        return list(range(n_tokens))
    if n_tokens != layout.n_tokens:
        raise PrismaError(
            f"hook {hook!r} has {n_tokens} token(s), not the layout's {layout.n_tokens} "
            f"(a pooled output): --tokens {spec} applies to token hooks; cache it with --tokens all"
        )
    if spec == "cls":
        if layout.n_prefix == 0:
            raise PrismaError(
                "--tokens cls: this model has no CLS token (no prefix tokens); use patches or all"
            )
        return [0]
    if spec == "patches":
        return list(range(layout.n_prefix, layout.n_tokens))
    count = random_count(spec)
    if count is not None:
        if not per_sample:
            raise PrismaError(
                f"--tokens {spec} picks tokens per input and applies to `prisma-mm cache`; "
                "use all, cls, patches or token indices here"
            )
        n_patches = layout.n_tokens - layout.n_prefix
        if count > n_patches:
            raise PrismaError(
                f"--tokens {spec}: the model has {n_patches} patch tokens per input; give K "
                f"<= {n_patches} (or --tokens patches)"
            )
        return [RANDOM_TOKEN] * count
    bad = [t for t in spec if not 0 <= t < n_tokens]
    if bad:
        raise PrismaError(f"--tokens {bad[0]} is outside 0..{n_tokens - 1} for hook {hook!r}")
    if len(set(spec)) != len(spec):
        raise PrismaError("--tokens lists a token index twice")
    return list(spec)


def _model_card(model: Any) -> tuple[str, dict[str, Any]]:
    card = getattr(model, "card", None)
    if card is None:
        return type(model.module).__name__, {}
    return card.name, card.to_dict() if hasattr(card, "to_dict") else dict(vars(card))


# ----- the output directory -------------------------------------------------------------------
def _check_out(out: Path) -> None:
    """Refuse an ``out`` that cannot become a cache directory, before any work starts."""
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file, not a directory: choose a directory")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise PrismaError(
            f"cannot write to output directory {str(out)!r} ({str(above)!r} is a file): "
            "choose a writable --out"
        )
    if (out / PARTS_DIR).is_dir():
        n_parts = sorted({count for _, count in part_dirs(out)})
        raise PrismaError(
            f"--out {str(out)!r} holds a cache written in {n_parts[0] if n_parts else 'several'} "
            "parts: resume it with --part i/N (or the launcher), or write to a new --out"
        )
    if out.is_dir() and not (out / fmt.MANIFEST).exists():
        _refuse_foreign(out)


def _check_parts_out(out: Path) -> None:
    """Refuse a top-level ``out`` for parts that holds anything but parts and their merge."""
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file, not a directory: choose a directory")
    if not out.is_dir():
        return
    if (out / fmt.MANIFEST).is_file() and "parts" not in fmt.read_manifest(out):
        raise PrismaError(
            f"--out {str(out)!r} holds a cache written by one process: parts cannot add to it; "
            "write the parts to a new --out"
        )
    foreign = sorted(
        path.name
        for path in out.iterdir()
        if path.name not in (PARTS_DIR, fmt.MANIFEST, fmt.LOCK_FILE)
        and not path.name.endswith(fmt.TMP_SUFFIX)
    )
    if foreign:
        raise PrismaError(
            f"--out {str(out)!r} is not empty and holds no cache ({foreign[0]!r} …): choose an "
            "empty or new directory"
        )


def _refuse_foreign(out: Path) -> None:
    """Refuse a directory without a manifest that holds files a writer did not leave."""
    foreign = sorted(
        path.name
        for path in out.iterdir()
        if path.name != fmt.LOCK_FILE and not path.name.endswith(fmt.TMP_SUFFIX)
    )
    if foreign:
        raise PrismaError(
            f"--out {str(out)!r} is not empty and holds no cache ({foreign[0]!r} …): choose an "
            "empty or new directory"
        )


def _prepare_out(out: Path) -> Any:
    """Create ``out`` and take its lock; returns the open lock file (kept for the run)."""
    _check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / fmt.LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run
    except OSError as error:
        raise PrismaError(
            f"cannot write to output directory {str(out)!r} ({error.strerror or error}): "
            "choose a writable --out"
        ) from error
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        raise PrismaError(
            f"another `prisma-mm cache` is writing to {str(out)!r}: wait for it or choose "
            "another --out"
        ) from error
    return lock


def _clean_leftovers(out: Path, manifest: Mapping[str, Any] | None) -> None:
    """Remove partial files and shards that the manifest does not list (an interrupted run)."""
    if manifest is None:
        _refuse_foreign(out)  # checked again under the lock
    listed = {s["name"] for s in manifest["shards"]} if manifest else set()
    for path in out.iterdir():
        if path.name.endswith(fmt.TMP_SUFFIX) or (
            fmt.SHARD_RE.match(path.name) and path.name not in listed
        ):
            path.unlink()


_IDENTITY = ("model", "fingerprint", "hooks", "dtype", "tokens", "source", "order", "generation")
# Fields of a manifest that a part only has alone (its share), not in the merged manifest.
_PART_ONLY = ("part", "tar_shards_done")
# Caches written before the visiting order was recorded were written in the source's order.
_SOURCE_ORDER = {"method": "source", "seed": None}


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    return {
        "model": model.get("name"),
        "fingerprint": model.get("fingerprint"),
        "hooks": manifest["hooks"],
        "dtype": manifest["dtype"],
        "tokens": manifest.get("tokens"),
        "source": manifest.get("source"),
        "order": manifest.get("order", _SOURCE_ORDER),
        "generation": manifest.get("generation"),  # prompt caches: steps, guidance, size
    }


def _check_same_cache(out: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    before, now = _identity(old), _identity(new)
    for field in _IDENTITY:
        if before[field] != now[field]:
            what = {
                "fingerprint": "the model weights differ",
                "source": "the data source differs",
                "order": "the visiting order differs",
            }.get(field, f"{field} {before[field]!r} differs from this run's {now[field]!r}")
            detail = ""
            if field == "fingerprint":
                detail = f" ({str(before[field])[:19]}… vs {str(now[field])[:19]}…)"
            elif field == "source":
                detail = f" ({before[field]} vs {now[field]})"
            elif field == "order":
                detail = (
                    f" (written with --order-seed {_seed_flag(before[field])}, this run "
                    f"{_seed_flag(now[field])}; pass the same --order-seed to resume)"
                    if before[field].get("seed") != now[field].get("seed")
                    else " (this numpy permutes differently: resume with the numpy that wrote it)"
                )
            raise PrismaError(
                f"{str(out)!r} already holds a different cache: {what}{detail}; write to a new "
                "--out directory (or delete the old cache)"
            )


def _seed_flag(order: Mapping[str, Any]) -> str:
    seed = order.get("seed")
    return "none" if seed is None else str(seed)


# ----- the entry point ---------------------------------------------------------------------------
def new_manifest(
    model: Mapping[str, Any],
    hooks: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    dtype: str = "float16",
    tokens: str | list[int] = "all",
    token_index: Mapping[str, Sequence[int]] | None = None,
    layout: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
    order: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an empty cache: ``model`` = {name, card, weights, fingerprint};
    ``shapes[hook]`` = [tokens, d]; ``order`` = how inputs are visited (see
    :func:`~prisma_mm.cache.inputs.describe_order`; default: the source's order).
    :class:`CacheSink` fills in shards and statistics."""
    from prisma_mm import __version__

    dtype = fmt.canonical_dtype(dtype)
    keys = fmt.hook_keys(hooks)
    if token_index is None:
        token_index = {h: list(range(int(shapes[h][0]))) for h in hooks}
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "prisma_mm_version": __version__,
        "model": dict(model),
        "hooks": list(hooks),
        "hook_keys": keys,
        "key_hooks": {k: h for h, k in keys.items()},
        "dtype": dtype,
        "storage_dtype": fmt.STORAGE_DTYPES[dtype],
        "tokens": tokens,
        "token_index": {h: [int(t) for t in token_index[h]] for h in hooks},
        "shapes": {h: [int(v) for v in shapes[h]] for h in hooks},
        "layout": dict(layout or {}),
        "source": dict(source or {}),
        "order": dict(order or _SOURCE_ORDER),
        "shard_size": shard_size,
        "created": fmt.utc_now(),
        "updated": fmt.utc_now(),
        "complete": False,
        "exhausted": False,
        "limit": limit,
        "inputs_done": 0,
        "n_samples": 0,
        "n_shards": 0,
        "n_skipped": 0,
        "shards": [],
        "skipped": [],
        "stats": {},
    }


def _to_host(moments: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.to("cpu", non_blocking=True) for k, v in moments.items()}


def _disk_error(error: OSError, out: Path, manifest: Mapping[str, Any]) -> PrismaError:
    kept = (
        f"{manifest['n_shards']} complete shard(s) with {manifest['n_samples']} samples stay "
        "valid; re-run the same command to resume"
    )
    if error.errno == errno.ENOSPC:
        return PrismaError(f"disk full while writing the cache in {str(out)!r}: free space; {kept}")
    name = f" {error.filename}" if error.filename else ""
    return PrismaError(f"cannot write{name} in {str(out)!r} ({error.strerror or error}); {kept}")


def _check_counts(batch_size: Any, workers: Any, shard_size: Any, limit: Any) -> None:
    """One line per wrong count, naming the flag (checked before any work starts)."""
    for flag, value, low in (
        ("--batch-size", 1 if batch_size is None else batch_size, 1),
        ("--shard-size", shard_size, 1),
        ("--workers", workers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            what = "a positive number" if low else "0 (decode in the main process) or more"
            raise PrismaError(f"{flag} {value!r}: give {what}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PrismaError(f"--limit {limit!r}: give a positive number of inputs")


def write_cache(
    model: Any,
    data: Any,
    out: str | Path,
    hooks: str | Sequence[str],
    *,
    weights: str | None = "pretrained",
    tokens: str | Sequence[int] = "all",
    dtype: str = "float16",
    batch_size: int | None = None,
    workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device = "auto",
    limit: int | None = None,
    order_seed: int | None = DEFAULT_ORDER_SEED,
    img_size: int | None = None,
    progress: bool = True,
    part: str | tuple[int, int] | None = None,
    clip: str | None = None,
    video_backend: str = "auto",
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream ``data`` through ``model`` and cache the activations at ``hooks`` in ``out``.

    ``model``: a card name (built with ``weights`` on ``device``) or a
    :class:`~prisma_mm.hooks.HookedModel`. ``data``: anything :func:`open_source` accepts.
    Each input becomes one sample holding a ``[tokens, d]`` array per hook (``tokens``:
    ``all`` | ``cls`` | ``patches`` | ``random:K`` | index list) in ``dtype`` (float16,
    bfloat16, float32). ``device``: ``auto`` (a GPU when there is one, else the CPU), ``cpu``,
    ``cuda``, ``cuda:N``; ``batch_size`` None: 256 on a GPU, 32 on the CPU (prompts: 16, 4).
    ``shard_size`` inputs per shard; ``limit`` caps the number of inputs read. Inputs are
    visited in a random order seeded by ``order_seed`` (None: the source's own order), so
    that shards of a class-sorted data set are mixed. ``img_size``: build the card at this
    input size (see :func:`~prisma_mm.zoo.registry.load_model`; a card name only).
    Re-running the same call resumes an interrupted cache.

    ``part``: ``"i/N"`` writes part i of N cooperating processes (default: the launcher's
    RANK / WORLD_SIZE or srun's SLURM_PROCID / SLURM_STEP_NUM_TASKS when set) into ``out/parts/`` (see
    :mod:`~prisma_mm.cache.parts`), on ``cuda:LOCAL_RANK`` when the device is a GPU; the
    last part to finish merges the manifest. Returns the manifest (the merged one once every
    part is complete, else this part's).

    Video data (see :mod:`prisma_mm.data.video`): one input per clip window, cut by ``clip``
    (``uniform:T``, ``stride:T:S``, ``windows:T:S[:HOP]``, ``card``; None: the card's own),
    decoded in the DataLoader workers by ``video_backend`` (``auto``, ``pyav``, ``decord``,
    ``torchcodec``).

    Diffusion cards (see :mod:`prisma_mm.zoo.diffusion`) generate from prompts (``data``: a
    prompts file or caption tar shards, see :mod:`prisma_mm.data.prompts`): one input per
    (prompt, seed), one sample per denoising step (key ``<input key>-sNNN``, provenance
    prompt, seed, step and timestep); ``generation``: ``steps``, ``guidance`` (None: the
    card's), ``seeds`` (each prompt with each seed; default 0), ``prompt_column`` (CSV /
    JSONL / json member), ``keep_images`` (the generated image as a ``png`` member of the
    step-0 sample). ``img_size``: the generation size.
    """
    _check_counts(batch_size, workers, shard_size, limit)
    part_index, n_parts, local_rank = resolve_part(part)
    order_seed = parse_order_seed(order_seed)
    hooks = parse_hooks(hooks)
    token_spec = parse_tokens(tokens)
    dtype_name = fmt.canonical_dtype(dtype)
    top = out = Path(out).expanduser()
    if n_parts > 1:
        _check_parts_out(top)
        out = top / PARTS_DIR / part_name(part_index, n_parts)
    _check_out(out)
    if isinstance(model, str):
        from prisma_mm.zoo.registry import check_img_size, get_card

        # an unknown or absent device: one line, before work
        device = _pick_device(device, part_index, n_parts, local_rank)
        check_img_size(get_card(model), img_size)
    elif img_size is not None:
        raise PrismaError(
            "img_size applies to a model card name: build the HookedModel at that size instead"
        )
    generation = _check_generation(model, generation)
    if generation is not None:
        from prisma_mm.data.prompts import open_prompts

        source = open_prompts(data, generation.pop("prompt_column"), generation.pop("seeds"))
        if clip is not None:
            raise PrismaError(f"--clip {clip!r} applies to video data, not prompts")
    else:
        import prisma_mm.data.prompts  # noqa: F401 - registers the prompts: prefix

        source = _clip_source(open_source(data), clip, video_backend, model)
        if source.kind == "prompt":
            raise PrismaError(
                f"{_describe_short(source)} holds prompts: caching from prompts needs a "
                "diffusion card (e.g. --model sdxl-turbo; see `prisma-mm zoo list --family "
                "diffusers`)"
            )
    if source.kind not in PREPARERS:
        raise PrismaError(
            f"the cache writer cannot prepare {source.kind!r} inputs yet (known: "
            f"{sorted(PREPARERS)})"
        )
    if source.count() == 0:
        raise PrismaError(
            f"data source {_describe_short(source)} has no inputs (no image files found)"
        )
    span = _span(source, limit, part_index, n_parts)
    model, new = _prepare_model(
        model, weights, device, hooks, token_spec, dtype_name, source, shard_size, limit, img_size,
        generation,
    )  # fmt: skip
    new["order"] = describe_order(source, order_seed)
    if n_parts > 1:
        new["part"] = span["part"]
        new["inputs_done"] = span["start"]
        check_siblings(top, part_index, n_parts, new)
    if batch_size is None:
        sizes = DEFAULT_BATCH_SIZES if generation is None else DEFAULT_PROMPT_BATCH_SIZES
        batch_size = sizes.get(model.device.type, sizes["cpu"])
    lock = _prepare_out(out)
    try:
        manifest = _write(model, new, source, out, batch_size, workers, shard_size, limit,
                          progress, span)  # fmt: skip
    finally:
        lock.close()
    if n_parts > 1 and manifest.get("complete"):
        merged = try_merge(top)
        if merged is not None:
            return merged
    return manifest


def _clip_source(source: Source, clip: str | None, backend: str, model: Any) -> Source:
    """A video source cut into clips (``clip``, else the card's own sampling); other kinds
    refuse ``clip``."""
    if source.kind != "video":
        if clip is not None:
            raise PrismaError(f"--clip {clip!r} applies to video data; {_describe_short(source)} "
                              f"holds {source.kind} inputs")  # fmt: skip
        return source
    from prisma_mm.data.video import sample_source

    if isinstance(model, str):
        from prisma_mm.zoo.registry import get_card

        card = get_card(model)
    else:
        card = getattr(model, "card", None)
    return sample_source(source, clip, card, backend)


def _pick_device(device: Any, part_index: int, n_parts: int, local_rank: int | None
                 ) -> torch.device:  # fmt: skip
    """``auto`` -> cuda when there is a GPU, else cpu; a part on ``cuda`` takes
    ``cuda:LOCAL_RANK`` (by hand, without a launcher: ``cuda:(i mod GPUs)``)."""
    from prisma_mm.zoo.registry import resolve_device

    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and n_parts > 1 and torch.cuda.is_available():
        gpu = local_rank if local_rank is not None else part_index
        name = f"cuda:{gpu % torch.cuda.device_count()}"
    return resolve_device(name)


def _span(source: Source, limit: int | None, part_index: int, n_parts: int) -> dict[str, Any]:
    """Where this process starts and stops in the visiting order: ``start`` (first position),
    ``stop`` (None: the end of the stream), ``final`` (reaching ``stop`` reads the whole
    source) and, for a part, its manifest record. Refuses a split with an empty part."""
    n_inputs = source.count()
    total = limit if n_inputs is None else min(n_inputs, limit if limit is not None else n_inputs)
    covers_all = n_inputs is not None and (limit is None or limit >= n_inputs)
    if n_parts == 1:
        return {"start": 0, "stop": total, "final": covers_all, "part": None}
    if not source.random_access and source.n_parts() < n_parts:
        raise PrismaError(
            f"the data has {source.n_parts()} tar shard(s), fewer than the {n_parts} parts: "
            f"use at most {source.n_parts()} parts (parts split tar shards, not inputs)"
        )
    if total is not None and total < n_parts:
        raise PrismaError(
            f"{total} input(s) cannot be split into {n_parts} parts: use at most {total} parts"
        )
    if total is None:
        start, stop = 0, None
    else:
        low, high = block(part_index, n_parts, total)
        # random access: the block of the one visiting order; tar: a part-local count
        start, stop = (low, high) if source.random_access else (0, high - low)
    part = {
        "index": part_index,
        "count": n_parts,
        "inputs": [start, stop],
        "total": total,
        "random_access": source.random_access,
    }
    final = covers_all if source.random_access else limit is None
    return {"start": start, "stop": stop, "final": final, "part": part}


def token_rows(act: Tensor) -> Tensor:
    """A hook's activation as ``[batch, tokens, d]``: per-head hooks (``attn.hook_q/k/v/z``,
    ``[batch, tokens, heads, d_head]``) are stored with their heads concatenated,
    ``d = heads * d_head``, as attention-output SAEs read ``hook_z``."""
    return act.flatten(2) if act.dim() == 4 else act


def _prepare_model(
    model: Any,
    weights: str | None,
    device: str | torch.device,
    hooks: list[str],
    token_spec: str | list[int],
    dtype_name: str,
    source: Source,
    shard_size: int,
    limit: int | None,
    img_size: int | None = None,
    generation: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load the model, check the hooks, find their shapes; returns (model, new manifest)."""
    if isinstance(model, str):
        from prisma_mm.zoo.registry import load_model

        model = load_model(model, weights=weights, device=device, img_size=img_size)
        weights_label = weights
    else:
        weights_label = "object"
    if generation is not None:
        # a pipeline: shapes from its blocks (no probe), settings checked before any work
        layout, hook_shapes = model.describe_hooks(hooks)
        settings = {**model.settings(generation["steps"], generation["guidance"]),
                    "keep_images": bool(generation["keep_images"])}  # fmt: skip
        index = {h: token_index(token_spec, h, hook_shapes[h][0], layout, True) for h in hooks}
        shapes = {h: [len(index[h]), hook_shapes[h][1]] for h in hooks}
        new = new_manifest(
            _model_info(model, weights_label), hooks, shapes, dtype_name, token_spec, index,
            layout.to_dict(), source.describe(), shard_size, limit,
        )  # fmt: skip
        new["generation"] = settings
        return model, new
    for hook in hooks:
        if hook.startswith(("text.", "text2.")):
            raise PrismaError(
                f"hook {hook!r} is on the text tower, but the cache runs images through the "
                "model: choose an image hook (blocks.{i}...)"
            )
        model.hook_point(hook)
        if hook.endswith("hook_pattern"):
            raise PrismaError(
                f"hook {hook!r} is an attention pattern [heads, q, k], not [tokens, d]: the "
                "cache stores token activations; drop it from --hooks"
            )
    _check_clip_length(model, source)
    with torch.inference_mode():
        _, probe_cache = model.run_with_cache(probe_input(model), hooks, stop_at_layer="auto")
    probe_cache = {h: token_rows(a) for h, a in probe_cache.items()}
    # MViT / Swin3D: each stage has its own grid (model.layout_for); one cache, one grid
    layouts = {h: model.layout_for(h) if hasattr(model, "layout_for") else model.layout
               for h in hooks}  # fmt: skip
    if len({layouts[h] for h in hooks}) > 1:
        grids = ", ".join(f"{h} {layouts[h].grid}" for h in hooks)
        raise PrismaError(
            f"the hooks see different token grids ({grids}): cache hooks of one stage "
            "together, or each stage in its own cache"
        )
    layout = layouts[hooks[0]]
    index = {
        h: token_index(token_spec, h, int(probe_cache[h].shape[1]), layout, True) for h in hooks
    }
    shapes = {h: [len(index[h]), int(probe_cache[h].shape[2])] for h in hooks}
    new = new_manifest(
        _model_info(model, weights_label), hooks, shapes, dtype_name, token_spec, index,
        layout.to_dict(), source.describe(), shard_size, limit,
    )  # fmt: skip
    return model, new


def _model_info(model: Any, weights_label: str | None) -> dict[str, Any]:
    name, card = _model_card(model)
    return {
        "name": name,
        "card": card,
        "weights": weights_label,
        "fingerprint": weights_fingerprint(model.module),
    }


def _is_pipeline(model: Any) -> bool:
    """A diffusion card name or a :class:`~prisma_mm.zoo.diffusion.HookedPipeline`."""
    if isinstance(model, str):
        from prisma_mm.zoo.registry import get_card

        return get_card(model).family == "diffusers"
    return hasattr(model, "describe_hooks") and hasattr(model, "pipe")


GENERATION_FLAGS = {
    "steps": "--steps",
    "guidance": "--guidance",
    "seeds": "--seeds",
    "prompt_column": "--prompt-column",
    "keep_images": "--keep-images",
}


def _check_generation(model: Any, generation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The generation settings of a diffusion model (defaults filled in), else None; a
    setting given for another model is refused in one line."""
    given = {k: v for k, v in (generation or {}).items() if v is not None and v is not False}
    unknown_keys = sorted(set(given) - set(GENERATION_FLAGS))
    if unknown_keys:
        raise PrismaError(f"generation: unknown setting {unknown_keys[0]!r} (known: "
                          f"{', '.join(GENERATION_FLAGS)})")  # fmt: skip
    if not _is_pipeline(model):
        if given:
            flag = GENERATION_FLAGS[sorted(given)[0]]
            raise PrismaError(
                f"{flag} applies to diffusion cards (prompts -> images); this model reads its "
                "inputs from --data as they are"
            )
        return None
    from prisma_mm.data.prompts import parse_seeds

    return {
        "steps": given.get("steps"),
        "guidance": given.get("guidance"),
        "seeds": parse_seeds(given.get("seeds")),
        "prompt_column": given.get("prompt_column"),
        "keep_images": bool(given.get("keep_images")),
    }


def _check_clip_length(model: Any, source: Source) -> None:
    """Refuse, before work, clips of another length than the video model takes."""
    frames = getattr(model.spec, "frames", None)
    sampling = getattr(source, "sampling", None)
    if source.kind != "video" or frames is None or sampling is None:
        return
    if sampling.frames != frames:
        raise PrismaError(
            f"--clip {sampling.spec()} gives clips of {sampling.frames} frames but the model "
            f"takes {frames}: sample {frames} frames per clip (e.g. --clip windows:{frames}:"
            f"{sampling.stride})"
        )


def _open_manifest(out: Path, new: dict[str, Any], limit: int | None,
                   shard_size: int) -> dict[str, Any]:  # fmt: skip
    """The manifest to continue: the one in ``out`` when it holds this cache (a resume), else
    ``new``, written now. A manifest that holds no sample (a refused all-unreadable run)
    starts over, so fixing the data and re-running works."""
    if (out / fmt.MANIFEST).exists():
        manifest = fmt.read_manifest(out)
        if manifest["shards"]:
            _check_same_cache(out, manifest, new)
            if manifest.get("part") != new.get("part"):
                raise PrismaError(
                    f"{str(out)!r} holds part {manifest.get('part')} but this run writes "
                    f"{new.get('part')}: start every part with the same --limit and N"
                )
        _clean_leftovers(out, manifest)
        if manifest["shards"]:
            manifest["limit"] = limit
            manifest["shard_size"] = shard_size
            return manifest
    else:
        _clean_leftovers(out, None)
    try:
        fmt.write_manifest(out, new)
    except OSError as error:
        raise _disk_error(error, out, new) from error
    return new


def _write(
    model: Any,
    new: dict[str, Any],
    source: Source,
    out: Path,
    batch_size: int,
    workers: int,
    shard_size: int,
    limit: int | None,
    progress: bool,
    span: Mapping[str, Any],
) -> dict[str, Any]:
    device = model.device
    hooks: list[str] = new["hooks"]
    index: dict[str, list[int]] = new["token_index"]
    dtype_name: str = new["dtype"]
    manifest = _open_manifest(out, new, limit, shard_size)
    start = manifest["inputs_done"]
    stop = span["stop"]
    if manifest.get("exhausted") or (stop is not None and start >= stop):
        if progress:
            print(f"cache {out} is complete: {manifest['n_samples']} samples", flush=True)
        return manifest
    manifest["complete"] = False

    prepare = PREPARERS[source.kind](model)
    part = span["part"] or {"index": 0, "count": 1}
    done = {shard: high - low for shard, low, high in manifest.get("tar_shards_done", [])}
    inputs = InputBatches(source, prepare, start, stop, batch_size, new["order"]["seed"],
                          part["index"], part["count"], done)  # fmt: skip
    random_k = random_count(new["tokens"])
    layout = TokenLayout.from_dict(new["layout"])  # a pipeline's: its hooks' grid
    generation = new.get("generation")
    loader = DataLoader(
        inputs,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    sink = CacheSink(out, manifest, shard_size)
    background = BackgroundSink(sink)
    background.start()
    total = None if stop is None else max(stop - start, 0)
    n_tokens = len(index[hooks[0]])
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, unit="input", desc=f"cache {out.name}", disable=not progress, smoothing=0.05
    )
    seen_end = start
    written = skipped = 0
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                background.raise_error()
                records, reasons, pixels = batch["records"], batch["reasons"], batch["pixels"]
                n_inputs = len(records)
                arrays: dict[str, Tensor] = {}
                moments = None
                ready = None
                n_ok = 0
                if pixels is not None:
                    records, reasons, cache = _run_batch(
                        model, records, reasons, pixels, hooks, generation
                    )
                    n_ok = len(cache[hooks[0]])
                    picks = None
                    if random_k is not None:
                        kept = [r for r, why in zip(records, reasons) if why is None]
                        chosen = [random_tokens(r["key"], random_k, layout.n_prefix,
                                                layout.n_tokens) for r in kept]  # fmt: skip
                        for record, tokens in zip(kept, chosen):
                            record["tokens"] = tokens
                        picks = torch.tensor(chosen, device=device)  # [n_ok, K]
                    for hook in hooks:
                        act = token_rows(cache[hook])
                        if picks is not None:
                            act = act[torch.arange(len(act), device=device)[:, None], picks]
                        elif len(index[hook]) != act.shape[1]:
                            act = act[:, index[hook]]
                        arrays[hook] = act.to(fmt.TORCH_DTYPES[dtype_name]).contiguous()
                    if device.type == "cuda":
                        moments = {h: _to_host(sample_moments(a)) for h, a in arrays.items()}
                        arrays = {h: a.to("cpu", non_blocking=True) for h, a in arrays.items()}
                        ready = torch.cuda.Event()
                        ready.record()
                background.put(Job(records, reasons, arrays, moments, ready))
                seen_end = records[-1]["position"] + 1
                written += n_ok
                bar.update(n_inputs)
                skipped += sum(reason is not None for reason in reasons)
                elapsed = max(time.perf_counter() - began, 1e-9)
                bar.set_postfix_str(
                    f"{written * n_tokens / elapsed:,.0f} tok/s, {skipped} skipped", refresh=False
                )
        exhausted = stop is None or seen_end < stop or span["final"]
        background.put((seen_end, exhausted))
        background.close()
        background.raise_error()
    except BaseException as error:
        background.close()
        sink.abort()
        if isinstance(error, OSError) and background.error is error:
            raise _disk_error(error, out, sink.manifest) from error
        raise
    finally:
        bar.close()
    if sink.manifest["n_samples"] == 0:
        # nothing readable: leave no manifest behind, so the fixed data can be re-run
        (out / fmt.MANIFEST).unlink(missing_ok=True)
        first = sink.manifest["skipped"][0]["reason"] if sink.manifest["skipped"] else "no inputs"
        raise PrismaError(
            f"no readable input in {_describe_short(source)}: all {sink.manifest['n_skipped']} "
            f"inputs were skipped (first: {first}); nothing was written"
        )
    return sink.manifest


def _run_batch(model: Any, records: list[dict[str, Any]], reasons: list[str | None],
               inputs: Any, hooks: list[str], generation: Mapping[str, Any] | None
               ) -> tuple[list[dict[str, Any]], list[str | None], dict[str, Tensor]]:  # fmt: skip
    """The hooks' activations ``[n_samples, tokens, d]`` for one batch of prepared inputs,
    one sample per readable record; a pipeline generates from the prompts and expands each
    record into one per denoising step (see :func:`~prisma_mm.zoo.diffusion.cache_prompts`)."""
    if generation is not None:
        from prisma_mm.zoo.diffusion import cache_prompts

        return cache_prompts(model, records, reasons, inputs, hooks, generation)
    _, cache = model.run_with_cache(
        inputs.to(model.device, non_blocking=True), hooks, stop_at_layer="auto"
    )
    return records, reasons, cache


def _describe_short(source: Source) -> str:
    info = source.describe()
    where = info.get("root") or info.get("file") or info.get("urls") or info.get("class")
    return f"{info['type']} {where!r}"
