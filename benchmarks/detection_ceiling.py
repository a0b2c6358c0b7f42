"""Where is the healthy/tumour evidence of a slice lost on its way to the salient embedding?

    .venv/bin/python benchmarks/detection_ceiling.py STORE [--model MODEL] [--steps 300] [--seeds 0 1 2] [--json OUT]

The issue-3 target asks a logistic probe on the salient embedding to separate healthy
from tumour test slices with balanced accuracy ≥ 0.9. The embedding is learnt from
image labels only, through the frozen stage-1 tokens Z. This script trains the same
kind of *supervised* slice classifier (slice labels, the store's **training**
subjects, healthy 1 : 1 tumour batches, left/right flips) on each representation a
slice passes through, and scores it on the **test** and **validation** subjects:

* ``pixels`` — the store's images (C, H, W): what the data allows;
* ``render`` (with ``--model``) — the frozen stage-1 render of Z (the coarse image the
  renderer draws from the tokens alone, ``DiffCAModel.denoiser.render``);
* ``tokens`` (with ``--model``) — the K semantic tokens on their √K × √K grid;
* ``model`` (with ``--model``, no training) — the model's own stage-2 detector (image
  logit = log-mean-exp of its token logits) and the grouped probe on its salient
  embedding, the figure the target is about.

Per arm: balanced accuracy at logit 0, AUROC, balanced accuracy without the lesion-
fringe slices (tumour on < 3 % of the slice), recall on those fringe slices alone,
specificity, and the target's own protocol on the classifier's pooled features (the
grouped 5-fold logistic probe of ``analysis.probes.classification_probe`` over the
split's subjects). Image arms use a small CNN (three 3×3 conv blocks, 32² → 8², global
mean *and* max pooling so a few lesion pixels can decide); the token arm a 1×1 + two
3×3 convolutions over the grid with the same pooling. A supervised classifier is not a
bound in the strict sense (a bigger one might do better), but it shows what label
supervision on each representation buys with a model a CPU trains in a minute; several
seeds show its spread.

Measured on the final demo of the fifth delivery (``diffca-med demo``, 60 subjects,
32², t1c + flair; ``--model RUN/model``, 300 steps, seeds 0–2, mean; test subjects):

=======  =====  =====  ===================  =============  ===========  =============
arm      bacc   AUROC  bacc without fringe  fringe recall  specificity  grouped probe
=======  =====  =====  ===================  =============  ===========  =============
pixels   0.969  0.998  0.974                0.979          0.948        0.968
render   0.883  0.967  0.932                0.782          0.863        0.870
tokens   0.810  0.922  0.883                0.658          0.776        0.803
model    0.793  0.880  0.865                0.654          0.749        0.818
=======  =====  =====  ===================  =============  ===========  =============

(validation: grouped probe 0.989 / 0.891 / 0.820 / 0.826). The images hold the
evidence, even of lesion fringes; stage 1 loses most of what the target needs before
stage 2 sees it: the salient embedding (0.818) already matches what supervision on
the frozen tokens buys (0.803).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn

from diffca_med.analysis.probes import classification_probe
from diffca_med.data.store import SliceStore
from diffca_med.models.diffca import DiffCAModel
from diffca_med.models.split import image_logits
from model_quality import FRINGE_FRACTION, batched  # benchmarks/ is the script's folder



def _pooled(h: torch.Tensor) -> torch.Tensor:
    """(B, F, h, w) → (B, 2F): global mean and max."""
    return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


class SliceClassifier(nn.Module):
    """Maps (B, C, H, W) → logits (B,) and pooled features (B, 2·width)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(channels, 32), nn.MaxPool2d(2), block(32, width), nn.MaxPool2d(2),
                                  block(width, width))
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = _pooled(self.body(x))
        return self.head(f).squeeze(1), f


class TokenGridClassifier(nn.Module):
    """Token grids (B, D, g, g) → logits (B,) and pooled features (B, 2·width)."""

    def __init__(self, token_dim: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(token_dim, width, 1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = _pooled(self.body(x))
        return self.head(f).squeeze(1), f


def representations(x: torch.Tensor, model=None, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Arm name → inputs (N, ...) of the classifier, from images x (N, C, H, W) and, with
    a model, their stage-1 tokens (N, T, D)."""
    out = {"pixels": x}
    if model is not None:
        render = batched(model.denoiser.render, tokens) if model.config.render_prior else None
        if render is not None:
            out["render"] = ((render + 1) / 2).clamp(0, 1) if model.vae is None else render
        k = model.config.n_queries
        side = int(round(k ** 0.5))
        if side * side == k:
            out["tokens"] = tokens[:, :k].transpose(1, 2).reshape(len(x), -1, side, side)
    return out


def train_classifier(arm: str, x: torch.Tensor, labels: np.ndarray, steps: int, batch_size: int,
                     seed: int) -> nn.Module:
    """Supervised classifier of ``arm``'s inputs x (N, C, H, W), labels (N,) 0/1, balanced batches."""
    torch.manual_seed(seed)
    model = TokenGridClassifier(x.shape[1]) if arm == "tokens" else SliceClassifier(x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(labels).float()
    pos, neg = torch.where(y == 1)[0], torch.where(y == 0)[0]
    half = batch_size // 2
    model.train()
    for _ in range(steps):
        pick = torch.cat([pos[torch.randint(len(pos), (half,), generator=g)],
                          neg[torch.randint(len(neg), (half,), generator=g)]])
        xb = x[pick]
        flip = torch.rand(len(pick), generator=g) < 0.5  # left/right flips: brains are roughly symmetric
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.binary_cross_entropy_with_logits(model(xb)[0], y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def split_labels(store: SliceStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels 0/1, lesion-fringe mask, subject ids) of store ``rows``."""
    index = store.index.iloc[rows]
    y = (index["label"].to_numpy() == "tumour").astype(int)
    return y, store.thin_tumour(rows, FRINGE_FRACTION), index["subject"].to_numpy()


def score(logits: np.ndarray, features: np.ndarray | None, y: np.ndarray, fringe: np.ndarray,
          subjects: np.ndarray) -> dict:
    """Figures of one arm on one split (see the module docstring)."""
    pred = (logits > 0).astype(int)
    core = ~fringe
    return {
        "bacc": float(balanced_accuracy_score(y, pred)),
        "auroc": float(roc_auc_score(y, logits)),
        "bacc_without_fringe": float(balanced_accuracy_score(y[core], pred[core])),
        "fringe_recall": float(pred[fringe].mean()) if fringe.any() else float("nan"),
        "specificity": float(1 - pred[y == 0].mean()),
        "grouped_probe": classification_probe(features, y, subjects) if features is not None else float("nan"),
    }


def model_arm(model, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The model's own detector image logits (N,) and salient embeddings (N, d) from the
    stage-1 tokens (N, T, D), or None when its split has no detector."""
    if not hasattr(model.split, "gate_logits"):
        return None
    logits = batched(model.split.gate_logits, tokens)
    embeddings = batched(lambda z: model.split(z).salient_embedding, tokens)
    return image_logits(logits).numpy(), embeddings.numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="model folder: also the render, token and model arms")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    store = SliceStore(args.store)
    model = DiffCAModel.from_pretrained(args.model).eval() if args.model is not None else None
    def inputs_of(rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        x = torch.from_numpy(np.asarray(store.images[rows], np.float32))
        tokens = batched(model.conditioner, x) if model is not None else None
        return representations(x, model, tokens), tokens

    train_rows = store.rows(split="train")
    y_train = split_labels(store, train_rows)[0]
    train_inputs = inputs_of(train_rows)[0]
    evals = {split: (*inputs_of(store.rows(split=split)), split_labels(store, store.rows(split=split)))
             for split in ("test", "val")}
    results: dict[str, dict] = {}
    for arm, x_train in train_inputs.items():
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            clf = train_classifier(arm, x_train, y_train, args.steps, args.batch_size, seed)
            row = {"seed": seed, "train_s": round(time.perf_counter() - t0, 1)}
            for split, (inputs, _, (y, fringe, subjects)) in evals.items():
                with torch.no_grad():
                    logits, feats = clf(inputs[arm])
                row[split] = score(logits.numpy(), feats.numpy(), y, fringe, subjects)
            runs.append(row)
            print(arm, json.dumps(row), flush=True)
        results[arm] = {split: {k: round(float(np.mean([r[split][k] for r in runs])), 3) for k in runs[0][split]}
                        for split in evals} | {"runs": runs}
    if model is not None:
        for split, (_, tokens, (y, fringe, subjects)) in evals.items():
            arm = model_arm(model, tokens)
            if arm is not None:
                logits, emb = arm
                row = score(logits, None, y, fringe, subjects)
                row["grouped_probe"] = classification_probe(emb, y, subjects)  # the issue-3 figure
                results.setdefault("model", {})[split] = {k: round(v, 3) for k, v in row.items()}
    print(f"{'arm':8s} {'split':5s} " + " ".join(f"{k:>19s}" for k in ("bacc", "auroc", "bacc_without_fringe",
                                                                       "fringe_recall", "specificity", "grouped_probe")))
    for arm, res in results.items():
        for split in evals:
            r = res[split]
            print(f"{arm:8s} {split:5s} " + " ".join(f"{r[k]:19.3f}" for k in ("bacc", "auroc", "bacc_without_fringe",
                                                                             "fringe_recall", "specificity", "grouped_probe")))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
