"""Contrastive PCA (Abid et al. 2018) on flattened slices: embeddings and subgroups.

cPCA finds the directions of largest variance in the *target* set (tumour slices)
relative to the *background* set (healthy slices): the top eigenvectors of
``C_fg − α C_bg``. The eigen-problem and the choice of candidate α values come from
the ``contrastive`` package (``CPCA.cpca_alpha``, ``CPCA.find_spectral_alphas``).

The package projects only the data it was fitted on, and it PCA-reduces inputs of
more than 1000 features inside ``fit`` without keeping the projection; so slices are
first reduced here (``sklearn`` PCA on pooled training slices, kept), and the
package's cPCA directions are read out once (by projecting the identity matrix) so
that new slices can be embedded.

α: among the package's spectral exemplar α values, the one whose projected target
slices form the most separated clusters (best k-means silhouette over k = 2..5) —
the criterion a user applies by eye in the cPCA paper, made automatic; it uses no
subtype label. A fixed α can be given instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffca_med.baselines.base import Method, read_meta, register
from diffca_med.errors import InputError
from diffca_med.fileio import atomic_path

WEIGHTS = "cpca.npz"


def _flatten(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).reshape(len(images), -1)


def _best_silhouette(x: np.ndarray, seed: int) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    best = -1.0
    for k in range(2, min(5, len(x) - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        if len(np.unique(labels)) > 1:
            best = max(best, float(silhouette_score(x, labels)))
    return best


@register
class CPCABaseline(Method):
    """cPCA embedding of flattened slices.

    Weights: ``mean`` (F,), ``pca`` (F, p) reduction, ``fg_mean`` (p,), ``directions``
    (p, d) cPCA directions; ``embed(x) = ((flat(x) − mean) pca − fg_mean) directions``.
    """

    kind = "cpca"
    makes_embeddings = True

    def __init__(self, modalities, image_size, mean, pca, fg_mean, directions, alpha: float):
        super().__init__(modalities, image_size)
        self.mean = np.asarray(mean, np.float32)
        self.pca = np.asarray(pca, np.float32)
        self.fg_mean = np.asarray(fg_mean, np.float32)
        self.directions = np.asarray(directions, np.float32)
        self.alpha = float(alpha)

    @classmethod
    def fit(
        cls,
        healthy: np.ndarray,
        tumour: np.ndarray,
        modalities: tuple[str, ...],
        n_components: int = 16,
        pca_dim: int = 100,
        alpha: float | None = None,
        seed: int = 0,
    ) -> "CPCABaseline":
        """Fit on background ``healthy`` and target ``tumour`` slices ``(N, C, H, W)``.

        Args:
            n_components: embedding dimension d (≥ 2).
            pca_dim: dimension p of the PCA reduction before cPCA.
            alpha: contrast strength; ``None`` picks it as described in the module doc.
        """
        from contrastive import CPCA
        from sklearn.decomposition import PCA

        if n_components < 2:
            raise ValueError("cPCA needs n_components >= 2")
        if len(healthy) < 2 or len(tumour) < 2:
            raise InputError("cPCA needs at least 2 healthy and 2 tumour training slices")
        image_size = int(np.shape(healthy)[-1])
        fg, bg = _flatten(tumour), _flatten(healthy)
        both = np.concatenate([fg, bg])
        p = int(min(pca_dim, len(both) - 1, both.shape[1]))
        reducer = PCA(n_components=p, random_state=seed).fit(both)
        fg_r, bg_r = reducer.transform(fg), reducer.transform(bg)
        d = int(min(n_components, p))
        model = CPCA(n_components=d, standardize=False)
        # preprocess_with_pca_dim > p: the package must not reduce (we already did).
        model.fit(fg_r, bg_r, preprocess_with_pca_dim=p + 1)

        def directions(a: float) -> np.ndarray:
            return np.real(model.cpca_alpha(np.eye(p), alpha=a))  # (p, d): columns = directions

        fg_c = fg_r - fg_r.mean(0)
        if alpha is None:
            best_alphas, _, _, _ = model.find_spectral_alphas(
                n_alphas=40, max_log_alpha=3, n_alphas_to_return=4
            )
            candidates = [float(a) for a in best_alphas] or [1.0]
            scores = [_best_silhouette(fg_c @ directions(a), seed) for a in candidates]
            alpha = candidates[int(np.argmax(scores))]
        return cls(
            modalities, image_size,
            mean=reducer.mean_, pca=reducer.components_.T, fg_mean=fg_r.mean(0),
            directions=directions(alpha), alpha=alpha,
        )

    def embed(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        out = []
        for i in range(0, len(images), batch_size):
            flat = _flatten(images[i : i + batch_size])
            out.append(((flat - self.mean) @ self.pca - self.fg_mean) @ self.directions)
        d = self.directions.shape[1]
        return {"salient": np.concatenate(out) if out else np.zeros((0, d), np.float32)}

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            np.savez(tmp / WEIGHTS, mean=self.mean, pca=self.pca, fg_mean=self.fg_mean,
                     directions=self.directions)
            self._write_meta(tmp, alpha=self.alpha)

    @classmethod
    def load(cls, path: str | Path) -> "CPCABaseline":
        meta = read_meta(path)
        file = Path(path) / WEIGHTS
        try:
            w = np.load(file, allow_pickle=False)
            arrays = {k: w[k] for k in ("mean", "pca", "fg_mean", "directions")}
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{file}: unreadable cPCA weights ({err})") from None
        return cls(tuple(meta["modalities"]), int(meta["image_size"]), alpha=meta["alpha"], **arrays)
