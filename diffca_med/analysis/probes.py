"""Linear probes and cluster-agreement scores for disentanglement and subgroups.

A probe asks how much of a known factor (set label, phantom subtype, tumour
hemisphere, slice position, brain area) can be read linearly from a representation
(the salient embedding, or the pooled common part). Slices of one brain are not
independent, so every cross-validation here is **grouped by subject**: no subject has
slices in both the training and the test fold of a probe.

* :func:`classification_probe` — logistic regression, out-of-fold balanced accuracy.
* :func:`regression_probe` — ridge regression, out-of-fold R².
* :func:`cluster_agreement` — adjusted Rand index and NMI of a clustering against
  known labels (the clustering itself, and its silhouette, come from
  :func:`diffca_med.analysis.subgroups.cluster`).
* :func:`probe_table` — all of the above for a set of representations and targets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import (
    adjusted_rand_score,
    balanced_accuracy_score,
    normalized_mutual_info_score,
    r2_score,
)
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

NAN = float("nan")


def _folds(y, groups, n_splits: int, stratified: bool, seed: int):
    """Grouped (and, for classes, stratified) folds; fewer folds if there are few groups."""
    n_groups = len(np.unique(groups))
    k = min(n_splits, n_groups)
    if k < 2:
        return None
    if stratified:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=k)
    with warnings.catch_warnings():
        # StratifiedGroupKFold warns when a class has fewer groups than folds; the
        # folds are still valid and grouped.
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y, groups))


def classification_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> float:
    """Out-of-fold balanced accuracy of a logistic-regression probe ``X -> y``.

    Args:
        X: ``(N, d)`` representations (one row per slice).
        y: ``(N,)`` class labels (any hashable values).
        groups: ``(N,)`` subject ids; folds never split a subject.
        n_splits: number of folds (reduced to the number of subjects if smaller).

    Returns:
        Balanced accuracy in [0, 1] of the pooled out-of-fold predictions (chance =
        1 / number of classes); NaN when fewer than 2 classes or 2 subjects.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    groups = np.asarray(groups)
    if len(np.unique(y)) < 2:
        return NAN
    folds = _folds(y, groups, n_splits, stratified=True, seed=seed)
    if folds is None:
        return NAN
    pred = np.empty(len(y), dtype=y.dtype)
    for train, test in folds:
        classes = np.unique(y[train])
        if len(classes) < 2:  # this fold's training part saw one class only
            pred[test] = classes[0]
            continue
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(max_iter=2000, class_weight="balanced"),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
    return float(balanced_accuracy_score(y, pred))


def regression_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_splits: int = 5,
) -> float:
    """Out-of-fold R² of a ridge probe ``X -> y`` (regularisation chosen inside each fold).

    Args:
        X: ``(N, d)`` representations; y: ``(N,)`` float target; groups: subject ids.

    Returns:
        R² of the pooled out-of-fold predictions (1 perfect, 0 = predicting the mean,
        negative = worse); NaN for a constant target or fewer than 2 subjects.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    groups = np.asarray(groups)
    if np.ptp(y) == 0:
        return NAN
    folds = _folds(y, groups, n_splits, stratified=False, seed=0)
    if folds is None:
        return NAN
    pred = np.empty_like(y)
    for train, test in folds:
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        reg.fit(X[train], y[train])
        pred[test] = reg.predict(X[test])
    return float(r2_score(y, pred))


def cluster_agreement(true_labels, cluster_labels) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information of clusters vs known labels.

    Both are 1 for a perfect match (up to renaming); ARI is ≈ 0 for random clusters.
    """
    true_labels = np.asarray(true_labels)
    cluster_labels = np.asarray(cluster_labels)
    if len(true_labels) < 2:
        return {"ari": NAN, "nmi": NAN}
    return {
        "ari": float(adjusted_rand_score(true_labels, cluster_labels)),
        "nmi": float(normalized_mutual_info_score(true_labels, cluster_labels)),
    }


@dataclass(frozen=True)
class Target:
    """A factor to probe: ``values`` per row, ``kind`` "class" or "value", and ``rows``
    (a boolean mask of rows where the factor is defined, e.g. tumour slices only)."""

    values: np.ndarray
    kind: str
    rows: np.ndarray | None = None


def probe_table(
    representations: dict[str, np.ndarray],
    targets: dict[str, Target],
    groups: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Probe every representation for every target.

    Args:
        representations: name -> ``(N, d)`` array (e.g. ``{"salient": ..., "common": ...}``).
        targets: name -> :class:`Target` (classification -> balanced accuracy,
            value -> R²).
        groups: ``(N,)`` subject ids.

    Returns:
        ``{representation: {target: score}}``.
    """
    out: dict[str, dict[str, float]] = {}
    for rname, X in representations.items():
        X = np.asarray(X)
        row: dict[str, float] = {}
        for tname, target in targets.items():
            sel = np.ones(len(X), bool) if target.rows is None else np.asarray(target.rows, bool)
            if target.kind == "class":
                row[tname] = classification_probe(
                    X[sel], np.asarray(target.values)[sel], np.asarray(groups)[sel], n_splits, seed
                )
            elif target.kind == "value":
                row[tname] = regression_probe(
                    X[sel], np.asarray(target.values)[sel], np.asarray(groups)[sel], n_splits
                )
            else:
                raise ValueError(f"unknown target kind {target.kind!r} for {tname}")
        out[rname] = row
    return out
