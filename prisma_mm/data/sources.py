"""Input sources: a data set as a fixed, ordered sequence of inputs, each with a stable key.

The activation cache writer streams a source through a model. It needs three things from a
source, whatever its kind: the inputs in a deterministic order (so a killed run resumes
from "the first n inputs are done"), a stable key per input (the same file gets the same key
on every run and on every machine), and the raw input itself, loaded lazily (so DataLoader
workers decode only their own inputs).

Image sources here: a folder of images (recursive), a list file of paths, webdataset tar
shards (local paths with brace patterns, or any URL webdataset opens), an ImageNet-style
class-folder tree (the class folder becomes the label) and a torch ``Dataset`` object.

The seam for other kinds: a source class sets ``kind`` (``"image"`` here; ``"video"`` and
``"prompt"`` sources set their own, and the writer prepares inputs per kind) and is made
reachable from a string with :func:`register_source` (an explicit ``name:`` prefix and,
optionally, a detector for bare paths).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from prisma_mm.data.images import IMAGE_EXTENSIONS, BadImage, decode_image_bytes, load_image
from prisma_mm.errors import PrismaError

# Image members recognised inside webdataset samples, in order of preference.
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv")


def stable_key(identity: str) -> str:
    """The cache key of an input: sha1 hex of its identity (path relative to the source
    root, shard name + sample key, …). Independent of the input's position in the source."""
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class InputRecord:
    """One input as the source enumerates it: no pixels, just where it is and what it is."""

    index: int  # position in the source's fixed order, 0..n-1
    key: str  # stable id (see stable_key)
    source: str  # provenance: a path, "url#member_key", "DatasetClass[i]"
    label: str | int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "key": self.key, "source": self.source, "label": self.label}


Loader = Callable[[], Any]  # loads the raw input (an image, a clip, a prompt); may raise BadImage


@dataclass(frozen=True)
class Labeled:
    """A loaded input together with a label known only once it is loaded (torch Datasets)."""

    value: Any
    label: str | int | None


class Source(ABC):
    """A data set as an ordered sequence of inputs.

    ``kind`` names the modality (how the writer turns a raw input into model input).
    ``random_access`` sources implement :meth:`record` and :meth:`load` by index; streaming
    sources implement :meth:`stream`. Both describe themselves for the cache manifest. A
    loader returns the raw input, or :class:`Labeled` when the label comes with the input.
    """

    kind: ClassVar[str] = "image"
    random_access: ClassVar[bool] = True

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON identity of the source (type, root, count): a resumed cache must match it."""

    @abstractmethod
    def count(self) -> int | None:
        """Number of inputs, or None where unknown without reading everything (remote URLs)."""

    def record(self, index: int) -> InputRecord:
        raise NotImplementedError(f"{type(self).__name__} is a streaming source")

    def load(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a streaming source")

    def n_parts(self) -> int:
        """Parts (tar shards) that :meth:`stream` can read in any order; 1 when it has none."""
        return 1

    def stream(self, parts: Sequence[int] | None = None) -> Iterator[tuple[InputRecord, Loader]]:
        """All inputs in order as ``(record, loader)``; calling the loader decodes the input.
        ``parts``: the order to read the source's :meth:`n_parts` parts in (default: as is)."""
        for index in range(self.count() or 0):
            yield self.record(index), (lambda i=index: self.load(i))

    def __len__(self) -> int:
        n = self.count()
        if n is None:
            raise TypeError(f"{type(self).__name__} does not know its length")
        return n


# ----- files on disk ----------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: Path) -> tuple[list[Path], int]:
    """Image files under ``root`` (recursive, sorted by relative path) and the number of other
    files ignored. Hidden files and folders are left out."""
    images: list[Path] = []
    ignored = 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            if _is_image_name(name):
                images.append(Path(folder, name))
            else:
                ignored += 1
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, ignored


class _FileListSource(Source):
    """Shared by the folder, class-folder and list sources: a fixed list of image paths."""

    def __init__(self, paths: Sequence[Path], identities: Sequence[str], labels=None) -> None:
        self.paths = list(paths)
        self.identities = list(identities)
        self.labels = list(labels) if labels is not None else [None] * len(self.paths)

    def count(self) -> int:
        return len(self.paths)

    def record(self, index: int) -> InputRecord:
        return InputRecord(
            index, stable_key(self.identities[index]), str(self.paths[index]), self.labels[index]
        )

    def load(self, index: int) -> Any:
        path = self.paths[index]
        try:
            return load_image(path)
        except FileNotFoundError as error:
            raise BadImage(f"{path}: file not found") from error
        except IsADirectoryError as error:
            raise BadImage(f"{path}: is a directory, not an image") from error


def _existing_dir(path: str | Path, what: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise PrismaError(f"{what} {str(path)!r} does not exist: check the --data path")
    if not root.is_dir():
        raise PrismaError(f"{what} {str(path)!r} is not a directory")
    return root.resolve()


class FolderSource(_FileListSource):
    """Every image file under a folder, recursively (jpg, png, webp, bmp, tiff, gif), in
    sorted relative-path order; the key is the sha1 of the relative path."""

    def __init__(self, root: str | Path) -> None:
        self.root = _existing_dir(root, "image folder")
        paths, self.ignored = _walk_images(self.root)
        identities = [p.relative_to(self.root).as_posix() for p in paths]
        super().__init__(paths, identities)

    def describe(self) -> dict[str, Any]:
        return {"type": "folder", "root": str(self.root), "count": self.count()}


class ClassFolderSource(_FileListSource):
    """An ImageNet-style tree ``root/<class>/**/<image>``: the class folder is the label
    (its name); classes are sorted, so ``label_index`` follows torchvision's ImageFolder."""

    def __init__(self, root: str | Path) -> None:
        self.root = _existing_dir(root, "class-folder tree")
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise PrismaError(
                f"class-folder tree {str(root)!r} has no class sub-folders "
                "(expected root/<class>/<image>; use folder:PATH for a plain folder)"
            )
        paths: list[Path] = []
        labels: list[str] = []
        self.ignored = 0
        for name in self.classes:
            images, ignored = _walk_images(self.root / name)
            self.ignored += ignored
            paths += images
            labels += [name] * len(images)
        identities = [p.relative_to(self.root).as_posix() for p in paths]
        super().__init__(paths, identities, labels)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "classes",
            "root": str(self.root),
            "count": self.count(),
            "classes": self.classes,
        }


def read_list_file(list_file: str | Path, what: str) -> tuple[Path, list[str]]:
    """The resolved path of a list file and its entries, one per line (stripped; blank lines
    and lines starting with ``#`` dropped); ``what`` names the listed files in errors."""
    path = Path(list_file).expanduser()
    if not path.is_file():
        raise PrismaError(f"list file {str(list_file)!r} does not exist: check the --data path")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise PrismaError(
            f"list file {str(list_file)!r} is not text: expected one {what} path per line"
        ) from error
    entries = [line.strip() for line in lines]
    return path.resolve(), [e for e in entries if e and not e.startswith("#")]


class ListSource(_FileListSource):
    """A text file with one image path per line (relative paths are relative to the list
    file's folder; blank lines and lines starting with ``#`` are ignored). A path listed
    twice is two inputs with distinct keys; a missing or unreadable path is skipped."""

    def __init__(self, list_file: str | Path) -> None:
        self.list_file, entries = read_list_file(list_file, "image")
        paths: list[Path] = []
        identities: list[str] = []
        seen: dict[str, int] = {}
        for entry in entries:
            entry = entry.split("\t")[0]
            seen[entry] = seen.get(entry, 0) + 1
            identities.append(entry if seen[entry] == 1 else f"{entry}#{seen[entry]}")
            file = Path(entry).expanduser()
            paths.append(file if file.is_absolute() else self.list_file.parent / file)
        super().__init__(paths, identities)

    def describe(self) -> dict[str, Any]:
        return {"type": "list", "file": str(self.list_file), "count": self.count()}


# ----- webdataset tar shards ---------------------------------------------------------------
def _is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://").removeprefix("file:")).expanduser()


class TarSource(Source):
    """Webdataset tar shards of images: local paths with brace patterns
    (``train-{000..099}.tar``), several patterns joined by ``::``, or any URL webdataset
    opens (``http(s)://``, ``pipe:``, ``gs://`` …). Samples are taken in shard order, then
    tar order; the image is the first of the jpg/png/webp/… members, the label the ``cls``
    member when present; the key is the sha1 of ``<shard file name>/<sample key>``.

    The cache writer reads the shards as :meth:`n_parts` parts: processes writing a cache in
    parts take disjoint shard lists (webdataset's ``split_by_node`` rule, see
    :func:`prisma_mm.cache.inputs.part_shards`); within a process each DataLoader worker
    reads its part's byte stream and decodes only its own inputs, so remote shards are
    downloaded once per worker; copy them locally for many workers.
    """

    random_access = False

    def __init__(self, urls: str | Sequence[str]) -> None:
        from webdataset.shardlists import expand_urls

        self.pattern = urls if isinstance(urls, str) else "::".join(urls)
        self.urls = list(expand_urls(urls)) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise PrismaError(f"tar pattern {self.pattern!r} expands to no shards")
        missing = [u for u in self.urls if _is_local(u) and not _local_path(u).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise PrismaError(
                f"tar shard {missing[0]!r}{more} does not exist: check the --data pattern "
                f"{self.pattern!r}"
            )
        self._count: int | None = None
        self._counted = False

    def describe(self) -> dict[str, Any]:
        return {"type": "tar", "urls": self.pattern, "n_shards": len(self.urls)}

    def count(self) -> int | None:
        """Samples in local shards, from their tar headers (no data read); None for URLs."""
        if not self._counted:
            self._counted = True
            if all(_is_local(u) for u in self.urls):
                self._count = sum(_count_tar_samples(_local_path(u)) for u in self.urls)
        return self._count

    def n_parts(self) -> int:
        return len(self.urls)

    def stream(self, parts: Sequence[int] | None = None) -> Iterator[tuple[InputRecord, Loader]]:
        """Samples shard by shard (in ``parts`` order when given, e.g. one shard: ``[j]``);
        ``index`` counts them in the order read (the writer renumbers them by position)."""
        index = 0
        for url, shard_name, sample in tar_samples(self.urls, parts):
            if isinstance(sample, Exception):
                # A damaged shard ends there; the rest of it counts as one skipped input.
                record = InputRecord(index, stable_key(f"{shard_name}/#error"), url)
                index += 1
                reason = f"{url}: unreadable tar shard ({sample.__class__.__name__}: {sample})"
                yield record, _raise(BadImage(reason))
                continue
            key = sample["__key__"]
            record = InputRecord(
                index, stable_key(f"{shard_name}/{key}"), f"{url}#{key}", _tar_label(sample)
            )
            index += 1
            yield record, _tar_loader(sample, record.source)


def tar_samples(urls: Sequence[str], parts: Sequence[int] | None = None
                ) -> Iterator[tuple[str, str, dict[str, Any] | Exception]]:  # fmt: skip
    """``(url, shard file name, sample)`` for every webdataset sample of the shards ``urls``
    (in ``parts`` order when given); a damaged shard ends with ``(url, name, error)``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    for url in urls if parts is None else [urls[i] for i in parts]:
        shard_name = url.rstrip("/").rsplit("/", 1)[-1]
        samples = group_by_keys(tar_file_expander(url_opener([{"url": url}])))
        try:
            for sample in samples:
                yield url, shard_name, sample
        except (tarfile.TarError, OSError, ValueError) as error:
            yield url, shard_name, error


def _raise(error: Exception) -> Loader:
    def load() -> Any:
        raise error

    return load


def _tar_label(sample: dict[str, Any]) -> int | str | None:
    value = sample.get("cls")
    if value is None:
        return None
    text = value.decode("utf-8", "replace").strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _tar_loader(sample: dict[str, Any], name: str) -> Loader:
    for key in TAR_IMAGE_KEYS:
        if key in sample:
            data = sample[key]
            return lambda: decode_image_bytes(data, name)
    members = sorted(k for k in sample if not k.startswith("__"))
    return _raise(BadImage(f"{name}: no image member (has {members})"))


def _count_tar_samples(path: Path) -> int:
    from webdataset.tariterators import base_plus_ext

    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isreg():
                    prefix, _ = base_plus_ext(member.name)
                    if prefix is not None and not member.name.split("/")[-1].startswith("__"):
                        keys.add(prefix)
    except tarfile.TarError:
        return len(keys) + 1  # the stream reports the damaged part as one skipped input
    return len(keys)


# ----- torch Dataset -------------------------------------------------------------------------
class TorchDatasetSource(Source):
    """A map-style ``torch.utils.data.Dataset`` whose items are images (PIL, arrays, tensors)
    or ``(image, label)`` pairs or dicts with ``image``/``img`` and ``label`` keys. Keys are
    the sha1 of ``<class name>[<index>]``: the index is the only identity a Dataset has."""

    def __init__(self, dataset: Any, name: str | None = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise PrismaError(
                f"{type(dataset).__name__} is not a map-style Dataset (needs __len__ and "
                "__getitem__)"
            )
        self.dataset = dataset
        self.name = name or type(dataset).__name__

    def describe(self) -> dict[str, Any]:
        return {"type": "dataset", "class": self.name, "count": self.count()}

    def count(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> InputRecord:
        return InputRecord(index, stable_key(f"{self.name}[{index}]"), f"{self.name}[{index}]")

    def load(self, index: int) -> Labeled:
        image, label = _split_item(self.dataset[index])
        return Labeled(image, label)


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, dict):
        for key in ("image", "img", "pixel_values", "clip", "video"):
            if key in item:
                return item[key], _plain_label(item.get("label"))
        raise BadImage(f"dataset item has keys {sorted(item)}; expected 'image' and 'label'")
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], _plain_label(item[1])
    return item, None


def _plain_label(label: Any) -> int | str | None:
    if label is None or isinstance(label, int | str):
        return label
    if hasattr(label, "item"):
        value = label.item()
        return int(value) if float(value).is_integer() else str(value)
    return str(label)


# ----- from a --data string ------------------------------------------------------------------
SourceFactory = Callable[[str], Source]
_FACTORIES: dict[str, SourceFactory] = {}
_DETECTORS: list[tuple[str, Callable[[str], bool]]] = []


def register_source(
    name: str, factory: SourceFactory, detect: Callable[[str], bool] | None = None
) -> None:
    """Make ``name:SPEC`` strings open ``factory(SPEC)``; with ``detect``, bare strings for
    which ``detect(spec)`` is true open it too (checked before the built-in rules)."""
    _FACTORIES[name] = factory
    if detect is not None:
        _DETECTORS.insert(0, (name, detect))


def _looks_like_class_tree(root: Path) -> bool:
    """No image directly in root, and every sub-folder holds images directly."""
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    if any(e.is_file() and _is_image_name(e.name) for e in entries):
        return False
    folders = [e for e in entries if e.is_dir()]
    if not folders:
        return False
    return all(any(_is_image_name(f.name) for f in d.iterdir() if f.is_file()) for d in folders)


def _is_tar_spec(spec: str) -> bool:
    if "://" in spec or spec.startswith("pipe:") or "::" in spec:
        return True
    lowered = spec.lower()
    return "{" in spec or lowered.endswith((".tar", ".tar.gz", ".tgz"))


register_source("folder", FolderSource)
register_source("classes", ClassFolderSource)
register_source("list", ListSource)
register_source("tar", TarSource)


def _toy_clips(spec: str) -> Source:
    """``toyclips:N[,seed=S,size=P,frames=T,start=K,objects=M]``: moving toy-world clips."""
    from prisma_mm.data.toyworld import ToyClipSource

    return ToyClipSource(spec)


register_source("toyclips", _toy_clips)


def open_source(data: Any) -> Source:
    """A :class:`Source` from what the user passed as ``--data`` / ``data=``.

    A Source is returned as is; a torch Dataset is wrapped; a string may carry an explicit
    ``folder:`` / ``classes:`` / ``list:`` / ``tar:`` prefix (or one added by
    :func:`register_source`); otherwise a tar pattern or URL opens shards, a directory whose
    sub-folders each hold images opens a class-folder tree, any other directory a folder,
    and a text file a list.
    """
    if isinstance(data, Source):
        return data
    from prisma_mm.data import video  # noqa: F401 - registers the video sources

    if isinstance(data, Path):
        data = str(data)
    if not isinstance(data, str):
        return TorchDatasetSource(data)
    prefix, _, rest = data.partition(":")
    if rest and prefix in _FACTORIES:
        return _FACTORIES[prefix](rest)
    for name, detect in _DETECTORS:
        if detect(data):
            return _FACTORIES[name](data)
    if _is_tar_spec(data):
        return TarSource(data)
    path = Path(data).expanduser()
    if not path.exists():
        raise PrismaError(f"data path {data!r} does not exist: check the --data path")
    if path.is_dir():
        return ClassFolderSource(path) if _looks_like_class_tree(path) else FolderSource(path)
    if _is_image_name(path.name):
        raise PrismaError(
            f"--data {data!r} is a single image: pass its folder, or a list file of paths"
        )
    return ListSource(path)
