"""Every bad-input case of ``prepare`` through the CLI: one line naming the file and the
problem, exit status 2, no traceback, nothing left at OUT (no store, no temporary)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LPS_AFFINE, save_nifti
from diffca_med.cli.app import app

runner = CliRunner()
SID = "BraTS-GLI-00001-000"


def run(*args: str):
    return runner.invoke(app, ["prepare", *[str(a) for a in args], "--quiet", "--size", "16"])


def assert_clean_failure(result, out, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return errors[0]


def f(root, mod: str, sid: str = SID):
    return root / sid / f"{sid}-{mod}.nii.gz"


def test_missing_and_empty_folder(tmp_path):
    out = tmp_path / "store"
    assert_clean_failure(run(tmp_path / "nope", out), out, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run(tmp_path / "empty", out), out, "empty", "folder is empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert_clean_failure(run(tmp_path / "junk", out), out, "junk", "cannot tell the layout")


def test_missing_modality_and_skip(handmade, tmp_path):
    f(handmade, "t2w").unlink()
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, SID, "missing modality t2", "--skip-incomplete")
    ok = run(handmade, out, "--skip-incomplete")
    assert ok.exit_code == 0, ok.output
    assert "warning: skipped 1 incomplete subject(s)" in ok.output and SID in ok.output
    # the modality is not needed when not requested
    ok2 = run(handmade, tmp_path / "store2", "--modalities", "t1c,flair")
    assert ok2.exit_code == 0, ok2.output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip(handmade, tmp_path, workers):
    path = f(handmade, "t2w")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "store"
    line = assert_clean_failure(run(handmade, out, "--workers", workers), out, f"{SID}-t2w.nii.gz", "truncated or corrupt")
    assert SID + "/" in line  # names the file relative to the data folder


def test_corrupt_gzip_stream(handmade, tmp_path):
    path = f(handmade, "t1c")
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)  # garbage in the deflate stream, header intact
    path.write_bytes(bytes(raw))
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t1c.nii.gz", "corrupt")


def test_not_a_nifti(handmade, tmp_path):
    f(handmade, "t1n").write_bytes(gzip.compress(b"this is not an image" * 10))
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t1n.nii.gz", "not a readable NIfTI")


def test_shape_mismatch(handmade, tmp_path):
    save_nifti(f(handmade, "t2f"), np.ones((24, 28, 15), np.float32))
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t2f.nii.gz", "shape (24, 28, 15) differs")


def test_affine_mismatch(handmade, tmp_path):
    path = f(handmade, "t2f")
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 1e-4  # within tolerance: accepted
    save_nifti(path, arr, shifted)
    ok = run(handmade, tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    shifted[0, 3] += 0.5
    save_nifti(path, arr, shifted)
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t2f.nii.gz", "affine differs", "0.5")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_label_outside_convention(handmade, tmp_path, workers):
    path = f(handmade, "seg")
    seg = np.asanyarray(nib.load(str(path)).dataobj).copy()
    seg[10, 10, 8] = 7
    save_nifti(path, seg)
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out, "--workers", workers), out, f"{SID}-seg.nii.gz", "label values [7]")


def test_brats2021_label_3_is_illegal(tmp_path):
    from conftest import make_handmade

    root = make_handmade(tmp_path / "d21", "brats2021", n=1, shape=(12, 12, 8))
    path = root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    seg = np.asanyarray(nib.load(str(path)).dataobj).copy()
    seg[seg == 4] = 3
    save_nifti(path, seg)
    out = tmp_path / "store"
    assert_clean_failure(run(root, out), out, "BraTS2021_00000_seg.nii.gz", "label values [3]", "[0, 1, 2, 4]")


@pytest.mark.parametrize("shape,dims", [((24, 28), "2-D"), ((24, 28, 16, 2, 2), "5-D")])
def test_wrong_dimensionality(handmade, tmp_path, shape, dims):
    save_nifti(f(handmade, "t1n"), np.ones(shape, np.float32))
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t1n.nii.gz", f"found a {dims} image")


def test_nonfinite_voxels_and_zeroing(handmade, tmp_path):
    path = f(handmade, "t1c")
    arr = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    arr[5:7, 10, 8] = np.nan
    arr[12, 12, 8] = np.inf
    save_nifti(path, arr)
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-t1c.nii.gz", "3 NaN/inf voxel(s)", "--zero-nonfinite")
    ok = run(handmade, out, "--zero-nonfinite")
    assert ok.exit_code == 0, ok.output
    assert "warning:" in ok.output and "set 3 NaN/inf voxel(s) to 0" in ok.output
    from diffca_med.data import SliceStore

    assert np.isfinite(SliceStore(out).images).all()


def test_bad_options(handmade, tmp_path):
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out, "--modalities", "t1,dwi"), out, "--modalities", "dwi")
    assert_clean_failure(run(handmade, out, "--val-fraction", "0.7", "--test-fraction", "0.5"), out, "--val-fraction")
    assert_clean_failure(run(handmade, out, "--layout", "nifti"), out, "--layout")


def test_existing_folder_that_is_not_a_store(handmade, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run(handmade, out)
    assert result.exit_code == 2 and "is not a slice store" in result.output
    assert (out / "precious.txt").read_text() == "keep me"


def test_all_zero_images(handmade, tmp_path):
    for mod in ("t1n", "t1c", "t2w", "t2f"):
        save_nifti(f(handmade, mod), np.zeros((24, 28, 16), np.float32))
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, SID, "all zero")


def test_non_integer_label_map(handmade, tmp_path):
    path = f(handmade, "seg")
    seg = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    seg[3, 3, 3] = 1.5
    save_nifti(path, seg)
    out = tmp_path / "store"
    assert_clean_failure(run(handmade, out), out, f"{SID}-seg.nii.gz", "non-integer")
