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
    ``strata``: optional int array (N,) (e.g. binned axial position); with it, each
    tumour index of a balanced micro-batch is paired with a healthy index of the same
    stratum (the nearest stratum that has healthy slices), each stratum walking its
    own endless permutation, so the two halves share the strata's distribution and a
    set classifier cannot tell them apart by that variable alone.
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
        strata: Sequence[int] | np.ndarray | None = None,
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
        self.matched = None
        if self.balanced:
            self.streams = [_EndlessPermutation(healthy, seed, stage, 0), _EndlessPermutation(tumour, seed, stage, 1)]
            self.counts = [batch_size // 2, batch_size - batch_size // 2]
            if strata is not None:
                self._match_strata(np.asarray(strata, dtype=np.int64), healthy, seed, stage)
        else:
            self.streams = [_EndlessPermutation(idx, seed, stage, 2)]
            self.counts = [batch_size]

    def _match_strata(self, strata: np.ndarray, healthy: np.ndarray, seed: int, stage: int) -> None:
        """Per-stratum healthy streams; ``self.matched[k]`` serves tumour stratum k."""
        self.strata = strata
        values = np.unique(strata)
        own = {int(v): healthy[strata[healthy] == v] for v in values}
        have = np.array([v for v in values if len(own[int(v)])])
        self.matched = {}
        for v in values:
            nearest = int(have[np.argmin(np.abs(have - v))])
            self.matched[int(v)] = _EndlessPermutation(own[nearest], seed, stage, 3 + nearest)
        self._ranks: dict[int, np.ndarray] = {}
        tumour_strata = strata[self.streams[1].rows]
        self._per_epoch = {int(v): int((tumour_strata == v).sum()) for v in values}

    def _stratum_draw(self, q: int) -> tuple[int, int]:
        """(stratum k, draw number r within k) of the tumour chain's position ``q``."""
        stream = self.streams[1]
        n = len(stream.rows)
        epoch, pos = divmod(q, n)
        if epoch not in self._ranks:
            if len(self._ranks) > 4:
                self._ranks.clear()
            perm_strata = self.strata[stream._perm(epoch)]
            ranks = np.empty(n, dtype=np.int64)
            for v in np.unique(perm_strata):
                where = np.flatnonzero(perm_strata == v)
                ranks[where] = np.arange(len(where))
            self._ranks[epoch] = ranks
        k = int(self.strata[stream._perm(epoch)[pos]])
        return k, epoch * self._per_epoch[k] + int(self._ranks[epoch][pos])

    def batch(self, micro: int) -> list[int]:
        """Dataset indices of this process's micro-batch number ``micro``."""
        g = micro * self.world + self.rank
        if self.matched is None:
            parts = [s.take(g * c, c) for s, c in zip(self.streams, self.counts)]
            return np.concatenate(parts).tolist()
        # tumour half as usual; the healthy half mirrors its strata: the tumour draw at
        # chain position q is the r-th draw of its stratum k, and is paired with draw r
        # of stratum k's healthy stream (r = epoch · n_k + rank of q within the epoch)
        n_t = self.counts[1]
        healthy = []
        for q in range(g * n_t, g * n_t + self.counts[0]):
            k, r = self._stratum_draw(q)
            healthy.append(int(self.matched[k].take(r, 1)[0]))
        tumour = self.streams[1].take(g * n_t, n_t)
        return healthy + tumour.tolist()

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
