"""Baselines: identity, cPCA (toy problem with a known answer), save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest

from diffca_med.analysis.probes import cluster_agreement
from diffca_med.baselines import CPCABaseline, IdentityBaseline, load_baseline
from diffca_med.errors import InputError


def test_identity_returns_input(tmp_path):
    x = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float32)
    method = IdentityBaseline(("t1c", "flair"), 8)
    seen = []
    out = method.pseudo_healthy(x, progress=seen.append)
    assert np.array_equal(out, x) and out is not x and seen == [3]
    method.save(tmp_path / "id")
    again = load_baseline(tmp_path / "id")
    assert isinstance(again, IdentityBaseline) and again.modalities == ("t1c", "flair")
    with pytest.raises(TypeError):
        method.embed(x)


def _contrastive_toy(n=120, seed=0):
    """Background: big nuisance variance in pixels 0-7. Target: the same nuisance plus
    two subgroups told apart by a smaller shift in pixels 40-47 (invisible to PCA)."""
    rng = np.random.default_rng(seed)

    def nuisance(m):
        x = rng.normal(0, 0.05, (m, 64))
        x[:, :8] += rng.normal(0, 3.0, (m, 1))
        return x

    bg = nuisance(n)
    fg = nuisance(n)
    groups = rng.integers(0, 2, n)
    fg[:, 40:48] += np.where(groups[:, None] == 1, 1.0, -1.0)
    return bg.reshape(n, 1, 8, 8), fg.reshape(n, 1, 8, 8), groups


def test_cpca_finds_the_target_only_structure(tmp_path):
    bg, fg, groups = _contrastive_toy()
    method = CPCABaseline.fit(bg, fg, ("flair",), n_components=2, pca_dim=20)
    emb = method.embed(fg)["salient"]
    assert emb.shape == (len(fg), 2)
    # First cPCA direction separates the two hidden subgroups.
    from sklearn.cluster import KMeans

    labels = KMeans(2, n_init=4, random_state=0).fit_predict(emb[:, :1])
    assert cluster_agreement(groups, labels)["ari"] > 0.9
    # Save / load gives identical embeddings.
    method.save(tmp_path / "cpca")
    again = load_baseline(tmp_path / "cpca")
    assert np.allclose(again.embed(fg)["salient"], emb, atol=1e-5)
    assert again.alpha == method.alpha


def test_load_baseline_errors(tmp_path):
    with pytest.raises(InputError, match="baseline.json"):
        load_baseline(tmp_path)
    (tmp_path / "baseline.json").write_text('{"kind": "nope"}')
    with pytest.raises(InputError, match="unknown baseline kind"):
        load_baseline(tmp_path)
