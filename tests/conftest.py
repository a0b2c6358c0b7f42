"""Shared fixtures: tiny hand-made NIfTI data sets, tiny phantom cohorts, a tiny store.

``tiny_store`` (session scope) is the store other test modules train and analyse on:
a tiny-grid BraTS 2023 phantom of 6 subjects prepared at size 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffca_med.data import modalities as M

#: BraTS-like affine (x flipped, y flipped: LPS voxel order) at 4 mm.
LPS_AFFINE = np.array([[-4.0, 0, 0, 120.0], [0, -4.0, 0, 120.0], [0, 0, 4.0, -60.0], [0, 0, 0, 1]])


def handmade_subject(shape=(24, 28, 16), seed=0, tumour=True):
    """Synthetic skull-stripped head: four modalities (t1, t1c, t2, flair) + BraTS 2023 seg.

    An ellipsoidal brain with a smooth intensity pattern per modality (zero outside),
    and optionally a spherical tumour (ED shell 2, ET ring 3, NCR core 1). Returns
    ``(images: dict canonical -> float32 (X, Y, Z), seg: uint8 (X, Y, Z))``.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2 <= 1.0
    seg = np.zeros(shape, np.uint8)
    if tumour:
        c = rng.uniform(-0.3, 0.3, 3)
        r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        seg[(r < 0.45) & brain] = 2
        seg[(r < 0.3) & brain] = 3
        seg[(r < 0.15) & brain] = 1
    images = {}
    for k, mod in enumerate(M.CANONICAL):
        base = 100 + 40 * k + 30 * np.sin(3 * x + k) * np.cos(2 * y) + 10 * z
        base = base + rng.normal(0, 2, shape)
        base = base + 50.0 * (seg > 0) * (1 + k % 2)
        images[mod] = np.where(brain, base, 0).astype(np.float32)
    return images, seg


def save_nifti(path: Path, arr: np.ndarray, affine=LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def make_handmade(root: Path, layout: str = "brats2023", n: int = 3, shape=(24, 28, 16), affine=LPS_AFFINE) -> Path:
    """Write ``n`` hand-made subjects in ``layout`` (brats2023 | brats2021 | msd | bids)."""
    root.mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        images, seg = handmade_subject(shape, seed=i, tumour=(i % 3 != 2))
        if layout == "brats2023":
            sid = f"BraTS-GLI-{i:05d}-000"
            for mod, arr in images.items():
                save_nifti(root / sid / f"{sid}-{M.BRATS2023_SUFFIX[mod]}.nii.gz", arr, affine)
            save_nifti(root / sid / f"{sid}-seg.nii.gz", seg, affine)
        elif layout == "brats2021":
            sid = f"BraTS2021_{i:05d}"
            seg21 = np.where(seg == 3, 4, seg).astype(np.uint8)
            for mod, arr in images.items():
                save_nifti(root / sid / f"{sid}_{M.BRATS2021_SUFFIX[mod]}.nii.gz", arr, affine)
            save_nifti(root / sid / f"{sid}_seg.nii.gz", seg21, affine)
        elif layout == "msd":
            sid = f"BRATS_{i:03d}"
            stack = np.stack([images[m] for m in M.MSD_CHANNELS], axis=-1)
            # MSD: 1 edema, 2 non-enhancing, 3 enhancing
            msd = np.select([seg == 2, seg == 1, seg == 3], [1, 2, 3], 0).astype(np.uint8)
            save_nifti(root / "imagesTr" / f"{sid}.nii.gz", stack, affine)
            save_nifti(root / "labelsTr" / f"{sid}.nii.gz", msd, affine)
            training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
        elif layout == "bids":
            sid = f"sub-{i:03d}"
            names = {"t1": "T1w", "t1c": "ce-gadolinium_T1w", "t2": "T2w", "flair": "FLAIR"}
            for mod, arr in images.items():
                save_nifti(root / sid / "anat" / f"{sid}_{names[mod]}.nii.gz", arr, affine)
            save_nifti(root / "derivatives" / "tumour" / sid / "anat" / f"{sid}_dseg.nii.gz", seg, affine)
            # ground-truth twins must be ignored by discovery
            save_nifti(root / "derivatives" / "phantom-truth" / sid / "anat" / f"{sid}_T1w.nii.gz", images["t1"], affine)
        else:
            raise ValueError(layout)
    if layout == "msd":
        meta = {
            "name": "BrainTumour",
            "modality": M.MSD_MODALITY_JSON,
            "labels": M.MSD_LABELS_JSON,
            "numTraining": n,
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta))
    if layout == "bids":
        (root / "dataset_description.json").write_text(json.dumps({"Name": "handmade", "BIDSVersion": "1.8.0"}))
        (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{i:03d}\n" for i in range(n)))
    return root


@pytest.fixture
def handmade(tmp_path):
    """A fresh 3-subject hand-made BraTS 2023 folder (function scope: tests may break it)."""
    return make_handmade(tmp_path / "data", "brats2023", n=3)


@pytest.fixture(scope="session")
def tiny_cohorts(tmp_path_factory):
    """Tiny-grid phantom cohorts, one per layout: layout -> folder (3 subjects each)."""
    from diffca_med.data.phantom import make_cohort

    base = tmp_path_factory.mktemp("cohorts")
    out = {}
    for layout in M.LAYOUTS:
        out[layout] = base / layout
        make_cohort(out[layout], n_subjects=3, seed=1, layout=layout, grid="tiny", workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """Path of a prepared store: tiny-grid BraTS 2023 phantom, 6 subjects, size 32."""
    from diffca_med.data.phantom import make_cohort
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    base = tmp_path_factory.mktemp("tiny_store")
    make_cohort(base / "data", n_subjects=6, seed=0, layout="brats2023", grid="tiny", workers=1)
    opts = PrepareOptions(size=32, val_fraction=0.2, test_fraction=0.2, seed=0)
    prepare(base / "data", base / "store", opts, workers=1, progress=False)
    return base / "store"
