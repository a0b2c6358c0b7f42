"""Can tumour tokens be found and replaced? A probe of a trained model's tokens Z.

    .venv/bin/python benchmarks/token_localisation_probe.py MODEL STORE [--steps 1500]

On the frozen conditioner's tokens of the store's train slices it trains, for
``--steps`` steps (batch 16 healthy + 16 tumour, AdamW lr 1e-3):

* a per-token detector (shared MLP on [token; position]) from image labels only, the
  image logit being the log-mean-exp over patch tokens (multiple-instance);
* a masked-token in-painter (3-layer transformer) on healthy slices only: random
  1–3-token square blocks are replaced by a learnt mask token and predicted back.

On the test slices it reports the token-level AUROC (tokens ≥ 30 % covered by tumour
vs all tokens of healthy slices) of the detector and of the in-painter's own error
(3×3 block centred on each token), and, after masking the detector's flagged tokens
(dilated by one) and in-painting them, the mean FLAIR (last channel) inside the
tumour of the render of Z and of the in-painted tokens, against the healthy-brain
mean, and the mean |change| of the render inside and outside the tumour. The tokens'
patch grid must be square (``n_queries`` = g², token i ↔ patch i).

This is a research probe for the stage-2 design (see the stop notes), not a method.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import diffca_med  # noqa: F401  (thread settings before torch work)
from diffca_med.data import SliceStore
from diffca_med.models import DiffCAModel


class InPainter(nn.Module):
    """Tokens (B, T, D) and a mask (B, T) in [0, 1] → predicted tokens (B, T, D)."""

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0, "gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = (1 - mask[..., None]) * tokens + mask[..., None] * self.mask_token
        return self.out(self.transformer(h + self.pos))


class TokenDetector(nn.Module):
    """Per-token tumour logits (B, P) for the P patch tokens."""

    def __init__(self, n_patches: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n_patches, dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.pos.shape[0]
        x = F.layer_norm(tokens[:, :p], tokens.shape[-1:])
        return self.mlp(torch.cat([x, self.pos.expand(x.shape[0], -1, -1)], dim=-1)).squeeze(-1)


def _pad(mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_zeros(mask.shape[0], n_tokens - mask.shape[1])], dim=1)


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model folder")
    ap.add_argument("store", help="slice store the model was trained on")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model, store = DiffCAModel.from_pretrained(args.model), SliceStore(args.store)
    side = math.isqrt(model.config.n_queries)
    if side * side != model.config.n_queries:
        raise SystemExit(f"n_queries {model.config.n_queries} is not a square")
    P, size = side * side, store.size

    def tokens(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))
        with torch.no_grad():
            return torch.cat([model.conditioner(x[i:i + 128]) for i in range(0, len(x), 128)])

    train = store.rows(split="train")
    labels = torch.tensor((store.index.iloc[train]["label"] == "tumour").to_numpy(), dtype=torch.float32)
    z_train = tokens(train)
    T, D = z_train.shape[1:]
    detector, painter = TokenDetector(P, D), InPainter(T, D)
    opt = torch.optim.AdamW(list(detector.parameters()) + list(painter.parameters()), lr=1e-3)
    healthy, tumour = torch.nonzero(labels == 0).squeeze(1), torch.nonzero(labels == 1).squeeze(1)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        pick = torch.cat([healthy[torch.randint(len(healthy), (16,), generator=gen)],
                          tumour[torch.randint(len(tumour), (16,), generator=gen)]])
        z, y = z_train[pick], labels[pick]
        image_logit = torch.logsumexp(detector(z), dim=1) - math.log(P)
        detect_loss = F.binary_cross_entropy_with_logits(image_logit, y)
        zh = z[y == 0]
        blocks = torch.zeros(zh.shape[0], side, side)
        for i in range(zh.shape[0]):
            k = int(torch.randint(1, 4, (), generator=gen))
            r, c = torch.randint(0, side - k + 1, (2,), generator=gen).tolist()
            blocks[i, r:r + k, c:c + k] = 1
        mask = _pad(blocks.flatten(1), T)
        err = ((painter(zh, mask) - zh) ** 2).mean(-1)
        paint_loss = (err * mask).sum() / mask.sum()
        opt.zero_grad()
        (detect_loss + paint_loss).backward()
        opt.step()

    test_t, test_h = store.rows(split="test", labels=("tumour",)), store.rows(split="test", labels=("healthy",))
    seg = np.asarray(store.seg[test_t]) > 0
    brain = np.asarray(store.brain[test_t]) > 0
    x = torch.from_numpy(np.asarray(store.images[test_t], dtype=np.float32))
    cover = seg.reshape(-1, side, size // side, side, size // side).mean(axis=(2, 4)).reshape(len(test_t), P)
    covered = torch.from_numpy(cover >= 0.3)
    with torch.no_grad():
        z, zh = tokens(test_t), tokens(test_h)
        p_t, p_h = torch.sigmoid(detector(z)), torch.sigmoid(detector(zh))

        def centred_errors(tok: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(tok.shape[0], P)
            for i in range(P):
                r, c = divmod(i, side)
                block = torch.zeros(side, side)
                block[max(0, r - 1):r + 2, max(0, c - 1):c + 2] = 1
                mask = _pad(block.flatten()[None], T).expand(tok.shape[0], -1)
                out[:, i] = ((painter(tok, mask)[:, i] - tok[:, i]) ** 2).mean(-1)
            return out

        def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
            return float(roc_auc_score(np.r_[np.ones(pos.numel()), np.zeros(neg.numel())],
                                       np.r_[pos.flatten().numpy(), neg.flatten().numpy()]))

        print(f"token AUROC, detector: {auroc(p_t[covered], p_h):.3f}")
        print(f"token AUROC, in-painting error: {auroc(centred_errors(z)[covered], centred_errors(zh)):.3f}")
        flagged = (F.max_pool2d((p_t > 0.5).float().view(-1, 1, side, side), 3, 1, 1).view(len(test_t), P) > 0).float()
        mask = _pad(flagged, T)
        z_c = (1 - mask[..., None]) * z + mask[..., None] * painter(z, mask)
        r_z = model.from_diffusion(model.denoiser.render(z)).numpy()
        r_c = model.from_diffusion(model.denoiser.render(z_c)).numpy()
    outside = brain & ~seg
    inside_all = np.broadcast_to(seg[:, None], r_z.shape)
    outside_all = np.broadcast_to(outside[:, None], r_z.shape)
    print(f"flagged tokens per tumour slice {flagged.sum(1).mean():.1f}; tumour tokens flagged "
          f"{flagged[covered].mean():.2f}; healthy-slice tokens flagged {(p_h > 0.5).float().mean():.3f}")
    print(f"FLAIR inside the tumour: input {x[:, -1].numpy()[seg].mean():.3f}, render(Z) {r_z[:, -1][seg].mean():.3f}, "
          f"render(in-painted) {r_c[:, -1][seg].mean():.3f}; healthy brain {x[:, -1].numpy()[outside].mean():.3f}")
    print(f"|render change| inside {np.abs(r_c - r_z)[inside_all].mean():.4f}, outside {np.abs(r_c - r_z)[outside_all].mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
