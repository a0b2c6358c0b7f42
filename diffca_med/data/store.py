"""Read the slice store written by ``prepare``; torch Dataset; slices back to the original grid.

Store folder (docs/architecture.md, "The slice store"):

==================  =========================================================================
``store.json``      format version, layout, source root, modalities, size, thresholds, split
                    options, fingerprint of inputs + options, counts
``images.npy``      float32 (N, C, H, W), H = W = size, in [0, 1] (brain-normalised)
``seg.npy``         uint8 (N, H, W) label map (layout convention), 0 = no tumour
``brain.npy``       uint8 (N, H, W), 1 inside the brain
``index.csv``       row i <-> array index i: subject, slice, split, label, tumour_pixels,
                    brain_pixels, tumour_voxels, brain_fraction
``subjects.csv``    subject, split, has_tumour, n_slices, files (JSON)
``geometry.json``   per subject: how to put slices back into the original NIfTI grid
==================  =========================================================================

``geometry.json`` entry of a subject: ``shape`` (X, Y, Z) and ``affine`` (4x4) of the
source grid; ``source_crop_start``/``source_crop_end`` the brain's bounding box in source
voxel indices (end exclusive); ``ornt`` the nibabel orientation transform source -> RAS;
``ras_shape`` the reoriented full volume's shape and ``crop_start``/``crop_end`` the same
box in it (axial slice k of the store = RAS z index ``crop_start[2] + k``); ``square``
(in-plane side after symmetric padding), ``pad`` ([[before, after] along x, along y]),
``size``, ``first_slice``, ``n_slices``; ``intensity``: modality -> [lo, hi] source
intensities mapped to 0 and 1.

In-plane orientation of a stored slice: rows run anterior -> posterior, columns
left -> right (patient's left on the image's left), i.e. ``slice[h, w] = ras[w, H-1-h]``
on the resized RAS grid, so ``imshow`` shows a conventional axial view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from diffca_med.errors import InputError

STORE_FORMAT = 1
LABELS = ("healthy", "tumour", "excluded")
#: Integer class of each slice label in :class:`SliceDataset` (excluded -> -1).
LABEL_CODES = {"healthy": 0, "tumour": 1, "excluded": -1}
STORE_FILES = ("store.json", "images.npy", "seg.npy", "brain.npy", "index.csv", "subjects.csv", "geometry.json")


def min_tumour_pixels(size: int, min_tumour_fraction: float) -> int:
    """Tumour area (pixels at store resolution) a slice needs to be labelled ``tumour``."""
    return max(1, int(np.ceil(min_tumour_fraction * size * size)))


def ras_to_display(arr: np.ndarray) -> np.ndarray:
    """(..., X, Y) RAS in-plane arrays -> (..., H, W) display slices (rows A->P, cols L->R)."""
    return np.flip(np.swapaxes(arr, -1, -2), axis=-2)


def display_to_ras(arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_display`: (..., H, W) -> (..., X, Y)."""
    return np.swapaxes(np.flip(arr, axis=-2), -1, -2)


def slices_to_volume(geometry: dict, slices: np.ndarray, order: int = 1) -> np.ndarray:
    """Put a subject's stack of store slices back into its original NIfTI grid.

    Args:
        geometry: the subject's entry of ``geometry.json``.
        slices: (D, H, W) or (D, C, H, W), D = the subject's number of stored slices (in
            ``slice`` order), H = W = store size.
        order: 1 = bilinear in-plane (images), 0 = nearest (label maps, masks).

    Returns:
        (X, Y, Z) or (X, Y, Z, C) array in the original voxel grid (same shape and voxel
        order as the source file, so it can be saved with the source affine/header); voxels
        outside the brain's bounding box are 0. dtype float32 for order 1, else the input's.
    """
    arr = np.asarray(slices)
    squeeze = arr.ndim == 3
    if squeeze:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"slices must be (D, H, W) or (D, C, H, W), got shape {arr.shape}")
    n = geometry["n_slices"]
    if arr.shape[0] != n:
        raise ValueError(f"expected {n} slices for this subject, got {arr.shape[0]}")
    size, s = geometry["size"], geometry["square"]
    out_dtype = np.float32 if order == 1 else arr.dtype
    ras_plane = np.ascontiguousarray(display_to_ras(arr))  # (D, C, size, size) over (x, y)
    t = torch.from_numpy(ras_plane.astype(np.float32))
    if s != size:
        if order == 1:
            t = torch.nn.functional.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)
        else:
            t = torch.nn.functional.interpolate(t, size=(s, s), mode="nearest-exact")
    (bx, ax), (by, ay) = geometry["pad"]
    t = t[:, :, bx : s - ax, by : s - ay]  # undo the square padding -> (D, C, x, y)
    box = t.permute(2, 3, 0, 1).numpy()  # the brain's box in RAS order (x, y, z, C)
    # undo the reorientation (MONAI's Orientationd uses nibabel's io_orientation too)
    inverse = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(np.asarray(geometry["affine"]))
    )
    box = nib.orientations.apply_orientation(box, inverse)
    vol = np.zeros((*geometry["shape"], box.shape[-1]), dtype=out_dtype)
    region = tuple(slice(a, b) for a, b in zip(geometry["source_crop_start"], geometry["source_crop_end"]))
    vol[region] = box
    return vol[..., 0] if squeeze else vol


def normalisation_key(percentiles, upper_value) -> tuple[tuple[float, ...], float]:
    """((lower, upper) brain percentiles, value the upper one maps to), comparable with ==."""
    return tuple(float(v) for v in percentiles), float(upper_value)


def describe_normalisation(key: tuple[tuple[float, ...], float]) -> str:
    """``"0.5/50 to 0/0.3"``: which brain percentiles map to which values."""
    (lo, hi), value = key
    return f"{lo:g}/{hi:g} to 0/{value:g}"


class SliceStore:
    """Read-only view of a slice store folder; arrays are memory-mapped.

    Attributes:
        images: float32 (N, C, H, W) memmap in [0, 1].
        seg: uint8 (N, H, W) memmap, label map (0 = no tumour).
        brain: uint8 (N, H, W) memmap, 1 inside the brain.
        index: DataFrame, one row per slice (row i <-> array index i).
        subjects_table: DataFrame, one row per subject.
        modalities: channel order (canonical names). size: H = W.
        meta: the parsed ``store.json``. geometry: subject -> geometry dict.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        missing = [f for f in STORE_FILES if not (self.path / f).is_file()]
        if missing:
            raise InputError(f"{self.path}: not a slice store (missing {', '.join(missing)})")
        try:
            self.meta = json.loads((self.path / "store.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{self.path / 'store.json'}: unreadable ({err})") from None
        if self.meta.get("format") != STORE_FORMAT:
            raise InputError(
                f"{self.path / 'store.json'}: store format {self.meta.get('format')} is not "
                f"supported (expected {STORE_FORMAT}); re-run prepare with --force"
            )
        self.images = np.load(self.path / "images.npy", mmap_mode="r")
        self.seg = np.load(self.path / "seg.npy", mmap_mode="r")
        self.brain = np.load(self.path / "brain.npy", mmap_mode="r")
        self.index = pd.read_csv(self.path / "index.csv", keep_default_na=False)
        self.subjects_table = pd.read_csv(self.path / "subjects.csv", keep_default_na=False)
        self.geometry: dict[str, dict] = json.loads((self.path / "geometry.json").read_text(encoding="utf-8"))
        self.modalities: tuple[str, ...] = tuple(self.meta["modalities"])
        self.size: int = int(self.meta["size"])
        self.layout: str = self.meta.get("layout", "")
        #: (lower, upper) brain percentiles and the value the upper one maps to; stores
        #: without ``upper_value`` mapped the upper percentile to 1
        self.normalisation = normalisation_key(self.meta.get("percentiles", (0.5, 99.5)),
                                               self.meta.get("upper_value", 1.0))
        if len(self.index) != self.images.shape[0]:
            raise InputError(f"{self.path}: index.csv has {len(self.index)} rows but images.npy {self.images.shape[0]}")

    # pickling by path keeps DataLoader workers from copying the memory maps
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"SliceStore({str(self.path)!r}, n={len(self)}, modalities={self.modalities}, size={self.size})"

    @property
    def subjects(self) -> list[str]:
        return list(self.subjects_table["subject"])

    def rows(self, split: str | Sequence[str] | None = None, labels: Sequence[str] | str | None = ("healthy", "tumour"), subject: str | None = None) -> np.ndarray:
        """Array indices of the slices in ``split`` (None = all) with a label in ``labels`` (None = all)."""
        mask = np.ones(len(self.index), dtype=bool)
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            mask &= self.index["split"].isin(splits).to_numpy()
        if labels is not None:
            labels = [labels] if isinstance(labels, str) else list(labels)
            mask &= self.index["label"].isin(labels).to_numpy()
        if subject is not None:
            mask &= (self.index["subject"] == subject).to_numpy()
        return np.flatnonzero(mask)

    def thin_tumour(self, rows: np.ndarray, min_tumour_fraction: float) -> np.ndarray:
        """bool (len(rows),): which of ``rows`` are tumour slices whose tumour covers less
        than ``min_tumour_fraction`` of the slice (size² pixels) — lesion fringes."""
        index = self.index.iloc[rows]
        return (index["label"] == "tumour").to_numpy() & (
            index["tumour_pixels"].to_numpy() < min_tumour_pixels(self.size, min_tumour_fraction))

    def axial_position(self) -> np.ndarray:
        """Each row's slice position within its subject's stored slices, in [0, 1] (N,).

        0 is the subject's lowest stored slice, 1 its highest (0.5 when it has one).
        """
        idx = self.index
        lo = idx.groupby("subject")["slice"].transform("min").to_numpy(dtype=float)
        hi = idx.groupby("subject")["slice"].transform("max").to_numpy(dtype=float)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.where(hi > lo, (idx["slice"].to_numpy(dtype=float) - lo) / span, 0.5)

    def axial_bins(self, bins: int) -> np.ndarray:
        """Each row's :meth:`axial_position` as a bin index 0..bins-1 (N,) int64."""
        return np.minimum((self.axial_position() * bins).astype(np.int64), bins - 1)

    def subject_rows(self, subject: str) -> np.ndarray:
        """All rows of ``subject`` in axial (``slice``) order — the stack :meth:`to_volume` expects."""
        rows = self.rows(labels=None, subject=subject)
        if rows.size == 0:
            raise KeyError(f"unknown subject {subject!r}")
        return rows[np.argsort(self.index["slice"].to_numpy()[rows], kind="stable")]

    def to_volume(self, subject: str, slices: np.ndarray, order: int = 1, rescale: bool = False) -> np.ndarray:
        """Put ``slices`` (D, H, W) or (D, C, H, W) of ``subject`` back into its original grid.

        D must equal the subject's number of stored slices (all of :meth:`subject_rows`).
        With ``rescale=True`` (images, (D, C, H, W) in store channel order), values in
        [0, 1] are mapped back to each modality's source intensity range (the
        normalisation percentiles) inside the brain; the background stays 0.
        Returns (X, Y, Z) or (X, Y, Z, C).
        """
        geom = self.geometry[subject]
        vol = slices_to_volume(geom, slices, order=order)
        if rescale:
            if vol.ndim != 4:
                raise ValueError("rescale=True needs image slices (D, C, H, W)")
            lohi = np.array([geom["intensity"][m] for m in self.modalities], dtype=np.float32)
            # background stays 0 rather than becoming lo: inside = the subject's stored brain
            # mask put back, or any channel above 0 (interpolation blurs the mask's edge)
            brain = slices_to_volume(geom, np.asarray(self.brain[self.subject_rows(subject)]), order=0) > 0
            inside = brain | (vol > 0).any(axis=-1)
            vol = lohi[:, 0] + vol * (lohi[:, 1] - lohi[:, 0])
            vol[~inside] = 0.0
        return vol

    def source_files(self, subject: str) -> dict:
        """Canonical modality -> ImageRef of the source file, plus ``"seg"`` -> Path or None."""
        from diffca_med.data.layouts import ImageRef

        row = self.subjects_table.loc[self.subjects_table["subject"] == subject]
        if row.empty:
            raise KeyError(f"unknown subject {subject!r}")
        files = json.loads(row.iloc[0]["files"])
        out: dict = {m: ImageRef(Path(v["path"]), v.get("channel")) for m, v in files["images"].items()}
        out["seg"] = Path(files["seg"]) if files.get("seg") else None
        return out

    def source_affine(self, subject: str) -> np.ndarray:
        """(4, 4) affine of the subject's original grid."""
        return np.asarray(self.geometry[subject]["affine"], dtype=np.float64)


class SliceDataset(Dataset):
    """Torch dataset over store slices.

    ``ds[i]`` -> ``{"image": FloatTensor (C, H, W) in [0, 1], "label": LongTensor ()
    0 healthy / 1 tumour (-1 excluded), "brain": FloatTensor (1, H, W), "row": int}``.
    ``min_tumour_fraction`` > 0 leaves out tumour slices whose tumour covers less of
    the slice (size² pixels) than that, on top of the store's own threshold.
    """

    def __init__(self, store: SliceStore | str | Path, split: str | Sequence[str] | None = "train",
                 labels: Sequence[str] | None = ("healthy", "tumour"), min_tumour_fraction: float = 0.0):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.split = split
        self.label_names = tuple(labels) if labels is not None else LABELS
        self.indices = self.store.rows(split=split, labels=labels)
        if min_tumour_fraction > 0:  # drop thinner tumour slices (lesion fringes)
            self.indices = self.indices[~self.store.thin_tumour(self.indices, min_tumour_fraction)]
        codes = self.store.index["label"].map(LABEL_CODES).to_numpy()
        self.labels = codes[self.indices].astype(np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        return {
            "image": torch.from_numpy(np.array(self.store.images[row], dtype=np.float32)),
            "label": torch.tensor(int(self.labels[i]), dtype=torch.long),
            "brain": torch.from_numpy(np.array(self.store.brain[row], dtype=np.float32))[None],
            "row": row,
        }


def balanced_sampler(ds: SliceDataset, num_samples: int | None = None, seed: int = 0) -> Sampler:
    """Sampler drawing healthy and tumour slices 1:1 (with replacement).

    Each class gets half of the total weight, spread evenly over its slices; classes
    absent from ``ds`` are skipped. ``num_samples`` defaults to ``len(ds)``.
    """
    if len(ds) == 0:
        raise InputError(f"{ds.store.path}: no slices in split {ds.split!r} to sample from")
    labels = ds.labels
    weights = np.zeros(len(labels), dtype=np.float64)
    classes = [c for c in np.unique(labels) if c >= 0]
    for c in classes:
        members = labels == c
        weights[members] = 1.0 / members.sum()
    if not classes:
        weights[:] = 1.0
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        torch.from_numpy(weights), num_samples=int(num_samples or len(ds)), replacement=True, generator=generator
    )
