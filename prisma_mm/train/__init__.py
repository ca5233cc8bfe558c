"""Training sparse dictionaries on cached activations with Lightning.

:class:`SAEModule` (the step logic around any dictionary), :class:`ActivationDataModule`
(batches of a cache, resumable), :class:`ModelActivationDataModule` (batches straight from a
model), :class:`MultiSAEModule` (several dictionaries from one forward), the callbacks of a
run, and ``prisma-mm train`` (LightningCLI,
:func:`run_train_cli`). See docs/training.md.
"""

from prisma_mm.train.callbacks import (
    CheckpointEveryNTokens,
    DecoderNormalization,
    DictionaryUpdate,
    FiringStats,
    SaveDictionary,
    TrainMetrics,
    export_dictionary,
)
from prisma_mm.train.cli import run_train_cli, train_cli
from prisma_mm.train.data import ActivationDataModule
from prisma_mm.train.model_data import ModelActivationDataModule
from prisma_mm.train.module import SAEModule
from prisma_mm.train.multi import MultiSAEModule

__all__ = [
    "ActivationDataModule",
    "CheckpointEveryNTokens",
    "DecoderNormalization",
    "DictionaryUpdate",
    "FiringStats",
    "ModelActivationDataModule",
    "MultiSAEModule",
    "SAEModule",
    "SaveDictionary",
    "TrainMetrics",
    "export_dictionary",
    "run_train_cli",
    "train_cli",
]
