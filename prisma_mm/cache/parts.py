"""A cache written by N cooperating processes ("parts") and their merge into one manifest.

Part ``i`` of ``N`` is an ordinary cache directory ``OUT/parts/part-000i-of-000N/`` (its own
manifest, lock and shards, so parts never contend for a lock and each resumes on its own)
holding a disjoint, deterministic share of the inputs:

- a random-access source: the contiguous block ``[i*T//N, (i+1)*T//N)`` of the seeded visiting
  order (``T`` = inputs, or ``--limit``), so a part's positions are the one-process run's;
- a tar source: the tar shards ``order[i::N]`` of the seeded shard order (the rule of
  webdataset's ``split_by_node``), positions counted within the part.

When every part is complete, ``OUT/manifest.json`` lists every part's shards (paths relative
to OUT), their skipped inputs and the statistics merged exactly (Chan's parallel moments):
the reader, verify and training see one cache. The last part to finish writes it;
``prisma-mm cache merge --out OUT`` does it for parts run separately.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prisma_mm.cache import manifest as fmt
from prisma_mm.cache.stats import RunningMoments
from prisma_mm.errors import PrismaError

PARTS_DIR = "parts"
PART_RE = re.compile(r"^part-(\d{4,})-of-(\d{4,})$")
# Launchers' variables, in the order they are looked for: (rank, world size, local rank).
LAUNCHER_VARIABLES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, Lightning, accelerate, mpirun wrappers
    # srun; the step's task count, not SLURM_NTASKS, which an sbatch script's own (one-task)
    # batch step also sees, so a command run there without srun stays one process
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def part_name(index: int, count: int) -> str:
    """``part-0003-of-0008``: the folder of part ``index`` of ``count`` under ``parts/``."""
    return f"part-{index:04d}-of-{count:04d}"


def parse_part(spec: Any) -> tuple[int, int]:
    """``"i/N"`` (or ``(i, N)``) -> ``(i, N)`` with ``0 <= i < N``; one line otherwise."""
    if isinstance(spec, tuple | list) and len(spec) == 2:
        text = f"{spec[0]}/{spec[1]}"
    else:
        text = str(spec).strip()
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if match is None:
        raise PrismaError(f"--part {spec!r}: give i/N, part i (0-based) of N parts, e.g. 0/8")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise PrismaError(
            f"--part {spec!r}: the part index must be 0..N-1 (0-based) and N at least 1, "
            f"e.g. {min(index, max(count - 1, 0))}/{max(count, 1)}"
        )
    return index, count


def launcher_part(environ: Mapping[str, str] | None = None) -> tuple[int, int, int | None]:
    """``(rank, world_size, local_rank)`` from torchrun's or SLURM's variables; ``(0, 1,
    None)`` when no launcher set them."""
    environ = os.environ if environ is None else environ
    for rank_name, size_name, local_name in LAUNCHER_VARIABLES:
        if rank_name in environ and size_name in environ:
            try:
                rank, size = int(environ[rank_name]), int(environ[size_name])
                local = int(environ[local_name]) if local_name in environ else None
            except ValueError:
                raise PrismaError(
                    f"{rank_name}={environ[rank_name]!r} / {size_name}={environ[size_name]!r} "
                    "are not integers: fix the launcher's environment or pass --part i/N"
                ) from None
            if size < 1 or not 0 <= rank < size:
                raise PrismaError(
                    f"{rank_name}={rank} is outside 0..{size_name}-1 ({size}): fix the "
                    "launcher's environment or pass --part i/N"
                )
            return rank, size, local
    return 0, 1, None


def resolve_part(part: Any = None, environ: Mapping[str, str] | None = None
                 ) -> tuple[int, int, int | None]:  # fmt: skip
    """The part this process writes: ``--part`` when given, else the launcher's rank; with the
    launcher's local rank (the GPU to use) when it set one."""
    environ = os.environ if environ is None else environ
    rank, size, local = launcher_part(environ)
    if part is None:
        return rank, size, local
    index, count = parse_part(part)
    return index, count, local if size == count else None


def block(index: int, count: int, total: int) -> tuple[int, int]:
    """Part ``index``'s contiguous block ``[lo, hi)`` of ``total`` positions."""
    return index * total // count, (index + 1) * total // count


def part_dirs(out: Path) -> dict[tuple[int, int], Path]:
    """Every ``parts/part-i-of-N`` folder under ``out`` by ``(i, N)``."""
    root = out / PARTS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        match = PART_RE.match(path.name)
        if match and path.is_dir():
            found[(int(match[1]), int(match[2]))] = path
    return found


def check_siblings(out: Path, index: int, count: int, new: Mapping[str, Any]) -> None:
    """Refuse, before any work, a part whose split or settings differ from its siblings'."""
    from prisma_mm.cache.writer import _identity

    mine = _identity(new)
    for (other, other_count), path in sorted(part_dirs(out).items()):
        if other_count != count:
            raise PrismaError(
                f"{str(out)!r} holds parts of a split into {other_count} ({path.name}), not "
                f"{count}: start every part with the same N, or write to a new --out"
            )
        if other == index or not (path / fmt.MANIFEST).is_file():
            continue
        sibling = fmt.read_manifest(path)
        theirs = _identity(sibling)
        for field, value in mine.items():
            if theirs[field] != value:
                shown = "" if field in ("fingerprint", "order", "source") else f" {value!r}"
                raise PrismaError(
                    f"part {index}/{count} differs from part {other}/{count} already in "
                    f"{str(out)!r}: {field}{shown} vs {theirs[field]!r}; start every part with "
                    "the same model, weights, hooks, data, tokens, dtype and --order-seed"
                )
        if sibling.get("part", {}).get("total") != new["part"]["total"]:
            raise PrismaError(
                f"part {index}/{count} covers {new['part']['total']} inputs but part "
                f"{other}/{count} covers {sibling.get('part', {}).get('total')}: start every "
                "part with the same --limit"
            )


def merge_parts(out: str | Path) -> dict[str, Any]:
    """Merge the complete parts under ``out`` into ``out/manifest.json``; refuse in one line
    when a part is missing, incomplete or written with other settings. Returns the manifest."""
    out = Path(out).expanduser()
    found = part_dirs(out)
    if not found:
        raise PrismaError(
            f"{str(out)!r} has no parts/part-i-of-N folders: nothing to merge (write parts "
            "with `prisma-mm cache --part i/N` or a launcher)"
        )
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise PrismaError(f"{str(out)!r} holds parts of splits into {counts} parts: keep one split")
    count = counts[0]
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        raise PrismaError(
            f"cannot merge {str(out)!r}: part {missing[0]}/{count} is missing "
            f"({len(missing)} of {count} missing): run it, then merge again"
        )
    manifests = []
    for index in range(count):
        path = found[(index, count)]
        if not (path / fmt.MANIFEST).is_file():
            raise PrismaError(f"cannot merge {str(out)!r}: part {index}/{count} has not started")
        manifest = fmt.read_manifest(path)
        if not manifest.get("complete"):
            raise PrismaError(
                f"cannot merge {str(out)!r}: part {index}/{count} is incomplete "
                f"({manifest['inputs_done']} inputs done): re-run it to finish, then merge"
            )
        manifests.append(manifest)
    return _write_merged(out, manifests)


def try_merge(out: Path) -> dict[str, Any] | None:
    """Merge when every part is present and complete (called by each part as it finishes);
    else None, leaving the merge to the last part or to ``prisma-mm cache merge``."""
    found = part_dirs(out)
    counts = {count for _, count in found}
    if len(counts) != 1:
        return None
    count = counts.pop()
    for index in range(count):
        path = found.get((index, count))
        if path is None or not (path / fmt.MANIFEST).is_file():
            return None
        if not fmt.read_manifest(path).get("complete"):
            return None
    return merge_parts(out)


def _write_merged(out: Path, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    from prisma_mm.cache.writer import _identity

    first = manifests[0]
    for number, manifest in enumerate(manifests[1:], start=1):
        for field, value in _identity(first).items():
            if _identity(manifest)[field] != value:
                raise PrismaError(
                    f"cannot merge {str(out)!r}: part {number} differs from part 0 in {field}; "
                    "re-write that part with the same settings"
                )
    merged = {k: v for k, v in first.items() if k not in ("part", "tar_shards_done")}
    merged.update(shards=[], skipped=[], n_samples=0, n_skipped=0, inputs_done=0)
    moments = {h: RunningMoments(int(first["shapes"][h][1])) for h in first["hooks"]}
    parts = []
    random_access = first["part"]["random_access"]
    offset = 0
    for manifest in manifests:
        info = manifest["part"]
        folder = f"{PARTS_DIR}/{part_name(info['index'], info['count'])}"
        # tar parts count positions from 0; shift them so the merged positions are one sequence
        shift = 0 if random_access else offset
        for shard in manifest["shards"]:
            low, high = shard["inputs"]
            merged["shards"].append(
                {
                    **shard,
                    "name": f"{folder}/{shard['name']}",
                    "inputs": [low + shift, high + shift],
                }
            )
        merged["skipped"] += [
            {**skip, "position": skip["position"] + shift} for skip in manifest["skipped"]
        ]
        merged["n_samples"] += manifest["n_samples"]
        end = manifest["inputs_done"] + shift
        parts.append({"name": folder, "inputs": [info["inputs"][0] + shift, end],
                      "n_samples": manifest["n_samples"], "n_shards": manifest["n_shards"]})  # fmt: skip
        offset = end
        for hook, stats in manifest["stats"].items():
            part_moments = RunningMoments.from_dict(stats)
            moments[hook].merge(
                part_moments.count,
                part_moments.mean,
                part_moments.m2,
                part_moments.norm_sum,
                part_moments.sq_norm_sum,
                part_moments.nonfinite,
            )
    merged.update(
        inputs_done=offset,
        n_shards=len(merged["shards"]),
        n_skipped=len(merged["skipped"]),
        stats={h: m.to_dict() for h, m in moments.items()},
        complete=True,
        exhausted=all(m.get("exhausted") for m in manifests),
        parts=parts,
        updated=fmt.utc_now(),
    )
    with open(out / fmt.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parts finishing together write one after the other
        tmp = out / f"{fmt.MANIFEST}.{os.getpid()}{fmt.TMP_SUFFIX}"
        with open(tmp, "w") as handle:
            handle.write(fmt._dump(merged) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out / fmt.MANIFEST)
        fmt.fsync_dir(out)
    return merged
