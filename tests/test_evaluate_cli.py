"""`diffca-med evaluate` end to end on the tiny phantom store, and its error paths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from diffca_med.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def truth(tiny_store):
    return tiny_store.parent / "data" / "derivatives" / "phantom-truth"


@pytest.fixture(scope="module")
def identity_dir(tiny_store, tmp_path_factory):
    from diffca_med.baselines import IdentityBaseline
    from diffca_med.data.store import SliceStore

    store = SliceStore(tiny_store)
    path = tmp_path_factory.mktemp("methods") / "identity"
    IdentityBaseline(store.modalities, store.size).save(path)
    return path


def test_twin_of_a_healthy_subject_is_its_own_store_slices(tiny_store, truth):
    from diffca_med.data.store import SliceStore
    from diffca_med.pipelines.evaluate import twin_slices

    store = SliceStore(tiny_store)
    table = store.subjects_table
    healthy = table.loc[~table["has_tumour"].astype(str).str.lower().isin(["true", "1"]), "subject"]
    tumour = table.loc[table["has_tumour"].astype(str).str.lower().isin(["true", "1"]), "subject"]
    for subject in list(healthy)[:1]:
        twin = twin_slices(store, subject, truth)
        assert np.allclose(twin, store.images[store.subject_rows(subject)], atol=1e-6)
    subject = list(tumour)[0]
    rows = store.subject_rows(subject)
    twin = twin_slices(store, subject, truth)
    diff = np.abs(twin - store.images[rows]).max(axis=1)
    away = ~(np.asarray(store.seg[rows]) > 0)
    # Twin and input differ around the tumour, hardly anywhere else.
    assert diff[~away].mean() > 10 * diff[away].mean()


def test_identity_baseline_known_answers(tiny_store, truth, identity_dir, tmp_path):
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(identity_dir), str(tiny_store), str(out),
                              "--ground-truth", str(truth)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    cf = metrics["counterfactual"]
    assert cf["healthy_psnr"] == "inf"  # the input is left unchanged
    assert cf["healthy_ssim"] == pytest.approx(1.0)
    # Identity's pseudo-healthy image *is* the input: same scores as the input reference.
    assert cf["tumour_psnr"] == pytest.approx(cf["input_tumour_psnr"])
    assert cf["twin_subjects"] >= 1 and math.isfinite(cf["tumour_psnr"])
    det = cf["detection"]
    # A constant (all-zero) anomaly map ranks nothing: AP = prevalence, AUROC = 0.5.
    assert det["auprc"] == pytest.approx(det["tumour_prevalence"], rel=1e-6)
    assert det["slice_auroc"] == pytest.approx(0.5)
    assert "embedding" not in metrics and "detection_in_support" not in cf  # identity does not localise
    table = (out / "metrics.md").read_text()
    assert "| identity |" in table and "∞" in table


def test_evaluate_a_model_folder(tiny_store, truth, tmp_path):
    import torch

    from diffca_med.models import DiffCAModel
    from diffca_med.training.config import config_from_dict
    from diffca_med.data.store import SliceStore

    store = SliceStore(tiny_store)
    cfg = config_from_dict({
        "data": {"modalities": ["t1c", "flair"], "size": store.size},
        "model": dict(unet_channels=[8, 16], attention_levels=[False, True], scratch_channels=[8, 8],
                      token_dim=16, attention_heads=2, n_queries=2, norm_groups=8, salient_dim=4,
                      sample_steps=2, adversary_hidden=8),
    })
    torch.manual_seed(0)
    DiffCAModel(cfg.model).save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "model"), str(tiny_store), str(out),
                              "--ground-truth", str(truth), "--split", "train", "--threshold-split", "test",
                              "--slice-stride", "3", "--folds", "2"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "diffca" and m["split"] == "train"
    assert set(m["embedding"]["probes"]) == {"salient", "common"}
    assert {"set_label", "slice_position", "brain_area", "subtype", "hemisphere"} <= set(
        m["embedding"]["probes"]["salient"])
    assert m["embedding"]["subgroups"]["subjects"] >= 3
    assert 0.0 <= m["counterfactual"]["detection"]["auprc"] <= 1.0
    # 2 queries form no square token grid: the support is the whole image, the same figures
    assert m["counterfactual"]["detection_in_support"] == m["counterfactual"]["detection"]
    assert m["timing"]["seconds_per_subject_volume"] > 0


@pytest.mark.parametrize("case", ["no_model", "no_store", "no_truth", "bad_noise"])
def test_bad_input_one_line_exit_2(case, tiny_store, truth, identity_dir, tmp_path):
    args = [str(identity_dir), str(tiny_store), str(tmp_path / "out")]
    if case == "no_model":
        args[0] = str(tmp_path / "missing-model")
    elif case == "no_store":
        args[1] = str(tmp_path)
    elif case == "no_truth":
        args += ["--ground-truth", str(tmp_path / "nowhere")]
    elif case == "bad_noise":
        args += ["--noise", "purple"]
    res = runner.invoke(app, ["evaluate", *args])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_twin_names_the_file(tiny_store, truth, identity_dir, tmp_path):
    import shutil

    fake = tmp_path / "truth"
    shutil.copytree(truth, fake)
    victim = sorted(fake.rglob("*t1c.nii.gz"))[0]
    victim.unlink()
    res = runner.invoke(app, ["evaluate", str(identity_dir), str(tiny_store), str(tmp_path / "out"),
                              "--ground-truth", str(fake), "--split", "train"])
    assert res.exit_code == 2
    assert victim.name in res.output and "twin missing" in res.output


def test_table_and_json_conventions():
    from diffca_med.pipelines.evaluate import jsonable, markdown_table

    a = {"method": "a", "counterfactual": {"healthy_psnr": float("inf"), "tumour_psnr": float("nan")}}
    b = {"method": "b", "embedding": {"subgroups": {"ari": 0.5}}}
    assert jsonable(a)["counterfactual"] == {"healthy_psnr": "inf", "tumour_psnr": None}
    json.dumps(jsonable(a), allow_nan=False)  # strict JSON
    for rows in ([a, b], [jsonable(a), b]):  # fresh results and results read back from JSON
        table = markdown_table(rows).splitlines()
        header = [c.strip() for c in table[0].split("|")[1:-1]]
        row_a = dict(zip(header, [c.strip() for c in table[2].split("|")[1:-1]]))
        row_b = dict(zip(header, [c.strip() for c in table[3].split("|")[1:-1]]))
        assert row_a["healthy-region PSNR (dB)"] == "∞"
        assert row_a["tumour PSNR vs twin (dB)"] == "n/a"
        assert row_a["subgroup ARI"] == "–" and row_b["subgroup ARI"] == "0.500"
        assert "pixel AUPRC" not in header  # no method has it
