"""``diffca-med prepare`` end to end on tiny phantoms: CLI output, reuse, determinism
across worker counts, channel selection, and the shared ``tiny_store`` fixture."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from diffca_med.cli.app import app
from diffca_med.data import SliceDataset, SliceStore, balanced_sampler
from diffca_med.data.modalities import LAYOUTS

runner = CliRunner()


def test_cli_prepare_reuse_and_force(tiny_cohorts, tmp_path):
    data, out = tiny_cohorts["brats2021"], tmp_path / "store"
    args = ["prepare", str(data), str(out), "--size", "24", "--workers", "2", "--val-fraction", "0.34"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    for word in ("slice store", "train", "val", "test", "total", "healthy", "tumour", "excluded"):
        assert word in first.output
    assert f"wrote {out}" in first.output
    st = SliceStore(out)
    assert st.layout == "brats2021" and st.size == 24 and len(st.subjects) == 3
    meta = json.loads((out / "store.json").read_text())
    assert meta["counts"]["slices"] == len(st.index) and len(meta["fingerprint"]) == 64
    # the summary's total row matches the store
    counts = st.index["label"].value_counts()
    total = next(line for line in first.output.splitlines() if "total" in line)
    numbers = [int(tok) for tok in total.replace("│", " ").split() if tok.isdigit()]
    assert numbers == [3, int(st.subjects_table["has_tumour"].sum())] + [
        int(counts.get(k, 0)) for k in ("healthy", "tumour", "excluded")
    ]

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "reusing existing store" in again.output
    changed = runner.invoke(app, args[:-2] + ["--val-fraction", "0.5"])
    assert changed.exit_code == 2 and "--force" in changed.output and "val_fraction" in changed.output
    forced = runner.invoke(app, args + ["--force", "--quiet"])
    assert forced.exit_code == 0 and "reusing" not in forced.output


def test_workers_do_not_change_the_store(tiny_cohorts, tmp_path):
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    data = tiny_cohorts["msd"]
    a = prepare(data, tmp_path / "a", PrepareOptions(size=16), workers=1, progress=False)
    b = prepare(data, tmp_path / "b", PrepareOptions(size=16), workers=2, progress=False)
    sa, sb = SliceStore(a.store), SliceStore(b.store)
    assert np.array_equal(sa.images, sb.images) and np.array_equal(sa.seg, sb.seg)
    pd.testing.assert_frame_equal(sa.index, sb.index)


def test_modalities_choose_channels(tiny_cohorts, tmp_path):
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    data = tiny_cohorts["bids"]
    full = SliceStore(prepare(data, tmp_path / "full", PrepareOptions(size=16), workers=1, progress=False).store)
    two = SliceStore(
        prepare(data, tmp_path / "two", PrepareOptions(size=16, modalities="flair,t1c"), workers=1, progress=False).store
    )
    assert two.modalities == ("flair", "t1c") and two.images.shape[1] == 2
    np.testing.assert_allclose(two.images[:, 0], full.images[:, 3], atol=1e-6)
    np.testing.assert_allclose(two.images[:, 1], full.images[:, 1], atol=1e-6)


def test_every_layout_gives_the_same_slices(tiny_cohorts, tmp_path):
    """The four layouts of one phantom seed hold the same volumes, so the stores agree."""
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    stores = {
        lay: SliceStore(prepare(tiny_cohorts[lay], tmp_path / lay, PrepareOptions(size=16), workers=1, progress=False).store)
        for lay in LAYOUTS
    }
    ref = stores["brats2023"]
    for lay, st in stores.items():
        assert st.layout == lay
        assert list(st.index["label"]) == list(ref.index["label"]), lay
        np.testing.assert_allclose(st.images, ref.images, atol=1e-5)


def test_tiny_store_contract(tiny_store):
    st = SliceStore(tiny_store)
    assert st.size == 32 and st.modalities == ("t1", "t1c", "t2", "flair")
    assert len(st.subjects) == 6 and set(st.subjects_table["split"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        ds = SliceDataset(st, split=split)
        assert len(ds) > 0 and set(np.unique(ds.labels)) <= {0, 1}
    train = SliceDataset(st, split="train")
    assert set(np.unique(train.labels)) == {0, 1}
    assert len(list(balanced_sampler(train, 10))) == 10
    sub = st.subjects[0]
    vol = st.to_volume(sub, st.images[st.subject_rows(sub)])
    assert vol.shape == (60, 60, 40, 4)  # the tiny phantom grid


def test_subject_without_label_map_is_never_called_healthy(tmp_path):
    from conftest import make_handmade
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    data = make_handmade(tmp_path / "d", "brats2023", n=2, shape=(12, 14, 8))
    (data / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz").unlink()
    messages = []
    res = prepare(data, tmp_path / "s", PrepareOptions(size=16), workers=1, progress=False, warn=messages.append)
    st = SliceStore(res.store)
    labels = set(st.index.loc[st.index["subject"] == "BraTS-GLI-00001-000", "label"])
    assert labels == {"excluded"}
    assert any("no tumour label map" in m and "BraTS-GLI-00001-000" in m for m in messages)
    assert st.source_files("BraTS-GLI-00001-000")["seg"] is None


def test_isal_and_nibabel_decoding_agree(tmp_path, monkeypatch):
    """The ISA-L fast path and nibabel's own decoding give the same store and errors."""
    from conftest import make_handmade
    from diffca_med.data import niftigz
    from diffca_med.errors import InputError
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    data = make_handmade(tmp_path / "d", "msd", n=2, shape=(12, 14, 8))
    fast = SliceStore(prepare(data, tmp_path / "fast", PrepareOptions(size=16), workers=1, progress=False).store)
    monkeypatch.setattr(niftigz, "igzip", None)
    slow = SliceStore(prepare(data, tmp_path / "slow", PrepareOptions(size=16), workers=1, progress=False).store)
    np.testing.assert_array_equal(fast.images, slow.images)
    pd.testing.assert_frame_equal(fast.index, slow.index)
    path = data / "imagesTr" / "BRATS_001.nii.gz"
    path.write_bytes(path.read_bytes()[:-200])
    import pytest

    with pytest.raises(InputError, match="BRATS_001.nii.gz: truncated or corrupt"):
        prepare(data, tmp_path / "x", PrepareOptions(size=16), workers=1, progress=False)
