"""HTML report: contents, embedded images, links, escaping of hostile strings."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import save_tiny_model

from diffca_med.analysis.counterfactuals import GenerationOptions, run_pseudo_healthy
from diffca_med.analysis.subgroups import run_subgroups
from diffca_med.data.store import SliceStore
from diffca_med.errors import InputError
from diffca_med.reports.html import build_report, page_name


@pytest.fixture(scope="module")
def inputs(tiny_store, tmp_path_factory):
    """A real pseudo-healthy run (tiny untrained model, one tumour subject) and a subgroups folder."""
    base = tmp_path_factory.mktemp("report_inputs")
    model = save_tiny_model(base / "model")
    store = SliceStore(tiny_store)
    subject = store.subjects_table.loc[store.subjects_table["has_tumour"].astype(bool), "subject"].iloc[0]
    ph = base / "ph"
    run_pseudo_healthy(model, tiny_store, ph, subjects=[subject], generation=GenerationOptions(steps=1, seed=0),
                       progress=False)
    rng = np.random.default_rng(0)
    subjects = list(store.subjects_table["subject"])
    emb = pd.DataFrame({"subject": subjects, "split": "train", "label": "tumour", "n_slices": 3, "tumour_pixels": 9,
                        **{f"salient_{j}": rng.normal(size=len(subjects)) + (np.arange(len(subjects)) % 2) * 6
                           for j in range(3)}})
    emb.to_csv(base / "subject_embeddings.csv", index=False)
    pd.DataFrame({"participant_id": subjects, "grade": ["II", "IV"] * (len(subjects) // 2)}).to_csv(
        base / "participants.tsv", sep="\t", index=False)
    sg = base / "sg"
    run_subgroups(base / "subject_embeddings.csv", sg, clinical=base / "participants.tsv", maps=("pca",), k=2)
    return ph, sg, subject


def test_report_contents_and_links(inputs, tmp_path):
    ph, sg, subject = inputs
    index = build_report(ph, tmp_path / "report", subgroups=sg, title="test report")
    text = index.read_text()
    summary = json.loads((ph / subject / "summary.json").read_text())
    page = tmp_path / "report" / "subjects" / page_name(subject)
    assert f'href="subjects/{page_name(subject)}"' in text and page.is_file()
    assert "<table id=\"cohort\">" in text and "<table id=\"associations\">" in text and "grade" in text
    assert f"{summary['anomaly_volume_ml']:.2f}" in text
    body = page.read_text()
    # embedded images only: the previews and the cohort map, nothing fetched from elsewhere
    srcs = re.findall(r'src="([^"]*)"', body)
    assert len(srcs) == len(summary["previews"]) + 1
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:)?//', body + text)
    assert f"{summary['tumour_volume_ml']:.2f} ml" in body and f"{summary['anomaly_volume_ml']:.2f} ml" in body
    assert f"{summary['fidelity']['psnr']:.1f} dB" in body
    assert html.escape(summary["source_files"]["t1c"]) in body
    assert "cluster" in body and 'href="../index.html"' in body
    for flag in summary["flags"]:
        assert html.escape(flag) in body


def test_hostile_subject_id_is_escaped(inputs, tmp_path):
    ph, sg, subject = inputs
    evil = "<script>alert('x')</script>&\"/.."
    ph2, sg2 = tmp_path / "ph", tmp_path / "sg"
    shutil.copytree(ph, ph2)
    shutil.copytree(sg, sg2)
    summary_path = ph2 / subject / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["subject"] = evil
    summary["flags"] = ["<b>flag</b>"]
    summary["source_files"]["t1c"] = "/data/<img src=x onerror=alert(1)>.nii.gz"
    summary_path.write_text(json.dumps(summary))
    clusters = pd.read_csv(sg2 / "clusters.csv")
    clusters.loc[clusters["subject"] == subject, "subject"] = evil
    clusters.to_csv(sg2 / "clusters.csv", index=False)
    index = build_report(ph2, tmp_path / "report", subgroups=sg2)
    pages = list((tmp_path / "report" / "subjects").glob("*.html"))
    assert len(pages) == 1 and pages[0].parent.name == "subjects"
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.html", pages[0].name)
    for text in (index.read_text(), pages[0].read_text()):
        assert "<script>" not in text and "<img src=x" not in text and "<b>flag</b>" not in text
    assert "&lt;script&gt;alert(" in index.read_text()
    assert "&lt;b&gt;flag&lt;/b&gt;" in pages[0].read_text()


def test_report_without_subgroups_and_bad_input(inputs, tmp_path):
    ph, _, subject = inputs
    index = build_report(ph, tmp_path / "r")
    assert "Subgroups" not in index.read_text()
    with pytest.raises(InputError, match="no subject summaries"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "run.json").write_text("{}")
        build_report(empty, tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
    with pytest.raises(InputError, match="clusters.csv"):
        build_report(ph, tmp_path / "r3", subgroups=tmp_path)
