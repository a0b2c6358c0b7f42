"""Anomaly maps/thresholds, counterfactual NIfTI geometry, determinism, embeddings."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from scipy import ndimage
import pandas as pd
import pytest
import SimpleITK as sitk
from analysis_helpers import save_tiny_model

from diffca_med.analysis.anomaly import (
    anomaly_map,
    anomaly_mask,
    healthy_region_fidelity,
    largest_components,
    most_affected_slices,
    threshold_value,
)
from diffca_med.analysis.counterfactuals import GenerationOptions, generate, nifti_stem, run_pseudo_healthy, write_like
from diffca_med.analysis.embeddings import SLICE_KEYS, SUBJECT_KEYS, run_embed, subject_table
from diffca_med.data.store import SliceStore
from diffca_med.errors import ConfigError, InputError
from diffca_med.models import DiffCAModel


# ------------------------------------------------------------------ pure functions
def test_anomaly_map_combines_modalities_and_masks_brain():
    x = np.zeros((2, 2, 4, 4), np.float32)
    p = np.zeros_like(x)
    x[0, 0, 1, 1], x[0, 1, 1, 1] = 0.8, 0.2  # |diff| 0.8 and 0.2 at one pixel
    x[1, 1, 3, 3] = 0.5  # outside the brain below
    brain = np.ones((2, 4, 4), bool)
    brain[1, 3, 3] = False
    mean = anomaly_map(x, p, brain, "mean")
    mx = anomaly_map(x, p, brain, "max")
    assert mean.shape == (2, 4, 4) and mean.dtype == np.float32
    assert mean[0, 1, 1] == pytest.approx(0.5) and mx[0, 1, 1] == pytest.approx(0.8)
    assert mean[1, 3, 3] == 0.0 and mx[1, 3, 3] == 0.0
    with pytest.raises(ConfigError):
        anomaly_map(x, p, brain, "median")


def test_otsu_separates_two_populations_and_other_thresholds():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.05, 0.01, 5000), rng.normal(0.6, 0.05, 500)
    values = np.concatenate([low, high])
    t = threshold_value(values, "otsu")
    assert (high > t).all() and (low > t).mean() < 0.01
    # agrees with a direct maximisation of the between-class variance
    h, e = np.histogram(values, 256)
    c = (e[:-1] + e[1:]) / 2
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c) / np.maximum(w0, 1)
    m1 = (np.sum(h * c) - np.cumsum(h * c)) / np.maximum(w1, 1)
    assert abs(t - c[np.argmax(w0 * w1 * (m0 - m1) ** 2)]) < 2 * (e[1] - e[0])
    assert threshold_value(values, "percentile", 90) == pytest.approx(np.percentile(values, 90))
    assert threshold_value(values, "fixed", 0.3) == 0.3
    with pytest.raises(ConfigError):
        threshold_value(values, "fixed")
    with pytest.raises(ConfigError):
        threshold_value(values, "percentile", 150)
    with pytest.raises(ConfigError):
        threshold_value(values, "triangle")


def test_anomaly_mask_recovers_a_blob_and_most_affected_orders_by_area():
    rng = np.random.default_rng(1)
    amap = rng.uniform(0, 0.05, (5, 16, 16)).astype(np.float32)
    amap[2, 4:10, 4:10] = 0.7  # 36 px
    amap[4, 1:4, 1:4] = 0.7  # 9 px
    brain = np.ones_like(amap, bool)
    mask, thr = anomaly_mask(amap, brain)
    assert mask.dtype == np.uint8
    assert mask[2, 4:10, 4:10].all() and mask[4, 1:4, 1:4].all()
    assert mask.sum() == 36 + 9
    assert list(most_affected_slices(amap, mask, 2)) == [2, 4]


def test_largest_components_keeps_the_biggest_3d_parts():
    mask = np.zeros((6, 12, 12), bool)
    mask[1:4, 2:6, 2:6] = True  # 48 voxels over three consecutive slices: one 3-D part
    mask[0, 9:11, 9:11] = True  # 4 voxels
    mask[5, 0, 0] = True  # 1 voxel
    one = largest_components(mask, 1)
    assert one.sum() == 48 and one[1:4, 2:6, 2:6].all()
    assert largest_components(mask, 2).sum() == 52
    assert np.array_equal(largest_components(mask, 0), mask)
    assert np.array_equal(largest_components(mask, 5), mask)
    # slices touching diagonally are one part (26-connectivity across consecutive slices)
    diag = np.zeros((2, 4, 4), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert largest_components(diag, 1).sum() == 2


def test_healthy_region_fidelity_ignores_the_dilated_anomaly():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (3, 2, 24, 24)).astype(np.float32)
    p = x.copy()
    p[1, :, 10:14, 10:14] = 0.0  # a change confined to the anomaly
    brain = np.ones((3, 24, 24), bool)
    anomaly = np.zeros((3, 24, 24), np.uint8)
    anomaly[1, 11:13, 11:13] = 1
    fid = healthy_region_fidelity(x, p, brain, anomaly, dilation=2)
    assert fid["psnr"] == float("inf") and fid["ssim"] > 0.9
    undilated = healthy_region_fidelity(x, p, brain, anomaly, dilation=0)
    assert np.isfinite(undilated["psnr"])  # the change leaks outside the undilated mask


def test_write_like_keeps_header_geometry(tmp_path):
    affine = np.array([[-2.0, 0.1, 0, 90], [0, 2.0, 0, -120], [0, 0, 3.0, -60], [0, 0, 0, 1]])
    ref = nib.Nifti1Image(np.zeros((5, 6, 7, 3), np.int16), affine)
    ref.set_qform(affine, code=1)
    ref.set_sform(affine, code=4)
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(ref, ref_path)
    ref = nib.load(ref_path)
    out = write_like(np.ones((5, 6, 7)), ref, tmp_path / "out.nii.gz")
    img = nib.load(out)
    assert img.shape == (5, 6, 7) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
    assert np.allclose(img.header.get_qform(), ref.header.get_qform())
    assert nifti_stem(tmp_path / "a.b.nii.gz") == "a.b"


# --------------------------------------------------------------- with a tiny model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def ph_run(model_dir, tiny_store, tmp_path_factory):
    store = SliceStore(tiny_store)
    subject = store.subjects_table.loc[store.subjects_table["has_tumour"].astype(bool), "subject"].iloc[0]
    out = tmp_path_factory.mktemp("ph") / "out"
    gen = GenerationOptions(seed=3, steps=1, batch_size=16)
    summaries = run_pseudo_healthy(model_dir, tiny_store, out, subjects=[subject], generation=gen,
                                   write_slices=True, progress=False)
    return out, subject, summaries, store


def test_pseudo_healthy_volumes_match_input_geometry(ph_run):
    out, subject, summaries, store = ph_run
    s = summaries[0]
    sources = store.source_files(subject)
    for mod in ("t1c", "flair"):
        src = nib.load(sources[mod].path)
        path = out / subject / s["outputs"][mod]
        assert path.name == f"{nifti_stem(sources[mod].path)}_pseudohealthy.nii.gz"
        gen = nib.load(path)
        assert gen.shape == src.shape
        assert np.allclose(gen.affine, src.affine)
        assert nib.aff2axcodes(gen.affine) == nib.aff2axcodes(src.affine)
        assert gen.get_data_dtype() == np.float32
        for kind in ("qform", "sform"):
            a, ca = getattr(src.header, f"get_{kind}")(coded=True)
            b, cb = getattr(gen.header, f"get_{kind}")(coded=True)
            assert int(ca) == int(cb) and np.allclose(a, b)
        itk_src, itk_gen = sitk.ReadImage(str(sources[mod].path)), sitk.ReadImage(str(path))
        assert itk_gen.GetSize() == itk_src.GetSize()
        assert np.allclose(itk_gen.GetOrigin(), itk_src.GetOrigin())
        assert np.allclose(itk_gen.GetDirection(), itk_src.GetDirection())
        assert np.allclose(itk_gen.GetSpacing(), itk_src.GetSpacing())
        # outside the brain the original voxels are kept
        data, orig = np.asanyarray(gen.dataobj), np.asanyarray(src.dataobj)
        assert np.array_equal(data[orig == 0], orig[orig == 0].astype(np.float32)) or (data[orig == 0] == 0).mean() > 0.9
    mask = nib.load(out / subject / s["outputs"]["anomaly_mask"])
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
    amap = nib.load(out / subject / s["outputs"]["anomaly"])
    assert amap.shape == mask.shape and amap.get_data_dtype() == np.float32
    # the mask volume in ml is what the summary reports
    voxel_ml = float(np.prod(mask.header.get_zooms()[:3])) / 1000
    assert s["anomaly_volume_ml"] == pytest.approx(np.asanyarray(mask.dataobj).sum() * voxel_ml)
    seg = nib.load(sources["seg"])
    assert s["tumour_volume_ml"] == pytest.approx((np.asanyarray(seg.dataobj) > 0).sum() * voxel_ml)
    assert len(s["previews"]) == 3 and all((out / subject / p).is_file() for p in s["previews"])
    table = pd.read_csv(out / "summary.csv")
    assert list(table["subject"]) == [subject]


def test_slices_option_writes_stack_and_pngs(ph_run):
    out, subject, summaries, store = ph_run
    stack = np.load(out / subject / "slices" / "pseudo_healthy.npy")
    n = len(store.subject_rows(subject))
    assert stack.shape == (n, 2, store.size, store.size) and stack.dtype == np.float32
    assert len(list((out / subject / "slices").glob("*.png"))) == n


def test_same_seed_same_output_and_rerun_is_skipped(ph_run, model_dir, tiny_store):
    out, subject, summaries, store = ph_run
    model = DiffCAModel.from_pretrained(model_dir).eval()
    rows = store.subject_rows(subject)[:6]
    x = np.asarray(store.images[rows][:, [store.modalities.index(m) for m in model.config.modalities]])
    a = generate(model, x, GenerationOptions(seed=3, steps=1, batch_size=4))
    b = generate(model, x, GenerationOptions(seed=3, steps=1, batch_size=4))
    c = generate(model, x, GenerationOptions(seed=4, steps=1, batch_size=4))
    assert a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, c)
    # the run (seed 3, batch size 16) equals a direct generation of its first batch
    first = store.subject_rows(subject)[:16]
    x16 = np.asarray(store.images[first][:, [store.modalities.index(m) for m in model.config.modalities]])
    d = generate(model, x16, GenerationOptions(seed=3, steps=1, batch_size=16))
    brain = np.asarray(store.brain[first]) > 0
    stack = np.load(out / subject / "slices" / "pseudo_healthy.npy")
    assert np.array_equal(stack[: len(first)], np.where(brain[:, None], d, x16))
    # re-running with the same options keeps the finished subject folder
    stamp = (out / subject / "summary.json").stat().st_mtime_ns
    gen = GenerationOptions(seed=3, steps=1, batch_size=16)
    run_pseudo_healthy(model_dir, tiny_store, out, subjects=[subject], generation=gen, write_slices=True, progress=False)
    assert (out / subject / "summary.json").stat().st_mtime_ns == stamp


def test_unknown_subject_and_wrong_modalities_are_input_errors(model_dir, tiny_store, tmp_path):
    with pytest.raises(InputError, match="unknown subject"):
        run_pseudo_healthy(model_dir, tiny_store, tmp_path / "x", subjects=["nobody"], progress=False)
    bad = save_tiny_model(tmp_path / "m2", modalities=("t1", "t2"), size=16)
    with pytest.raises(InputError):
        run_pseudo_healthy(bad, tiny_store, tmp_path / "y", progress=False)


def test_embeddings_csv_schema(model_dir, tiny_store, tmp_path):
    info = run_embed(model_dir, tiny_store, tmp_path / "emb", batch_size=64, progress=False)
    slices = pd.read_csv(tmp_path / "emb" / "slice_embeddings.csv")
    subjects = pd.read_csv(tmp_path / "emb" / "subject_embeddings.csv")
    d = info["dim"]
    assert d == 4
    assert list(slices.columns) == SLICE_KEYS + [f"salient_{i}" for i in range(d)]
    assert list(subjects.columns) == SUBJECT_KEYS + [f"salient_{i}" for i in range(d)]
    store = SliceStore(tiny_store)
    assert len(slices) == len(store)
    assert set(subjects["subject"]) == set(store.subjects_table["subject"])
    # a tumour subject's row is the mean over its tumour slices
    row = subjects[subjects["label"] == "tumour"].iloc[0]
    mine = slices[(slices["subject"] == row["subject"]) & (slices["label"] == "tumour")]
    assert row["n_slices"] == len(mine)
    assert np.allclose(row[[f"salient_{i}" for i in range(d)]].astype(float), mine[[f"salient_{i}" for i in range(d)]].mean(), atol=1e-5)
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["n_slices"] == len(store)


def test_subject_table_falls_back_to_healthy_slices():
    df = pd.DataFrame({"subject": ["a", "a", "b", "b"], "slice": [0, 1, 0, 1], "split": ["test"] * 4,
                       "label": ["healthy", "tumour", "healthy", "healthy"], "tumour_pixels": [0, 5, 0, 0],
                       "salient_0": [1.0, 3.0, 2.0, 4.0]})
    t = subject_table(df).set_index("subject")
    assert t.loc["a", "label"] == "tumour" and t.loc["a", "salient_0"] == 3.0 and t.loc["a", "n_slices"] == 1
    assert t.loc["b", "label"] == "healthy" and t.loc["b", "salient_0"] == 3.0 and t.loc["b", "n_slices"] == 2


def test_masked_compose_keeps_the_original_outside_the_anomaly(model_dir, tiny_store, tmp_path):
    from diffca_med.analysis.counterfactuals import AnomalyOptions

    store = SliceStore(tiny_store)
    subject = store.subjects[0]
    gen = GenerationOptions(seed=0, steps=1, batch_size=64)
    # a threshold above any anomaly: empty mask, so nothing may change
    none = AnomalyOptions(threshold="fixed", threshold_value=10.0, compose="masked", previews=1)
    [s] = run_pseudo_healthy(model_dir, tiny_store, tmp_path / "m", subjects=[subject], generation=gen,
                             anomaly=none, progress=False)
    src = store.source_files(subject)["t1c"].path
    out = nib.load(tmp_path / "m" / subject / s["outputs"]["t1c"])
    assert s["anomaly_volume_ml"] == 0.0
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(src).dataobj).astype(np.float32))


def test_slices_with_less_brain_than_training_are_not_assessed(tiny_store, tmp_path):
    import torch
    from analysis_helpers import tiny_model

    from diffca_med.analysis.counterfactuals import AnomalyOptions, trained_slices

    store = SliceStore(tiny_store)
    subject = store.subjects[0]
    rows = store.subject_rows(subject)
    assessed = trained_slices(store, rows)
    assert assessed.any() and not assessed.all()  # the phantom has top and bottom slices with little brain
    gen = GenerationOptions(seed=0, steps=1, batch_size=64)
    # a threshold of 0 and every token gated: all assessed brain may change
    everything = AnomalyOptions(threshold="fixed", threshold_value=0.0, compose="masked", previews=1)
    model = tiny_model(split_mode="inpaint", gate_threshold=0.5, gate_dilation=0)
    model.split.gate_logits = lambda tokens: torch.full((tokens.shape[0], 4), 10.0)  # every token salient
    [s] = run_pseudo_healthy("tiny", tiny_store, tmp_path / "a", subjects=[subject], generation=gen,
                             anomaly=everything, progress=False, model=model)
    slices = store.index["slice"].to_numpy()[rows]
    assert s["assessed_slices"] == [int(k) for k in slices[assessed]]
    brain = np.asarray(store.brain[rows]) > 0
    outside = store.to_volume(subject, (brain & ~assessed[:, None, None]).astype(np.uint8), order=0) > 0
    inside = store.to_volume(subject, (brain & assessed[:, None, None]).astype(np.uint8), order=0) > 0
    amap = np.asanyarray(nib.load(tmp_path / "a" / subject / s["outputs"]["anomaly"]).dataobj)
    out = np.asanyarray(nib.load(tmp_path / "a" / subject / s["outputs"]["t1c"]).dataobj)
    original = np.asanyarray(nib.load(store.source_files(subject)["t1c"].path).dataobj).astype(np.float32)
    only_outside = outside & ~ndimage.binary_dilation(inside)  # voxels interpolated from unassessed slices only
    assert only_outside.sum() > 100
    assert np.all(amap[only_outside] == 0) and np.array_equal(out[only_outside], original[only_outside])
    assert (amap[inside] > 0).mean() > 0.5 and not np.array_equal(out[inside], original[inside])


def test_masked_compose_changes_only_the_salient_support(tiny_store, tmp_path):
    import torch
    from analysis_helpers import tiny_model

    from diffca_med.analysis.counterfactuals import AnomalyOptions

    store = SliceStore(tiny_store)
    subject = store.subjects[0]
    src = store.source_files(subject)["t1c"].path
    original = np.asanyarray(nib.load(src).dataobj).astype(np.float32)
    gen = GenerationOptions(seed=0, steps=1, batch_size=64)
    everything = AnomalyOptions(threshold="fixed", threshold_value=0.0, compose="masked", previews=1)
    model = tiny_model(split_mode="inpaint", gate_threshold=0.5, gate_dilation=0)
    changed = {}
    for name, logit in (("nothing gated", -10.0), ("all gated", 10.0)):
        model.split.gate_logits = lambda tokens, v=logit: torch.full((tokens.shape[0], 4), v)
        [s] = run_pseudo_healthy("tiny", tiny_store, tmp_path / name, subjects=[subject], generation=gen,
                                 anomaly=everything, progress=False, model=model)
        out = np.asanyarray(nib.load(tmp_path / name / subject / s["outputs"]["t1c"]).dataobj)
        changed[name] = int((out != original).sum())
    # the whole brain is over the threshold, so the support alone decides what changes
    assert changed["nothing gated"] == 0 and changed["all gated"] > 1000, changed


def test_anomaly_mask_keeps_only_the_salient_support(tiny_store, tmp_path):
    import torch
    from analysis_helpers import tiny_model

    from diffca_med.analysis.counterfactuals import AnomalyOptions

    store = SliceStore(tiny_store)
    subject = store.subjects[0]
    gen = GenerationOptions(seed=0, steps=1, batch_size=64)
    model = tiny_model(split_mode="inpaint", gate_threshold=0.5, gate_dilation=0)
    model.split.gate_logits = lambda tokens: torch.full((tokens.shape[0], 4), -10.0)  # no token salient
    volumes = {}
    for support in (True, False):
        # a threshold of 0: the whole assessed brain is over it
        ano = AnomalyOptions(threshold="fixed", threshold_value=0.0, support=support, previews=1)
        [s] = run_pseudo_healthy("tiny", tiny_store, tmp_path / str(support), subjects=[subject], generation=gen,
                                 anomaly=ano, progress=False, model=model)
        mask = np.asanyarray(nib.load(tmp_path / str(support) / subject / s["outputs"]["anomaly_mask"]).dataobj)
        volumes[support] = (s["anomaly_volume_ml"], int(mask.sum()))
    assert volumes[True] == (0.0, 0) and volumes[False][1] > 1000, volumes


def test_samples_average_generations_from_other_seeds(model_dir, tiny_store):
    from diffca_med.analysis.counterfactuals import SAMPLE_SEED_STRIDE

    model = DiffCAModel.from_pretrained(model_dir)
    store = SliceStore(tiny_store)
    x = np.asarray(store.images[:6][:, [store.modalities.index(m) for m in model.config.modalities]], np.float32)
    one = [generate(model, x, GenerationOptions(seed=seed, steps=1, batch_size=8))
           for seed in (3, 3 + SAMPLE_SEED_STRIDE)]
    mean = generate(model, x, GenerationOptions(seed=3, steps=1, batch_size=8, samples=2))
    assert not np.allclose(one[0], one[1])
    np.testing.assert_allclose(mean, (one[0] + one[1]) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="--samples"):
        GenerationOptions(noise="inverted", samples=2)
