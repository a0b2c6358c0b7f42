"""Layout discovery: BraTS 2021, BraTS 2023/2024 (all prefixes), MSD Task01 and BIDS."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_handmade, save_nifti
from diffca_med.data import discover
from diffca_med.data.layouts import detect_layout, parse_modalities
from diffca_med.data.modalities import ALLOWED_LABELS, CANONICAL, LAYOUTS
from diffca_med.errors import ConfigError, InputError

EXPECTED_IDS = {
    "brats2023": ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"],
    "brats2021": ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"],
    "msd": ["BRATS_000", "BRATS_001", "BRATS_002"],
    "bids": ["sub-000", "sub-001", "sub-002"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_handmade_layouts(tmp_path, layout):
    root = make_handmade(tmp_path / layout, layout, n=3, shape=(8, 8, 6))
    assert detect_layout(root) == layout
    subjects = discover(root)
    assert [s.subject for s in subjects] == EXPECTED_IDS[layout]
    for s in subjects:
        assert s.layout == layout
        assert tuple(s.images) == CANONICAL
        assert all(ref.path.is_file() for ref in s.images.values())
        assert s.seg is not None and s.seg.is_file()
        assert "phantom-truth" not in str(s.seg)
    if layout == "msd":
        # channels come from dataset.json: FLAIR, T1w, t1gd, T2w
        assert {m: r.channel for m, r in subjects[0].images.items()} == {"t1": 1, "t1c": 2, "t2": 3, "flair": 0}
        assert subjects[0].allowed_labels == frozenset({0, 1, 2, 3})
    else:
        assert all(r.channel is None for r in subjects[0].images.values())
        assert subjects[0].allowed_labels == ALLOWED_LABELS[layout]
    if layout == "bids":
        assert subjects[0].images["t1c"].path.name == "sub-000_ce-gadolinium_T1w.nii.gz"
        assert subjects[0].images["t1"].path.name == "sub-000_T1w.nii.gz"


def test_msd_trusts_dataset_json(tmp_path):
    root = make_handmade(tmp_path / "msd", "msd", n=1, shape=(8, 8, 6))
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2w", "1": "FLAIR", "2": "T1w", "3": "T1gd"}
    meta["labels"] = {"0": "background", "1": "tumour"}
    (root / "dataset.json").write_text(json.dumps(meta))
    (s,) = discover(root)
    assert {m: r.channel for m, r in s.images.items()} == {"t1": 2, "t1c": 3, "t2": 0, "flair": 1}
    assert s.allowed_labels == frozenset({0, 1})


def test_modalities_select_and_order(tmp_path):
    root = make_handmade(tmp_path / "d", "brats2023", n=1, shape=(8, 8, 6))
    (s,) = discover(root, modalities="flair,t1c")
    assert list(s.images) == ["flair", "t1c"]
    assert s.images["flair"].path.name.endswith("-t2f.nii.gz")
    assert parse_modalities(["T2", " t1 "]) == ("t2", "t1")
    with pytest.raises(ConfigError, match="unknown modality t3"):
        parse_modalities("t1,t3")


def test_other_brats_prefixes_and_layout_override(tmp_path):
    root = make_handmade(tmp_path / "d", "brats2023", n=1, shape=(8, 8, 6))
    src = root / "BraTS-GLI-00000-000"
    for prefix in ("MEN", "MET", "PED", "SSA"):
        sid = f"BraTS-{prefix}-00007-001"
        (root / sid).mkdir()
        for f in src.iterdir():
            shutil.copy(f, root / sid / f.name.replace("BraTS-GLI-00000-000", sid))
    ids = [s.subject for s in discover(root, layout="brats2023")]
    assert ids == sorted(["BraTS-GLI-00000-000"] + [f"BraTS-{p}-00007-001" for p in ("MEN", "MET", "PED", "SSA")])
    # forcing the wrong layout finds nothing and says so
    with pytest.raises(InputError, match="no brats2021 subjects"):
        discover(root, layout="brats2021")
    with pytest.raises(ConfigError, match="unknown layout"):
        discover(root, layout="nifti")


def test_bids_sessions_and_derivative_pipelines(tmp_path):
    root = make_handmade(tmp_path / "bids", "bids", n=1, shape=(8, 8, 6))
    # a second subject with a session folder and no label map
    img = next((root / "sub-000" / "anat").glob("*_T2w.nii.gz"))
    import nibabel as nib

    arr = nib.load(str(img)).get_fdata()
    for name in ("T1w", "ce-gd_T1w", "T2w", "FLAIR"):
        ent = name.split("_")
        fname = f"sub-009_ses-01_{name}.nii.gz" if len(ent) == 1 else f"sub-009_ses-01_{ent[0]}_{ent[1]}.nii.gz"
        save_nifti(root / "sub-009" / "ses-01" / "anat" / fname, arr.astype("float32"))
    subjects = discover(root)
    assert [s.subject for s in subjects] == ["sub-000", "sub-009_ses-01"]
    assert subjects[1].seg is None and subjects[1].images["t1c"].path.name.startswith("sub-009_ses-01_ce-gd")
    assert subjects[0].seg.parent.parent.parent.name == "tumour"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_phantom_layouts(tiny_cohorts, layout):
    """Every layout the phantom writes is found, with the ids of docs/architecture.md."""
    import pandas as pd

    root = tiny_cohorts[layout]
    assert detect_layout(root) == layout
    subjects = discover(root)
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert [s.subject for s in subjects] == sorted(participants["participant_id"])
    for s in subjects:
        assert tuple(s.images) == CANONICAL and s.seg is not None
        assert "phantom-truth" not in str(s.seg)
        assert all("phantom-truth" not in str(r.path) for r in s.images.values())
