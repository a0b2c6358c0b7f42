"""Probes and cluster scores on toy data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffca_med.analysis import probes as P


def _toy(n_subjects=12, per=8, seed=0):
    """Subjects with a subject-level class encoded in dim 0 and noise elsewhere."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_subjects), per)
    cls = groups % 2
    X = rng.normal(size=(len(groups), 4))
    X[:, 0] += 10.0 * cls
    return X, cls, groups, rng


def test_classification_probe_separable_and_chance():
    X, y, g, rng = _toy()
    assert P.classification_probe(X, y, g) == pytest.approx(1.0)
    noise = rng.normal(size=X.shape)
    assert P.classification_probe(noise, y, g) < 0.75
    assert math.isnan(P.classification_probe(X, np.zeros(len(y)), g))


def test_probe_is_grouped_by_subject():
    # A subject-identity feature lets an ungrouped probe memorise the label of each
    # subject; grouped folds give it nothing to generalise from.
    rng = np.random.default_rng(1)
    n_subjects, per = 10, 10
    g = np.repeat(np.arange(n_subjects), per)
    y = rng.permutation(np.repeat([0, 1], n_subjects // 2))[g]
    X = np.eye(n_subjects)[g] + rng.normal(0, 0.01, (len(g), n_subjects))
    assert P.classification_probe(X, y, g) < 0.8


def test_regression_probe():
    X, _, g, rng = _toy()
    y = 2.0 * X[:, 1] - X[:, 2]
    assert P.regression_probe(X, y, g) > 0.95
    assert P.regression_probe(rng.normal(size=X.shape), y, g) < 0.3
    assert math.isnan(P.regression_probe(X, np.ones(len(y)), g))


def test_cluster_agreement():
    truth = np.array([0, 0, 1, 1, 2, 2])
    assert P.cluster_agreement(truth, [5, 5, 3, 3, 9, 9]) == {"ari": 1.0, "nmi": 1.0}
    assert P.cluster_agreement(truth, [0, 1, 2, 0, 1, 2])["ari"] < 0.1
    assert math.isnan(P.cluster_agreement([1], [1])["ari"])


def test_probe_table_rows_and_kinds():
    X, y, g, _ = _toy()
    pos = np.tile(np.linspace(0, 1, 8), 12)
    Xc = np.c_[X, pos]
    table = P.probe_table(
        {"salient": X, "common": Xc},
        {
            "set": P.Target(y, "class"),
            "position": P.Target(pos, "value"),
            "set_on_half": P.Target(y, "class", rows=g < 6),
        },
        g,
    )
    assert table["salient"]["set"] == pytest.approx(1.0)
    assert table["common"]["position"] > 0.95
    assert table["salient"]["position"] < 0.3
    assert set(table["common"]) == {"set", "position", "set_on_half"}
    with pytest.raises(ValueError):
        P.probe_table({"a": X}, {"t": P.Target(y, "bogus")}, g)
