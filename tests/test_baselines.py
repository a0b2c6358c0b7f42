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


# ----------------------------------------------------------- diffusion baselines
TINY_MODEL = dict(
    unet_channels=[8, 16], attention_levels=[False, True], scratch_channels=[8, 8], token_dim=16,
    attention_heads=2, n_queries=2, norm_groups=8, salient_dim=4, sample_steps=3, adversary_hidden=8,
)


def _tiny_cfg(store_path, steps=2):
    from diffca_med.data.store import SliceStore
    from diffca_med.training.config import config_from_dict

    store = SliceStore(store_path)
    return config_from_dict({
        "data": {"modalities": list(store.modalities), "size": store.size},
        "model": TINY_MODEL,
        "stage1": {"steps": steps, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "sample_count": 0},
    })


def _slices(store_path, n=4):
    from diffca_med.data.store import SliceStore

    store = SliceStore(store_path)
    return np.array(store.images[store.rows(split="train")[:n]], dtype=np.float32)


def test_cfg_null_class_only_leaves_class_tokens_untrained(tiny_store):
    import torch

    from diffca_med.baselines.cfg_diffusion import CFGDiffusion

    cfg = _tiny_cfg(tiny_store)
    model = CFGDiffusion(cfg.model, p_uncond=1.0)
    x = torch.from_numpy(_slices(tiny_store))
    out = model.stage_loss(1, x, torch.tensor([0, 1, 0, 1]), torch.Generator().manual_seed(0))
    out["loss"].backward()
    g = model.class_tokens.grad
    assert g[2].abs().sum() > 0  # the null class is used ...
    assert g[:2].abs().sum() == 0  # ... and never the healthy / tumour classes


@pytest.mark.slow
def test_cfg_baseline_trains_through_the_loop_and_round_trips(tiny_store, tmp_path):
    from diffca_med.baselines.cfg_diffusion import train_cfg_baseline

    method, figures = train_cfg_baseline(tiny_store, _tiny_cfg(tiny_store), tmp_path / "run", progress=False)
    assert figures["steps"] == 2 and (tmp_path / "run" / "logs" / "stage1.csv").is_file()
    x = _slices(tiny_store)
    ph = method.pseudo_healthy(x, batch_size=3)
    assert ph.shape == x.shape and ph.min() >= 0.0 and ph.max() <= 1.0
    assert np.allclose(method.pseudo_healthy(x), ph, atol=1e-5)  # deterministic (inverted noise)
    method.save(tmp_path / "cfg")
    again = load_baseline(tmp_path / "cfg")
    assert again.inversion_depth == 0.5 and again.guidance == 3.0
    assert np.allclose(again.pseudo_healthy(x, batch_size=3), ph, atol=1e-6)


def test_ours_adapter_and_diffae_pca(tiny_store, tmp_path):
    import torch

    from diffca_med.baselines import DiffAEPCABaseline, DiffCAMethod
    from diffca_med.models import DiffCAModel

    cfg = _tiny_cfg(tiny_store)
    torch.manual_seed(0)
    model = DiffCAModel(cfg.model)
    x = _slices(tiny_store, 6)
    ours = DiffCAMethod(model, steps=2)
    reps = ours.embed(x, batch_size=4)
    assert reps["salient"].shape == (6, 4) and reps["common"].shape == (6, 16)
    assert ours.pseudo_healthy(x, batch_size=4).shape == x.shape
    dp = DiffAEPCABaseline.fit(model, x, n_components=3)
    emb = dp.embed(x)["salient"]
    assert emb.shape == (6, 3)
    # PCA of the codes: centred on the fitted slices, components orthonormal.
    assert np.allclose(emb.mean(0), 0, atol=1e-3)
    assert np.allclose(dp.components.T @ dp.components, np.eye(3), atol=1e-4)
    dp.save(tmp_path / "dp")
    assert np.allclose(load_baseline(tmp_path / "dp").embed(x)["salient"], emb, atol=1e-5)
