"""``prisma-mm eval``, ``stitch``, ``meta-sae`` and ``compare``: the analysis stages on the
command line. :func:`add_analysis_parsers` adds the four subcommands; each handler takes the
parsed arguments and returns an exit code. Outputs land beside the analysed dictionary unless
``--out`` says otherwise. Every input (paths, sizes, output locations) is checked before any
work starts, and a mistake ends in one :class:`~prisma_mm.errors.PrismaError` line.
Formulas and options: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError

DEFAULT_STITCH_TOKENS = 65536  # rows of the stitching sample

__all__ = [
    "add_analysis_parsers",
    "check_output_dir",
    "check_output_file",
    "image_batches",
    "load_cache_rows",
    "run_compare",
    "run_eval",
    "run_meta_sae",
    "run_stitch",
]


# ----- shared helpers ------------------------------------------------------------------------
def _print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    width = max((len(name) for name, _ in rows), default=0)
    print(title)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1))
    return path


def check_output_file(path: str | Path, flag: str, example: str = "report.json") -> Path:
    """``path`` as a file to be written: refused when it is a directory, lies under a file, or
    is the config or weights file of a saved dictionary."""
    path = Path(path)
    if path.is_dir():
        raise PrismaError(
            f"{flag} {str(path)!r} is a directory: give a file path (e.g. {path / example})"
        )
    if (
        path.is_file()
        and (path.parent / "cfg.json").is_file()
        and path.name
        in (
            "cfg.json",
            "weights.safetensors",
        )
    ):
        raise PrismaError(
            f"{flag} {str(path)!r} would overwrite a saved dictionary: choose another"
        )
    _check_parents(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a directory to be written into: refused when it is a file or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrismaError(f"{flag} {str(path)!r} is a file: give a directory for the outputs")
    _check_parents(path, flag)
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrismaError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            return


def _check_device(args: argparse.Namespace) -> None:
    """``--device`` must exist on this machine (checked first: one line, before any work)."""
    from prisma_mm.zoo.registry import resolve_device

    if args.device is not None:
        resolve_device(args.device)


def _load_dictionary(path: str, device: str | None) -> Any:
    from prisma_mm.sae.published import resolve_dictionary

    return resolve_dictionary(path, device=device or "cpu")


def _check_width(dictionary: Any, d: int, hooks: list[str], cache: str) -> None:
    """The cache's rows must have the width the dictionary reads (one line naming both)."""
    cfg = dictionary.cfg
    wanted = {"d_in": int(cfg.d_in)}
    if getattr(dictionary, "architecture", "") == "transcoder":
        wanted["d_out"] = int(getattr(dictionary, "d_out", cfg.d_in))
    wrong = {name: size for name, size in wanted.items() if size != d}
    if wrong:
        sizes = ", ".join(f"{name}={size}" for name, size in wanted.items())
        raise PrismaError(
            f"the dictionary reads {sizes} but cache {cache!r} holds rows of width {d} at "
            f"{', '.join(hooks)}: use a cache of the hook it was trained on"
        )


def _hooks_of(dictionary: Any, override: Sequence[str] | None) -> list[str]:
    from prisma_mm.analysis.spliced import dictionary_hooks

    if override:
        return dictionary_hooks(dictionary, override if len(override) > 1 else override[0])
    return dictionary_hooks(dictionary)


def _dataset(
    cache: str, hooks: list[str], split: str, eval_fraction: float, batch_size: int
) -> Any:
    from prisma_mm.cache import ActivationDataset

    return ActivationDataset(
        cache,
        hooks=hooks[0] if len(hooks) == 1 else hooks,
        batch_size=batch_size,
        shuffle_buffer=0,
        split=None if split == "all" else split,
        eval_fraction=eval_fraction,
        normalize=False,
    )


def load_cache_rows(
    cache: str,
    hooks: list[str],
    max_tokens: int,
    split: str = "eval",
    eval_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """A uniform random sample (without replacement, seeded) of ``max_tokens`` token rows of
    ``hooks`` from the whole ``split`` of the cache, or all its rows when it holds fewer:
    ``[n, d]`` for one hook, ``[n, n_hooks, d]`` for several (in no particular order).

    The split is read once; memory stays at ``max_tokens`` rows plus one batch. Each row gets
    a uniform random key and the ``max_tokens`` smallest keys are kept (a bottom-k
    reservoir), so every row of every shard is equally likely to be drawn.
    """
    if max_tokens <= 0:
        raise PrismaError(f"max_tokens must be positive, got {max_tokens}")
    ds = _dataset(cache, hooks, split, eval_fraction, 8192)
    generator = torch.Generator().manual_seed(seed)
    expected = ds.n_rows + ds.n_rows // 16 + 1  # exact for split all, else about that
    rows: torch.Tensor | None = None  # [<= max_tokens, ...] reservoir
    keys = torch.empty(0)
    filled = 0
    bar = tqdm(total=ds.n_rows, desc="sample rows", unit="tok", unit_scale=True,
               disable=not progress)  # fmt: skip
    for batch in ds:
        bar.update(batch.shape[0])
        batch_keys = torch.rand(batch.shape[0], generator=generator)
        room = max_tokens - filled
        if room > 0:  # filling: take rows as they come
            take = min(room, batch.shape[0])
            if rows is None or filled + take > rows.shape[0]:
                # grow towards max_tokens (a huge --max-tokens on a small split stays small)
                size = min(max_tokens, max(filled + take, 2 * filled, expected))
                grown = batch.new_empty((size, *batch.shape[1:]))
                grown_keys = torch.empty(size)
                if rows is not None:
                    grown[:filled], grown_keys[:filled] = rows[:filled], keys[:filled]
                rows, keys = grown, grown_keys
            rows[filled : filled + take] = batch[:take]
            keys[filled : filled + take] = batch_keys[:take]
            filled += take
            batch, batch_keys = batch[take:], batch_keys[take:]
        if batch.shape[0] == 0:
            continue
        assert rows is not None and rows.shape[0] == max_tokens
        enter = batch_keys < keys.max()  # only these can be among the smallest keys
        if not bool(enter.any()):
            continue
        batch, batch_keys = batch[enter], batch_keys[enter]
        merged = torch.cat([keys, batch_keys])
        kept = torch.zeros(merged.numel(), dtype=torch.bool)
        kept[merged.topk(max_tokens, largest=False).indices] = True
        evicted = (~kept[:max_tokens]).nonzero().flatten()
        arrived = kept[max_tokens:].nonzero().flatten()
        rows[evicted] = batch[arrived]
        keys[evicted] = batch_keys[arrived]
    bar.close()
    if rows is None or filled == 0:
        raise PrismaError(_no_rows(cache, split))
    return rows[:filled]


def _no_rows(cache: str, split: str) -> str:
    hint = (
        " (a small cache may hold no held-out samples: try --split all)" if split == "eval" else ""
    )
    return f"cache {cache!r} yielded no token rows for split {split!r}{hint}"


def _class_names(value: str | None) -> list[str] | None:
    """``--class-names``: a text file (one name per line) or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise PrismaError(f"--class-names {value!r} lists no names")
    return names


def _label_index(label: Any, kind: str, class_names: list[str] | None) -> int:
    if class_names is not None and str(label) in class_names:
        return class_names.index(str(label))
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        return int(label)
    if kind == "clip":
        raise PrismaError(f"label {label!r} is not among the class names")
    raise PrismaError(
        f"label {label!r} is not a class index: name the class folders by the classifier's "
        "indices (0, 1, ...) or pass --class-names FILE listing its classes in order"
    )


class _ImageBatches:
    """Re-iterable ``(images [B, 3, H, W], labels [B])`` batches from a data source."""

    def __init__(self, model: Any, source: Any, batch_size: int, max_images: int | None,
                 kind: str, class_names: list[str] | None) -> None:  # fmt: skip
        self.model, self.source = model, source
        self.batch_size, self.max_images = batch_size, max_images
        self.kind, self.class_names = kind, class_names

    def _items(self) -> Iterator[tuple[Any, Any]]:
        from prisma_mm.data.images import BadImage
        from prisma_mm.data.sources import Labeled

        for record, loader in self.source.stream():
            try:
                value = loader()
            except BadImage as error:
                print(f"prisma-mm: skipping {record.source}: {error}", file=sys.stderr)
                continue
            label = record.label
            if isinstance(value, Labeled):
                value, label = value.value, value.label
            if label is None:
                raise PrismaError(
                    f"input {record.source} has no label: spliced evaluation needs labelled "
                    "data (a class-folder tree root/<class>/<image>)"
                )
            yield value, label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[Any] = []
        labels: list[int] = []
        seen = 0
        for value, label in self._items():
            if self.max_images is not None and seen >= self.max_images:
                break
            images.append(value)
            labels.append(_label_index(label, self.kind, self.class_names))
            seen += 1
            if len(images) == self.batch_size:
                yield self.model.preprocess(images), torch.tensor(labels)
                images, labels = [], []
        if images:
            yield self.model.preprocess(images), torch.tensor(labels)


def image_batches(
    model: Any,
    data: Any,
    batch_size: int = 32,
    max_images: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[Any, list[str] | None]:
    """Labelled image batches for :func:`~prisma_mm.analysis.spliced.spliced_eval` from any
    ``--data`` source, and the class names (CLIP: ``class_names``, else the class folders)."""
    from prisma_mm.data.sources import open_source

    source = open_source(data)
    kind = getattr(getattr(model, "card", None), "task", "classifier")
    if kind == "clip" and class_names is None:
        class_names = list(getattr(source, "classes", []) or []) or None
        if class_names is None:
            raise PrismaError(
                "zero-shot evaluation needs class names: use a class-folder tree or --class-names"
            )
    return _ImageBatches(model, source, batch_size, max_images, kind, class_names), class_names


# ----- eval ----------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    """``prisma-mm eval DICT --cache CACHE``: metrics JSON + table (+ spliced with --data)."""
    _check_device(args)
    from prisma_mm.analysis.metrics import EmptyEvaluation, evaluate, plot_density_histogram
    from prisma_mm.sae.published import (
        card_token_rows,
        check_cache_size,
        dictionary_label,
        output_home,
    )

    out = check_output_file(
        args.out or output_home(args.dictionary) / "eval.json", "--out", "eval.json"
    )
    histogram = check_output_file(
        args.histogram or out.with_name(out.stem + "_density.png"), "--histogram", "density.png"
    )
    dictionary = _load_dictionary(args.dictionary, args.device)
    hooks = _hooks_of(dictionary, args.hook)
    ds = _dataset(args.cache, hooks, args.split, args.eval_fraction, args.batch_size)
    _check_width(dictionary, ds.d, hooks, args.cache)
    check_cache_size(dictionary, ds.manifest, args.cache)
    tokens = dictionary.metadata.get("tokens")
    if card_token_rows(ds.manifest, hooks[0], tokens) is not None:
        # metrics over tokens the SAE never saw would describe another distribution
        raise PrismaError(
            f"{args.dictionary} was trained on {tokens} tokens but cache {args.cache!r} keeps "
            f"{ds.manifest.get('tokens')!r}: evaluate on a cache written with --tokens {tokens}"
        )
    img_size = dictionary.metadata.get("img_size")
    task = _task_data(args, ds.manifest, hooks, img_size) if args.data is not None else None
    try:
        metrics = evaluate(
            dictionary,
            ds,
            dense_threshold=args.dense_threshold,
            max_tokens=args.max_tokens,
            device=args.device,
            progress=not args.quiet,
        )
    except EmptyEvaluation:
        raise PrismaError(_no_rows(args.cache, args.split)) from None
    report: dict[str, Any] = {
        "dictionary": dictionary_label(args.dictionary),
        "architecture": dictionary.architecture,
        "hooks": hooks,
        "cache": str(Path(args.cache).resolve()),
        "split": args.split,
        "metrics": metrics.to_dict(),
    }
    _print_table(f"{dictionary.architecture} dictionary on {', '.join(hooks)}", metrics.rows())
    if task is not None:
        report["spliced"] = _spliced(args, task, dictionary, hooks, ds.manifest)
    plot_density_histogram(metrics, histogram, title=f"feature density ({metrics.n_tokens} tokens)")
    report["histogram"] = str(histogram)
    _write_json(out, report)
    print(f"wrote {out} and {histogram}")
    return 0


def _task_data(
    args: argparse.Namespace, manifest: dict[str, Any], hooks: list[str],
    img_size: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The cache's model (or ``--model`` / ``--weights``), built at ``img_size`` (a published
    SAE's input size) when given, and ``--data``'s labelled batches; the model must have
    ``hooks``."""
    import prisma_mm
    from prisma_mm.cache.writer import weights_fingerprint

    templates = tuple(args.template or ("a photo of a {}.",))
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise PrismaError(f"--template {bad[0]!r} has no '{{}}' for the class name")
    class_names = _class_names(args.class_names)
    cached_model = manifest.get("model") or {}
    name = args.model or cached_model.get("name")
    if not name:
        raise PrismaError("the cache does not name its model: pass --model NAME")
    weights = args.weights if args.weights is not None else cached_model.get("weights")
    if weights == "object":
        raise PrismaError(
            "the cache was written from a model object: pass --weights (a file, 'pretrained' or "
            "'none') to load the same weights"
        )
    weights = None if str(weights).lower() == "none" else weights
    model = prisma_mm.load_model(
        name, weights=weights, device=args.device or "cpu", img_size=img_size
    )
    fingerprint = cached_model.get("fingerprint")
    if fingerprint and weights_fingerprint(model.module) != fingerprint:
        print(
            f"prisma-mm: warning: the weights of {name!r} ({weights}) differ from those the cache "
            "was written with: spliced results describe another model (pass --weights)",
            file=sys.stderr,
        )
    batches, class_names = image_batches(
        model, args.data, args.image_batch_size, args.max_images, class_names
    )
    for hook in hooks:
        model.hook_point(hook)  # an unknown hook fails here, before any work
    return {
        "model": model,
        "name": name,
        "weights": weights,
        "batches": batches,
        "class_names": class_names,
        "templates": templates,
    }


def _spliced(args: argparse.Namespace, task: dict[str, Any], dictionary: Any,
             hooks: list[str], manifest: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from prisma_mm.analysis.spliced import spliced_eval

    token_index = (manifest.get("token_index") or {}).get(hooks[0])
    replaced = [hooks[1]] if dictionary.architecture == "transcoder" else hooks
    stats = manifest.get("stats") or {}
    means = None
    if all(h in stats and stats[h].get("count") for h in replaced):
        means = {h: torch.tensor(stats[h]["mean"], dtype=torch.float64) for h in replaced}
    result = spliced_eval(
        task["model"],
        dictionary,
        task["batches"],
        hooks=hooks,
        token_index=token_index,
        class_names=task["class_names"],
        templates=task["templates"],
        means=means,
        progress=not args.quiet,
    )
    _print_table(f"spliced into {task['name']} ({result.task})", result.rows())
    out = result.to_dict()
    out.update(
        {"model": task["name"], "weights": task["weights"],
         "mean_source": "cache" if means else "data"}
    )  # fmt: skip
    return out


# ----- stitch --------------------------------------------------------------------------------
def run_stitch(args: argparse.Namespace) -> int:
    """``prisma-mm stitch SMALL LARGE --cache CACHE``: stitch.json + stitch.png."""
    _check_device(args)
    from prisma_mm.analysis.stitching import Stitcher, plot_stitching, stitch
    from prisma_mm.sae.published import dictionary_label, output_home

    out = check_output_dir(
        args.out or output_home(args.large) / f"stitch_{output_home(args.small).name}", "--out"
    )
    small = _load_dictionary(args.small, args.device)
    large = _load_dictionary(args.large, args.device)
    hooks = _hooks_of(small, args.hook)
    if not args.hook and large.metadata.get("hook") not in (None, small.metadata.get("hook")):
        raise PrismaError(
            f"the SAEs were trained on different hooks ({small.metadata.get('hook')!r} vs "
            f"{large.metadata.get('hook')!r}): stitch SAEs of the same hook"
        )
    Stitcher(small, large)  # refuses pairs of other sizes or families before any work
    if small.cfg.n_latents > large.cfg.n_latents:
        raise PrismaError(
            f"SMALL has {small.cfg.n_latents} latents and LARGE {large.cfg.n_latents}: pass the "
            "smaller SAE first"
        )
    ds = _dataset(args.cache, hooks, args.split, args.eval_fraction, 8192)
    _check_width(small, ds.d, hooks, args.cache)
    loss_fn = None
    if args.data is not None:
        from prisma_mm.analysis.spliced import make_spliced_loss

        manifest = ds.manifest
        task = _task_data(args, manifest, hooks, small.metadata.get("img_size"))
        loss_fn = make_spliced_loss(
            task["model"],
            list(task["batches"]),  # read and preprocessed once for every stitched SAE
            hooks=hooks,
            token_index=(manifest.get("token_index") or {}).get(hooks[0]),
            class_names=task["class_names"],
            templates=task["templates"],
        )
    x = load_cache_rows(
        args.cache, hooks, args.max_tokens, args.split, args.eval_fraction, args.seed,
        progress=not args.quiet,
    )  # fmt: skip
    result = stitch(
        small,
        large,
        x.to(args.device or "cpu"),
        threshold=args.threshold,
        use=args.use,
        max_points=args.max_points,
        loss_fn=loss_fn,
        progress=not args.quiet,
    )
    report = {
        "small": dictionary_label(args.small),
        "large": dictionary_label(args.large),
        "hooks": hooks,
        "cache": str(Path(args.cache).resolve()),
        **result.to_dict(),
    }
    _write_json(out / "stitch.json", report)
    plot_stitching(result, out / "stitch.png")
    _print_table("SAE stitching", result.rows())
    print(f"wrote {out / 'stitch.json'} and {out / 'stitch.png'}")
    return 0


# ----- meta-SAE ------------------------------------------------------------------------------
def run_meta_sae(args: argparse.Namespace) -> int:
    """``prisma-mm meta-sae DICT``: the meta-SAE and its JSON export."""
    _check_device(args)
    from prisma_mm.analysis.meta_sae import train_meta_sae
    from prisma_mm.sae.published import dictionary_label, output_home

    out = check_output_dir(args.out or output_home(args.dictionary) / "meta_sae", "--out")
    dictionary = _load_dictionary(args.dictionary, args.device)
    result = train_meta_sae(
        dictionary,
        k=args.k,
        n_meta=args.n_meta,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        decoder_bias=args.decoder_bias,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    result.source["path"] = dictionary_label(args.dictionary)
    path = result.save(out)
    summary = result.to_dict()["meta"]
    rows = [
        ("latents -> meta-latents", f"{result.n_latents} -> {result.n_meta}"),
        ("k", str(summary["k"])),
        ("fvu", f"{result.fvu:.4f}"),
        ("meta-latents per latent", f"{summary['mean_meta_per_latent']:.2f}"),
        ("latents with no meta-latent", str(summary["n_latents_without_meta"])),
        ("unused meta-latents", str(summary["n_unused_meta"])),
    ]
    _print_table("meta-SAE", rows)
    print(f"wrote {out / 'meta_sae'} and {path}")
    return 0


# ----- compare -------------------------------------------------------------------------------
def run_compare(args: argparse.Namespace) -> int:
    """``prisma-mm compare A B``: Hungarian matching of decoder directions."""
    _check_device(args)
    from prisma_mm.analysis.matching import match_dictionaries

    out = check_output_file(args.out, "--out", "matching.json") if args.out else None
    a = _load_dictionary(args.a, args.device)
    b = _load_dictionary(args.b, args.device)
    result = match_dictionaries(a, b, threshold=args.threshold)
    _print_table(f"{args.a} vs {args.b}", result.rows())
    if out is not None:
        from prisma_mm.sae.published import dictionary_label

        report = {"a": dictionary_label(args.a), "b": dictionary_label(args.b)}
        report.update(result.to_dict())
        _write_json(out, report)
        print(f"wrote {args.out}")
    return 0


# ----- parsers -------------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_seed = _int_at_least(0)


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Any:
    """An argparse type: a float in the interval from ``low`` to ``high``."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"expected a number in {shown}, got {text}")
        return value

    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cache_args(
    parser: argparse.ArgumentParser, max_tokens: int | None, help_max_tokens: str
) -> None:
    parser.add_argument("--cache", required=True, help="activation cache directory")
    parser.add_argument(
        "--hook",
        nargs="+",
        default=None,
        help="hook(s) to read (default: the dictionary's cfg.json metadata)",
    )
    parser.add_argument(
        "--split",
        choices=("eval", "train", "all"),
        default="eval",
        help="cache rows: the held-out samples (default), the training ones, or all",
    )
    parser.add_argument(
        "--eval-fraction",
        type=_float_in(0.0, 1.0, high_open=True),
        default=0.01,
        help="held-out fraction the dictionary was trained with (default 0.01)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=max_tokens,
        help=help_max_tokens,
    )


def _spliced_args(parser: argparse.ArgumentParser, title: str) -> None:
    group = parser.add_argument_group(title)
    group.add_argument(
        "--data", default=None, help="labelled images: class-folder tree root/<class>/<image>"
    )
    group.add_argument(
        "--class-names",
        default=None,
        help="file (one per line) or comma list: the classifier's classes in index order, or "
        "the CLIP/SigLIP zero-shot classes (default: the class folders)",
    )
    group.add_argument(
        "--template",
        action="append",
        default=None,
        help="zero-shot prompt template with {} (repeatable; default 'a photo of a {}.')",
    )
    group.add_argument("--model", default=None, help="model card (default: the cache's)")
    group.add_argument(
        "--weights", default=None, help="model weights (default: the cache's; 'none' = random)"
    )
    group.add_argument("--max-images", type=_positive_int, default=None)
    group.add_argument("--image-batch-size", type=_positive_int, default=32)


def add_analysis_parsers(subparsers: Any) -> None:
    """Add ``eval``, ``stitch``, ``meta-sae`` and ``compare`` to a ``prisma-mm`` subparsers."""
    ev = subparsers.add_parser(
        "eval",
        help="metrics of a saved dictionary on a cache (+ spliced-in task evaluation)",
        description="Reconstruction and sparsity metrics of a saved dictionary on an activation "
        "cache, written as JSON with a feature-density histogram. With --data (a labelled "
        "class-folder tree), also the spliced-in evaluation on the cache's model.",
    )
    ev.add_argument(
        "dictionary",
        help="saved dictionary directory (cfg.json + weights), or a published SAE name",
    )
    _cache_args(ev, None, "evaluate the first N token rows of the split (default all)")
    ev.add_argument("--batch-size", type=_positive_int, default=4096, help="token rows per batch")
    ev.add_argument(
        "--dense-threshold",
        type=_float_in(0.0, 1.0),
        default=0.1,
        help="dense: firing on more than this fraction of tokens",
    )
    ev.add_argument("--out", default=None, help="report path (default DICT/eval.json; for a "
                    "published SAE ./sae-<NAME>/eval.json)")  # fmt: skip
    ev.add_argument("--histogram", default=None, help="density PNG (default beside the report)")
    _spliced_args(ev, "spliced-in evaluation")
    _common(ev)
    ev.set_defaults(handler=run_eval)

    st = subparsers.add_parser(
        "stitch",
        help="SAE stitching between a smaller and a larger SAE of the same hook",
        description="Split the larger SAE's latents into novel and reconstruction latents "
        "(exact test and cosine proxy) and measure the stitched SAEs from SMALL to LARGE "
        "(Leask et al. 2025). Writes stitch.json and stitch.png.",
    )
    st.add_argument("small", help="the smaller saved SAE")
    st.add_argument("large", help="the larger saved SAE")
    _cache_args(
        st,
        DEFAULT_STITCH_TOKENS,
        f"token rows drawn uniformly from the whole split (default {DEFAULT_STITCH_TOKENS})",
    )
    st.add_argument("--seed", type=_seed, default=0, help="seed of the row sample")
    st.add_argument(
        "--threshold",
        type=_float_in(0.0, 1.0, low_open=True),
        default=0.7,
        help="cosine proxy threshold, in (0, 1]",
    )
    st.add_argument(
        "--use",
        choices=("test", "proxy"),
        default="test",
        help="novel/reconstruction split driving the stitching (default: the exact test)",
    )
    st.add_argument(
        "--max-points",
        type=_int_at_least(2),
        default=64,
        help="stitched SAEs measured on the curve (at least 2: the two ends)",
    )
    st.add_argument("--out", default=None, help="output folder (default LARGE/stitch_<SMALL>)")
    _spliced_args(st, "spliced-in loss along the curve (optional)")
    _common(st)
    st.set_defaults(handler=run_stitch)

    ms = subparsers.add_parser(
        "meta-sae",
        help="train a meta-SAE on a dictionary's decoder directions",
        description="Train a BatchTopK meta-SAE on the unit-norm decoder rows of a dictionary "
        "and export each latent's decomposition into meta-latents (JSON for the browser).",
    )
    ms.add_argument("dictionary", help="saved dictionary directory")
    ms.add_argument("--k", type=_positive_int, default=4, help="meta-latents per latent (avg)")
    ms.add_argument("--n-meta", type=_positive_int, default=None, help="default n_latents // 4")
    ms.add_argument("--steps", type=_positive_int, default=2000)
    ms.add_argument("--lr", type=_float_in(0.0, 1.0, low_open=True), default=1e-3)
    ms.add_argument("--batch-size", type=_positive_int, default=None)
    ms.add_argument("--decoder-bias", action="store_true", help="learn a decoder bias")
    ms.add_argument("--seed", type=_seed, default=0)
    ms.add_argument("--out", default=None, help="output folder (default DICT/meta_sae)")
    _common(ms)
    ms.set_defaults(handler=run_meta_sae)

    cp = subparsers.add_parser(
        "compare",
        help="match the latents of two dictionaries by decoder cosine (Hungarian)",
        description="One-to-one matching of two dictionaries' latents by decoder cosine; the "
        "fraction shared above a threshold.",
    )
    cp.add_argument("a", help="first saved dictionary")
    cp.add_argument("b", help="second saved dictionary")
    cp.add_argument(
        "--threshold",
        type=_float_in(-1.0, 1.0),
        default=0.7,
        help="shared: cosine at least this, in [-1, 1]",
    )
    cp.add_argument("--out", default=None, help="write the full matching as JSON")
    _common(cp)
    cp.set_defaults(handler=run_compare)
