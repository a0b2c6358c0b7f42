"""Image-fidelity and anomaly-detection metrics with known, documented definitions.

Three families, all on NumPy arrays:

* **Inpainting fidelity (BraTS 2023 "local synthesis" style)** —
  :func:`inpainting_metrics` scores a pseudo-healthy image against the true healthy
  image inside the tumour mask the way the BraTS 2023 inpainting challenge does:
  percentiles 0.5/99.5 of the *voided input* (the input with the mask region set to
  0, i.e. what an inpainting model is given) fix an intensity window (lower end
  clipped at 0); prediction and reference, each multiplied by the mask, are clipped
  to that window and scaled to [0, 1]; MSE and PSNR (data range 1) are taken over the
  voxels inside the mask; SSIM is the mean of the SSIM map (Gaussian window 11,
  σ = 1.5) over the voxels inside the mask. The challenge computes its SSIM map with
  torchmetrics on the whole volume; we compute it per axial slice (2-D), because our
  volumes are stacks of independently resized slices.
* **Masked fidelity** — :func:`masked_psnr` / :func:`masked_ssim` between two images
  over an arbitrary mask, intensities already in [0, 1]. (Healthy-region fidelity of
  a pseudo-healthy image — brain minus the dilated tumour — is
  :func:`diffca_med.analysis.anomaly.healthy_region_fidelity`.)
* **Anomaly detection** — pixel-level average precision (AUPRC), Dice at a threshold,
  the best Dice over all thresholds and the threshold that reaches it, and
  slice-level AUROC.

Conventions: images are float arrays of shape ``(..., H, W)`` (any leading axes:
slices, channels); masks are boolean arrays broadcastable to the image shape.
PSNR is in dB; identical images give ``inf`` (callers serialise it as such).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from sklearn.metrics import average_precision_score, roc_auc_score

#: BraTS 2023 inpainting challenge percentile window.
P_LOW, P_HIGH = 0.5, 99.5


# --------------------------------------------------------------------------- helpers
def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    return mask


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


# ------------------------------------------------------------------ image fidelity
def percentile_window(
    reference: np.ndarray,
    p_low: float = P_LOW,
    p_high: float = P_HIGH,
    strictly_positive: bool = True,
) -> tuple[float, float]:
    """Intensity window ``(lo, hi)`` = percentiles ``p_low``/``p_high`` of ``reference``.

    As in the BraTS 2023 inpainting evaluation, all voxels of ``reference`` count
    (background included) and ``lo`` is raised to 0 when ``strictly_positive``.
    """
    lo, hi = np.percentile(np.asarray(reference, dtype=np.float64), [p_low, p_high])
    if strictly_positive:
        lo = max(float(lo), 0.0)
    return float(lo), float(hi)


def brain_window(volume: np.ndarray, brain: np.ndarray, p_low: float = P_LOW,
                 p_high: float = P_HIGH) -> tuple[float, float]:
    """Intensity window ``(lo, hi)`` = percentiles ``p_low``/``p_high`` of ``volume`` inside
    ``brain`` (bool, same shape).

    The benchmarks score source-grid volumes in this window, fixed by the source
    data rather than by the store's normalisation, so a figure keeps one meaning
    whatever ``prepare`` did.
    """
    return percentile_window(volume[brain], p_low, p_high, strictly_positive=False)


def percentile_normalise(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip ``x`` to ``[lo, hi]`` and scale to [0, 1] (float64).

    A degenerate window (``hi <= lo``) maps everything to 0 rather than dividing by 0.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), lo, hi)
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def masked_mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference of ``a`` and ``b`` over the voxels where ``mask`` is true.

    Returns NaN for an empty mask.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_same_shape(a, b)
    m = _as_mask(mask, a.shape)
    if not m.any():
        return float("nan")
    return float(np.mean((a[m] - b[m]) ** 2))


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB for a given MSE: ``10 log10(range² / mse)``; ``inf`` when mse == 0."""
    if math.isnan(mse):
        return float("nan")
    if mse <= 0.0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / mse))


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR (dB) of ``a`` against ``b`` over ``mask``; ``inf`` for identical images."""
    return psnr_from_mse(masked_mse(a, b, mask), data_range)


def ssim_map(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> np.ndarray:
    """Per-pixel 2-D SSIM of ``a`` vs ``b``, shape ``(..., H, W)`` like the inputs.

    Computed by MONAI's ``compute_ssim_and_cs`` (Gaussian window ``win_size``,
    ``sigma``) on each 2-D slice after reflect-padding by ``win_size // 2`` so the
    map has the image's size (the same convention as torchmetrics' full image).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    _check_same_shape(a, b)
    if a.ndim < 2:
        raise ValueError("ssim_map needs images with at least 2 dimensions (H, W)")
    shape = a.shape
    h, w = shape[-2:]
    win = int(min(win_size, h, w))
    win = win if win % 2 == 1 else win - 1
    pad = win // 2
    ta = torch.from_numpy(np.ascontiguousarray(a.reshape(-1, 1, h, w)))
    tb = torch.from_numpy(np.ascontiguousarray(b.reshape(-1, 1, h, w)))
    if pad > 0:
        ta = F.pad(ta, (pad, pad, pad, pad), mode="reflect")
        tb = F.pad(tb, (pad, pad, pad, pad), mode="reflect")
    with torch.no_grad():
        smap, _ = compute_ssim_and_cs(
            ta, tb, spatial_dims=2, kernel_size=(win, win), kernel_sigma=(sigma, sigma),
            data_range=data_range,
        )
    return smap.reshape(shape).numpy().astype(np.float64)


def masked_ssim(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0, win_size: int = 11
) -> float:
    """Mean of the 2-D SSIM map of ``a`` vs ``b`` over ``mask`` (NaN for an empty mask)."""
    m = _as_mask(mask, np.shape(a))
    if not m.any():
        return float("nan")
    return float(ssim_map(a, b, data_range=data_range, win_size=win_size)[m].mean())


def inpainting_metrics(
    prediction: np.ndarray,
    target: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    win_size: int = 11,
) -> dict[str, float]:
    """BraTS 2023 inpainting-style PSNR / SSIM / MSE of ``prediction`` vs ``target`` in ``mask``.

    Args:
        prediction: the generated (pseudo-healthy) image, shape ``(..., H, W)``.
        target: the true healthy image, same shape and intensity scale as the input.
        reference: the input image whose 0.5/99.5 percentiles set the window; its
            voxels inside ``mask`` are voided (set to 0) first, as the challenge's
            normalisation uses the voided input.
        mask: region to score (e.g. the tumour), broadcastable to the image shape.

    Returns:
        ``{"psnr": dB (data range 1), "ssim": mean SSIM in mask, "mse": in [0, 1]²}``;
        NaN everywhere for an empty mask.
    """
    prediction = np.asarray(prediction, np.float64)
    target = np.asarray(target, np.float64)
    reference = np.asarray(reference, np.float64)
    _check_same_shape(prediction, target)
    _check_same_shape(prediction, reference)
    m = _as_mask(mask, prediction.shape)
    if not m.any():
        return {"psnr": float("nan"), "ssim": float("nan"), "mse": float("nan")}
    lo, hi = percentile_window(np.where(m, 0.0, reference))
    pred_n = percentile_normalise(prediction * m, lo, hi)
    targ_n = percentile_normalise(target * m, lo, hi)
    mse = masked_mse(pred_n, targ_n, m)
    ssim = masked_ssim(pred_n, targ_n, m, data_range=1.0, win_size=win_size)
    return {"psnr": psnr_from_mse(mse, 1.0), "ssim": ssim, "mse": mse}


# --------------------------------------------------------------- anomaly detection
def dice_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice ``2|P∩T| / (|P| + |T|)`` of two binary arrays; 1.0 when both are empty."""
    p = np.asarray(prediction, bool)
    t = np.asarray(target, bool)
    _check_same_shape(p, t)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def dice_at_threshold(scores: np.ndarray, target: np.ndarray, threshold: float,
                      valid: np.ndarray | None = None) -> float:
    """Dice of ``scores > threshold`` against ``target``, counting only ``valid`` pixels."""
    scores = np.asarray(scores, np.float64)
    target = np.asarray(target, bool)
    if valid is not None:
        v = _as_mask(valid, scores.shape)
        scores, target = scores[v], target[v]
    return dice_score(scores > threshold, target)


def _scores_in(scores: np.ndarray, target: np.ndarray,
               valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float64) and binary target, restricted to ``valid`` pixels when given."""
    s = np.asarray(scores, np.float64)
    t = np.asarray(target, bool)
    _check_same_shape(s, t)
    if valid is not None:
        v = _as_mask(valid, s.shape)
        s, t = s[v], t[v]
    return s, t


def best_dice(scores: np.ndarray, target: np.ndarray,
              valid: np.ndarray | None = None) -> tuple[float, float]:
    """Best Dice of ``scores > t`` against ``target`` over all thresholds ``t``.

    Exact over every distinct score value (one sort, cumulative counts), so it is the
    upper bound a perfectly tuned threshold could reach. Returns ``(dice, t)``; with
    no positive pixel anywhere returns ``(nan, nan)``.
    """
    s, t = _scores_in(scores, target, valid)
    s, t = s.ravel(), t.ravel()
    n_pos = int(t.sum())
    if n_pos == 0 or s.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    tp = np.cumsum(t_sorted)
    n_pred = np.arange(1, s.size + 1)
    # Only the last index of a run of equal scores is a reachable cut.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    dice = np.where(last, 2.0 * tp / (n_pred + n_pos), -1.0)
    i = int(np.argmax(dice))
    # Threshold strictly below s_sorted[i] and at/above the next smaller score keeps
    # exactly the top i+1 pixels under `scores > threshold`.
    nxt = s_sorted[i + 1] if i + 1 < s.size else s_sorted[i] - 1.0
    return float(dice[i]), float((s_sorted[i] + nxt) / 2.0)


def pixel_auprc(scores: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Pixel-level average precision (area under the precision-recall curve).

    ``scores`` are anomaly scores (higher = more anomalous), ``target`` the binary
    tumour mask, ``valid`` an optional mask of pixels that count (e.g. the brain).
    Uses ``sklearn.metrics.average_precision_score``; NaN without positive pixels.
    """
    s, t = _scores_in(scores, target, valid)
    if not t.any():
        return float("nan")
    return float(average_precision_score(t.ravel(), s.ravel()))


def slice_auroc(slice_scores: np.ndarray, slice_is_tumour: np.ndarray) -> float:
    """Area under the ROC curve of per-slice scores for tumour (1) vs healthy (0) slices.

    NaN when only one class is present.
    """
    y = np.asarray(slice_is_tumour, bool).ravel()
    s = np.asarray(slice_scores, np.float64).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def slice_scores(anomaly: np.ndarray, valid: np.ndarray, quantile: float = 0.99) -> np.ndarray:
    """One anomaly score per slice: the ``quantile`` of the map over its valid pixels.

    Args:
        anomaly: ``(N, H, W)`` anomaly maps.
        valid: ``(N, H, W)`` pixels that count (e.g. the brain); a slice with none
            scores 0.

    Returns:
        ``(N,)`` float array. A high quantile rather than the mean, so that a small
        tumour in a large brain still lifts its slice's score.
    """
    anomaly = np.asarray(anomaly, np.float64)
    valid = _as_mask(valid, anomaly.shape)
    out = np.zeros(anomaly.shape[0])
    for i in range(anomaly.shape[0]):
        vals = anomaly[i][valid[i]]
        out[i] = float(np.quantile(vals, quantile)) if vals.size else 0.0
    return out
