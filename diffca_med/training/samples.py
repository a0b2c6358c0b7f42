"""Sample grids written during training: input | reconstruction | pseudo-healthy.

One row per held-out slice; each panel shows every modality side by side (grey,
intensities in [0, 1]). Reconstructions start from fresh noise with a fixed seed so
grids from different steps are comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffca_med.fileio import atomic_path


def _panel(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> uint8 (H, C*W + gaps) with the modalities side by side."""
    x = x.detach().float().clamp(0, 1).cpu().numpy()
    c, h, w = x.shape
    out = np.zeros((h, c * w + (c - 1)), dtype=np.float32)
    for i in range(c):
        out[:, i * (w + 1) : i * (w + 1) + w] = x[i]
    return (out * 255 + 0.5).astype(np.uint8)


def make_grid(columns: list[torch.Tensor], titles: list[str], scale: int = 2) -> Image.Image:
    """Grid image from ``columns`` (each (B, C, H, W) in [0, 1]) with a title row."""
    b = columns[0].shape[0]
    rows = []
    for i in range(b):
        panels = [_panel(col[i]) for col in columns]
        gap = np.full((panels[0].shape[0], 4), 128, dtype=np.uint8)
        row = panels[0]
        for p in panels[1:]:
            row = np.concatenate([row, gap, p], axis=1)
        rows.append(row)
        rows.append(np.full((2, row.shape[1]), 128, dtype=np.uint8))
    body = np.concatenate(rows[:-1], axis=0)
    img = Image.fromarray(body, mode="L").resize((body.shape[1] * scale, body.shape[0] * scale), Image.NEAREST)
    header = Image.new("L", (img.width, 14), 0)
    draw = ImageDraw.Draw(header)
    panel_w = (columns[0].shape[1] * (columns[0].shape[3] + 1) - 1 + 4) * scale
    for j, title in enumerate(titles):
        draw.text((j * panel_w + 2, 1), title, fill=255)
    full = Image.new("L", (img.width, img.height + header.height), 0)
    full.paste(header, (0, 0))
    full.paste(img, (0, header.height))
    return full


@torch.no_grad()
def write_sample_grid(model, images: torch.Tensor, path: str | Path, *, steps: int, seed: int = 0, stage: int = 1) -> Path:
    """Write ``path`` (PNG): input | reconstruction | pseudo-healthy of ``images`` (B, C, H, W).

    Stage 0 (the autoencoder) shows input | autoencoder reconstruction instead.
    """
    was_training = model.training
    model.eval()
    try:
        if stage == 0:
            recon = model.from_diffusion(model.to_diffusion(images))
            columns, titles = [images, recon], ["input", "autoencoder"]
        else:
            recon = model.reconstruct(images, noise="fresh", steps=steps, seed=seed)
            healthy = model.pseudo_healthy(images, noise="fresh", steps=steps, seed=seed)
            columns, titles = [images, recon, healthy], ["input", "reconstruction", "pseudo-healthy"]
    finally:
        model.train(was_training)
    grid = make_grid([c.float().cpu() for c in columns], titles)
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
