"""Measure a trained Diff-CA model against the issue-3 targets on held-out subjects.

    .venv/bin/python benchmarks/model_quality.py RUN/model STORE [--split test]
        [--n-slices 96] [--steps 20] [--seed 0] [--truth DEMO/data/derivatives/phantom-truth]
        [--json OUT.json]

Figures (all on slices of the store's ``--split`` subjects, healthy + tumour):

* stage 1 — reconstruction of a slice from its own tokens, PSNR (dB, data range 1) and
  SSIM (Gaussian window 11) inside the brain mask, in a fixed evaluation window: each
  subject's 0.5th–99.5th percentile inside the brain of its source volume maps to
  [0, 1] (clipped), whatever normalisation the store used (``evaluation_scale``), per slice averaged over channels,
  then averaged over slices; from fresh noise (DDIM ``--steps``, η = 0) and from the
  DDIM-inverted input; and from *another slice's* tokens (a slice of a different
  subject, fresh noise with the same seed) scored against the original slice — the
  ``token_gap_db`` = PSNR(own tokens) − PSNR(other tokens) shows whether the
  conditioning carries the image (target ≥ 5 dB);
* stage 2 — 5-fold logistic-regression probes of healthy vs tumour (balanced
  accuracy, :func:`diffca_med.analysis.probes.classification_probe`: folds grouped by
  subject, as slices of one brain are not independent) from the salient embedding
  (target ≥ 0.9) and from the common tokens averaged over tokens (target ≤ 0.65),
  beside the same probe on Z and on the slice position alone (axial index + brain
  area: a confound the common anatomy legitimately carries), and both again on
  position-matched subsets (per bin of ``store.axial_bins(8)``, as many
  healthy as tumour slices; mean over 5 draws) where position predicts nothing, to
  split a common-part leak into anatomy-by-position and lesion; the salient probe again
  without the lesion-fringe slices (tumour on < 3 % of the slice), to show where it
  fails; with ``--truth`` (the phantom's ``derivatives/phantom-truth`` folder) the
  same common probe on the **ideal** common part: pooled stage-1 tokens Z where every
  tumour slice is replaced by the same slice of its true healthy twin (the lesion
  removed, the anatomy kept), what a perfect split would score with this stage 1;
  the adversary's accuracy on these slices and the controller's GRL weight;
  a *fresh* adversary (same architecture, trained from scratch on the training
  subjects' Ẑ_C, balanced batches) and its balanced accuracy here: the GRL holds the
  co-trained adversary near chance, this shows what a new classifier still finds;
* sampling speed in images/second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from diffca_med.analysis.probes import classification_probe

#: a tumour slice with tumour on less than this fraction of its pixels is lesion fringe
FRINGE_FRACTION = 0.03


def _metrics(pred: np.ndarray, ref: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice PSNR and SSIM inside the brain; pred/ref (N, C, H, W), brain (N, H, W)."""
    from diffca_med.analysis.metrics import masked_psnr, masked_ssim

    psnr, ssim = [], []
    for p, r, m in zip(pred, ref, brain):
        mask = np.broadcast_to(m[None] > 0, p.shape)
        psnr.append(masked_psnr(p, r, mask))
        ssim.append(masked_ssim(p, r, mask))
    return np.asarray(psnr), np.asarray(ssim)


def evaluation_scale(store, subjects: np.ndarray) -> np.ndarray:
    """(N, C) factors taking store intensities to the fixed evaluation window.

    Store value x means ``lo + x·(hi − lo)`` in source units (``geometry.json``); the
    window maps the source volume's brain percentiles 0.5 → 0 and 99.5 → 1. With
    ``lo`` the same 0.5th percentile, the map is the factor (hi − lo) / (p99.5 − p0.5).
    """
    import nibabel as nib

    from diffca_med.analysis.metrics import brain_window

    factors: dict[str, list[float]] = {}
    mods = store.modalities
    for subject in np.unique(subjects):
        files = store.source_files(str(subject))
        vols = []
        for m in mods:
            data = np.asanyarray(nib.load(str(files[m].path)).dataobj)
            vols.append(np.asarray(data[..., files[m].channel] if files[m].channel is not None else data, np.float32))
        brain = np.any([v > 0 for v in vols], axis=0)
        factors[subject] = []
        for m, v in zip(mods, vols):
            lo, hi = store.geometry[str(subject)]["intensity"][m]
            p_lo, p_hi = brain_window(v, brain)
            factors[subject].append((hi - lo) / (p_hi - p_lo))
    return np.asarray([factors[s] for s in subjects], dtype=np.float32)


def _other_subject_permutation(subjects: np.ndarray) -> np.ndarray:
    """Map slice i to slice perm[i], half-way round the subject-sorted list.

    Slices of one subject are contiguous after sorting, so a half-turn lands on another
    subject unless one subject owns more than half of the slices.
    """
    n = len(subjects)
    order = np.argsort(subjects, kind="stable")
    perm = np.empty(n, dtype=int)
    perm[order] = order[(np.arange(n) + n // 2) % n]
    return perm


def batched(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``batch`` (no gradients), concatenated."""
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)], dim=0)


def fresh_adversary(model, store, test_c: torch.Tensor, test_y: np.ndarray, steps: int = 1000,
                    seed: int = 0) -> dict:
    """Train a new :class:`~diffca_med.models.split.Adversary` (the model's config)
    on the training subjects' Ẑ_C (16 + 16 slices a step, AdamW 1e-3) and score it on
    held-out Ẑ_C ``test_c`` (N, T, D) with labels ``test_y`` (N,) 1 = tumour: its mean
    batch accuracy over the last half of training (as the training log reports the
    co-trained one) and its balanced accuracy on the held-out slices."""
    from diffca_med.models.split import Adversary

    torch.manual_seed(seed)
    rows = store.rows(split="train", labels=("healthy", "tumour"))
    x = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))
    train_c = batched(lambda b: model.encode(b).common, x)
    train_y = (store.index.iloc[rows]["label"].to_numpy() == "tumour").astype(int)
    adversary = Adversary(model.config)
    opt = torch.optim.AdamW(adversary.parameters(), lr=1e-3)
    pos, neg = np.flatnonzero(train_y == 1), np.flatnonzero(train_y == 0)
    rng = np.random.default_rng(seed)
    y_all = torch.from_numpy(train_y).float()
    accs = []
    for _ in range(steps):
        pick = np.concatenate([rng.choice(pos, 16), rng.choice(neg, 16)])
        logits = adversary(train_c[pick])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_all[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(float(((logits.detach() > 0).float() == y_all[pick]).float().mean()))
    adversary.eval()
    with torch.no_grad():
        pred = (adversary(test_c) > 0).long().numpy()
    return {"fresh_adversary_train_acc": float(np.mean(accs[steps // 2:])),
            "fresh_adversary_bacc": float(balanced_accuracy_score(test_y, pred))}


def position_matched(b: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a subset with equal healthy and tumour counts in every position bin.

    ``b`` (N,) axial-position bins (``SliceStore.axial_bins``), ``labels`` (N,) 1 = tumour.
    """
    keep = []
    for k in np.unique(b):
        h, t = np.flatnonzero((b == k) & (labels == 0)), np.flatnonzero((b == k) & (labels == 1))
        n = min(len(h), len(t))
        keep += [rng.choice(h, n, replace=False), rng.choice(t, n, replace=False)]
    return np.sort(np.concatenate(keep))


def evaluate(model, store, split: str = "test", n_slices: int = 96, steps: int = 20,
             seed: int = 0, batch: int = 32, probes: bool = True, reconstruction: bool = True,
             truth: Path | None = None) -> dict:
    """All figures of the module docstring as a JSON-ready dict."""
    model.eval()
    rows = store.rows(split=split, labels=("healthy", "tumour"))
    index = store.index.iloc[rows]
    labels_all = (index["label"].to_numpy() == "tumour").astype(int)
    subjects_all = index["subject"].to_numpy()
    x_all = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))
    out: dict = {"split": split, "n_slices_total": int(len(rows)), "steps": steps, "seed": seed,
                 "n_tumour": int(labels_all.sum()), "n_healthy": int((1 - labels_all).sum())}
    rng = np.random.default_rng(seed)
    if reconstruction:
        pick = np.sort(rng.choice(len(rows), size=min(n_slices, len(rows)), replace=False))
        x = x_all[pick]
        brain = np.asarray(store.brain[rows[pick]])
        scale = evaluation_scale(store, subjects_all[pick])[:, :, None, None]  # (N, C, 1, 1)

        def window(v: np.ndarray) -> np.ndarray:
            return np.clip(v * scale, 0.0, 1.0)

        ref = window(x.numpy())
        t0 = time.perf_counter()
        fresh = batched(lambda b: model.reconstruct(b, noise="fresh", steps=steps, seed=seed), x, batch)
        dt = time.perf_counter() - t0
        inverted = batched(lambda b: model.reconstruct(b, noise="inverted", steps=steps, seed=seed), x, batch)
        perm = _other_subject_permutation(subjects_all[pick])
        with torch.no_grad():
            tokens = torch.cat([model.encode(x[i:i + batch]).combined for i in range(0, len(x), batch)])
            other = torch.cat([model.generate(tokens[perm][i:i + batch], steps=steps, seed=seed)
                               for i in range(0, len(x), batch)])
        res = {}
        for name, pred in (("fresh", fresh), ("inverted", inverted), ("other_tokens", other)):
            p, s = _metrics(window(pred.numpy()), ref, brain)
            res[name] = {"psnr_db": float(np.nanmean(p)), "ssim": float(np.nanmean(s))}
        lab = labels_all[pick]
        for name, mask in (("healthy", lab == 0), ("tumour", lab == 1)):
            if mask.any():
                p, s = _metrics(window(fresh.numpy())[mask], ref[mask], brain[mask])
                res[f"fresh_{name}"] = {"psnr_db": float(np.nanmean(p)), "ssim": float(np.nanmean(s))}
        res["token_gap_db"] = res["fresh"]["psnr_db"] - res["other_tokens"]["psnr_db"]
        res["n_slices"] = int(len(pick))
        res["other_tokens_same_subject"] = int((subjects_all[pick][perm] == subjects_all[pick]).sum())
        res["sampling_images_per_s"] = float(len(pick) / dt)
        out["reconstruction"] = res
    if probes:
        with torch.no_grad():
            enc = [model.encode(x_all[i:i + batch]) for i in range(0, len(x_all), batch)]
        sal = torch.cat([e.salient_embedding for e in enc]).numpy()
        com = torch.cat([e.common.mean(dim=1) for e in enc]).numpy()
        tok = torch.cat([e.tokens.mean(dim=1) for e in enc]).numpy()
        commons = torch.cat([e.common for e in enc])
        with torch.no_grad():
            adv = (model.adversary(commons) > 0).long().numpy()
        sal_norm = torch.cat([e.salient.pow(2).mean(dim=(1, 2)) for e in enc]).numpy()
        def probe(features: np.ndarray, keep: np.ndarray | slice = slice(None)) -> float:
            return classification_probe(features[keep], labels_all[keep], subjects_all[keep], seed=seed)

        # lesion-fringe tumour slices (a few oedema pixels) are where a probe fails
        core = ~store.thin_tumour(rows, FRINGE_FRACTION)
        position = index[["slice", "brain_pixels"]].to_numpy(dtype=float)
        bins = store.axial_bins(8)[rows]
        draws = [position_matched(bins, labels_all, np.random.default_rng(seed + r)) for r in range(5)]
        out["probes"] = {
            "salient_embedding_bacc": probe(sal),
            "common_pooled_bacc": probe(com),
            "tokens_pooled_bacc": probe(tok),
            # confound baseline: how well slice position alone (axial index, brain area)
            # predicts the label; common anatomy legitimately carries this much
            "slice_position_bacc": probe(position),
            "common_pooled_bacc_position_matched": float(np.mean([probe(com, d) for d in draws])),
            "slice_position_bacc_position_matched": float(np.mean([probe(position, d) for d in draws])),
            "n_position_matched": int(len(draws[0])),
            "salient_embedding_bacc_without_fringe": probe(sal, core),
            "n_fringe_tumour_slices": int((~core).sum()),
            "adversary_accuracy": float((adv == labels_all).mean()),
            "grl_weight": float(model.grl.weight),
            "salient_sq_healthy": float(sal_norm[labels_all == 0].mean()),
            "salient_sq_tumour": float(sal_norm[labels_all == 1].mean()),
            **fresh_adversary(model, store, commons, labels_all, seed=seed),
        }
        if truth is not None:
            healed = twin_images(store, rows, labels_all, truth)
            ideal = batched(lambda b: model.encode(b).tokens.mean(dim=1), healed, batch).numpy()
            out["probes"]["twin_tokens_pooled_bacc"] = probe(ideal)
            out["probes"]["twin_tokens_pooled_bacc_position_matched"] = float(np.mean([probe(ideal, d) for d in draws]))
    return out


def twin_images(store, rows: np.ndarray, labels: np.ndarray, truth: Path) -> torch.Tensor:
    """Store images (N, C, H, W) of ``rows`` with every tumour row (``labels`` 1) replaced
    by the same slice of the subject's true healthy twin (``truth``: the phantom's truth folder)."""
    from diffca_med.pipelines.evaluate import twin_rows

    x = np.asarray(store.images[rows], dtype=np.float32)
    subjects = store.index["subject"].to_numpy()[rows]
    for subject in np.unique(subjects[labels == 1]):
        sel = (subjects == subject) & (labels == 1)
        x[sel] = twin_rows(store, subject, rows[sel], truth)
    return torch.from_numpy(x)


TARGETS = {
    "fresh PSNR >= 20 dB": lambda r: r["reconstruction"]["fresh"]["psnr_db"] >= 20,
    "fresh SSIM >= 0.6": lambda r: r["reconstruction"]["fresh"]["ssim"] >= 0.6,
    "other-token gap >= 5 dB": lambda r: r["reconstruction"]["token_gap_db"] >= 5,
    "salient probe >= 0.9": lambda r: r["probes"]["salient_embedding_bacc"] >= 0.9,
    "common probe <= 0.65": lambda r: r["probes"]["common_pooled_bacc"] <= 0.65,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="model folder (config.json + model.safetensors)")
    ap.add_argument("store", type=Path, help="slice store folder made by 'diffca-med prepare'")
    ap.add_argument("--split", default="test", help="store split to measure on (default test)")
    ap.add_argument("--n-slices", type=int, default=96, help="slices reconstructed (default 96)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of noise, slice choice, folds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--truth", type=Path, default=None,
                    help="the phantom's truth folder (DATA/derivatives/phantom-truth): also probe the ideal common part")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from diffca_med.data import SliceStore
    from diffca_med.errors import DiffCAError
    from diffca_med.fileio import atomic_write_text
    from diffca_med.models import DiffCAModel

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = DiffCAModel.from_pretrained(args.model)
        store = SliceStore(args.store)
    except DiffCAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if list(store.modalities) != list(model.config.modalities) or store.size != model.config.image_size:
        print(f"error: {args.store}: store has {store.modalities} at {store.size} px, the model "
              f"needs {model.config.modalities} at {model.config.image_size} px", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        res = evaluate(model, store, args.split, args.n_slices, args.steps, args.seed, truth=args.truth)
    except DiffCAError as err:  # e.g. a twin missing from --truth
        print(f"error: {err}", file=sys.stderr)
        return 2
    res["model"], res["store"], res["seconds"] = str(args.model), str(args.store), time.perf_counter() - t0
    res["targets"] = {}
    for name, check in TARGETS.items():
        try:
            res["targets"][name] = bool(check(res))
        except (KeyError, TypeError):
            res["targets"][name] = None
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
