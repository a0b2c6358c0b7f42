"""How well can *any* subject-level clustering recover the phantom's tumour subtype?

    .venv/bin/python benchmarks/subtype_ceiling.py STORE PARTICIPANTS_TSV [--model MODEL] [--json OUT]

The issue-4 target asks k-means of the salient embeddings to recover the phantom
subtype with ARI ≥ 0.6. This script measures what the slices of a store allow, using
the **true tumour mask** (the store's label map), so no learnt representation can be
expected to do better:

* hand-made lesion features per subject (mean over its tumour slices), per channel:
  the lesion's intensity relative to the healthy brain of the same slices as z-scores
  (mean, 5th and 95th percentile, fraction above +1.5 and below −1.5), plus the
  log lesion area: 11 features with two channels;
* k-means with k = 3 (the number of subtypes, given) on the standardised features
  → ARI against the subtype;
* other label-free clusterings of the same features (GMM and HDBSCAN, k-means with k
  chosen by silhouette, k-means and GMM on 2, 3 or 5 whitened principal components):
  whether k-means is merely the wrong tool;
* the best ARI over every subset of 2 or 3 of those features — chosen *with* the
  subtype labels, so an optimistic ceiling, not an achievable figure;
* a 5-fold logistic regression (supervised) on all features: the information is
  there even where clustering cannot find it;
* with ``--model``, the same k-means and supervised figures for the model's stage-1
  tokens inside the true tumour (token cells with ≥ 30 % tumour) and for its salient
  embedding, both averaged over each subject's tumour slices; and the hand-made lesion
  features again with the model's salient support (its gated token cells,
  ``DiffCAModel.salient_support``) in place of the true mask: what the split's
  localisation leaves of the lesion's own contrast.

All subjects of the store with tumour slices are used (train, val and test): the
figures describe the data, not a held-out model score.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from diffca_med.analysis.probes import cluster_agreement
from diffca_med.analysis.subgroups import cluster
from diffca_med.fileio import atomic_write_text

FEATURES = ("mean_z", "p95_z", "p5_z", "frac_above", "frac_below")


def lesion_features(images: np.ndarray, lesion: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(5·C + 1,) features of one subject's tumour slices.

    images (N, C, H, W) in store units, lesion (N, H, W) bool, brain (N, H, W) mask.
    """
    healthy = (brain > 0) & ~lesion
    feats = []
    for c in range(images.shape[1]):
        ref = images[:, c][healthy]
        z = (images[:, c][lesion] - np.median(ref)) / max(float(ref.std()), 1e-6)
        feats += [z.mean(), np.percentile(z, 95), np.percentile(z, 5), (z > 1.5).mean(), (z < -1.5).mean()]
    feats.append(np.log(lesion.sum()))
    return np.asarray(feats, np.float64)


def _subject_features(images: np.ndarray, lesion: np.ndarray, brain: np.ndarray,
                      subjects: np.ndarray, names: np.ndarray) -> np.ndarray:
    """(n_subjects, 5·C + 1) lesion features, each subject over its slices where
    ``lesion`` (N, H, W) bool marks something; all zeros (no contrast, log area 0) for a
    subject where it marks nothing."""
    rows = []
    for s in names:
        marked = (subjects == s) & lesion.any(axis=(1, 2))
        if marked.any():
            rows.append(lesion_features(images[marked], lesion[marked], brain[marked]))
        else:
            rows.append(np.zeros(5 * images.shape[1] + 1))
    return np.stack(rows)


def _kmeans_ari(x: np.ndarray, truth: np.ndarray) -> float:
    return cluster_agreement(truth, cluster(StandardScaler().fit_transform(x), k=3).labels)["ari"]


def _other_clusterings(x: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from sklearn.decomposition import PCA

    z = StandardScaler().fit_transform(x)
    fits = {"gmm": cluster(z, "gmm", k=3), "hdbscan": cluster(z, "hdbscan"),
            "kmeans, k by silhouette": cluster(z, "kmeans")}
    for n in (2, 3, 5):
        pcs = PCA(n, whiten=True, random_state=0).fit_transform(z)
        fits[f"kmeans on {n} whitened PCs"] = cluster(pcs, "kmeans", k=3)
        fits[f"gmm on {n} whitened PCs"] = cluster(pcs, "gmm", k=3)
    return {name: cluster_agreement(truth, fit.labels)["ari"] for name, fit in fits.items()}


def _supervised(x: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(LogisticRegression(max_iter=5000), StandardScaler().fit_transform(x), truth, cv=cv).mean())


def _model_features(model_path: Path, images: np.ndarray, seg: np.ndarray
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-slice (N, D) stage-1 tokens inside the true tumour and (N, d) salient
    embeddings, and the model's salient support (N, H, W) bool."""
    import torch
    import torch.nn.functional as F

    from diffca_med.models import DiffCAModel

    model = DiffCAModel.from_pretrained(model_path).eval()
    k = model.config.n_queries
    side = int(round(k ** 0.5))
    tok, emb, support = [], [], []
    for i in range(0, len(images), 128):
        x = torch.from_numpy(images[i:i + 128])
        enc = model.encode(x)
        support.append(model.salient_support(x).numpy())
        cells = F.adaptive_avg_pool2d(torch.from_numpy((seg[i:i + 128] > 0).astype(np.float32))[:, None], side)
        w = (cells.flatten(1) >= 0.3).float()
        w[w.sum(1) == 0] = 1.0  # a slice whose tumour fills no cell: average all tokens
        tok.append((enc.tokens[:, :k] * w[..., None]).sum(1) / w.sum(1, keepdim=True))
        emb.append(enc.salient_embedding)
    per_slice = {"stage-1 tokens in true tumour": torch.cat(tok).numpy(), "salient embedding": torch.cat(emb).numpy()}
    return per_slice, np.concatenate(support)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path, help="slice store folder made by 'diffca-med prepare'")
    ap.add_argument("participants", type=Path, help="the phantom's participants.tsv (subtype column)")
    ap.add_argument("--model", type=Path, default=None, help="also score this model's tokens and embeddings")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from diffca_med.data import SliceStore

    store = SliceStore(args.store)
    subtypes = pd.read_csv(args.participants, sep="\t", dtype={"participant_id": str}).set_index("participant_id")["subtype"]
    rows = store.rows(labels=("tumour",))
    subjects = store.index.iloc[rows]["subject"].to_numpy()
    images = np.asarray(store.images[rows], np.float32)
    seg, brain = np.asarray(store.seg[rows]), np.asarray(store.brain[rows])
    names = np.unique(subjects)
    truth = subtypes.reindex(names).to_numpy()
    feats = _subject_features(images, seg > 0, brain, subjects, names)
    labels = [f"{m}:{f}" for m in store.modalities for f in FEATURES] + ["log_area"]

    best = max((_kmeans_ari(feats[:, list(c)], truth), c) for r in (2, 3)
               for c in itertools.combinations(range(feats.shape[1]), r))
    result = {
        "store": str(args.store), "subjects": int(len(names)), "size": int(images.shape[-1]),
        "subtype_counts": pd.Series(truth).value_counts().to_dict(),
        "lesion_features_kmeans_ari": _kmeans_ari(feats, truth),
        "lesion_features_best_subset_ari": best[0],
        "lesion_features_best_subset": [labels[i] for i in best[1]],
        "lesion_features_supervised_accuracy": _supervised(feats, truth),
        "lesion_features_other_clusterings_ari": _other_clusterings(feats, truth),
    }
    if args.model is not None:
        per_slice, support = _model_features(args.model, images, seg)
        for name, values in per_slice.items():
            x = np.stack([values[subjects == s].mean(0) for s in names])
            result[f"{name}: kmeans_ari"] = _kmeans_ari(x, truth)
            result[f"{name}: supervised_accuracy"] = _supervised(x, truth)
        gated = _subject_features(images, support & (brain > 0), brain, subjects, names)
        result["lesion features in salient support: kmeans_ari"] = _kmeans_ari(gated, truth)
        result["lesion features in salient support: supervised_accuracy"] = _supervised(gated, truth)
    for key, value in result.items():
        if isinstance(value, dict):
            value = {name: round(ari, 3) for name, ari in value.items()}
        print(f"{key}: {round(value, 3) if isinstance(value, float) else value}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
