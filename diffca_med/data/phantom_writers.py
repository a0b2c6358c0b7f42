"""Write phantom subjects in the on-disk layouts of docs/architecture.md.

| layout      | subject id            | files                                                        |
|-------------|-----------------------|--------------------------------------------------------------|
| brats2023   | BraTS-GLI-00000-000   | <id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz                        |
| brats2021   | BraTS2021_00000       | <id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz                       |
| msd         | BRATS_000             | imagesTr/<id>.nii.gz (4-D FLAIR,T1w,T1gd,T2w), labelsTr/<id>.nii.gz, dataset.json |
| bids        | sub-000               | sub-000/anat/sub-000_{T1w,ce-gadolinium_T1w,T2w,FLAIR}.nii.gz, derivatives/phantom/sub-000/anat/sub-000_dseg.nii.gz |

The healthy twin of every image file goes to
``derivatives/phantom-truth/<same relative path>``. Files are gzip-compressed with a
zero timestamp so the same data always gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from diffca_med.data import modalities as M
from diffca_med.data.phantom_tumours import ED, ET, NCR

TRUTH_DIR = Path("derivatives") / "phantom-truth"
BIDS_SEG_PIPELINE = "phantom"


def subject_id(layout: str, index: int) -> str:
    """The subject id of subject number ``index`` (0-based) in ``layout``."""
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "msd":
        return f"BRATS_{index:03d}"
    if layout == "bids":
        return f"sub-{index:03d}"
    raise ValueError(f"unknown layout {layout!r}")


def image_paths(layout: str, sid: str) -> dict[str, Path]:
    """Canonical modality -> image file relative to the data set root (3-D layouts);
    for ``msd`` the single 4-D file under the key ``"image"``."""
    if layout == "brats2023":
        return {m: Path(sid) / f"{sid}-{M.BRATS2023_SUFFIX[m]}.nii.gz" for m in M.CANONICAL}
    if layout == "brats2021":
        return {m: Path(sid) / f"{sid}_{M.BRATS2021_SUFFIX[m]}.nii.gz" for m in M.CANONICAL}
    if layout == "msd":
        return {"image": Path("imagesTr") / f"{sid}.nii.gz"}
    if layout == "bids":
        anat = Path(sid) / "anat"
        out = {}
        for m in M.CANONICAL:
            ce = f"_ce-{M.BIDS_CE_ENTITY}" if m == "t1c" else ""
            out[m] = anat / f"{sid}{ce}_{M.BIDS_SUFFIX[m]}.nii.gz"
        return out
    raise ValueError(f"unknown layout {layout!r}")


def seg_path(layout: str, sid: str) -> Path:
    """The tumour label map of ``sid`` relative to the data set root."""
    if layout == "brats2023":
        return Path(sid) / f"{sid}-{M.BRATS_SEG_SUFFIX}.nii.gz"
    if layout == "brats2021":
        return Path(sid) / f"{sid}_{M.BRATS_SEG_SUFFIX}.nii.gz"
    if layout == "msd":
        return Path("labelsTr") / f"{sid}.nii.gz"
    if layout == "bids":
        return Path("derivatives") / BIDS_SEG_PIPELINE / sid / "anat" / f"{sid}_{M.BIDS_SEG_SUFFIX}.nii.gz"
    raise ValueError(f"unknown layout {layout!r}")


def layout_labels(labels: np.ndarray, layout: str) -> np.ndarray:
    """Translate internal sub-region codes (NCR/ED/ET) to ``layout``'s label values (uint8)."""
    values = M.TUMOUR_LABELS[layout]
    lut = np.zeros(256, dtype=np.uint8)
    lut[NCR], lut[ED], lut[ET] = values["NCR"], values["ED"], values["ET"]
    return lut[labels]


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A deterministic ``.nii.gz`` byte string: sform and qform (code 1), mm units."""
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr["descrip"] = b"diffca-med phantom"
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write(root: Path, rel: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(nifti_bytes(data, affine))


def write_subject(
    root: Path,
    layout: str,
    sid: str,
    images: dict[str, np.ndarray],
    twins: dict[str, np.ndarray],
    labels: np.ndarray,
    affine: np.ndarray,
) -> None:
    """Write one subject's images (canonical name -> float32 (X, Y, Z)), their healthy
    twins under ``derivatives/phantom-truth`` and its label map (internal codes)."""
    paths = image_paths(layout, sid)
    if layout == "msd":
        order = list(M.MSD_CHANNELS)
        _write(root, paths["image"], np.stack([images[m] for m in order], axis=-1), affine)
        _write(root, TRUTH_DIR / paths["image"], np.stack([twins[m] for m in order], axis=-1), affine)
    else:
        for m, rel in paths.items():
            _write(root, rel, images[m], affine)
            _write(root, TRUTH_DIR / rel, twins[m], affine)
    _write(root, seg_path(layout, sid), layout_labels(labels, layout), affine)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_dataset_files(root: Path, layout: str, subject_ids: list[str], generated_by: dict) -> None:
    """Write the layout's data-set level files (MSD ``dataset.json``; BIDS
    ``dataset_description.json`` files, ``participants.json`` and the ``dseg.tsv``
    look-up) and a ``dataset_description.json`` for the twins' derivative folder."""
    truth_desc = {
        "Name": "diffca-med phantom ground-truth healthy twins",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "Description": "Each image file of the data set without its tumour (same subject, "
        "deformation, bias field and noise), at the same relative path.",
    }
    _json(root / TRUTH_DIR / "dataset_description.json", truth_desc)
    if layout == "msd":
        _json(root / "dataset.json", {
            "name": "BRATS",
            "description": "diffca-med synthetic phantom in the MSD Task01_BrainTumour layout",
            "reference": "diffca-med phantom (MNI152 2009 anatomy, synthetic tumours)",
            "licence": "CC-BY-SA 4.0",
            "tensorImageSize": "4D",
            "modality": dict(M.MSD_MODALITY_JSON),
            "labels": dict(M.MSD_LABELS_JSON),
            "numTraining": len(subject_ids),
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"}
                for sid in subject_ids
            ],
            "test": [],
        })
    elif layout == "bids":
        _json(root / "dataset_description.json", {
            "Name": "diffca-med phantom",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [generated_by],
        })
        _json(root / "derivatives" / BIDS_SEG_PIPELINE / "dataset_description.json", {
            "Name": "diffca-med phantom tumour label maps",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [generated_by],
            "Description": "Tumour label maps (_dseg) with BraTS 2023 values: 1 NCR, 2 ED, 3 ET.",
        })
        values = M.TUMOUR_LABELS["bids"]
        lines = ["index\tname\tabbreviation"]
        names = {"NCR": "necrotic or non-enhancing tumour core", "ED": "peritumoural oedema",
                 "ET": "enhancing tumour"}
        for region in ("NCR", "ED", "ET"):
            lines.append(f"{values[region]}\t{names[region]}\t{region}")
        path = root / "derivatives" / BIDS_SEG_PIPELINE / "dseg.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _json(root / "participants.json", PARTICIPANTS_JSON)


#: Column descriptions of participants.tsv (written as participants.json for BIDS).
PARTICIPANTS_JSON: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "subject id (layout-specific form)"},
    "subtype": {"Description": "'healthy' or the synthetic tumour subtype"},
    "n_lesions": {"Description": "connected components of the tumour core (NCR or ET)"},
    "tumour_volume_ml": {"Description": "voxels with label > 0 times voxel volume", "Units": "ml"},
    "centroid_i": {"Description": "tumour centroid, voxel index along axis 0", "Units": "voxel"},
    "centroid_j": {"Description": "tumour centroid, voxel index along axis 1", "Units": "voxel"},
    "centroid_k": {"Description": "tumour centroid, voxel index along axis 2", "Units": "voxel"},
    "centroid_x": {"Description": "tumour centroid, world RAS x", "Units": "mm"},
    "centroid_y": {"Description": "tumour centroid, world RAS y", "Units": "mm"},
    "centroid_z": {"Description": "tumour centroid, world RAS z", "Units": "mm"},
    "hemisphere": {"Description": "'left' (x < 0), 'right' (x >= 0) or 'none' (healthy)"},
    "age": {"Description": "synthetic age", "Units": "year"},
    "sex": {"Description": "synthetic sex", "Levels": {"F": "female", "M": "male"}},
}
