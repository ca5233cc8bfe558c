"""The sparse code shared by the dictionaries and their kernels (a module of its own so that
``base.py`` and ``kernels.py`` both build on it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SparseCode"]


@dataclass
class SparseCode:
    """A batch of sparse codes stored as flat entries grouped by row (``embedding_bag`` layout).

    ``values [nnz]``, ``latents [nnz]`` (long), ``offsets [batch]`` (long: start of each row's
    entries; rows are contiguous and in order). ``rank [nnz]`` optionally gives each entry's
    position in its row when sorted by value (TopK sorted), used by nested-k losses.
    """

    values: Tensor
    latents: Tensor
    offsets: Tensor
    batch: int
    n_latents: int
    rank: Tensor | None = None

    @classmethod
    def from_dense(cls, code: Tensor) -> SparseCode:
        """The non-zero entries of a dense ``code [batch, n_latents]`` (values keep autograd)."""
        rows, latents = code.nonzero(as_tuple=True)  # row-major: rows grouped, latents ascending
        counts = torch.bincount(rows, minlength=code.shape[0])
        offsets = torch.zeros(code.shape[0], dtype=torch.long, device=code.device)
        offsets[1:] = counts.cumsum(0)[:-1]
        return cls(code[rows, latents], latents, offsets, code.shape[0], code.shape[1])

    def rows(self) -> Tensor:
        """Row index of every entry, ``[nnz]``."""
        counts = self.counts()
        return torch.repeat_interleave(torch.arange(self.batch, device=counts.device), counts)

    def counts(self) -> Tensor:
        """Number of entries in each row, ``[batch]`` (long)."""
        end = self.offsets.new_tensor([self.values.numel()])
        return torch.diff(self.offsets, append=end)

    def padded(self) -> tuple[Tensor, Tensor]:
        """Rows as equal-width ``(values [batch, m], latents [batch, m])``, ``m`` the largest row
        count; shorter rows are padded with value 0 at latent 0 (a no-op when decoded)."""
        counts = self.counts()
        width = int(counts.max()) if self.batch else 0
        if self.values.numel() == self.batch * width:  # every row full (TopK): a plain view
            return self.values.reshape(self.batch, width), self.latents.reshape(self.batch, width)
        rows = self.rows()
        slot = torch.arange(self.values.numel(), device=rows.device) - self.offsets[rows]
        values = self.values.new_zeros(self.batch, width)
        latents = self.latents.new_zeros(self.batch, width)
        values[rows, slot] = self.values
        latents[rows, slot] = self.latents
        return values, latents

    def dense(self) -> Tensor:
        """The dense code ``[batch, n_latents]``."""
        out = self.values.new_zeros(self.batch, self.n_latents)
        out.index_put_((self.rows(), self.latents), self.values, accumulate=True)
        return out

    def fire_counts(self) -> Tensor:
        """How many rows each latent is non-zero in, ``[n_latents]`` (long)."""
        active = self.latents[self.values.detach() != 0]
        return torch.bincount(active, minlength=self.n_latents)
