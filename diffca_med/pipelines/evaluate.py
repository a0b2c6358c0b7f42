"""``evaluate``: score one method (ours or a baseline) on a slice store.

For the held-out subjects of a store (``split``, default ``test``):

* **counterfactuals** (methods that make pseudo-healthy images):
  healthy-region fidelity — PSNR/SSIM of pseudo-healthy vs input inside the brain and
  outside the dilated tumour (:func:`diffca_med.analysis.anomaly.healthy_region_fidelity`);
  tumour-region healthiness vs the true healthy twin, when ``truth`` is given —
  BraTS 2023 inpainting-style PSNR/SSIM/MSE inside the tumour
  (:func:`diffca_med.analysis.metrics.inpainting_metrics`), also for the unchanged
  input as a reference;
* **anomaly detection** (``|input − pseudo-healthy|``,
  :func:`diffca_med.analysis.anomaly.anomaly_map`) against the tumour mask:
  pixel-level AUPRC and best Dice inside the brain, Dice at the threshold that is best
  on the ``threshold_split`` (default ``val``) subjects, slice-level AUROC; for a
  method that localises the anomaly itself (``Method.anomaly_support``: Diff-CA's
  salient support) the same figures of the map kept only there
  (``detection_in_support``), the anomaly mask ``pseudo-healthy`` writes by default;
* **disentanglement** (methods that make embeddings): subject-grouped 5-fold probes
  of the set label, phantom subtype and tumour hemisphere (balanced accuracy) and of
  slice position and brain area (R²), from the salient embedding and, where the
  method has one, the pooled common part;
* **subgroups**: k-means (k = number of subtypes) of the per-subject mean salient
  embedding of tumour slices, ARI/NMI against the phantom subtype, silhouette.

All metrics are computed in the store's space (its resolution and per-subject
percentile normalisation, intensities in [0, 1]); the twin goes through the input's
recorded geometry and the *input's* normalisation percentiles (:func:`twin_slices`).
Outputs (:func:`write_outputs`): ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from diffca_med.analysis import metrics as M
from diffca_med.analysis.anomaly import anomaly_map, healthy_region_fidelity
from diffca_med.analysis.probes import Target, cluster_agreement, probe_table
from diffca_med.baselines.base import BASELINE_FILE, Method, load_baseline
from diffca_med.data.store import SliceStore, ras_to_display
from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path

METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"


# ------------------------------------------------------------------------- options
@dataclass
class EvaluateOptions:
    """Options of :func:`evaluate_method` (see ``diffca-med evaluate --help``)."""

    split: str = "test"
    threshold_split: str = "val"
    dilation: int = 3
    """Pixels (store resolution) by which the tumour mask grows before the healthy
    region is taken."""
    slice_stride: int = 1
    """Evaluate every n-th slice of each subject (sampling is the costly part)."""
    batch_size: int = 32
    seed: int = 0
    folds: int = 5

    def check(self) -> None:
        for name in ("split", "threshold_split"):
            if getattr(self, name) not in ("train", "val", "test"):
                raise ConfigError(f"--{name.replace('_', '-')}: must be train, val or test")
        if self.dilation < 0:
            raise ConfigError("--dilation: must be >= 0 pixels")
        if self.slice_stride < 1:
            raise ConfigError("--slice-stride: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size: must be >= 1")
        if self.folds < 2:
            raise ConfigError("--folds: must be >= 2")


# ------------------------------------------------------------- ground-truth twins
def twin_path(store: SliceStore, source: Path, truth_root: Path) -> Path:
    """The twin of input file ``source``: ``truth_root / (source relative to the data root)``."""
    root = Path(store.meta["source_root"])
    try:
        rel = Path(source).resolve().relative_to(root.resolve())
    except ValueError:
        raise InputError(f"{source}: not inside the store's data root {root}") from None
    return Path(truth_root) / rel


def twin_slices(store: SliceStore, subject: str, truth_root: str | Path) -> np.ndarray:
    """The subject's ground-truth healthy twin as store slices ``(D, C, H, W)`` in [0, 1].

    The twin files go through the *input's* recorded transform (``geometry.json``) with
    ``prepare``'s own resizing and normalisation transforms: reorientation to RAS (the
    nibabel orientation MONAI's ``Orientationd`` applies), the input's brain box,
    :class:`~diffca_med.data.transforms.SquareResized` (image and brain fraction) and
    :class:`~diffca_med.data.transforms.NormaliseInBraind` with the *input's*
    per-modality percentile window — what the BraTS 2023 inpainting evaluation does —
    then the input's stored brain mask. Row ``i`` lines up with the subject's ``i``-th
    stored slice (:meth:`SliceStore.subject_rows`).
    """
    import nibabel as nib

    from diffca_med.data.transforms import NormaliseInBraind, SquareResized
    from diffca_med.data.validate import decode_image, display_path, load_header

    truth_root = Path(truth_root)
    geom = store.geometry[subject]
    files = store.source_files(subject)
    decoded: dict[Path, np.ndarray] = {}
    boxes = []
    (x0, y0, z0), (x1, y1, z1) = geom["crop_start"], geom["crop_end"]
    for m in store.modalities:
        ref = files[m]
        p = twin_path(store, ref.path, truth_root)
        if not p.is_file():
            raise InputError(f"{p}: ground-truth twin missing for {subject}")
        if p not in decoded:
            img = load_header(p, truth_root)
            if not np.allclose(np.asarray(img.affine), geom["affine"], atol=1e-3) or \
                    list(img.shape[:3]) != list(geom["shape"]):
                raise InputError(f"{display_path(p, truth_root)}: twin grid differs from the input's (shape or affine)")
            decoded[p] = decode_image(img, display_path(p, truth_root))
        arr = decoded[p]
        vol = arr[..., ref.channel] if ref.channel is not None else (arr[..., 0] if arr.ndim == 4 else arr)
        ras = nib.orientations.apply_orientation(vol, np.asarray(geom["ornt"]))
        boxes.append(np.array(ras[x0:x1, y0:y1, z0:z1], dtype=np.float32))
    box = np.stack(boxes)  # (C, x, y, z) in RAS order, the input's brain box
    brain = (box != 0).any(axis=0, keepdims=True).astype(np.float32)
    data = {
        "image": torch.from_numpy(box),
        "brain": torch.from_numpy(brain),
        "intensity": [list(geom["intensity"][m]) for m in store.modalities],
    }
    data = SquareResized(keys=["image", "brain"], size=int(geom["size"]), modes=["image", "fraction"])(data)
    data = NormaliseInBraind(keys="image", fraction_key="brain")(data)
    arr = np.asarray(data["image"], dtype=np.float32)  # (C, size, size, D)
    slices = ras_to_display(np.moveaxis(arr, -1, 0))  # (D, C, H, W)
    mask = np.asarray(store.brain[store.subject_rows(subject)]) > 0
    if mask.shape[0] != slices.shape[0]:
        raise InputError(f"{store.path}: geometry of {subject} does not match its stored slices")
    return np.ascontiguousarray(slices * mask[:, None])


def twin_rows(store: SliceStore, subject: str, rows: np.ndarray, truth_root: str | Path) -> np.ndarray:
    """:func:`twin_slices` of ``subject`` at the store ``rows`` (all of that subject):
    ``(len(rows), C, H, W)``, row ``i`` the twin of stored slice ``rows[i]``."""
    position = {int(r): i for i, r in enumerate(store.subject_rows(subject))}
    return twin_slices(store, subject, truth_root)[[position[int(r)] for r in rows]]


# ----------------------------------------------------------------- method loading
@dataclass
class SamplingOptions:
    """How generative methods sample: starting noise, inversion depth, DDIM steps."""

    noise: str | None = None
    """``inverted`` or ``fresh``; None = the method's default (Diff-CA: inverted)."""
    inversion_depth: float | None = None
    """Fraction of the trajectory inverted; None = the method's default (Diff-CA 1.0,
    classifier-free guidance 0.5)."""
    steps: int | None = None
    """DDIM steps; None = the model's configured count."""


def load_method(path: str | Path, sampling: SamplingOptions | None = None) -> Method:
    """A Diff-CA model folder or a saved baseline (``baseline.json``) as a :class:`Method`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such model folder")
    if (path / BASELINE_FILE).is_file():
        method = load_baseline(path)
    else:
        from diffca_med.baselines.ours import DiffCAMethod

        method = DiffCAMethod.load(path)
    if sampling is not None and hasattr(method, "set_sampling"):
        method.set_sampling(sampling)
    return method


# ----------------------------------------------------------------------- helpers
def _select_rows(store: SliceStore, split: str, stride: int) -> np.ndarray:
    """Rows of ``split`` (healthy + tumour slices), every ``stride``-th per subject, in
    subject then slice order."""
    rows = store.rows(split=split)
    idx = store.index.iloc[rows]
    order = np.lexsort((idx["slice"].to_numpy(), idx["subject"].to_numpy()))
    rows = rows[order]
    if stride > 1:
        pos = store.index.iloc[rows].groupby("subject").cumcount().to_numpy()
        rows = rows[pos % stride == 0]
    return rows


def _channels(store: SliceStore, method: Method) -> list[int]:
    missing = [m for m in method.modalities if m not in store.modalities]
    if missing:
        raise InputError(
            f"{store.path}: store lacks modality {', '.join(missing)} that the method needs "
            f"(store has {', '.join(store.modalities)})"
        )
    return [store.modalities.index(m) for m in method.modalities]


def _resize(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    if x.shape[-1] == size:
        return np.asarray(x, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    kw = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(t, size=(size, size), mode=mode, **kw).numpy()


def _store_images(store: SliceStore, rows: np.ndarray, channels: list[int]) -> np.ndarray:
    return np.asarray(store.images[rows][:, channels], dtype=np.float32)


def _run_counterfactuals(method: Method, images: np.ndarray, opts: EvaluateOptions, desc: str) -> np.ndarray:
    """Pseudo-healthy images at the store's size, ``(N, C, H, W)``."""
    size = images.shape[-1]
    x = _resize(images, method.image_size, "area" if method.image_size < size else "bilinear")
    bar = tqdm(total=len(x), desc=desc, unit="slice", leave=False)
    try:
        ph = method.pseudo_healthy(x, seed=opts.seed, batch_size=opts.batch_size, progress=bar.update)
    finally:
        bar.close()
    return np.clip(_resize(ph, size, "bilinear"), 0.0, 1.0)


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def read_participants(store: SliceStore, participants: str | Path | None) -> pd.DataFrame | None:
    """The clinical table (``participants.tsv``) indexed by subject id, or None.

    Default: ``participants.tsv`` in the store's data root, when it exists.
    """
    from diffca_med.analysis.subgroups import read_clinical

    if participants is None:
        default = Path(store.meta["source_root"]) / "participants.tsv"
        if not default.is_file():
            return None
        participants = default
    return read_clinical(participants)


# -------------------------------------------------------------------- evaluation
def _counterfactual_metrics(
    method: Method, store: SliceStore, rows: np.ndarray, val_rows: np.ndarray,
    truth: Path | None, opts: EvaluateOptions, timing: dict,
) -> dict[str, Any]:
    ch = _channels(store, method)
    images = _store_images(store, rows, ch)
    t0 = time.perf_counter()
    ph = _run_counterfactuals(method, images, opts, f"{method.name}: pseudo-healthy ({opts.split})")
    seconds = time.perf_counter() - t0
    timing["pseudo_healthy_seconds"] = seconds
    timing["seconds_per_slice"] = seconds / max(1, len(rows))
    brain = np.asarray(store.brain[rows]) > 0
    tumour = np.asarray(store.seg[rows]) > 0
    amap = anomaly_map(images, ph, brain)
    subjects = store.index["subject"].to_numpy()[rows]
    labels = store.index["label"].to_numpy()[rows]

    per_subject: list[dict] = []
    for s in pd.unique(subjects):
        sel = subjects == s
        fid = healthy_region_fidelity(images[sel], ph[sel], brain[sel], tumour[sel], opts.dilation)
        rec = {"subject": s, "healthy_psnr": fid["psnr"], "healthy_ssim": fid["ssim"],
               "tumour_pixels": int(tumour[sel].sum())}
        if truth is not None and tumour[sel].any():
            twin = twin_rows(store, s, rows[sel], truth)[:, ch]
            m_ph, m_id = [], []
            for c in range(len(ch)):
                m_ph.append(M.inpainting_metrics(ph[sel][:, c], twin[:, c], images[sel][:, c], tumour[sel]))
                m_id.append(M.inpainting_metrics(images[sel][:, c], twin[:, c], images[sel][:, c], tumour[sel]))
            for key in ("psnr", "ssim", "mse"):
                rec[f"tumour_{key}"] = _nanmean([m[key] for m in m_ph])
                rec[f"input_tumour_{key}"] = _nanmean([m[key] for m in m_id])
        per_subject.append(rec)

    out: dict[str, Any] = {
        "healthy_psnr": _nanmean([r["healthy_psnr"] for r in per_subject]),
        "healthy_ssim": _nanmean([r["healthy_ssim"] for r in per_subject]),
    }
    if truth is not None:
        for key in ("psnr", "ssim", "mse"):
            out[f"tumour_{key}"] = _nanmean([r.get(f"tumour_{key}") for r in per_subject])
            out[f"input_tumour_{key}"] = _nanmean([r.get(f"input_tumour_{key}") for r in per_subject])
        out["twin_subjects"] = int(sum("tumour_psnr" in r for r in per_subject))

    val = None
    if len(val_rows):
        v_img = _store_images(store, val_rows, ch)
        v_ph = _run_counterfactuals(method, v_img, opts, f"{method.name}: pseudo-healthy ({opts.threshold_split})")
        v_brain = np.asarray(store.brain[val_rows]) > 0
        val = (anomaly_map(v_img, v_ph, v_brain), np.asarray(store.seg[val_rows]) > 0, v_brain)
    is_tumour = labels == "tumour"
    out["detection"] = _detection_metrics(amap, tumour, brain, is_tumour, val)
    support = method.anomaly_support(images, opts.batch_size)
    if support is not None:  # the same, with the map kept only where the method localises
        v_support = method.anomaly_support(v_img, opts.batch_size) if val is not None else None
        val_s = (val[0] * v_support, val[1], val[2]) if val is not None else None
        out["detection_in_support"] = _detection_metrics(amap * support, tumour, brain, is_tumour, val_s)
    out["per_subject"] = per_subject
    return out


def _detection_metrics(amap: np.ndarray, tumour: np.ndarray, brain: np.ndarray, is_tumour: np.ndarray,
                       val: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """Anomaly-detection figures of a map (N, H, W) against the tumour mask inside the
    brain; ``val`` = (map, tumour, brain) of the threshold split, or None."""
    detection: dict[str, Any] = {
        "auprc": M.pixel_auprc(amap, tumour, brain),
        "tumour_prevalence": float(tumour[brain].mean()) if brain.any() else float("nan"),
    }
    detection["best_dice"], detection["best_threshold"] = M.best_dice(amap, tumour, brain)
    detection["slice_auroc"] = M.slice_auroc(M.slice_scores(amap, brain), is_tumour)
    if val is not None:
        _, thr = M.best_dice(*val)
        detection["val_threshold"] = thr
        detection["dice_at_val_threshold"] = (
            M.dice_at_threshold(amap, tumour, thr, brain) if math.isfinite(thr) else float("nan")
        )
    return detection


def _embedding_metrics(
    method: Method, store: SliceStore, rows: np.ndarray, clinical: pd.DataFrame | None,
    opts: EvaluateOptions,
) -> dict[str, Any]:
    from sklearn.preprocessing import StandardScaler

    from diffca_med.analysis.subgroups import cluster

    ch = _channels(store, method)
    images = _store_images(store, rows, ch)
    x = _resize(images, method.image_size, "area" if method.image_size < images.shape[-1] else "bilinear")
    reps = method.embed(x, batch_size=max(opts.batch_size, 64))
    idx = store.index.iloc[rows]
    subjects = idx["subject"].to_numpy()
    labels = idx["label"].to_numpy()
    tumour_rows = labels == "tumour"
    # Axial position in [0, 1] within the subject's stored brain box (bottom to top).
    first = np.array([store.geometry[s]["first_slice"] for s in subjects], dtype=np.float64)
    n = np.array([store.geometry[s]["n_slices"] for s in subjects], dtype=np.float64)
    position = (idx["slice"].to_numpy() - first) / np.maximum(n - 1, 1)
    targets = {
        "set_label": Target(labels, "class"),
        "slice_position": Target(position, "value"),
        "brain_area": Target(idx["brain_pixels"].to_numpy(np.float64), "value"),
    }
    subtype = None
    if clinical is not None:
        for col, name in (("subtype", "subtype"), ("hemisphere", "hemisphere")):
            if col in clinical.columns:
                vals = clinical[col].reindex(subjects).astype(str).to_numpy()
                targets[name] = Target(vals, "class", rows=tumour_rows)
                if col == "subtype":
                    subtype = vals
    probes = probe_table(reps, targets, subjects, n_splits=opts.folds, seed=opts.seed)
    out: dict[str, Any] = {"probes": probes, "embedding_dim": int(reps["salient"].shape[1])}

    # Subject-level subgroups: mean salient embedding of each subject's tumour slices.
    tumour_subjects = pd.unique(subjects[tumour_rows])
    sub: dict[str, Any] = {"subjects": int(len(tumour_subjects))}
    if len(tumour_subjects) >= 3:
        emb = np.stack([reps["salient"][tumour_rows & (subjects == s)].mean(0) for s in tumour_subjects])
        z = StandardScaler().fit_transform(emb)
        if subtype is not None:
            truth = clinical["subtype"].reindex(tumour_subjects).astype(str).to_numpy()
            k = int(min(len(np.unique(truth)), len(tumour_subjects) - 1))
        else:
            truth, k = None, None
        if k is None or k >= 2:
            res = cluster(z, "kmeans", k=k, seed=opts.seed)
            sub.update({"k": int(res.k), "silhouette": res.silhouette})
            if truth is not None:
                sub.update(cluster_agreement(truth, res.labels))
    out["subgroups"] = sub
    return out


def evaluate_method(
    method: Method,
    store: SliceStore | str | Path,
    truth: str | Path | None = None,
    participants: str | Path | None = None,
    options: EvaluateOptions | None = None,
    info: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``method`` on ``store`` (see the module docstring); returns the metrics dict."""
    opts = options or EvaluateOptions()
    opts.check()
    info = info or (lambda msg: None)
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    truth = Path(truth) if truth is not None else None
    if truth is not None and not truth.is_dir():
        raise InputError(f"{truth}: ground-truth folder does not exist")
    rows = _select_rows(store, opts.split, opts.slice_stride)
    if rows.size == 0:
        raise InputError(f"{store.path}: no healthy or tumour slices in split {opts.split!r}")
    val_rows = np.zeros(0, dtype=np.int64)
    if method.makes_counterfactuals and opts.threshold_split != opts.split:
        val_rows = _select_rows(store, opts.threshold_split, opts.slice_stride)
    clinical = read_participants(store, participants)
    subjects = store.index["subject"].to_numpy()[rows]
    result: dict[str, Any] = {
        "method": method.name,
        "store": str(store.path),
        "split": opts.split,
        "subjects": int(len(pd.unique(subjects))),
        "slices": int(len(rows)),
        "tumour_slices": int((store.index["label"].to_numpy()[rows] == "tumour").sum()),
        "options": asdict(opts),
    }
    timing: dict[str, float] = {}
    if method.makes_counterfactuals:
        info(f"{method.name}: pseudo-healthy images for {len(rows)} slices")
        result["counterfactual"] = _counterfactual_metrics(method, store, rows, val_rows, truth, opts, timing)
        mean_slices = float(np.mean([store.geometry[s]["n_slices"] for s in pd.unique(subjects)]))
        timing["seconds_per_subject_volume"] = timing["seconds_per_slice"] * mean_slices
    if method.makes_embeddings:
        t0 = time.perf_counter()
        result["embedding"] = _embedding_metrics(method, store, rows, clinical, opts)
        timing["embedding_seconds"] = time.perf_counter() - t0
    result["timing"] = timing
    return result


# ----------------------------------------------------------------------- outputs
#: (column header, path into the metrics dict, format) of the summary table.
TABLE_COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("tumour PSNR vs twin (dB)", ("counterfactual", "tumour_psnr"), "{:.2f}"),
    ("tumour SSIM vs twin", ("counterfactual", "tumour_ssim"), "{:.3f}"),
    ("tumour MSE vs twin", ("counterfactual", "tumour_mse"), "{:.4f}"),
    ("healthy-region PSNR (dB)", ("counterfactual", "healthy_psnr"), "{:.2f}"),
    ("healthy-region SSIM", ("counterfactual", "healthy_ssim"), "{:.3f}"),
    ("pixel AUPRC", ("counterfactual", "detection", "auprc"), "{:.3f}"),
    ("best Dice", ("counterfactual", "detection", "best_dice"), "{:.3f}"),
    ("Dice @ val thr", ("counterfactual", "detection", "dice_at_val_threshold"), "{:.3f}"),
    ("slice AUROC", ("counterfactual", "detection", "slice_auroc"), "{:.3f}"),
    ("pixel AUPRC in own support", ("counterfactual", "detection_in_support", "auprc"), "{:.3f}"),
    ("Dice @ val thr in own support", ("counterfactual", "detection_in_support", "dice_at_val_threshold"), "{:.3f}"),
    ("set probe: salient", ("embedding", "probes", "salient", "set_label"), "{:.3f}"),
    ("set probe: common", ("embedding", "probes", "common", "set_label"), "{:.3f}"),
    ("subtype probe: salient", ("embedding", "probes", "salient", "subtype"), "{:.3f}"),
    ("subtype probe: common", ("embedding", "probes", "common", "subtype"), "{:.3f}"),
    ("hemisphere probe: salient", ("embedding", "probes", "salient", "hemisphere"), "{:.3f}"),
    ("position R²: salient", ("embedding", "probes", "salient", "slice_position"), "{:.3f}"),
    ("position R²: common", ("embedding", "probes", "common", "slice_position"), "{:.3f}"),
    ("brain-area R²: salient", ("embedding", "probes", "salient", "brain_area"), "{:.3f}"),
    ("brain-area R²: common", ("embedding", "probes", "common", "brain_area"), "{:.3f}"),
    ("subgroup ARI", ("embedding", "subgroups", "ari"), "{:.3f}"),
    ("subgroup NMI", ("embedding", "subgroups", "nmi"), "{:.3f}"),
    ("silhouette", ("embedding", "subgroups", "silhouette"), "{:.3f}"),
]


_MISSING = object()


def _get(d: dict, path: tuple[str, ...]):
    """Value at ``path``, or ``_MISSING`` when the method has no such output."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d


def _fmt(value, fmt: str) -> str:
    """Table cell: '–' no such output, 'n/a' undefined (NaN / JSON null), '∞' infinite."""
    if value is _MISSING:
        return "–"
    if value in ("inf", "-inf"):  # infinities as written by :func:`jsonable`
        value = float(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return fmt.format(value)


def markdown_table(results: list[dict[str, Any]], names: list[str] | None = None) -> str:
    """One row per method, one column per metric (columns no method has are left out).

    "–" = the method does not produce what the metric needs; "n/a" = undefined here
    (e.g. no tumour in the split); "∞" = identical images (PSNR).
    """
    names = names or [r["method"] for r in results]
    cols = [c for c in TABLE_COLUMNS if any(_get(r, c[1]) is not _MISSING for r in results)]
    head = "| method | " + " | ".join(c[0] for c in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for name, r in zip(names, results):
        lines.append(f"| {name} | " + " | ".join(_fmt(_get(r, c[1]), c[2]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def jsonable(obj: Any) -> Any:
    """Make ``obj`` strict JSON: NumPy scalars to Python, inf to ``"inf"``, NaN to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def write_outputs(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``metrics.json`` and ``metrics.md`` into folder ``out`` (atomically)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False), encoding="utf-8")
    text = f"# Evaluation of {result['method']} on {result['store']} ({result['split']} split)\n\n"
    text += markdown_table([result])
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out / METRICS_FILE
