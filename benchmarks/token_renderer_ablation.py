"""Why the token renderer is a grid: conditioner + renderer trained as a plain autoencoder.

    .venv/bin/python benchmarks/token_renderer_ablation.py STORE [--steps 750] [--arms flat16,grid16,grid64]

Each arm trains a fresh ``ConditioningEncoder`` + token renderer (no diffusion) with an
MSE to the slice, batch 32, AdamW lr 1e-3, on the store's train slices, and scores the
render's PSNR inside the brain (data range 1) on 96 test slices and 96 train slices
every 250 steps. Arms:

* ``flat16`` — the renderer before model format 2: one linear layer from the 17
  flattened tokens to a 4×4 map (16 queries), then the same upsampling convolutions;
* ``grid16`` / ``grid64`` — :class:`~diffca_med.models.denoiser.TokenRenderer` with 16
  queries on a 4×4 grid / 64 queries on an 8×8 grid (the CPU preset).

Measured on the 30-subject demo store (`diffca-med demo` RUN/store, 2 cores, 750 steps;
test / train brain PSNR): flat16 17.5 / 21.4 dB (it memorises: 17.6 dB on test after
1500 steps while the training loss kept falling), grid16 19.3 / 21.2 dB, grid64
22.1 / 23.0 dB.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import diffca_med  # noqa: F401  (thread settings before torch work)
from diffca_med.analysis.metrics import masked_psnr
from diffca_med.data import SliceStore
from diffca_med.models import ModelConfig
from diffca_med.models.conditioning import ConditioningEncoder
from diffca_med.models.denoiser import TokenRenderer, upsampling_decoder


class FlatRenderer(nn.Module):
    """The pre-format-2 renderer: flattened tokens → linear → (c, g, g) → upsampling convs."""

    def __init__(self, config: ModelConfig, grid: int = 4):
        super().__init__()
        c = config.unet_channels[-1]
        self.g, self.c = grid, c
        self.fc = nn.Linear(config.n_tokens * config.token_dim, c * grid * grid)
        self.net = nn.Sequential(*upsampling_decoder(config, grid))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(tokens.flatten(1)).view(-1, self.c, self.g, self.g))


ARMS = {
    "flat16": (16, 4, FlatRenderer),
    "grid16": (16, 4, TokenRenderer),
    "grid64": (64, 8, TokenRenderer),
}


def brain_psnr(pred: torch.Tensor, ref: torch.Tensor, brain: np.ndarray) -> float:
    p, r = pred.numpy(), ref.numpy()
    return float(np.mean([masked_psnr(a, b, np.broadcast_to(m[None] > 0, a.shape)) for a, b, m in zip(p, r, brain)]))


def run_arm(name: str, store: SliceStore, steps: int, seed: int = 0) -> list[dict]:
    n_queries, grid, renderer_cls = ARMS[name]
    torch.manual_seed(seed)
    cfg = ModelConfig(modalities=list(store.modalities), image_size=store.size, n_queries=n_queries, render_grid=grid)
    encoder, renderer = ConditioningEncoder(cfg), renderer_cls(cfg)
    params = list(encoder.parameters()) + list(renderer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    train_rows = store.rows(split="train")
    x_train = torch.from_numpy(np.asarray(store.images[train_rows], dtype=np.float32))
    rng = np.random.default_rng(seed)
    test_rows = store.rows(split="test")
    pick_test = np.sort(rng.choice(test_rows, size=min(96, len(test_rows)), replace=False))
    pick_train = np.sort(rng.choice(len(train_rows), size=min(96, len(train_rows)), replace=False))
    x_test = torch.from_numpy(np.asarray(store.images[pick_test], dtype=np.float32))
    brain_test = np.asarray(store.brain[pick_test])
    brain_train = np.asarray(store.brain[train_rows[pick_train]])
    gen = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x = x_train[torch.randint(0, len(x_train), (32,), generator=gen)]
        loss = F.mse_loss(renderer(encoder(x)), x * 2 - 1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                test = ((renderer(encoder(x_test)) + 1) / 2).clamp(0, 1)
                train = ((renderer(encoder(x_train[pick_train])) + 1) / 2).clamp(0, 1)
            row = {"arm": name, "step": step, "seconds": round(time.perf_counter() - t0, 1),
                   "train_loss": round(loss.item(), 4),
                   "test_brain_psnr_db": round(brain_psnr(test, x_test, brain_test), 2),
                   "train_brain_psnr_db": round(brain_psnr(train, x_train[pick_train], brain_train), 2)}
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="slice store made by 'diffca-med prepare' (or RUN/store)")
    ap.add_argument("--steps", type=int, default=750, help="optimiser steps per arm (default 750)")
    ap.add_argument("--arms", default="flat16,grid16,grid64", help="comma-separated arms: " + ", ".join(ARMS))
    args = ap.parse_args(argv)
    store = SliceStore(args.store)
    for name in args.arms.split(","):
        run_arm(name.strip(), store, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
