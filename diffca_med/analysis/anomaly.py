"""Anomaly maps, anomaly masks and healthy-region fidelity.

All functions work on arrays in the slice store's normalised intensity units (each
modality percentile-normalised inside the brain to [0, 1]), so differences are
comparable across modalities and subjects.

* :func:`anomaly_map` — ``|input − pseudo-healthy|`` combined over the modality axis
  (``mean`` by default: every modality votes equally; ``max``: the largest change in
  any modality), zero outside the brain.
* :func:`threshold_value` / :func:`anomaly_mask` — a binary mask from the map. The
  default threshold is Otsu's (SimpleITK's ``OtsuThresholdImageFilter``) on the map's
  values inside the brain; ``percentile`` (e.g. 99 → the top 1 % of brain voxels) and
  ``fixed`` (a value in normalised intensity units) are the alternatives.
* :func:`healthy_region_fidelity` — PSNR (dB, data range 1) and SSIM of the
  pseudo-healthy image against the input inside the brain but outside the dilated
  anomaly mask: where nothing should have changed (the definitions of
  :mod:`diffca_med.analysis.metrics`, shared with ``evaluate``).
* :func:`most_affected_slices` — the slices with the most anomalous voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffca_med.analysis.metrics import masked_psnr, masked_ssim
from diffca_med.errors import ConfigError

THRESHOLD_METHODS = ("otsu", "percentile", "fixed")
COMBINE_METHODS = ("mean", "max")


def anomaly_map(
    inputs: np.ndarray,
    pseudo_healthy: np.ndarray,
    brain: np.ndarray | None = None,
    combine: str = "mean",
) -> np.ndarray:
    """Per-pixel anomaly score.

    Args:
        inputs, pseudo_healthy: float arrays ``(..., C, H, W)`` in normalised units.
        brain: optional ``(..., H, W)`` mask; the score is 0 outside it.
        combine: ``"mean"`` or ``"max"`` over the ``C`` modalities.

    Returns:
        float32 ``(..., H, W)``, ``|inputs − pseudo_healthy|`` combined over ``C``.
    """
    if inputs.shape != pseudo_healthy.shape:
        raise ValueError(f"shape mismatch {inputs.shape} vs {pseudo_healthy.shape}")
    if combine not in COMBINE_METHODS:
        raise ConfigError(f"--combine: unknown method {combine!r} (use one of {', '.join(COMBINE_METHODS)})")
    diff = np.abs(inputs.astype(np.float32) - pseudo_healthy.astype(np.float32))
    amap = diff.mean(axis=-3) if combine == "mean" else diff.max(axis=-3)
    if brain is not None:
        amap = amap * (np.asarray(brain) > 0)
    return amap.astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    import SimpleITK as sitk

    # A 1 × N image of the values: Otsu only needs their histogram.
    image = sitk.GetImageFromArray(values.astype(np.float32).reshape(1, -1))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(image)
    return float(otsu.GetThreshold())


def threshold_value(values: np.ndarray, method: str = "otsu", value: float | None = None) -> float:
    """The anomaly threshold for a set of anomaly scores (normally: inside the brain).

    Args:
        values: 1-D (or any shape) array of scores.
        method: ``"otsu"`` (no parameter), ``"percentile"`` (``value`` in (0, 100),
            default 99) or ``"fixed"`` (``value`` is the threshold itself).

    Returns:
        The threshold; a score strictly above it is anomalous.
    """
    values = np.asarray(values, dtype=np.float32).ravel()
    if method not in THRESHOLD_METHODS:
        raise ConfigError(
            f"--threshold: unknown method {method!r} (use one of {', '.join(THRESHOLD_METHODS)})"
        )
    if method == "fixed":
        if value is None:
            raise ConfigError("--threshold fixed needs --threshold-value (normalised intensity units)")
        return float(value)
    if values.size == 0:
        return float("inf")
    if method == "percentile":
        q = 99.0 if value is None else float(value)
        if not 0.0 < q < 100.0:
            raise ConfigError(f"--threshold-value: percentile must be in (0, 100), got {q}")
        return float(np.percentile(values, q))
    if float(values.max()) <= float(values.min()):
        return float(values.max())  # constant map: nothing stands out
    return _otsu(values)


def anomaly_mask(
    amap: np.ndarray,
    brain: np.ndarray | None = None,
    method: str = "otsu",
    value: float | None = None,
) -> tuple[np.ndarray, float]:
    """Threshold an anomaly map.

    Args:
        amap: float ``(..., H, W)`` anomaly map.
        brain: optional mask of the same shape; the threshold is computed from the
            scores inside it and the mask is 0 outside it.

    Returns:
        ``(mask, threshold)``: uint8 mask (1 = anomalous) and the threshold used.
    """
    inside = np.ones(amap.shape, bool) if brain is None else np.asarray(brain) > 0
    thr = threshold_value(amap[inside], method, value)
    mask = (amap > thr) & inside
    return mask.astype(np.uint8), thr


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a stack of 2-D masks ``(..., H, W)`` in-plane by a disc of ``radius`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = (yy**2 + xx**2) <= radius**2
    return ndimage.binary_dilation(mask, structure=disc.reshape((1,) * (mask.ndim - 2) + disc.shape))


def largest_components(mask: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest 3-D connected parts of a slice stack ``(D, H, W)`` (26-connected;
    consecutive slices touch); ``n`` = 0 keeps the mask as it is."""
    mask = np.asarray(mask, dtype=bool)
    if n <= 0 or not mask.any():
        return mask.copy()
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= n:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:n] + 1
    return np.isin(labels, keep)


def healthy_region_fidelity(
    inputs: np.ndarray,
    pseudo_healthy: np.ndarray,
    brain: np.ndarray,
    anomaly: np.ndarray,
    dilation: int = 3,
) -> dict[str, float]:
    """PSNR and SSIM of pseudo-healthy vs input where nothing should change.

    Args:
        inputs, pseudo_healthy: ``(D, C, H, W)`` in normalised units (data range 1).
        brain: ``(D, H, W)`` brain mask.
        anomaly: ``(D, H, W)`` anomaly (or tumour) mask, dilated in-plane by a disc
            of radius ``dilation`` pixels before it is excluded.

    Returns:
        ``{"psnr": dB, "ssim": mean SSIM, "pixels": number of (D, H, W) pixels used}``;
        NaN when the region is empty.
    """
    region = (np.asarray(brain) > 0) & ~dilate_mask(np.asarray(anomaly) > 0, dilation)
    n = int(region.sum())
    if n == 0:
        return {"psnr": float("nan"), "ssim": float("nan"), "pixels": 0}
    sel = np.broadcast_to(region[:, None], inputs.shape)
    return {
        "psnr": masked_psnr(inputs, pseudo_healthy, sel),
        "ssim": masked_ssim(inputs, pseudo_healthy, sel),
        "pixels": n,
    }


def most_affected_slices(amap: np.ndarray, mask: np.ndarray, k: int = 3) -> np.ndarray:
    """Positions (along axis 0) of the ``k`` slices with the most anomalous pixels.

    Ties (e.g. no anomalous pixel at all) are broken by the summed anomaly score.

    Args:
        amap: float ``(D, H, W)``; mask: ``(D, H, W)``.

    Returns:
        int array of up to ``k`` positions, most affected first.
    """
    area = (np.asarray(mask) > 0).reshape(len(mask), -1).sum(1).astype(np.float64)
    score = np.asarray(amap, np.float64).reshape(len(amap), -1).sum(1)
    order = np.lexsort((-score, -area))  # primary key: area, then score
    return order[: max(0, min(k, len(order)))]
