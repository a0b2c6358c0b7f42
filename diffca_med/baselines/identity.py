"""Identity baseline: the unchanged input is its own "pseudo-healthy" image.

Scores what doing nothing achieves: perfect healthy-region fidelity, the tumour left
in place, an all-zero anomaly map (no detection skill). Any counterfactual method has
to beat it inside the tumour while staying close to it outside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from diffca_med.baselines.base import Method, read_meta, register
from diffca_med.fileio import atomic_path


@register
class IdentityBaseline(Method):
    kind = "identity"
    makes_counterfactuals = True

    def pseudo_healthy(
        self,
        images: np.ndarray,
        seed: int = 0,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        out = np.array(images, dtype=np.float32, copy=True)
        if progress is not None:
            progress(len(out))
        return out

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            self._write_meta(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "IdentityBaseline":
        meta = read_meta(path)
        return cls(tuple(meta["modalities"]), int(meta["image_size"]))
