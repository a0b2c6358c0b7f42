"""Write the slice store: slice labels, array assembly, tables and metadata.

The per-subject workers of ``prepare`` leave their slices in ``parts/`` inside the
temporary store folder; :func:`write_store` concatenates them in subject order into
the memory-mappable arrays (never holding the whole cohort in memory) and writes the
tables. Folder contents are described in :mod:`diffca_med.data.store`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffca_med.data.splits import SPLITS
from diffca_med.data.store import LABELS, min_tumour_pixels

#: Defaults of the slice-label thresholds (documented in ``prepare --help``).
DEFAULT_MIN_BRAIN_FRACTION = 0.3
DEFAULT_MIN_TUMOUR_FRACTION = 0.005


def label_slices(
    tumour_voxels: np.ndarray,
    tumour_pixels: np.ndarray,
    brain_pixels: np.ndarray,
    *,
    size: int,
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    min_tumour_fraction: float = DEFAULT_MIN_TUMOUR_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Label one subject's slices healthy / tumour / excluded.

    Args:
        tumour_voxels: (D,) tumour voxels per slice at the source resolution.
        tumour_pixels: (D,) tumour pixels per slice at store resolution.
        brain_pixels: (D,) brain pixels per slice at store resolution.
        size: store slice size (H = W).
        min_brain_fraction: a slice's brain area relative to the subject's largest axial
            brain cross-section must reach this for either class.
        min_tumour_fraction: tumour area as a fraction of the slice (size²) needed for
            ``tumour``.

    Returns:
        labels (D,) array of str, brain_fraction (D,) float.
    """
    brain_pixels = np.asarray(brain_pixels, dtype=np.float64)
    largest = brain_pixels.max() if brain_pixels.size else 0.0
    fraction = brain_pixels / largest if largest > 0 else np.zeros_like(brain_pixels)
    enough_brain = fraction >= min_brain_fraction
    healthy = enough_brain & (np.asarray(tumour_voxels) == 0)
    tumour = enough_brain & (np.asarray(tumour_pixels) >= min_tumour_pixels(size, min_tumour_fraction))
    labels = np.where(healthy, "healthy", np.where(tumour, "tumour", "excluded"))
    return labels, fraction


def write_part(parts: Path, key: str, images: np.ndarray, seg: np.ndarray, brain: np.ndarray) -> dict[str, str]:
    """Save one subject's arrays (D, C, H, W) / (D, H, W) / (D, H, W) under ``parts``."""
    parts.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, arr in (("images", images), ("seg", seg), ("brain", brain)):
        path = parts / f"{key}_{name}.npy"
        np.save(path, np.ascontiguousarray(arr))
        out[name] = str(path)
    return out


def write_store(
    folder: Path,
    results: Sequence[dict],
    splits: dict[str, str],
    meta: dict,
    *,
    size: int,
    min_brain_fraction: float,
    min_tumour_fraction: float,
) -> dict:
    """Assemble the store in ``folder`` (the temporary folder of an atomic write).

    ``results``: per-subject dicts from the workers, in subject order, with keys
    subject, parts, n_slices, first_slice, tumour_voxels, tumour_pixels, brain_pixels,
    geometry, files, has_tumour, has_seg (subjects without a label map get only
    ``excluded`` slices: healthy is never assumed). Returns the counts written to ``store.json``.
    """
    n = sum(r["n_slices"] for r in results)
    c = len(meta["modalities"])
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.float32, shape=(n, c, size, size))
    seg = np.lib.format.open_memmap(folder / "seg.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    brain = np.lib.format.open_memmap(folder / "brain.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    index_parts, subject_rows, geometry = [], [], {}
    start = 0
    for r in results:
        d = r["n_slices"]
        stop = start + d
        images[start:stop] = np.load(r["parts"]["images"])
        seg[start:stop] = np.load(r["parts"]["seg"])
        brain[start:stop] = np.load(r["parts"]["brain"])
        start = stop
        labels, fraction = label_slices(
            r["tumour_voxels"], r["tumour_pixels"], r["brain_pixels"], size=size,
            min_brain_fraction=min_brain_fraction, min_tumour_fraction=min_tumour_fraction,
        )
        if not r.get("has_seg", True):  # no label map: tumour status unknown
            labels = np.full(d, "excluded")
        split = splits[r["subject"]]
        index_parts.append(
            pd.DataFrame(
                {
                    "subject": r["subject"],
                    "slice": np.arange(r["first_slice"], r["first_slice"] + d),
                    "split": split,
                    "label": labels,
                    "tumour_pixels": np.asarray(r["tumour_pixels"], dtype=np.int64),
                    "brain_pixels": np.asarray(r["brain_pixels"], dtype=np.int64),
                    "tumour_voxels": np.asarray(r["tumour_voxels"], dtype=np.int64),
                    "brain_fraction": np.round(fraction, 4),
                }
            )
        )
        subject_rows.append(
            {
                "subject": r["subject"],
                "split": split,
                "has_tumour": bool(r["has_tumour"]),
                "has_seg": bool(r.get("has_seg", True)),
                "n_slices": d,
                "first_slice": r["first_slice"],
                "files": json.dumps(r["files"]),
            }
        )
        geometry[r["subject"]] = r["geometry"]
    for arr in (images, seg, brain):
        arr.flush()
    del images, seg, brain
    index = pd.concat(index_parts, ignore_index=True)
    subjects = pd.DataFrame(subject_rows)
    index.to_csv(folder / "index.csv", index=False)
    subjects.to_csv(folder / "subjects.csv", index=False)
    (folder / "geometry.json").write_text(json.dumps(geometry, indent=1), encoding="utf-8")
    counts = {
        "subjects": len(subjects),
        "slices": int(n),
        **{f"{label}_slices": int((index["label"] == label).sum()) for label in LABELS},
        **{f"{split}_subjects": int((subjects["split"] == split).sum()) for split in SPLITS},
    }
    meta = dict(meta, counts=counts)
    shutil.rmtree(folder / "parts", ignore_errors=True)
    # store.json last: its presence marks a complete store
    (folder / "store.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return counts


def summarise(index: pd.DataFrame, subjects: pd.DataFrame) -> pd.DataFrame:
    """Subjects and slices per label per split (rows train/val/test/total)."""
    rows = []
    for split in (*SPLITS, "total"):
        sub = subjects if split == "total" else subjects[subjects["split"] == split]
        idx = index if split == "total" else index[index["split"] == split]
        row = {"split": split, "subjects": len(sub), "tumour_subjects": int(sub["has_tumour"].astype(bool).sum())}
        for label in LABELS:
            row[label] = int((idx["label"] == label).sum())
        rows.append(row)
    return pd.DataFrame(rows)
