"""Metrics against cases whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric

from diffca_med.analysis import metrics as M


def _img(seed=0, shape=(3, 24, 24)):
    return np.random.default_rng(seed).random(shape)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    a = _img()
    mask = np.ones_like(a, bool)
    assert M.masked_psnr(a, a, mask) == math.inf
    assert M.masked_ssim(a, a, mask) == pytest.approx(1.0, abs=1e-6)
    assert M.masked_mse(a, a, mask) == 0.0


def test_known_mse_and_psnr():
    a = np.zeros((4, 8, 8))
    b = np.full((4, 8, 8), 0.1)
    mask = np.zeros_like(a, bool)
    mask[:, :4] = True
    assert M.masked_mse(a, b, mask) == pytest.approx(0.01)
    assert M.masked_psnr(a, b, mask) == pytest.approx(20.0)
    # Pixels outside the mask do not count.
    b[~mask] = 0.9
    assert M.masked_psnr(a, b, mask) == pytest.approx(20.0)
    assert math.isnan(M.masked_psnr(a, b, np.zeros_like(mask)))


def test_psnr_matches_monai_over_whole_image():
    a, b = _img(1, (1, 1, 16, 16)), _img(2, (1, 1, 16, 16))
    ours = M.masked_psnr(a, b, np.ones_like(a, bool), data_range=1.0)
    monai = PSNRMetric(max_val=1.0)(torch.tensor(a), torch.tensor(b)).item()
    assert ours == pytest.approx(monai, rel=1e-5)


def test_ssim_map_shape_and_degradation():
    a = _img(3, (2, 32, 32))
    noisy = np.clip(a + np.random.default_rng(4).normal(0, 0.2, a.shape), 0, 1)
    smap = M.ssim_map(a, noisy)
    assert smap.shape == a.shape
    assert M.masked_ssim(a, noisy, np.ones_like(a, bool)) < 0.9


def test_percentile_window_and_normalise():
    x = np.arange(1001, dtype=float)  # 0..1000
    lo, hi = M.percentile_window(x)
    assert lo == pytest.approx(5.0) and hi == pytest.approx(995.0)
    n = M.percentile_normalise(x, lo, hi)
    assert n.min() == 0.0 and n.max() == 1.0
    assert n[500] == pytest.approx((500 - 5) / 990)
    # strictly positive: negative lower percentile is raised to 0
    assert M.percentile_window(x - 500)[0] == 0.0


def test_inpainting_metrics_normalise_with_voided_input_percentiles():
    rng = np.random.default_rng(5)
    ref = rng.random((4, 20, 20)) * 200.0  # input in raw intensity units
    mask = np.zeros_like(ref, bool)
    mask[:, 5:10, 5:10] = True
    truth = ref.copy()
    perfect = M.inpainting_metrics(truth, truth, ref, mask)
    assert perfect["psnr"] == math.inf and perfect["mse"] == 0.0
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    # A constant offset of 10% of the window inside the mask: mse 0.01 -> 20 dB,
    # as long as no value is clipped (choose a target well inside the window).
    lo, hi = M.percentile_window(np.where(mask, 0.0, ref))
    target = np.where(mask, lo + 0.3 * (hi - lo), 0.0)
    pred = np.where(mask, lo + 0.4 * (hi - lo), 0.0)
    out = M.inpainting_metrics(pred, target, ref, mask)
    assert out["mse"] == pytest.approx(0.01)
    assert out["psnr"] == pytest.approx(20.0)


def test_dice_formula():
    p = np.array([1, 1, 0, 0], bool)
    t = np.array([1, 0, 1, 0], bool)
    assert M.dice_score(p, t) == pytest.approx(0.5)
    assert M.dice_score(np.zeros(3), np.zeros(3)) == 1.0
    assert M.dice_at_threshold(np.array([0.9, 0.8, 0.1, 0.0]), t, 0.5) == pytest.approx(0.5)


def test_perfect_detector_auprc_and_dice():
    rng = np.random.default_rng(6)
    target = rng.random((2, 16, 16)) > 0.8
    scores = target * 1.0 + rng.random(target.shape) * 0.5  # positives always higher
    assert M.pixel_auprc(scores, target) == pytest.approx(1.0)
    dice, thr = M.best_dice(scores, target)
    assert dice == pytest.approx(1.0)
    assert M.dice_at_threshold(scores, target, thr) == pytest.approx(1.0)


def test_best_dice_matches_brute_force_and_respects_valid_mask():
    rng = np.random.default_rng(7)
    target = rng.random((3, 10, 10)) > 0.7
    scores = np.round(target * 0.3 + rng.random(target.shape), 2)  # ties on purpose
    valid = rng.random(target.shape) > 0.2
    dice, thr = M.best_dice(scores, target, valid)
    brute = max(M.dice_at_threshold(scores, target, t, valid) for t in np.unique(scores) - 1e-9)
    assert dice == pytest.approx(brute)
    assert M.dice_at_threshold(scores, target, thr, valid) == pytest.approx(dice)
    assert all(math.isnan(v) for v in M.best_dice(scores, np.zeros_like(target)))


def test_random_detector_auprc_near_prevalence_and_slice_auroc():
    rng = np.random.default_rng(8)
    target = rng.random(20000) < 0.1
    ap = M.pixel_auprc(rng.random(20000), target)
    assert ap == pytest.approx(0.1, abs=0.02)
    assert M.slice_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.slice_auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert math.isnan(M.slice_auroc([0.1, 0.2], [1, 1]))


def test_slice_scores_quantile_inside_valid():
    anomaly = np.zeros((2, 10, 10))
    anomaly[1, 0, 0] = 5.0  # outside valid: ignored
    anomaly[1, 5, 5] = 1.0
    valid = np.zeros_like(anomaly, bool)
    valid[:, 2:8, 2:8] = True
    s = M.slice_scores(anomaly, valid, quantile=1.0)
    assert s.tolist() == [0.0, 1.0]
