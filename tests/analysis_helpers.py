"""Helpers shared by the analysis/report/CLI tests: a tiny, untrained Diff-CA model.

Random weights exercise the plumbing (shapes, geometry, files, determinism); they
say nothing about quality, and no test here asserts anything about image quality.
"""

from __future__ import annotations

from pathlib import Path


def tiny_model(modalities=("t1c", "flair"), size: int = 32, seed: int = 0, **overrides):
    import torch

    from diffca_med.models import DiffCAModel, ModelConfig

    cfg = ModelConfig(
        modalities=list(modalities), image_size=size, unet_channels=[8, 16], attention_levels=[False, True],
        scratch_channels=[8, 16], token_dim=16, n_queries=4, cross_query_layers=1, attention_heads=2,
        salient_dim=4, split_depth=1, adversary_hidden=8, norm_groups=4, sample_steps=2, vae_channels=[8, 16],
        **overrides,
    )
    torch.manual_seed(seed)
    return DiffCAModel(cfg).eval()


def save_tiny_model(path: Path, **kwargs) -> Path:
    tiny_model(**kwargs).save_pretrained(path)
    return path
