"""Data order and random draws as pure functions of (seed, stage, step, process).

Resuming is exact only if the batches and the noise after the resume point are the
ones the uninterrupted run would have drawn. Instead of saving a sampler's internal
position, every micro-batch is computed from its global index: the class-balanced
order is an endless chain of per-"epoch" permutations, each seeded by
(seed, stage, class, epoch), and micro-batch ``k`` takes its slice of it. So the data
position *is* the step count.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every integer in ``parts`` (order matters)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _EndlessPermutation:
    """Element ``i`` of the chain perm(epoch 0) ++ perm(epoch 1) ++ ... of ``rows``."""

    def __init__(self, rows: np.ndarray, seed: int, stage: int, stream: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.key = (seed, stage, stream)
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            rng = np.random.default_rng(derive_seed(*self.key, epoch))
            self._cache[epoch] = self.rows[rng.permutation(len(self.rows))]
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        n = len(self.rows)
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, pos = divmod(start + j, n)
            out[j] = self._perm(epoch)[pos]
        return out


class StepBatchSampler(Sampler[list[int]]):
    """Yields the dataset indices of micro-batches ``start_micro, start_micro+1, ...``.

    Micro-batch ``m`` of process ``rank`` (of ``world`` processes) is global batch
    ``g = m * world + rank``; with ``balanced`` it holds ``batch_size // 2`` healthy and
    the rest tumour indices (labels 0/1), each class walking its own endless
    permutation, so processes see disjoint data within an epoch. Without balance (or
    when a class is missing) all indices walk one permutation.

    ``labels``: int array (N,) of 0 healthy / 1 tumour for dataset indices 0..N-1.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int,
        stage: int,
        start_micro: int = 0,
        total_micro: int | None = None,
        rank: int = 0,
        world: int = 1,
        balanced: bool = True,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            raise ValueError("no training slices")
        self.batch_size = batch_size
        self.start_micro = start_micro
        self.total_micro = total_micro
        self.rank, self.world = rank, world
        idx = np.arange(len(labels))
        healthy, tumour = idx[labels == 0], idx[labels == 1]
        self.balanced = balanced and len(healthy) > 0 and len(tumour) > 0 and batch_size >= 2
        if self.balanced:
            self.streams = [_EndlessPermutation(healthy, seed, stage, 0), _EndlessPermutation(tumour, seed, stage, 1)]
            self.counts = [batch_size // 2, batch_size - batch_size // 2]
        else:
            self.streams = [_EndlessPermutation(idx, seed, stage, 2)]
            self.counts = [batch_size]

    def batch(self, micro: int) -> list[int]:
        """Dataset indices of this process's micro-batch number ``micro``."""
        g = micro * self.world + self.rank
        parts = [s.take(g * c, c) for s, c in zip(self.streams, self.counts)]
        return np.concatenate(parts).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start_micro
        while self.total_micro is None or m < self.total_micro:
            yield self.batch(m)
            m += 1

    def __len__(self) -> int:
        if self.total_micro is None:
            raise TypeError("endless sampler has no length")
        return max(self.total_micro - self.start_micro, 0)


def step_generator(device: torch.device, seed: int, stage: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator for one micro-batch's noise/timesteps, seeded from its coordinates.

    Also reseeds the global torch RNG (dropout and any draw without a generator).
    """
    s = derive_seed(seed, stage, step, micro, rank)
    torch.manual_seed(s)
    gen = torch.Generator(device=device)
    gen.manual_seed(s)
    return gen
