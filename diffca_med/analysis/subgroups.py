"""Subgroups of salient embeddings: clusters, 2-D maps and clinical associations.

Input: the CSVs written by :mod:`diffca_med.analysis.embeddings`
(``slice_embeddings.csv``, ``subject_embeddings.csv``; columns ``salient_0`` …
``salient_{d-1}``), optionally joined with a clinical table (``participants.tsv``:
first column ``participant_id`` — or ``subject`` — holding the subject id).

Output folder (:func:`run_subgroups`):

==========================  ==============================================================
``clusters.csv``            one row per subject: ``subject``, ``cluster`` (−1 = HDBSCAN noise),
                            ``pca_0``, ``pca_1``, ``umap_0``, ``umap_1`` (map coordinates),
                            ``label`` and the clinical columns
``slice_clusters.csv``      the same per slice (``subject``, ``slice``, …), when slices were given
``associations.csv``        one row per level × clinical column: ``level``, ``column``,
                            ``kind`` (categorical/numeric), ``test`` (chi-square /
                            Kruskal-Wallis), ``statistic``, ``p_value``, ``n``, ``effect``
                            (Cramér's V or ε²), ``ari`` and ``nmi`` (categorical only)
``summary.json``            method, chosen k, silhouette per level, silhouette for each k tried
``maps/<level>_<map>_<colour>.png``  PCA / UMAP maps coloured by cluster, label and each
                            clinical column
==========================  ==============================================================

By default only tumour subjects and tumour slices (``label == "tumour"``) are
clustered and mapped (``include_healthy`` adds the healthy ones). Clustering runs on
the standardised embedding (each salient dimension scaled to unit
variance) with k-means (default), a Gaussian mixture or HDBSCAN; for k-means and GMM,
``k`` is the value in ``k_range`` with the best silhouette unless given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path, atomic_write_text

CLUSTER_METHODS = ("kmeans", "gmm", "hdbscan")
MAP_METHODS = ("pca", "umap")
SLICE_FILE = "slice_embeddings.csv"
SUBJECT_FILE = "subject_embeddings.csv"
# Columns of the embedding tables that are not clinical variables or embeddings.
_META = {"subject", "slice", "split", "label", "tumour_pixels", "n_slices"}


def salient_columns(df: pd.DataFrame) -> list[str]:
    """The ``salient_<i>`` columns of a table, in index order."""
    cols = [c for c in df.columns if c.startswith("salient_") and c[8:].isdigit()]
    return sorted(cols, key=lambda c: int(c[8:]))


def load_embeddings(path: str | Path) -> dict[str, pd.DataFrame]:
    """Read embeddings from an ``embed`` output folder or one CSV.

    Returns:
        ``{"subject": df, "slice": df}`` (either may be missing); a single CSV is a
        slice table when it has a ``slice`` column, else a subject table.
    """
    path = Path(path)
    tables: dict[str, pd.DataFrame] = {}
    if path.is_dir():
        files = {"subject": path / SUBJECT_FILE, "slice": path / SLICE_FILE}
        files = {k: v for k, v in files.items() if v.exists()}
        if not files:
            raise InputError(f"{path}: no {SUBJECT_FILE} or {SLICE_FILE} (run `diffca-med embed` first)")
    elif path.is_file():
        files = {"?": path}
    else:
        raise InputError(f"{path}: no such file or folder")
    for level, file in files.items():
        try:
            df = pd.read_csv(file, dtype={"subject": str})
        except Exception as err:  # pandas raises many types for bad CSVs
            raise InputError(f"{file}: not a readable CSV ({type(err).__name__})") from None
        if "subject" not in df.columns or not salient_columns(df):
            raise InputError(f"{file}: needs a 'subject' column and salient_0 … salient_<d-1> columns")
        if level == "?":
            level = "slice" if "slice" in df.columns else "subject"
        tables[level] = df
    return tables


def read_clinical(path: str | Path) -> pd.DataFrame:
    """Read a clinical table (TSV/CSV); returns it indexed by subject id (string)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True, na_values=["n/a", "NA", ""])
    except Exception as err:
        raise InputError(f"{path}: not a readable table ({type(err).__name__})") from None
    key = next((c for c in ("participant_id", "subject", "subject_id") if c in df.columns), None)
    if key is None:
        raise InputError(f"{path}: needs a participant_id (or subject) column")
    df = df.rename(columns={key: "subject"}).set_index("subject")
    # Numbers stored as text become numeric columns.
    for col in df.columns:
        converted = pd.to_numeric(df[col], errors="coerce")
        if converted.notna().sum() == df[col].notna().sum() and df[col].notna().any():
            df[col] = converted
    return df


def column_kind(values: pd.Series) -> str | None:
    """``"numeric"``, ``"categorical"`` or ``None`` (nothing to test: constant or an id)."""
    v = values.dropna()
    n_unique = v.nunique()
    if n_unique < 2:
        return None
    if pd.api.types.is_numeric_dtype(v) and n_unique > 5:
        return "numeric"
    if not pd.api.types.is_numeric_dtype(v) and n_unique == len(v) and len(v) > 5:
        return None  # every value distinct: an identifier, not a grouping
    return "categorical"


@dataclass
class Clustering:
    """Result of :func:`cluster`: labels ``(n,)`` (−1 = noise), k and silhouettes."""

    labels: np.ndarray
    k: int
    silhouette: float
    scores: dict[int, float] = field(default_factory=dict)


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    keep = labels >= 0
    if keep.sum() < 3 or len(np.unique(labels[keep])) < 2 or len(np.unique(labels[keep])) >= keep.sum():
        return float("nan")
    size = 2000 if keep.sum() > 2000 else None  # O(n²): sample large slice sets
    return float(silhouette_score(x[keep], labels[keep], sample_size=size, random_state=seed))


def _fit(x: np.ndarray, method: str, k: int, seed: int) -> np.ndarray:
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=k, covariance_type="diag", n_init=3, random_state=seed).fit_predict(x)


def cluster(
    x: np.ndarray,
    method: str = "kmeans",
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
    min_cluster_size: int | None = None,
) -> Clustering:
    """Cluster the rows of ``x`` ``(n, d)``.

    Args:
        method: ``kmeans`` | ``gmm`` | ``hdbscan``.
        k: number of clusters (k-means, GMM); ``None`` → best silhouette in ``k_range``
            (inclusive, capped at n − 1).
        min_cluster_size: HDBSCAN's minimum cluster size (default max(3, n // 20)).
    """
    if method not in CLUSTER_METHODS:
        raise ConfigError(f"--method: unknown clustering {method!r} (use one of {', '.join(CLUSTER_METHODS)})")
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 3:
        raise InputError(f"need at least 3 embeddings to cluster, got {n}")
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        mcs = min_cluster_size or max(3, n // 20)
        labels = HDBSCAN(min_cluster_size=min(mcs, n), copy=True).fit_predict(x)
        k_found = len(set(labels.tolist()) - {-1})
        return Clustering(labels, k_found, _silhouette(x, labels, seed))
    if k is not None:
        if not 1 <= k < n:
            raise ConfigError(f"--k: must be between 1 and {n - 1} for {n} embeddings, got {k}")
        labels = _fit(x, method, k, seed)
        sil = _silhouette(x, labels, seed)
        return Clustering(labels, k, sil, {k: sil})
    lo, hi = k_range
    candidates = list(range(max(2, lo), min(hi, n - 1) + 1))
    if not candidates:
        raise ConfigError(f"--k-max: no k to try in {k_range} for {n} embeddings")
    scores: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for kk in candidates:
        fits[kk] = _fit(x, method, kk, seed)
        scores[kk] = _silhouette(x, fits[kk], seed)
    valid = {kk: s for kk, s in scores.items() if np.isfinite(s)}
    best = max(valid, key=lambda kk: (valid[kk], -kk)) if valid else candidates[0]
    return Clustering(fits[best], best, scores[best], scores)


def project(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D map ``(n, 2)`` of ``x`` ``(n, d)`` by ``pca`` or ``umap`` (seeded)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if method == "pca":
        from sklearn.decomposition import PCA

        n_comp = min(2, x.shape[1], n)
        y = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
        return np.pad(y, ((0, 0), (0, 2 - n_comp)))
    if method == "umap":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": intended
            import umap

            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=max(2, min(15, n - 1)),
                min_dist=0.1,
                random_state=seed,
                init="spectral" if n > 10 else "random",
            )
            return reducer.fit_transform(x)
    raise ConfigError(f"--maps: unknown map {method!r} (use pca and/or umap)")


def associations(clusters: pd.Series, clinical: pd.DataFrame, level: str) -> pd.DataFrame:
    """Test each clinical column against the cluster labels.

    Args:
        clusters: cluster label per row (HDBSCAN noise −1 is left out).
        clinical: same rows; one column per clinical variable.

    Returns:
        One row per testable column: chi-square test of the clusters × categories
        contingency table (effect: Cramér's V; also ARI and NMI of clusters vs the
        categories) or Kruskal–Wallis across clusters (effect: ε²).
    """
    from scipy import stats
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rows = []
    for col in clinical.columns:
        kind = column_kind(clinical[col])
        if kind is None:
            continue
        frame = pd.DataFrame({"c": clusters.values, "v": clinical[col].values}).dropna()
        frame = frame[frame["c"] >= 0]
        n = len(frame)
        row = {"level": level, "column": col, "kind": kind, "n": n, "statistic": np.nan,
               "p_value": np.nan, "effect": np.nan, "ari": np.nan, "nmi": np.nan}
        if kind == "categorical":
            row["test"] = "chi-square"
            table = pd.crosstab(frame["c"], frame["v"].astype(str))
            if table.shape[0] >= 2 and table.shape[1] >= 2:
                chi2, p, _, _ = stats.chi2_contingency(table.values)
                row.update(statistic=chi2, p_value=p,
                           effect=np.sqrt(chi2 / (n * (min(table.shape) - 1))))
            if n:
                row["ari"] = adjusted_rand_score(frame["v"].astype(str), frame["c"])
                row["nmi"] = normalized_mutual_info_score(frame["v"].astype(str), frame["c"])
        else:
            row["test"] = "kruskal-wallis"
            groups = [g["v"].astype(float).values for _, g in frame.groupby("c") if len(g)]
            if len(groups) >= 2 and len(np.unique(frame["v"])) > 1:
                h, p = stats.kruskal(*groups)
                row.update(statistic=h, p_value=p, effect=(h - len(groups) + 1) / (n - len(groups)) if n > len(groups) else np.nan)
        rows.append(row)
    cols = ["level", "column", "kind", "test", "statistic", "p_value", "n", "effect", "ari", "nmi"]
    return pd.DataFrame(rows, columns=cols)


def _plot_map(coords: np.ndarray, values: pd.Series, title: str, path: Path, highlight: np.ndarray | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=100)
    small = len(coords) <= 300
    size = 36 if small else 6
    kind = column_kind(values)
    if kind == "numeric":
        v = values.astype(float).values
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=v, cmap="viridis", s=size, edgecolors="none")
        fig.colorbar(sc, ax=ax, shrink=0.8, label=str(values.name))
    else:
        cats = values.astype(str).fillna("n/a")
        levels = sorted(cats.unique(), key=lambda s: (len(s), s))
        cmap = matplotlib.colormaps["tab10" if len(levels) <= 10 else "tab20"]
        for i, lev in enumerate(levels):
            sel = (cats == lev).values
            colour = "lightgrey" if lev in ("-1", "nan", "n/a") else cmap(i % cmap.N)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=colour, label=lev, edgecolors="none")
        if len(levels) <= 20:
            ax.legend(fontsize=7, markerscale=1.2 if small else 3, loc="best", title=str(values.name), title_fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _analyse_level(
    df: pd.DataFrame,
    level: str,
    clinical: pd.DataFrame | None,
    out: Path,
    method: str,
    k: int | None,
    k_range: tuple[int, int],
    seed: int,
    maps: tuple[str, ...],
    min_cluster_size: int | None,
    standardize: bool,
) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    cols = salient_columns(df)
    x = df[cols].to_numpy(np.float64)
    if not np.isfinite(x).all():
        raise InputError(f"{level} embeddings contain NaN/inf values")
    if standardize:
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    result = cluster(x, method=method, k=k, k_range=k_range, seed=seed, min_cluster_size=min_cluster_size)
    keys = ["subject", "slice"] if level == "slice" else ["subject"]
    table = df[keys].copy().reset_index(drop=True)
    table["cluster"] = result.labels
    for m in MAP_METHODS:
        if m in maps:
            coords = project(x, m, seed)
            table[f"{m}_0"], table[f"{m}_1"] = coords[:, 0], coords[:, 1]
    if "label" in df.columns:
        table["label"] = df["label"].values
    extra = pd.DataFrame(index=table.index)
    if clinical is not None:
        joined = clinical.reindex(table["subject"].astype(str).values)
        joined.index = table.index
        extra = joined.drop(columns=[c for c in joined.columns if c in _META], errors="ignore")
        table = pd.concat([table, extra], axis=1)
    assoc = associations(table["cluster"], extra, level) if len(extra.columns) else associations(
        table["cluster"], pd.DataFrame(index=table.index), level)
    colours = ["cluster"] + (["label"] if "label" in table.columns else []) + list(extra.columns)
    for m in maps:
        coords = table[[f"{m}_0", f"{m}_1"]].to_numpy()
        for colour in colours:
            if colour != "cluster" and colour != "label" and column_kind(table[colour]) is None:
                continue
            values = table[colour].rename(colour)
            if colour == "cluster":
                values = values.astype(int).astype(str)
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in colour)
            _plot_map(coords, values, f"{level}s · {m.upper()} · {colour}", out / "maps" / f"{level}_{m}_{safe}.png")
    info = {
        "n": int(len(x)),
        "dim": len(cols),
        "k": int(result.k),
        "silhouette": None if not np.isfinite(result.silhouette) else float(result.silhouette),
        "silhouette_by_k": {str(kk): (None if not np.isfinite(s) else float(s)) for kk, s in result.scores.items()},
        "noise": int((result.labels < 0).sum()),
    }
    return table, info, assoc


def run_subgroups(
    embeddings: str | Path,
    out: str | Path,
    clinical: str | Path | None = None,
    method: str = "kmeans",
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
    maps: tuple[str, ...] = MAP_METHODS,
    levels: tuple[str, ...] = ("subject", "slice"),
    min_cluster_size: int | None = None,
    max_slices: int = 5000,
    include_healthy: bool = False,
    standardize: bool = True,
) -> dict:
    """Cluster and map embeddings; write the output folder described in the module doc.

    Args:
        embeddings: an ``embed`` output folder or one embeddings CSV.
        clinical: optional ``participants.tsv`` joined on the subject id.
        levels: which of ``subject`` / ``slice`` to analyse (when present).
        max_slices: slices beyond this number are subsampled (seeded) for speed.
        include_healthy: also cluster and map healthy subjects / slices. By default only
            tumour rows are analysed (``label == "tumour"``): subgroups are subgroups of
            tumours, and healthy embeddings (salient ≈ 0 by construction) would form
            one trivial cluster that dominates the silhouette. ``excluded`` slices are
            always dropped.

    Returns:
        The ``summary.json`` content.
    """
    for m in maps:
        if m not in MAP_METHODS:
            raise ConfigError(f"--maps: unknown map {m!r} (use pca and/or umap)")
    tables = load_embeddings(embeddings)
    clin = read_clinical(clinical) if clinical is not None else None
    out = Path(out)
    summary: dict = {"embeddings": str(embeddings), "clinical": str(clinical) if clinical else None,
                     "method": method, "seed": seed, "maps": list(maps), "include_healthy": include_healthy,
                     "levels": {}}
    assocs = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for level in levels:
            if level not in tables:
                continue
            df = tables[level]
            if "label" in df.columns:
                df = df[df["label"].isin(("healthy", "tumour") if include_healthy else ("tumour",))]
            if level == "slice":
                if len(df) > max_slices:
                    df = df.sample(n=max_slices, random_state=seed).sort_index()
            df = df.reset_index(drop=True)
            table, info, assoc = _analyse_level(df, level, clin, tmp, method, k, k_range, seed, maps,
                                                min_cluster_size, standardize)
            name = "clusters.csv" if level == "subject" else "slice_clusters.csv"
            table.to_csv(tmp / name, index=False)
            summary["levels"][level] = info
            assocs.append(assoc)
        if not summary["levels"]:
            what = "" if include_healthy else "tumour "
            raise InputError(f"{embeddings}: no {what}{' or '.join(levels)} embeddings to analyse")
        pd.concat(assocs, ignore_index=True).to_csv(tmp / "associations.csv", index=False)
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    return summary
