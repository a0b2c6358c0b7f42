"""``diffca-med subgroups EMBEDDINGS OUT``: clusters, PCA/UMAP maps and clinical associations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffca_med.cli.common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("subgroups")
    @user_errors
    def subgroups_cmd(
        embeddings: Path = typer.Argument(..., help="An `embed` output folder (slice_embeddings.csv, subject_embeddings.csv) or one embeddings CSV."),
        out: Path = typer.Argument(..., help="Output folder: clusters.csv, slice_clusters.csv, associations.csv, summary.json and maps/*.png."),
        clinical: Optional[Path] = typer.Option(None, "--clinical", help="Clinical table (participants.tsv, or a CSV) joined on participant_id = subject id; each column colours a map and is tested against the clusters."),
        method: str = typer.Option("kmeans", "--method", help="Clustering: 'kmeans', 'gmm' (Gaussian mixture) or 'hdbscan'."),
        k: Optional[int] = typer.Option(None, "--k", help="Number of clusters (kmeans, gmm). Default: the best silhouette between --k-min and --k-max."),
        k_min: int = typer.Option(2, "--k-min", help="Smallest k tried when --k is not given."),
        k_max: int = typer.Option(8, "--k-max", help="Largest k tried when --k is not given."),
        min_cluster_size: Optional[int] = typer.Option(None, "--min-cluster-size", help="HDBSCAN's minimum cluster size (default: max(3, n/20))."),
        maps: List[str] = typer.Option(["pca", "umap"], "--maps", help="2-D maps to draw (repeatable): pca, umap."),
        level: List[str] = typer.Option(["subject", "slice"], "--level", help="Analyse subject-level and/or slice-level embeddings (repeatable)."),
        max_slices: int = typer.Option(5000, "--max-slices", help="Slices beyond this number are subsampled (seeded) at the slice level."),
        include_healthy: bool = typer.Option(False, "--include-healthy", help="Also cluster and map healthy subjects and slices (default: tumour subjects and tumour slices only; healthy salient embeddings are near zero by design)."),
        standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="Scale each salient dimension to unit variance before clustering and mapping."),
        seed: int = typer.Option(0, "--seed", help="Seed of clustering, UMAP and subsampling (same seed, same output)."),
    ) -> None:
        """Find subgroups in salient embeddings: cluster them, draw PCA and UMAP maps coloured by cluster, label and clinical columns, and test each clinical column against the clusters (chi-square for categorical, Kruskal-Wallis for numeric)."""
        from diffca_med.analysis.subgroups import run_subgroups

        summary = run_subgroups(embeddings, out, clinical=clinical, method=method, k=k, k_range=(k_min, k_max),
                                seed=seed, maps=tuple(maps), levels=tuple(level), min_cluster_size=min_cluster_size,
                                max_slices=max_slices, include_healthy=include_healthy, standardize=standardize)
        for lev, info in summary["levels"].items():
            sil = "n/a" if info["silhouette"] is None else f"{info['silhouette']:.3f}"
            typer.echo(f"{lev}s: {info['n']} embeddings, k = {info['k']}, silhouette = {sil}")
        typer.echo(f"wrote {out / 'clusters.csv'}, {out / 'associations.csv'} and maps in {out / 'maps'}")
