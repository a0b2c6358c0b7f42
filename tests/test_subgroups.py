"""Subgroups on embeddings with known clusters: clustering, k by silhouette, maps, associations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffca_med.analysis.subgroups import associations, cluster, column_kind, load_embeddings, read_clinical, run_subgroups
from diffca_med.errors import ConfigError, InputError


def _blobs(n_per=12, k=3, d=6, seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 5
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + rng.normal(size=(len(labels), d)) * spread
    return x, labels


@pytest.fixture
def embed_dir(tmp_path):
    """An `embed`-style folder with 3 subject subtypes and 4 slices per subject, plus a participants.tsv."""
    x, labels = _blobs()
    rng = np.random.default_rng(5)
    subjects, slices, part = [], [], []
    for i, (e, lab) in enumerate(zip(x, labels)):
        sid = f"sub-{i:03d}"
        subjects.append({"subject": sid, "split": "train", "label": "tumour", "n_slices": 4, "tumour_pixels": 40,
                         **{f"salient_{j}": v for j, v in enumerate(e)}})
        for s in range(4):
            es = e + rng.normal(size=e.shape) * 0.3
            slices.append({"subject": sid, "slice": s, "split": "train", "label": "tumour" if s else "healthy",
                           "tumour_pixels": 10 * s, **{f"salient_{j}": v for j, v in enumerate(es)}})
        part.append({"participant_id": sid, "subtype": ["ring", "diffuse", "nodular"][lab],
                     "volume_ml": float(10 + 20 * lab + rng.normal()), "sex": "F" if rng.random() < 0.5 else "M",
                     "site": "one"})
    folder = tmp_path / "emb"
    folder.mkdir()
    pd.DataFrame(subjects).to_csv(folder / "subject_embeddings.csv", index=False)
    pd.DataFrame(slices).to_csv(folder / "slice_embeddings.csv", index=False)
    pd.DataFrame(part).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    return folder, tmp_path / "participants.tsv", labels


@pytest.mark.parametrize("method", ["kmeans", "gmm", "hdbscan"])
def test_cluster_recovers_known_clusters(method):
    from sklearn.metrics import adjusted_rand_score

    x, labels = _blobs(n_per=15)
    res = cluster(x, method=method, seed=0)
    assert adjusted_rand_score(labels, res.labels) > 0.95
    assert res.k == 3 and res.silhouette > 0.7


def test_k_is_chosen_by_silhouette_unless_given():
    x, _ = _blobs(n_per=10, k=4)
    res = cluster(x, k_range=(2, 6))
    assert res.k == 4 and set(res.scores) == {2, 3, 4, 5, 6}
    assert res.scores[4] == max(res.scores.values())
    assert cluster(x, k=2).k == 2
    with pytest.raises(ConfigError):
        cluster(x, k=100)
    with pytest.raises(ConfigError):
        cluster(x, method="spectral")


def test_associations_chi_square_and_kruskal():
    rng = np.random.default_rng(0)
    clusters = pd.Series(np.repeat([0, 1, 2], 20))
    clinical = pd.DataFrame({
        "subtype": np.repeat(["a", "b", "c"], 20),  # identical to the clusters
        "age": np.concatenate([rng.normal(m, 1, 20) for m in (30, 50, 70)]),  # differs by cluster
        "noise": rng.normal(size=60),  # unrelated
        "constant": ["x"] * 60,  # nothing to test
    })
    table = associations(clusters, clinical, "subject").set_index("column")
    assert set(table.index) == {"subtype", "age", "noise"}
    assert table.loc["subtype", "test"] == "chi-square" and table.loc["subtype", "p_value"] < 1e-6
    assert table.loc["subtype", "ari"] == pytest.approx(1.0) and table.loc["subtype", "effect"] == pytest.approx(1.0)
    assert table.loc["age", "test"] == "kruskal-wallis" and table.loc["age", "p_value"] < 1e-6
    assert table.loc["noise", "p_value"] > 0.01
    assert column_kind(pd.Series(["s1", "s2", "s3", "s4", "s5", "s6"])) is None  # an id column


def test_run_subgroups_writes_clusters_maps_and_associations(embed_dir, tmp_path):
    folder, participants, labels = embed_dir
    out = tmp_path / "sg"
    summary = run_subgroups(folder, out, clinical=participants, maps=("pca",), seed=0, include_healthy=True)
    assert summary["levels"]["subject"]["k"] == 3
    clusters = pd.read_csv(out / "clusters.csv")
    assert {"subject", "cluster", "pca_0", "pca_1", "label", "subtype", "volume_ml"} <= set(clusters.columns)
    assert len(clusters) == len(labels)
    slices = pd.read_csv(out / "slice_clusters.csv")
    assert {"subject", "slice", "cluster"} <= set(slices.columns) and len(slices) == 4 * len(labels)
    assoc = pd.read_csv(out / "associations.csv")
    assert list(assoc.columns) == ["level", "column", "kind", "test", "statistic", "p_value", "n", "effect", "ari", "nmi"]
    row = assoc[(assoc["level"] == "subject") & (assoc["column"] == "subtype")].iloc[0]
    assert row["ari"] == pytest.approx(1.0) and row["p_value"] < 1e-4
    assert "site" not in set(assoc["column"])  # constant column: not tested
    for level in ("subject", "slice"):
        for m in ("pca",):
            for colour in ("cluster", "label", "subtype", "volume_ml", "sex"):
                assert (out / "maps" / f"{level}_{m}_{colour}.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["levels"]["slice"]["n"] == 4 * len(labels)
    # same seed, same clusters; by default healthy slices are left out
    again = run_subgroups(folder, tmp_path / "sg2", clinical=participants, maps=("pca",), seed=0)
    assert again["levels"]["subject"]["k"] == 3
    assert again["levels"]["slice"]["n"] == 3 * len(labels)
    assert pd.read_csv(tmp_path / "sg2" / "clusters.csv")["cluster"].tolist() == clusters["cluster"].tolist()


def test_umap_maps_subjects(embed_dir, tmp_path):
    folder, participants, labels = embed_dir
    run_subgroups(folder, tmp_path / "u", clinical=participants, maps=("umap",), levels=("subject",), seed=0)
    clusters = pd.read_csv(tmp_path / "u" / "clusters.csv")
    assert np.isfinite(clusters[["umap_0", "umap_1"]].to_numpy()).all()
    assert (tmp_path / "u" / "maps" / "subject_umap_subtype.png").is_file()
    assert not (tmp_path / "u" / "slice_clusters.csv").exists()


def test_bad_inputs(tmp_path, embed_dir):
    folder, participants, _ = embed_dir
    with pytest.raises(InputError, match="no such"):
        load_embeddings(tmp_path / "missing")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="salient_0"):
        load_embeddings(bad)
    clin = tmp_path / "clin.tsv"
    clin.write_text("id\tage\nx\t3\n")
    with pytest.raises(InputError, match="participant_id"):
        read_clinical(clin)
    with pytest.raises(ConfigError):
        run_subgroups(folder, tmp_path / "o", maps=("tsne",))
    assert not (tmp_path / "o").exists()
