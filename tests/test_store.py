"""The slice store: arrays and tables, the torch Dataset, balanced sampling, slice labels,
subject splits, and the geometry round trip back into the original NIfTI grid."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import LPS_AFFINE, handmade_subject, make_handmade
from diffca_med.data import SliceDataset, SliceStore, balanced_sampler
from diffca_med.data.splits import split_subjects
from diffca_med.data.store_writer import label_slices, min_tumour_pixels
from diffca_med.errors import ConfigError, InputError
from diffca_med.pipelines.prepare import PrepareOptions, prepare

SHAPE = (24, 28, 16)


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    base = tmp_path_factory.mktemp("store16")
    make_handmade(base / "data", "brats2023", n=6, shape=SHAPE)
    opts = PrepareOptions(size=16, val_fraction=0.25, test_fraction=0.25, seed=3)
    prepare(base / "data", base / "store", opts, workers=1, progress=False)
    return SliceStore(base / "store")


def test_arrays_and_tables(store16):
    st = store16
    n = len(st.index)
    assert st.images.shape == (n, 4, 16, 16) and st.images.dtype == np.float32
    assert st.seg.shape == st.brain.shape == (n, 16, 16)
    assert st.seg.dtype == st.brain.dtype == np.uint8
    assert isinstance(st.images, np.memmap)
    assert 0.0 <= float(st.images.min()) and float(st.images.max()) <= 1.0
    assert st.modalities == ("t1", "t1c", "t2", "flair") and st.size == 16
    assert set(st.index["label"]) <= {"healthy", "tumour", "excluded"}
    # outside the brain every channel is 0
    assert float(np.abs(st.images * (1 - st.brain[:, None])).max()) == 0.0
    # index columns agree with the arrays
    assert np.array_equal(st.index["brain_pixels"].to_numpy(), st.brain.sum(axis=(1, 2)))
    assert np.array_equal(st.index["tumour_pixels"].to_numpy(), (st.seg > 0).sum(axis=(1, 2)))
    assert st.subjects_table["n_slices"].sum() == n
    assert set(st.subjects_table["split"]) <= {"train", "val", "test"}
    files = st.source_files(st.subjects[0])
    assert set(files) == {"t1", "t1c", "t2", "flair", "seg"} and files["t1"].path.name.endswith("-t1n.nii.gz")


def test_slice_labels_follow_the_seg(store16):
    st = store16
    idx = st.index
    thr = min_tumour_pixels(16, st.meta["thresholds"]["min_tumour_fraction"])
    healthy, tumour = idx["label"] == "healthy", idx["label"] == "tumour"
    assert healthy.any() and tumour.any()
    assert (idx.loc[healthy, "tumour_voxels"] == 0).all()
    assert (idx.loc[tumour, "tumour_pixels"] >= thr).all()
    # healthy subjects (every third hand-made subject) have no tumour slices
    for _, row in st.subjects_table.iterrows():
        labels = set(idx.loc[idx["subject"] == row["subject"], "label"])
        assert ("tumour" in labels) == bool(row["has_tumour"])
    # tumour_voxels counts the source seg per RAS axial slice (LPS affine: z kept as is)
    sub = st.subjects[0]
    _, seg = handmade_subject(SHAPE, seed=0, tumour=True)
    rows = st.subject_rows(sub)
    for r in rows:
        z = int(idx.loc[r, "slice"])
        assert idx.loc[r, "tumour_voxels"] == int((seg[:, :, z] > 0).sum())


def test_axial_position_spans_each_subject(store16):
    pos = store16.axial_position()
    assert pos.shape == (len(store16),) and pos.min() == 0.0 and pos.max() == 1.0
    for subject in store16.subjects:
        rows = store16.subject_rows(subject)
        order = np.argsort(store16.index["slice"].to_numpy()[rows])
        p = pos[rows][order]
        assert p[0] == 0.0 and p[-1] == 1.0 and (np.diff(p) > 0).all()


def test_label_rule_thresholds():
    labels, frac = label_slices(
        np.array([0, 0, 5, 50, 50]), np.array([0, 0, 1, 30, 30]), np.array([100, 10, 100, 100, 20]),
        size=64, min_brain_fraction=0.3, min_tumour_fraction=0.005,
    )
    assert list(labels) == ["healthy", "excluded", "excluded", "tumour", "excluded"]
    assert frac[1] == pytest.approx(0.1)


def test_dataset_can_leave_out_thin_tumour_slices(store16):
    full = SliceDataset(store16, split=None)
    pixels = store16.index["tumour_pixels"].to_numpy()[full.indices]
    cut = float(np.median(pixels[full.labels == 1])) / 16**2  # half the tumour slices are thinner
    strict = SliceDataset(store16, split=None, min_tumour_fraction=cut)
    kept = store16.index["tumour_pixels"].to_numpy()[strict.indices]
    assert (strict.labels == 0).sum() == (full.labels == 0).sum()  # healthy slices all stay
    assert 0 < (strict.labels == 1).sum() < (full.labels == 1).sum()
    assert (kept[strict.labels == 1] >= cut * 16**2).all()
    assert [int(strict[i]["row"]) for i in range(3)] == list(strict.indices[:3])


def test_dataset_and_balanced_sampler(store16):
    ds = SliceDataset(store16, split=None)
    item = ds[0]
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.float32
    assert item["brain"].shape == (1, 16, 16)
    assert item["label"].dtype == torch.long and int(item["label"]) in (0, 1)
    assert store16.index.loc[item["row"], "label"] in ("healthy", "tumour")
    n_tumour = int((ds.labels == 1).sum())
    assert 0 < n_tumour < len(ds)
    sampler = balanced_sampler(ds, num_samples=4000, seed=1)
    drawn = ds.labels[np.fromiter(iter(sampler), dtype=np.int64)]
    assert abs((drawn == 1).mean() - 0.5) < 0.05
    assert list(balanced_sampler(ds, 50, seed=2)) == list(balanced_sampler(ds, 50, seed=2))
    # pickles by path (DataLoader workers), not by copying the arrays
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 100_000 and torch.equal(clone[3]["image"], ds[3]["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=balanced_sampler(ds, 16))
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 4, 16, 16)


def test_splits_are_by_subject(store16):
    idx = store16.index
    per_subject = idx.groupby("subject")["split"].nunique()
    assert (per_subject == 1).all()
    subj = store16.subjects_table.set_index("subject")["split"]
    assert (idx["split"].to_numpy() == subj.loc[idx["subject"]].to_numpy()).all()
    assert {"train", "val", "test"} == set(subj)


def test_split_subjects_stratified_and_seeded():
    ids = [f"s{i:02d}" for i in range(40)]
    tumour = [i % 4 != 0 for i in range(40)]
    a = split_subjects(ids, tumour, 0.2, 0.2, seed=5)
    assert a == split_subjects(list(reversed(ids)), list(reversed(tumour)), 0.2, 0.2, seed=5)
    assert a != split_subjects(ids, tumour, 0.2, 0.2, seed=6)
    for flag, n in ((True, 30), (False, 10)):
        members = [s for s, t in zip(ids, tumour) if t == flag]
        counts = {k: sum(a[s] == k for s in members) for k in ("train", "val", "test")}
        assert counts["test"] == round(n * 0.2) and counts["val"] == round(n * 0.2)
    with pytest.raises(ConfigError):
        split_subjects(ids, tumour, 0.6, 0.5)


@pytest.mark.parametrize(
    "affine",
    [
        LPS_AFFINE,
        np.diag([2.0, 2.0, 3.0, 1.0]),  # RAS
        np.array([[0, 0, 3.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]]),  # permuted axes
    ],
    ids=["LPS", "RAS", "permuted"],
)
def test_geometry_round_trip(tmp_path, affine):
    make_handmade(tmp_path / "data", "brats2023", n=1, shape=SHAPE, affine=affine)
    images, seg = handmade_subject(SHAPE, seed=0, tumour=True)
    brain = images["t1"] != 0
    square = None
    for size, tol in ((16, 0.06), (None, 1e-5)):  # None: size = the padded square, no resampling
        size = size or square
        out = tmp_path / f"store{size}"
        prepare(tmp_path / "data", out, PrepareOptions(size=size), workers=1, progress=False)
        st = SliceStore(out)
        sub = st.subjects[0]
        square = st.geometry[sub]["square"]
        rows = st.subject_rows(sub)
        vol = st.to_volume(sub, st.images[rows], rescale=True)
        assert vol.shape == (*SHAPE, 4)
        for c, m in enumerate(st.modalities):
            lo, hi = st.geometry[sub]["intensity"][m]
            # lesion-robust scale: the 0.5th percentile maps to 0, the brain median to 0.3
            inside = images[m][brain]
            assert lo == pytest.approx(np.percentile(inside, 0.5), rel=1e-5)
            assert lo + 0.3 * (hi - lo) == pytest.approx(np.median(inside), rel=1e-5)
            err = np.abs(vol[..., c] - np.clip(images[m], lo, hi))[brain].mean() / (hi - lo)
            assert err < tol, (size, m, err)
        if size == square:  # no resampling: the background comes back exactly 0
            assert float(np.abs(vol[~brain]).max()) == 0.0
        back = st.to_volume(sub, st.seg[rows], order=0)
        assert back.shape == SHAPE and back.dtype == np.uint8
        dice = 2 * ((back > 0) & (seg > 0)).sum() / ((back > 0).sum() + (seg > 0).sum())
        assert dice > (0.999 if size == square else 0.75), (size, dice)
        # the brain mask lands back on the brain
        mask = st.to_volume(sub, st.brain[rows], order=0) > 0
        assert ((mask & brain).sum() / brain.sum()) > 0.9
        # the RAS crop box of geometry.json bounds the brain of the reoriented volume
        geom = st.geometry[sub]
        ras_brain = nib.orientations.apply_orientation(brain, np.asarray(geom["ornt"]))
        assert list(ras_brain.shape) == geom["ras_shape"]
        nz = [np.flatnonzero(ras_brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        assert [int(v[0]) for v in nz] == geom["crop_start"] and [int(v[-1]) + 1 for v in nz] == geom["crop_end"]
        assert list(st.index.loc[rows, "slice"]) == list(range(geom["crop_start"][2], geom["crop_end"][2]))
        # a volume saved with the source affine overlays the source file
        src = nib.load(str(st.source_files(sub)["t1"].path))
        assert np.allclose(st.source_affine(sub), src.affine)


def test_store_reuse_force_and_option_change(tmp_path, capsys):
    data = make_handmade(tmp_path / "data", "brats2023", n=2, shape=SHAPE)
    out = tmp_path / "store"
    first = prepare(data, out, PrepareOptions(size=16), workers=1, progress=False)
    assert not first.reused
    stamp = (out / "images.npy").stat().st_mtime_ns
    messages = []
    again = prepare(data, out, PrepareOptions(size=16), workers=1, progress=False, info=messages.append)
    assert again.reused and any("reusing existing store" in m for m in messages)
    assert (out / "images.npy").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="size 16 -> 24.*--force"):
        prepare(data, out, PrepareOptions(size=24), workers=1, progress=False)
    assert SliceStore(out).size == 16  # untouched
    rebuilt = prepare(data, out, PrepareOptions(size=24), workers=1, progress=False, force=True)
    assert not rebuilt.reused and SliceStore(out).size == 24
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="not a slice store"):
        SliceStore(tmp_path)
