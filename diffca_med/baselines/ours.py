"""Diff-CA itself behind the benchmark's :class:`~diffca_med.baselines.base.Method` interface.

Pseudo-healthy images are ``DiffCAModel.pseudo_healthy`` (salient := 0, the chosen
starting noise); the embeddings are the salient embedding (CLS projection, ``(N, d)``)
and the common part pooled over its tokens (``Ẑ_C`` mean over T, ``(N, D)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffca_med.baselines.base import Method


class DiffCAMethod(Method):
    kind = "diffca"
    makes_counterfactuals = True
    makes_embeddings = True

    def __init__(self, model, noise: str = "inverted", inversion_depth: float = 1.0,
                 steps: int | None = None):
        super().__init__(tuple(model.config.modalities), model.config.image_size)
        self.model = model.eval()
        self.noise, self.inversion_depth, self.steps = noise, float(inversion_depth), steps

    @classmethod
    def load(cls, path: str | Path) -> "DiffCAMethod":
        from diffca_med.models import DiffCAModel

        return cls(DiffCAModel.from_pretrained(path))

    def set_sampling(self, sampling) -> None:
        """Apply :class:`~diffca_med.pipelines.evaluate.SamplingOptions` (None = keep)."""
        self.noise = sampling.noise or self.noise
        if sampling.inversion_depth is not None:
            self.inversion_depth = float(sampling.inversion_depth)
        if sampling.steps is not None:
            self.steps = int(sampling.steps)

    def pseudo_healthy(self, images: np.ndarray, seed: int = 0, batch_size: int = 32,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        def generate(x: torch.Tensor, offset: int) -> torch.Tensor:
            return self.model.pseudo_healthy(x.to(self.model.device), noise=self.noise,
                                             inversion_depth=self.inversion_depth, steps=self.steps,
                                             seed=seed + offset)

        return self._generate_in_batches(images, batch_size, generate, progress)

    def anomaly_support(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The model's salient support (``DiffCAModel.salient_support``), bool (N, H, W)."""
        from diffca_med.analysis.counterfactuals import salient_support

        return salient_support(self.model, images, batch_size)

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        sal, com = [], []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[i : i + batch_size], dtype=np.float32))
            enc = self.model.encode(x.to(self.model.device))
            sal.append(enc.salient_embedding.float().cpu().numpy())
            com.append(enc.common.mean(dim=1).float().cpu().numpy())
        return {"salient": np.concatenate(sal), "common": np.concatenate(com)}
