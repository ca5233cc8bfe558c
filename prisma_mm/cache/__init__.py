"""Activation caches: stream a model over a data set into resumable webdataset shards with a
manifest (:func:`write_cache`), check them (:func:`verify_cache`) and read them back as
shuffled token-row batches (:class:`ActivationDataset`). Format: docs/cache.md."""

from prisma_mm.cache.manifest import VerifyReport, read_manifest, verify_cache
from prisma_mm.cache.reader import ActivationDataset
from prisma_mm.cache.writer import write_cache

__all__ = ["ActivationDataset", "VerifyReport", "read_manifest", "verify_cache", "write_cache"]
