"""The synthetic cohort: determinism, layouts, subtypes, labels, twins, participants.tsv."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from diffca_med.cli.app import app
from diffca_med.data import modalities as M
from diffca_med.data.phantom import (
    PARTICIPANT_COLUMNS, TRUTH_DIR, make_cohort, read_participants, synthesise_subject,
)
from diffca_med.data.phantom_tumours import SUBTYPES
from diffca_med.data.phantom_writers import image_paths, seg_path, subject_id
from diffca_med.errors import InputError

runner = CliRunner()


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, object]:
    """Tiny BraTS 2023 cohort: 7 subjects, 1 healthy, every tumour subtype at least twice."""
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    table = make_cohort(out, n_subjects=7, seed=3, layout="brats2023", grid="tiny",
                        healthy_fraction=0.15, workers=1)
    return out, table


def _subject(out: Path, sid: str, layout: str = "brats2023"):
    imgs = {m: _load(out / p) for m, p in image_paths(layout, sid).items()}
    twins = {m: _load(out / TRUTH_DIR / p) for m, p in image_paths(layout, sid).items()}
    return imgs, twins, _load(out / seg_path(layout, sid))


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    a = make_cohort(tmp_path / "a", n_subjects=3, seed=5, grid="tiny", workers=1)
    make_cohort(tmp_path / "b", n_subjects=3, seed=5, grid="tiny", workers=2)
    make_cohort(tmp_path / "c", n_subjects=3, seed=6, grid="tiny", workers=1)
    ha, hb, hc = (_hashes(tmp_path / x) for x in "abc")
    assert ha == hb and len(ha) == 3 * 9 + 2  # 5 files + 4 twins per subject, tsv, json
    images = [k for k in ha if k.endswith("-t1n.nii.gz")]
    assert images and all(ha[k] != hc[k] for k in images)
    assert list(a.columns) == list(PARTICIPANT_COLUMNS)


@pytest.mark.parametrize("layout", M.LAYOUTS)
def test_layout_files_names_and_headers(tmp_path, layout):
    out = tmp_path / layout
    table = make_cohort(out, n_subjects=2, seed=0, layout=layout, grid="tiny",
                        healthy_fraction=0.0, workers=1)
    assert list(table["participant_id"]) == [subject_id(layout, 0), subject_id(layout, 1)]
    expected = {
        "brats2023": ["BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
                      "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz",
                      "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2w.nii.gz",
                      "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
                      "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"],
        "brats2021": ["BraTS2021_00000/BraTS2021_00000_t1.nii.gz",
                      "BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz",
                      "BraTS2021_00000/BraTS2021_00000_t2.nii.gz",
                      "BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
                      "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"],
        "msd": ["imagesTr/BRATS_000.nii.gz", "labelsTr/BRATS_000.nii.gz", "dataset.json"],
        "bids": ["sub-000/anat/sub-000_T1w.nii.gz", "sub-000/anat/sub-000_ce-gadolinium_T1w.nii.gz",
                 "sub-000/anat/sub-000_T2w.nii.gz", "sub-000/anat/sub-000_FLAIR.nii.gz",
                 "derivatives/phantom/sub-000/anat/sub-000_dseg.nii.gz",
                 "dataset_description.json", "derivatives/phantom/dataset_description.json"],
    }[layout]
    for rel in expected + ["participants.tsv"]:
        assert (out / rel).is_file(), rel

    sid = subject_id(layout, 0)
    for rel in image_paths(layout, sid).values():
        img = nib.load(str(out / rel))
        twin = nib.load(str(out / TRUTH_DIR / rel))
        assert img.get_data_dtype() == np.float32
        assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
        assert img.header.get_zooms()[:3] == (4.0, 4.0, 4.0)
        assert img.shape == ((60, 60, 40, 4) if layout == "msd" else (60, 60, 40))
        np.testing.assert_array_equal(img.affine, twin.affine)
        assert twin.shape == img.shape
    seg = nib.load(str(out / seg_path(layout, sid)))
    assert seg.get_data_dtype() == np.uint8 and seg.shape == (60, 60, 40)
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= set(M.ALLOWED_LABELS[layout]) and len(values) > 1
    assert values - {0} <= set(M.TUMOUR_LABELS[layout].values())
    if layout == "msd":
        meta = json.loads((out / "dataset.json").read_text())
        assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
        assert meta["labels"]["3"] == "enhancing tumour" and meta["numTraining"] == 2
    if layout == "brats2021":
        assert 3 not in values


def test_layouts_hold_the_same_subjects(tmp_path):
    """Same seed, different layout: same voxels; MSD channels in FLAIR, T1w, T1gd, T2w order
    and labels translated (BraTS 2023 NCR 1, ED 2, ET 3 -> MSD 2, 1, 3)."""
    kw = dict(n_subjects=2, seed=4, grid="tiny", healthy_fraction=0.0, workers=1)
    make_cohort(tmp_path / "b23", layout="brats2023", **kw)
    make_cohort(tmp_path / "msd", layout="msd", **kw)
    for i in range(2):
        imgs, twins, seg = _subject(tmp_path / "b23", subject_id("brats2023", i))
        sid = subject_id("msd", i)
        data = _load(tmp_path / "msd" / "imagesTr" / f"{sid}.nii.gz")
        twin = _load(tmp_path / "msd" / TRUTH_DIR / "imagesTr" / f"{sid}.nii.gz")
        for c, m in enumerate(M.MSD_CHANNELS):
            np.testing.assert_array_equal(data[..., c], imgs[m])
            np.testing.assert_array_equal(twin[..., c], twins[m])
        msd_seg = _load(tmp_path / "msd" / "labelsTr" / f"{sid}.nii.gz")
        np.testing.assert_array_equal(msd_seg, np.select([seg == 1, seg == 2, seg == 3], [2, 1, 3], 0))


def test_subtypes_labels_and_contrasts(cohort):
    out, table = cohort
    assert set(table["subtype"]) >= set(SUBTYPES) and "healthy" in set(table["subtype"])
    lab = M.TUMOUR_LABELS["brats2023"]
    for _, row in table.iterrows():
        imgs, twins, seg = _subject(out, row["participant_id"])
        present = set(np.unique(seg).tolist()) - {0}
        if row["subtype"] == "healthy":
            assert present == set()
            continue
        assert lab["ED"] in present
        lesion = seg > 0
        # FLAIR is hyperintense in the lesion compared with the healthy twin
        assert imgs["flair"][lesion].mean() > 1.15 * twins["flair"][lesion].mean()
        if row["subtype"] == "infiltrative":
            assert lab["ET"] not in present and lab["NCR"] in present
            # no enhancement: T1c tracks T1 in the lesion
            ratio_t1c = imgs["t1c"][lesion].mean() / twins["t1c"][lesion].mean()
            assert ratio_t1c < 1.0
        else:
            et = seg == lab["ET"]
            assert et.any()
            # enhancement: bright on T1c, not on T1 (relative to the same healthy voxels)
            assert imgs["t1c"][et].mean() > 1.3 * twins["t1c"][et].mean()
            assert imgs["t1"][et].mean() < 1.1 * twins["t1"][et].mean()
        if row["subtype"] == "ring_enhancing":
            assert lab["NCR"] in present and row["n_lesions"] == 1
        if row["subtype"] == "multifocal_nodular":
            assert row["n_lesions"] >= 2


def test_tissue_contrasts_of_healthy_anatomy():
    from diffca_med.data.phantom import subject_rng
    from diffca_med.data.phantom_anatomy import grid_anatomy, subject_tissue

    subj = synthesise_subject("half", "healthy", 2, 0)
    tissue = subject_tissue(grid_anatomy("half"), subject_rng(2, 0))  # the same draw
    pure = {"wm": tissue.wm > 0.9, "gm": tissue.gm > 0.75,
            "csf": (tissue.brain - tissue.gm - tissue.wm) > 0.75}
    assert all(v.sum() > 100 for v in pure.values())
    mean = {m: {t: float(np.median(subj.twins[m][v])) for t, v in pure.items()} for m in M.CANONICAL}
    assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
    assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
    assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"]
    assert mean["t1c"]["wm"] > mean["t1c"]["gm"] > mean["t1c"]["csf"]
    brain = tissue.brain > 0.5
    assert all((subj.twins[m][~brain] == 0).all() for m in M.CANONICAL)  # skull-stripped


def test_twin_differs_only_around_the_tumour(cohort):
    out, table = cohort
    for _, row in table.iterrows():
        imgs, twins, seg = _subject(out, row["participant_id"])
        if row["subtype"] == "healthy":
            for m in M.CANONICAL:
                np.testing.assert_array_equal(imgs[m], twins[m])
            continue
        lesion = seg > 0
        # mass effect and partial volume reach < 24 mm (6 voxels of 4 mm) past the lesion
        near = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3)), iterations=6)
        for m in M.CANONICAL:
            np.testing.assert_array_equal(imgs[m][~near], twins[m][~near])
            diff = np.abs(imgs[m] - twins[m])
            assert diff[lesion].mean() > 0.05 * twins[m][lesion].mean()
        # the twin is a brain, not zeros, where the tumour is
        assert (twins["t1"][lesion] > 0).mean() > 0.9


def test_tumour_free_brain_slices_above_and_below(cohort):
    out, table = cohort
    for _, row in table[table["subtype"] != "healthy"].iterrows():
        imgs, _, seg = _subject(out, row["participant_id"])
        brain_k = np.flatnonzero((imgs["t1"] > 0).any(axis=(0, 1)))
        tumour_k = np.flatnonzero((seg > 0).any(axis=(0, 1)))
        assert brain_k.min() < tumour_k.min() and tumour_k.max() < brain_k.max()


def test_participants_consistent_with_seg(cohort):
    out, table = cohort
    read = read_participants(out)
    assert list(read.columns) == list(PARTICIPANT_COLUMNS)
    assert read["participant_id"].tolist() == table["participant_id"].tolist()
    for _, row in read.iterrows():
        path = out / seg_path("brats2023", row["participant_id"])
        img = nib.load(str(path))
        seg = np.asarray(img.dataobj) > 0
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        assert row["tumour_volume_ml"] == pytest.approx(seg.sum() * voxel_ml, abs=1e-3)
        assert row["sex"] in ("F", "M") and 18 <= row["age"] <= 90
        if not seg.any():
            assert row["subtype"] == "healthy" and row["hemisphere"] == "none"
            assert row["n_lesions"] == 0 and np.isnan(row["centroid_x"])
            continue
        ijk = np.argwhere(seg).mean(axis=0)
        np.testing.assert_allclose(row[["centroid_i", "centroid_j", "centroid_k"]].astype(float), ijk, atol=0.01)
        xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3]
        np.testing.assert_allclose(row[["centroid_x", "centroid_y", "centroid_z"]].astype(float), xyz, atol=0.01)
        # RAS world: x > 0 is the subject's right
        assert row["hemisphere"] == ("right" if xyz[0] >= 0 else "left")


def test_refuses_non_empty_out_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        make_cohort(out, n_subjects=1, grid="tiny", workers=1)
    args = ["phantom", str(out), "-n", "1", "--grid", "tiny", "--workers", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "not empty" in res.output and "Traceback" not in res.output
    assert (out / "keep.txt").exists()
    res = runner.invoke(app, args + ["--force", "--layout", "brats2021"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists()
    assert (out / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz").is_file()
    assert "phantom-truth" in res.output


@pytest.mark.parametrize("opt", [["--layout", "nifti"], ["--grid", "huge"], ["-n", "0"],
                                 ["--healthy-fraction", "1.5"], ["--seed", "-1"]])
def test_bad_options_one_line(tmp_path, opt):
    res = runner.invoke(app, ["phantom", str(tmp_path / "o"), "--grid", "tiny", *opt])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_tiny_subject_is_fast():
    synthesise_subject("tiny", "ring_enhancing", 0, 0)  # warm the template cache
    t0 = time.perf_counter()
    for i, sub in enumerate(SUBTYPES):
        synthesise_subject("tiny", sub, 0, i)
    assert (time.perf_counter() - t0) / len(SUBTYPES) < 1.0


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    import diffca_med.data.phantom as phantom

    real = phantom._make_one

    def flaky(job):
        if job[-1] == 1:
            raise RuntimeError("disk full")
        return real(job)

    monkeypatch.setattr(phantom, "_make_one", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        make_cohort(tmp_path / "out", n_subjects=2, grid="tiny", workers=1)
    assert list(tmp_path.iterdir()) == []
