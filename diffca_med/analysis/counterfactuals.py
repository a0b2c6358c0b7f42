"""Pseudo-healthy counterfactual volumes, anomaly maps and their files.

For each subject, every stored slice (the store keeps all axial slices inside the
brain's bounding box) is passed through ``model.pseudo_healthy`` in batches; the stack
is put back into the subject's original NIfTI grid with ``SliceStore.to_volume`` and
written next to an anomaly map and mask.

Output folder (one per run, ``OUT``)::

    OUT/run.json                         options, model, data, store
    OUT/summary.csv                      one row per subject (the cohort table)
    OUT/store/                           the prepared store, when DATA was a raw folder
    OUT/<subject>/
        <input stem>_pseudohealthy.nii.gz   one per input image file (3-D, float32)
        <input stem>_<modality>_pseudohealthy.nii.gz   for 4-D (MSD) inputs: one 3-D
                                            file per channel used
        <subject>_anomaly.nii.gz          float32 anomaly map (normalised units)
        <subject>_anomaly_mask.nii.gz     uint8 mask, 1 = anomalous
        previews/slice_<k>.png            most affected slices: rows = modalities,
                                          columns input | pseudo-healthy | anomaly overlay
                                          (red: anomaly mask contour, green: tumour label)
        summary.json                      volumes, fidelity, flags, files (see below)
        slices/ (with ``write_slices``)   <k>.png per slice, pseudo_healthy.npy
                                          ``(D, C, H, W)`` float32 and slices.csv

Naming: the ``_pseudohealthy`` suffix keeps each output beside, not over, its input's
name, so both can be loaded together in 3D Slicer / ITK-SNAP and told apart. Every
NIfTI copies its input's header (sform and qform with their codes, voxel sizes), so it
overlays the original exactly; ``cal_min``/``cal_max`` and scaling are reset.

Intensities: the model works at the store's resolution and normalisation. Three ways
back to the original grid and intensity scale (``compose``):

* ``residual``: ``original + (hi − lo) · up(pseudo − input)`` inside the
  brain, where ``up`` is the store's slice → volume resampling and ``lo``/``hi`` the
  modality's normalisation percentiles: the original's full-resolution detail is kept
  and only the model's change is added.
* ``direct``: ``lo + (hi − lo) · up(pseudo)`` inside the brain (the generated image
  itself, at the store's resolution).
* ``masked`` (default): like ``residual``, but the change is applied only inside the anomaly
  mask dilated by ``dilation`` pixels, inside the brain *and* inside the model's salient support (the
  image cells of the tokens the split marks salient, ``DiffCAModel.salient_support``),
  with a soft 1-pixel edge: the original everywhere else, so only the detected anomaly
  is replaced. The support drops the generation error the anomaly map picks up far
  from any lesion. With the additive split nearly every pixel is supported.
  ``components`` N > 0 keeps only the N largest 3-D connected parts of the region
  (``largest_components``).

Outside the brain both keep the original voxels. The anomaly map is
``|input − pseudo|`` in normalised units, combined over modalities
(:func:`diffca_med.analysis.anomaly.anomaly_map`), resampled to the original grid;
the mask thresholds it with a threshold computed at store resolution inside the brain
and, with ``support`` (default), keeps only the model's salient support.
The map, its mask, the healthy-region fidelity and hence ``masked`` composition cover
only the *assessed* slices: those with as much brain as the model's training slices
(``trained_slices``). Slices near the top and bottom of the brain are never trained
on and the generation errs there (~15.5 dB against the true healthy twin on the CPU
preset): the map is 0 and the output the original there.

``summary.json`` keys: ``subject``, ``split``, ``model``, ``store``, ``modalities``,
``source_files`` (modality → path, ``seg``), ``outputs`` (kind → file name), ``slices``
(axial indices), ``assessed_slices`` (the axial indices with anomaly scores),
``most_affected`` (axial indices), ``threshold`` (method, value),
``voxel_volume_ml``, ``anomaly_volume_ml``, ``tumour_volume_ml`` (null without a label
map), ``dice_vs_label`` (store resolution; null without a label map), ``fidelity``
(``psnr`` dB, ``ssim``, ``pixels``: pseudo-healthy vs input inside the brain of the
assessed slices and outside the dilated anomaly mask, store resolution), ``flags`` (list of quality
flags), ``options``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from diffca_med.analysis.anomaly import (
    COMBINE_METHODS,
    THRESHOLD_METHODS,
    anomaly_map,
    dilate_mask,
    anomaly_mask,
    healthy_region_fidelity,
    largest_components,
    most_affected_slices,
)
from diffca_med.devices import resolve_device
from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path, atomic_write_text

NOISE_CHOICES = ("fresh", "inverted")
COMPOSE_CHOICES = ("residual", "direct", "masked")
SAMPLE_SEED_STRIDE = 100_003  # seed offset between averaged samples (prime: no clash with batch offsets)
#: Quality-flag thresholds (documented in the report).
POOR_PSNR_DB = 20.0
LARGE_ANOMALY_FRACTION = 0.2
MISSED_TUMOUR_FRACTION = 0.1


@dataclass
class GenerationOptions:
    """Sampling options of ``model.pseudo_healthy`` (see the model contract)."""

    noise: str = "fresh"
    inversion_depth: float = 1.0
    steps: int | None = None  # None -> the model's default (config.sample_steps)
    seed: int = 0
    batch_size: int = 32
    paired: bool = False  # pseudo_healthy only: input + G(Ẑ_C) − G(Ẑ) from the same noise
    samples: int = 1  # fresh noise: mean of this many generations (other seeds)

    def __post_init__(self) -> None:
        if self.noise not in NOISE_CHOICES:
            raise ConfigError(f"--noise: unknown value {self.noise!r} (use fresh or inverted)")
        if not 0.0 < self.inversion_depth <= 1.0:
            raise ConfigError(f"--inversion-depth: must be in (0, 1], got {self.inversion_depth}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps: must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if self.samples < 1:
            raise ConfigError(f"--samples: must be at least 1, got {self.samples}")
        if self.samples > 1 and self.noise != "fresh":
            raise ConfigError("--samples: averaging needs --noise fresh (DDIM inversion gives one deterministic output)")


@dataclass
class AnomalyOptions:
    """How the anomaly map is combined and thresholded, and how outputs are composed."""

    combine: str = "mean"
    threshold: str = "otsu"
    threshold_value: float | None = None
    dilation: int = 2  # pixels at store resolution, for the healthy-region fidelity
    compose: str = "masked"
    components: int = 0  # --compose masked: keep the N largest 3-D parts of the region (0: all)
    support: bool = True  # the anomaly mask only inside the model's salient support
    previews: int = 3

    def __post_init__(self) -> None:
        # Checked before any generation, so a typo fails at once, not after minutes.
        if self.combine not in COMBINE_METHODS:
            raise ConfigError(f"--combine: unknown method {self.combine!r} (use one of {', '.join(COMBINE_METHODS)})")
        if self.threshold not in THRESHOLD_METHODS:
            raise ConfigError(
                f"--threshold: unknown method {self.threshold!r} (use one of {', '.join(THRESHOLD_METHODS)})"
            )
        if self.threshold == "fixed" and self.threshold_value is None:
            raise ConfigError("--threshold fixed needs --threshold-value (normalised intensity units)")
        if self.threshold == "percentile" and self.threshold_value is not None and not 0 < self.threshold_value < 100:
            raise ConfigError(f"--threshold-value: percentile must be in (0, 100), got {self.threshold_value}")
        if self.previews < 0 or self.dilation < 0 or self.components < 0:
            raise ConfigError("--previews, --dilation and --components must not be negative")
        if self.compose not in COMPOSE_CHOICES:
            raise ConfigError(f"--compose: unknown value {self.compose!r} (use residual, direct or masked)")


# --------------------------------------------------------------------------- data
def is_store(path: str | Path) -> bool:
    """True when ``path`` is a prepared slice store folder."""
    return (Path(path) / "store.json").is_file()


def open_data(data: str | Path, work: str | Path, config, progress: bool = True):
    """A :class:`~diffca_med.data.store.SliceStore` for ``data``.

    ``data`` is either a prepared store (opened as is) or a raw BraTS/MSD/BIDS folder,
    prepared on the fly into ``work`` (reused when already prepared with the same
    options) at the size, modalities and intensity normalisation of the model's
    ``config`` (:class:`~diffca_med.models.ModelConfig`).
    """
    from diffca_med.data.store import SliceStore

    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: no such file or folder")
    if is_store(data):
        return SliceStore(data)
    if not data.is_dir():
        raise InputError(f"{data}: neither a slice store nor a data folder")
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    options = PrepareOptions(modalities=tuple(config.modalities), size=int(config.image_size),
                             percentiles=tuple(config.intensity_percentiles),
                             upper_value=float(config.intensity_upper_value))
    result = prepare(data, Path(work), options, progress=progress)
    return SliceStore(result.store)


def channel_indices(store, model_modalities: Sequence[str]) -> list[int]:
    """Indices of the model's modalities in the store's channel order."""
    missing = [m for m in model_modalities if m not in store.modalities]
    if missing:
        raise InputError(
            f"{store.path}: store has modalities {', '.join(store.modalities)} but the model needs "
            f"{', '.join(missing)}"
        )
    return [store.modalities.index(m) for m in model_modalities]


def check_store_fits(store, model) -> None:
    """InputError unless the store's slice size and normalisation are the model's."""
    size = int(model.config.image_size)
    if store.size != size:
        raise InputError(f"{store.path}: slices are {store.size}×{store.size} but the model expects {size}×{size}")
    from diffca_med.data.store import describe_normalisation, normalisation_key

    wanted = normalisation_key(model.config.intensity_percentiles, model.config.intensity_upper_value)
    if store.normalisation != wanted:
        raise InputError(
            f"{store.path}: intensities map brain percentiles {describe_normalisation(store.normalisation)} but the model was "
            f"trained on {describe_normalisation(wanted)}; give the raw data folder instead"
        )


def select_subjects(store, subjects: Sequence[str] | None = None, split: str | None = None) -> list[str]:
    """Subjects to process: the given ids (checked), else those of ``split`` (None = all)."""
    known = list(store.subjects_table["subject"].astype(str))
    if subjects:
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise InputError(f"{store.path}: unknown subject(s) {', '.join(unknown)}")
        chosen = list(subjects)
    else:
        chosen = known
    if split is not None:
        splits = dict(zip(known, store.subjects_table["split"].astype(str)))
        chosen = [s for s in chosen if splits[s] == split]
    if not chosen:
        raise InputError(f"{store.path}: no subject to process" + (f" in split {split!r}" if split else ""))
    return chosen


# --------------------------------------------------------------------- generation
def generate(model, images: np.ndarray, options: GenerationOptions, kind: str = "pseudo_healthy",
             on_batch=None) -> np.ndarray:
    """Run ``model.<kind>`` over ``images`` ``(N, C, H, W)`` in batches.

    Batch ``b`` uses seed ``options.seed + b``: the same seed and batch size give the
    same output. With ``options.samples`` = n > 1 the output is the mean of n
    generations, sample k seeded ``options.seed + b + k·SAMPLE_SEED_STRIDE``: the mean
    of independent draws has less of the sampling noise each one carries (on the CPU
    preset 4 samples gained +0.2 dB inside and +0.7 dB outside the tumour against the
    true healthy twin). Returns float32 ``(N, C, H, W)`` in [0, 1].
    """
    import torch

    fn = getattr(model, kind)
    out = np.empty(images.shape, np.float32)
    bs = options.batch_size
    kwargs = {"noise": options.noise, "inversion_depth": options.inversion_depth, "seed": 0}
    if options.steps is not None:
        kwargs["steps"] = options.steps
    if kind == "pseudo_healthy" and options.paired:
        kwargs["paired"] = True
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else "cpu"
    with torch.no_grad():
        for b, start in enumerate(range(0, len(images), bs)):
            x = torch.as_tensor(np.ascontiguousarray(images[start : start + bs]), dtype=torch.float32, device=device)
            total = None
            for k in range(options.samples):
                kwargs["seed"] = options.seed + b + k * SAMPLE_SEED_STRIDE
                y = fn(x, **kwargs).detach().double()
                total = y if total is None else total + y
            out[start : start + len(x)] = (total / options.samples).float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(x))
    return np.clip(out, 0.0, 1.0)


@dataclass
class SubjectStack:
    """One subject's slices at store resolution, in axial order.

    Attributes:
        rows: store rows ``(D,)``; slices: axial indices ``(D,)``.
        inputs, pseudo: float32 ``(D, C, H, W)`` in normalised units (model channels).
        brain: bool ``(D, H, W)``; seg: uint8 ``(D, H, W)`` (all zero without a label map).
        support: bool ``(D, H, W)``, the model's salient support (None: everywhere).
    """

    subject: str
    rows: np.ndarray
    slices: np.ndarray
    inputs: np.ndarray
    pseudo: np.ndarray
    brain: np.ndarray
    seg: np.ndarray
    modalities: list[str] = field(default_factory=list)
    support: np.ndarray | None = None


def salient_support(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.salient_support`` of ``images`` ``(N, C, H, W)`` in batches → bool ``(N, H, W)``."""
    import torch

    with torch.no_grad():
        parts = [model.salient_support(torch.as_tensor(np.ascontiguousarray(images[i : i + batch_size])))
                 for i in range(0, len(images), batch_size)]
    return torch.cat(parts).cpu().numpy()


def trained_slices(store, rows: np.ndarray) -> np.ndarray:
    """bool ``(D,)``: the store rows with enough brain for the model to have seen slices
    like them in training (``min_brain_fraction`` of the store).

    Slices near the top and bottom of the brain are never trained on; there the
    generated image errs most (on the CPU preset: ~15.5 dB against the true healthy
    twin, a third of all the error outside the tumour), so the anomaly map, the
    healthy-region fidelity and ``--compose masked`` leave them out (the *assessed*
    slices of ``write_subject`` are these).
    """
    minimum = float(store.meta.get("thresholds", {}).get("min_brain_fraction", 0.0))
    return store.index["brain_fraction"].to_numpy()[rows] >= minimum


def subject_stack(store, subject: str, channels: list[int], model, options: GenerationOptions, on_batch=None) -> SubjectStack:
    """Generate the pseudo-healthy stack of one subject (all its stored slices)."""
    rows = store.subject_rows(subject)
    inputs = np.asarray(store.images[rows][:, channels], np.float32)
    brain = np.asarray(store.brain[rows]) > 0
    pseudo = generate(model, inputs, options, on_batch=on_batch)
    support = salient_support(model, inputs, options.batch_size)
    # Outside the brain there is nothing to generate: keep the (zero) input there.
    pseudo = np.where(brain[:, None], pseudo, inputs)
    return SubjectStack(
        subject=subject,
        rows=rows,
        slices=store.index["slice"].to_numpy()[rows],
        inputs=inputs,
        pseudo=pseudo.astype(np.float32),
        brain=brain,
        seg=np.asarray(store.seg[rows]),
        modalities=[store.modalities[c] for c in channels],
        support=support,
    )


# -------------------------------------------------------------------------- NIfTI
def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def write_like(data: np.ndarray, reference: nib.Nifti1Image, path: str | Path, dtype=np.float32) -> Path:
    """Save ``data`` (3-D) with ``reference``'s affine and header (sform, qform kept).

    The header is copied (a 4-D reference becomes 3-D), its data type set to ``dtype``
    and its scaling and display window reset.
    """
    data = np.asarray(data).astype(dtype, copy=False)
    hdr = reference.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    img = nib.Nifti1Image(data, reference.affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    sform, scode = reference.header.get_sform(coded=True)
    qform, qcode = reference.header.get_qform(coded=True)
    img.set_sform(sform if sform is not None else reference.affine, int(scode))
    img.set_qform(qform, int(qcode))
    nib.save(img, str(path))
    return Path(path)


def _load(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))
    except Exception as err:
        raise InputError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from None


def _channel(img: nib.Nifti1Image, channel: int | None, path: Path) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(f"{path}: unreadable NIfTI data ({type(err).__name__})") from None
    data = data[..., channel] if channel is not None else data
    return np.asarray(data, np.float32)


# ------------------------------------------------------------------------ previews
def _display(ax, img, title=None):
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def save_preview(path: Path, inputs: np.ndarray, pseudo: np.ndarray, amap: np.ndarray, mask: np.ndarray,
                 seg: np.ndarray | None, modalities: Sequence[str], title: str, vmax: float) -> None:
    """PNG of one slice: rows = modalities; input | pseudo-healthy | anomaly overlay.

    Args:
        inputs, pseudo: ``(C, H, W)``; amap, mask, seg: ``(H, W)``; vmax: colour scale
        top of the anomaly overlay (normalised units).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(modalities)
    fig, axes = plt.subplots(c, 3, figsize=(6.6, 2.3 * c), dpi=100, squeeze=False)
    for i, mod in enumerate(modalities):
        _display(axes[i, 0], inputs[i], "input" if i == 0 else None)
        _display(axes[i, 1], pseudo[i], "pseudo-healthy" if i == 0 else None)
        _display(axes[i, 2], inputs[i], "anomaly" if i == 0 else None)
        axes[i, 2].imshow(np.ma.masked_less_equal(amap, 0.0), cmap="hot", alpha=0.6, vmin=0.0,
                          vmax=max(vmax, 1e-6), interpolation="nearest")
        if mask.any():
            axes[i, 2].contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        if seg is not None and (seg > 0).any():
            axes[i, 2].contour((seg > 0).astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        axes[i, 0].set_ylabel(mod, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def save_strip(path: Path, images: Sequence[np.ndarray], titles: Sequence[str], modalities: Sequence[str], title: str = "") -> None:
    """PNG strip: columns = ``images`` (each ``(C, H, W)`` in [0, 1]), rows = modalities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, n = len(modalities), len(images)
    fig, axes = plt.subplots(c, n, figsize=(1.9 * n + 0.4, 2.0 * c + 0.3), dpi=100, squeeze=False)
    for j, img in enumerate(images):
        for i in range(c):
            _display(axes[i, j], img[i], titles[j] if i == 0 else None)
            if j == 0:
                axes[i, j].set_ylabel(modalities[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# -------------------------------------------------------------------- per subject
def _jsonable(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_subject(stack: SubjectStack, store, out_dir: Path, options: AnomalyOptions, model_name: str,
                  extra: dict | None = None, write_slices: bool = False) -> dict:
    """Write one subject's NIfTI files, previews and ``summary.json`` into ``out_dir``.

    ``out_dir`` must be an empty (temporary) folder; the caller renames it into place.
    Returns the summary dictionary.
    """
    subject = stack.subject
    sources = store.source_files(subject)
    geom = store.geometry[subject]
    lohi = np.array([geom["intensity"][m] for m in stack.modalities], np.float32)  # (C, 2)
    # the model is judged only where it was trained: brain of slices like its training slices
    assessed = stack.brain & trained_slices(store, stack.rows)[:, None, None]  # (D, H, W)
    amap = anomaly_map(stack.inputs, stack.pseudo, assessed, options.combine)  # (D, H, W)
    mask, thr = anomaly_mask(amap, assessed, options.threshold, options.threshold_value)
    # the map differs from the input everywhere a generation errs; where the split gated
    # no lesion token that is reconstruction error, not anomaly (on the demo's tumour
    # subjects the mask's Dice with the label: 0.283 -> 0.441 test, 0.310 -> 0.418 val)
    support = stack.support if options.support and stack.support is not None else None
    if support is not None:
        mask = mask * support.astype(np.uint8)

    # ---- back to the original grid
    brain_vol = store.to_volume(subject, stack.brain.astype(np.uint8), order=0) > 0
    if options.compose in ("residual", "masked"):
        delta = stack.pseudo - stack.inputs  # (D, C, H, W)
        if options.compose == "masked":
            # only inside the dilated anomaly mask, the brain and the salient support, with
            # a soft (1-pixel Gaussian) edge; the brain limit keeps the edge from spreading
            # the generated brain border, where generation errs most (+0.65 dB outside the
            # tumour on the CPU preset's test subjects)
            region = dilate_mask(mask, options.dilation) & stack.brain  # in-plane: assessed slices only
            if stack.support is not None:
                region = region & stack.support
            region = largest_components(region, options.components)
            weight = ndimage.gaussian_filter(region.astype(np.float32), (0, 1, 1))
            delta = delta * weight[:, None]
        change = store.to_volume(subject, delta)  # (X, Y, Z, C)
    else:
        generated = store.to_volume(subject, stack.pseudo)
    outputs: dict[str, str] = {}
    reference: nib.Nifti1Image | None = None
    for c, mod in enumerate(stack.modalities):
        ref_path = Path(sources[mod].path)
        channel = sources[mod].channel
        img = _load(ref_path)
        original = _channel(img, channel, ref_path)
        if reference is None:
            reference = img
        if original.shape != brain_vol.shape:
            raise InputError(f"{ref_path}: shape {original.shape} differs from the stored geometry {brain_vol.shape}")
        lo, hi = lohi[c]
        if options.compose in ("residual", "masked"):
            vol = original + (hi - lo) * change[..., c]
        else:
            vol = lo + (hi - lo) * generated[..., c]
        vol = np.where(brain_vol, vol, original).astype(np.float32)
        suffix = f"_{mod}_pseudohealthy" if channel is not None else "_pseudohealthy"
        name = f"{nifti_stem(ref_path)}{suffix}.nii.gz"
        write_like(vol, img, out_dir / name)
        outputs[mod] = name
    assert reference is not None
    amap_vol = np.clip(store.to_volume(subject, amap), 0.0, None) * brain_vol
    mask_vol = (amap_vol > thr) & brain_vol
    if support is not None:
        mask_vol &= store.to_volume(subject, support.astype(np.uint8), order=0) > 0
    mask_vol = mask_vol.astype(np.uint8)
    outputs["anomaly"] = f"{subject}_anomaly.nii.gz"
    outputs["anomaly_mask"] = f"{subject}_anomaly_mask.nii.gz"
    write_like(amap_vol, reference, out_dir / outputs["anomaly"], np.float32)
    write_like(mask_vol, reference, out_dir / outputs["anomaly_mask"], np.uint8)

    # ---- volumes, fidelity, flags
    voxel_ml = float(np.prod(reference.header.get_zooms()[:3])) / 1000.0
    tumour_ml = None
    seg_path = sources.get("seg")
    if seg_path is not None and Path(seg_path).is_file():
        seg_img = _load(Path(seg_path))
        seg_voxels = int((np.asanyarray(seg_img.dataobj) > 0).sum())
        tumour_ml = seg_voxels * float(np.prod(seg_img.header.get_zooms()[:3])) / 1000.0
    fidelity = healthy_region_fidelity(stack.inputs, stack.pseudo, assessed, mask, options.dilation)
    label = stack.seg > 0
    dice = None
    if seg_path is not None:
        denom = int(label.sum() + mask.sum())
        dice = float(2.0 * (label & (mask > 0)).sum() / denom) if denom else 1.0
    flags = []
    if np.isfinite(fidelity["psnr"]) and fidelity["psnr"] < POOR_PSNR_DB:
        flags.append(f"poor reconstruction: healthy-region PSNR {fidelity['psnr']:.1f} dB < {POOR_PSNR_DB:.0f} dB")
    brain_pixels = int(stack.brain.sum())
    if brain_pixels and mask.sum() > LARGE_ANOMALY_FRACTION * brain_pixels:
        flags.append(f"large anomaly: {100.0 * mask.sum() / brain_pixels:.0f}% of the brain")
    if label.any() and (label & (mask > 0)).sum() < MISSED_TUMOUR_FRACTION * label.sum():
        flags.append("tumour missed: under 10% of the labelled tumour is in the anomaly mask")
    if not label.any() and seg_path is not None and mask.sum() > 0.02 * max(brain_pixels, 1):
        flags.append("anomaly without a labelled tumour")

    # ---- previews
    top = most_affected_slices(amap, mask, options.previews)
    (out_dir / "previews").mkdir()
    vmax = float(np.percentile(amap[stack.brain], 99.5)) if stack.brain.any() else 1.0
    previews = []
    for pos in top:
        name = f"previews/slice_{int(stack.slices[pos]):03d}.png"
        save_preview(out_dir / name, stack.inputs[pos], stack.pseudo[pos], amap[pos], mask[pos],
                     stack.seg[pos] if seg_path is not None else None, stack.modalities,
                     f"{subject} · axial slice {int(stack.slices[pos])}", vmax)
        previews.append(name)
    if write_slices:
        (out_dir / "slices").mkdir()
        np.save(out_dir / "slices" / "pseudo_healthy.npy", stack.pseudo.astype(np.float32))
        pd.DataFrame({"position": np.arange(len(stack.rows)), "store_row": stack.rows, "slice": stack.slices}).to_csv(
            out_dir / "slices" / "slices.csv", index=False)
        for pos in range(len(stack.rows)):
            save_strip_plain(out_dir / "slices" / f"{int(stack.slices[pos]):03d}.png", stack.pseudo[pos])

    split = store.subjects_table.set_index("subject").loc[subject, "split"] if "split" in store.subjects_table else ""
    summary = {
        "subject": subject,
        "split": str(split),
        "model": model_name,
        "store": str(store.path),
        "modalities": list(stack.modalities),
        "source_files": {m: str(sources[m].path) for m in stack.modalities} | {"seg": str(seg_path) if seg_path else None},
        "outputs": outputs,
        "previews": previews,
        "slices": [int(s) for s in stack.slices],
        "assessed_slices": [int(s) for s in stack.slices[assessed.any(axis=(1, 2))]],
        "most_affected": [int(stack.slices[p]) for p in top],
        "threshold": {"method": options.threshold, "value": _jsonable(float(thr)), "combine": options.combine},
        "voxel_volume_ml": voxel_ml,
        "anomaly_volume_ml": float(mask_vol.sum()) * voxel_ml,
        "tumour_volume_ml": tumour_ml,
        "dice_vs_label": dice,
        "fidelity": {k: _jsonable(float(v)) if k != "pixels" else int(v) for k, v in fidelity.items()},
        "flags": flags,
        "options": extra or {},
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def save_strip_plain(path: Path, image: np.ndarray) -> None:
    """Grey PNG of one slice ``(C, H, W)`` with the modalities side by side (no axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = np.concatenate([np.clip(ch, 0.0, 1.0) for ch in image], axis=1)
    plt.imsave(path, row, cmap="gray", vmin=0.0, vmax=1.0, format="png")


# -------------------------------------------------------------------------- run
SUMMARY_COLUMNS = ["subject", "split", "anomaly_volume_ml", "tumour_volume_ml", "dice_vs_label",
                   "healthy_psnr_db", "healthy_ssim", "flags", "folder"]


def summary_row(summary: dict) -> dict:
    """The cohort-table row of a subject summary."""
    return {
        "subject": summary["subject"],
        "split": summary.get("split", ""),
        "anomaly_volume_ml": summary["anomaly_volume_ml"],
        "tumour_volume_ml": summary["tumour_volume_ml"],
        "dice_vs_label": summary["dice_vs_label"],
        "healthy_psnr_db": summary["fidelity"]["psnr"],
        "healthy_ssim": summary["fidelity"]["ssim"],
        "flags": "; ".join(summary["flags"]),
        "folder": summary["subject"],
    }


def open_model_and_data(model_path: str | Path, data: str | Path, work: str | Path, model=None,
                        progress: bool = True, device: str = "auto"):
    """Load the model (unless given) and the store it reads, checked against each other.

    Args:
        model_path: a trained model folder; ignored when ``model`` is given.
        data: a prepared store or a raw BraTS/MSD/BIDS folder (prepared into ``work``).
        work: where a raw folder's store is written.
        device: where the model runs (:func:`diffca_med.devices.resolve_device`).

    Returns:
        ``(model in eval mode, SliceStore, channel indices of the model's modalities)``.
    """
    if model is None:
        from diffca_med.models import DiffCAModel

        if not Path(model_path).is_dir():
            raise InputError(f"{model_path}: no such model folder")
        model = DiffCAModel.from_pretrained(model_path)
    model.eval()
    model.to(resolve_device(device))
    store = open_data(data, work, model.config, progress)
    check_store_fits(store, model)
    return model, store, channel_indices(store, model.config.modalities)


def run_pseudo_healthy(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    subjects: Sequence[str] | None = None,
    split: str | None = None,
    generation: GenerationOptions | None = None,
    anomaly: AnomalyOptions | None = None,
    write_slices: bool = False,
    progress: bool = True,
    model=None,
    device: str = "auto",
) -> list[dict]:
    """Generate and write pseudo-healthy volumes for the chosen subjects of ``data``.

    Args:
        model_path: a trained model folder (``DiffCAModel.from_pretrained``).
        data: a prepared store or a raw BraTS/MSD/BIDS folder (prepared into OUT/store).
        subjects: subject ids (default: all; ``split`` narrows to one split).
        model: an already loaded model (then ``model_path`` only names it in summaries).
        device: where the model runs: ``auto`` (a CUDA GPU when visible), ``cpu``, ``cuda[:N]``.

    A subject folder whose ``summary.json`` was written with the same options is
    kept (re-running continues where it stopped). Returns the subject summaries.
    """
    from tqdm.auto import tqdm

    generation = generation or GenerationOptions()
    anomaly = anomaly or AnomalyOptions()
    out = Path(out)
    model, store, channels = open_model_and_data(model_path, data, out / "store", model, progress, device)
    chosen = select_subjects(store, subjects, split)
    options = {"generation": asdict(generation), "anomaly": asdict(anomaly), "write_slices": write_slices,
               "model": str(model_path), "store": str(store.path)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", json.dumps({"data": str(data), **options}, indent=2))

    summaries: list[dict] = []
    todo = []
    for s in chosen:
        done = out / s / "summary.json"
        if done.is_file():
            old = json.loads(done.read_text(encoding="utf-8"))
            if old.get("options") == options:
                summaries.append(old)
                continue
        todo.append(s)
    n_slices = sum(len(store.subject_rows(s)) for s in todo)
    bar = tqdm(total=n_slices, unit="slice", desc="pseudo-healthy", disable=not progress or not todo)
    t0 = time.perf_counter()
    for s in todo:
        bar.set_postfix_str(s)
        stack = subject_stack(store, s, channels, model, generation, on_batch=bar.update)
        with atomic_path(out / s) as tmp:
            tmp.mkdir(parents=True)
            summaries.append(write_subject(stack, store, tmp, anomaly, str(model_path), options, write_slices))
    bar.close()
    order = {s: i for i, s in enumerate(chosen)}
    summaries.sort(key=lambda d: order[d["subject"]])
    table = pd.DataFrame([summary_row(d) for d in summaries], columns=SUMMARY_COLUMNS)
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    if todo and progress:
        rate = n_slices / max(time.perf_counter() - t0, 1e-9)
        tqdm.write(f"{len(todo)} subject(s), {n_slices} slices, {rate:.1f} slices/s")
    return summaries
