"""Single-code diffusion autoencoder: Diff-CA's stage 1 alone, its code reduced by PCA.

As in MONAI's diffusion-autoencoder tutorial, one code per image (here the stage-1
tokens Z, flattened to ``T·D`` values) describes everything about the slice; there is
no common/salient split. PCA fitted on the training slices (healthy and tumour
together) reduces it to the same dimension as Diff-CA's salient embedding, and that is
the embedding the benchmark probes and clusters. It isolates what stage 2 adds.

Saved as a folder: ``baseline.json``, ``pca.npz`` and ``model/`` (the Diff-CA model
whose stage-1 encoder makes the codes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffca_med.baselines.base import Method, read_meta, register
from diffca_med.errors import InputError
from diffca_med.fileio import atomic_path

WEIGHTS = "pca.npz"


@torch.no_grad()
def stage1_codes(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Flattened stage-1 tokens Z of ``images`` (N, C, H, W) -> (N, T·D)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i : i + batch_size], dtype=np.float32))
        out.append(model.encode(x.to(model.device)).tokens.flatten(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@register
class DiffAEPCABaseline(Method):
    kind = "diffae_pca"
    makes_embeddings = True

    def __init__(self, model, mean: np.ndarray, components: np.ndarray):
        super().__init__(tuple(model.config.modalities), model.config.image_size)
        self.model = model.eval()
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # (T·D, d)

    @classmethod
    def fit(cls, model, images: np.ndarray, n_components: int | None = None, seed: int = 0) -> "DiffAEPCABaseline":
        """PCA of the stage-1 codes of training ``images`` (N, C, H, W).

        ``n_components`` defaults to the model's salient dimension.
        """
        from sklearn.decomposition import PCA

        codes = stage1_codes(model, images)
        d = int(n_components or model.config.salient_dim)
        d = min(d, codes.shape[1], len(codes) - 1)
        if d < 1:
            raise InputError("DiffAE-PCA needs at least 2 training slices")
        pca = PCA(n_components=d, random_state=seed).fit(codes)
        return cls(model, pca.mean_, pca.components_.T)

    def embed(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        codes = stage1_codes(self.model, images, batch_size)
        return {"salient": (codes - self.mean) @ self.components}

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            self.model.save_pretrained(tmp / "model")
            np.savez(tmp / WEIGHTS, mean=self.mean, components=self.components)
            self._write_meta(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "DiffAEPCABaseline":
        from diffca_med.models import DiffCAModel

        read_meta(path)
        file = Path(path) / WEIGHTS
        try:
            w = np.load(file, allow_pickle=False)
            mean, comps = w["mean"], w["components"]
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{file}: unreadable PCA weights ({err})") from None
        return cls(DiffCAModel.from_pretrained(Path(path) / "model"), mean, comps)
