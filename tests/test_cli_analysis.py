"""The analysis commands through the CLI: outputs, options, one-line errors (exit 2)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from analysis_helpers import save_tiny_model
from typer.testing import CliRunner

from diffca_med.cli.app import app
from diffca_med.data.store import SliceStore

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli_model") / "model")


@pytest.fixture(scope="module")
def tumour_subjects(tiny_store):
    table = SliceStore(tiny_store).subjects_table
    return list(table.loc[table["has_tumour"].astype(bool), "subject"])


def test_pseudo_healthy_embed_subgroups_report_chain(model_dir, tiny_store, tumour_subjects, tmp_path):
    subject = tumour_subjects[0]
    r = invoke("pseudo-healthy", model_dir, tiny_store, tmp_path / "ph", "--subjects", subject, "--steps", "1",
               "--threshold", "percentile", "--threshold-value", "95", "--combine", "max", "--slices", "--quiet",
               "--no-support")  # the untrained split gates nothing: its salient support is empty
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "ph" / subject / "summary.json").read_text())
    assert summary["threshold"]["method"] == "percentile" and summary["threshold"]["combine"] == "max"
    assert summary["options"]["anomaly"]["support"] is False
    assert (tmp_path / "ph" / subject / "slices" / "pseudo_healthy.npy").is_file()
    mask = np.asanyarray(nib.load(tmp_path / "ph" / subject / summary["outputs"]["anomaly_mask"]).dataobj)
    assert mask.any()

    r = invoke("embed", model_dir, tiny_store, tmp_path / "emb", "--quiet")
    assert r.exit_code == 0, r.output
    subjects = pd.read_csv(tmp_path / "emb" / "subject_embeddings.csv")
    assert len(subjects) == len(SliceStore(tiny_store).subjects_table)

    clinical = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": subjects["subject"], "arm": ["a", "b"] * (len(subjects) // 2)}).to_csv(
        clinical, sep="\t", index=False)
    r = invoke("subgroups", tmp_path / "emb", tmp_path / "sg", "--clinical", clinical, "--maps", "pca", "--k", "2")
    assert r.exit_code == 0, r.output
    assert "k = 2" in r.output
    assert set(pd.read_csv(tmp_path / "sg" / "clusters.csv")["cluster"]) == {0, 1}
    assert (tmp_path / "sg" / "maps" / "subject_pca_arm.png").is_file()

    r = invoke("report", tmp_path / "ph", tmp_path / "report", "--subgroups", tmp_path / "sg")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report" / "index.html").is_file() and "open " in r.output


def test_swap_and_interpolate_write_strips(model_dir, tiny_store, tumour_subjects, tmp_path):
    a, b = tumour_subjects[0], SliceStore(tiny_store).subjects[-1]
    r = invoke("swap", model_dir, tiny_store, a, f"{b}:20", tmp_path / "swap.png", "--steps", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "swap.png").stat().st_size > 1000
    r = invoke("interpolate", model_dir, tiny_store, a, b, tmp_path / "interp.png", "--n", "3", "--steps", "1")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "interp.png").stat().st_size > 1000
    r = invoke("swap", model_dir, tiny_store, a, f"{b}:999", tmp_path / "x.png")
    assert r.exit_code == 2 and "no stored slice 999" in r.output and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["pseudo-healthy", "{model}", "{store}", "{out}", "--subjects", "nobody"], "unknown subject"),
        (["pseudo-healthy", "{model}", "{store}", "{out}", "--noise", "pink"], "--noise"),
        (["pseudo-healthy", "{model}", "{store}", "{out}", "--threshold", "triangle"], "--threshold"),
        (["pseudo-healthy", "{tmp}/no-model", "{store}", "{out}"], "no such model folder"),
        (["pseudo-healthy", "{model}", "{tmp}/nothing", "{out}"], "no such file or folder"),
        (["embed", "{model}", "{store}", "{out}", "--split", "holdout"], "no slices to embed"),
        (["pseudo-healthy", "{model}", "{store}", "{out}", "--device", "tpu"], "--device: 'tpu'"),
        (["pseudo-healthy", "{model}", "{store}", "{out}", "--samples", "0"], "--samples"),
        (["embed", "{model}", "{store}", "{out}", "--device", "cuda:7"], "--device: 'cuda:7' asked for"),
        (["subgroups", "{tmp}/none", "{out}"], "no such file or folder"),
        (["report", "{tmp}/none", "{out}"], "no such folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, model_dir, tiny_store, tmp_path):
    fill = {"model": model_dir, "store": tiny_store, "out": tmp_path / "out", "tmp": tmp_path}
    r = invoke(*[a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


@pytest.mark.slow
def test_demo_quick_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", out, "--quick", "--subjects", "6", "--quiet")
    assert r.exit_code == 0, r.output
    index = out / "report" / "index.html"
    assert index.is_file() and str(index.resolve()) in r.output
    ph = pd.read_csv(out / "pseudo-healthy" / "summary.csv")
    assert len(ph) >= 1 and set(ph["split"]) == {"test"}
    assert (out / "embeddings" / "subject_embeddings.csv").is_file()
    assoc = pd.read_csv(out / "subgroups" / "associations.csv")
    assert "subtype" in set(assoc["column"])
    state = json.loads((out / "demo.json").read_text())
    assert list(state["steps"]) == ["phantom", "prepare", "train", "pseudo-healthy", "embed", "subgroups", "report"]
    r = invoke("demo", out, "--quick", "--subjects", "6", "--quiet")
    assert r.exit_code == 0 and r.output.count("skipped") == 7
    r = invoke("demo", out, "--subjects", "6", "--quiet")  # other options into the same OUT
    assert r.exit_code == 2 and "other options" in r.output


def test_raw_msd_folder_is_prepared_on_the_fly_and_4d_inputs_give_per_channel_files(model_dir, tmp_path):
    from conftest import make_handmade

    data = make_handmade(tmp_path / "msd", "msd", n=3)
    out = tmp_path / "ph"
    r = invoke("pseudo-healthy", model_dir, data, out, "--subjects", "BRATS_000", "--steps", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "store" / "store.json").is_file()
    src = nib.load(data / "imagesTr" / "BRATS_000.nii.gz")
    for mod in ("t1c", "flair"):
        img = nib.load(out / "BRATS_000" / f"BRATS_000_{mod}_pseudohealthy.nii.gz")
        assert img.shape == src.shape[:3] and np.allclose(img.affine, src.affine)
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(src.affine)
    mask = nib.load(out / "BRATS_000" / "BRATS_000_anomaly_mask.nii.gz")
    assert mask.shape == src.shape[:3]
