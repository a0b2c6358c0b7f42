"""``diffca-med phantom OUT``: write the built-in synthetic cohort."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from diffca_med.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``phantom`` command to ``app``."""
    app.command(
        "phantom",
        help=(
            "Write a synthetic brain-MRI cohort with tumours and their ground-truth "
            "healthy twins. Anatomy comes from the MNI152 2009 template bundled with "
            "nilearn (no download), deformed per subject; four modalities (T1, T1c, T2, "
            "FLAIR) with bias field and Rician noise; tumours of three subtypes "
            "(ring_enhancing, infiltrative, multifocal_nodular) with mass effect, "
            "labelled in the layout's BraTS-style convention. Every image's healthy twin "
            "is written to OUT/derivatives/phantom-truth/<same relative path>, and "
            "OUT/participants.tsv lists subtype, lesion count, volume, centroid and "
            "hemisphere. The same seed always gives byte-identical files."
        ),
    )(phantom)


@user_errors
def phantom(
    out: Path = typer.Argument(..., help="Output folder (refused if it exists and is not empty, unless --force)."),
    n_subjects: int = typer.Option(20, "--n-subjects", "-n", help="Number of subjects to write."),
    seed: int = typer.Option(0, "--seed", help="Master random seed (>= 0); the same seed gives identical files."),
    layout: str = typer.Option(
        "brats2023", "--layout",
        help="On-disk layout: brats2023 (BraTS-GLI-00000-000/...-t1n.nii.gz, ET=3), "
        "brats2021 (BraTS2021_00000/..._t1ce.nii.gz, ET=4), msd (Task01 4-D imagesTr/labelsTr "
        "+ dataset.json) or bids (sub-000/anat/..., label maps in derivatives/phantom, "
        "BraTS 2023 label values).",
    ),
    grid: str = typer.Option(
        "half", "--grid",
        help="Voxel grid: full (240x240x155 at 1 mm, the BraTS grid), half (120x120x78 at "
        "2 mm) or tiny (60x60x40 at 4 mm, for quick tests).",
    ),
    healthy_fraction: float = typer.Option(
        0.2, "--healthy-fraction", help="Fraction of subjects written without any tumour (0 to 1)."
    ),
    workers: int = typer.Option(
        os.cpu_count() or 1, "--workers", "-j", help="Worker processes writing subjects in parallel.",
        show_default="all cores",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Write the synthetic cohort to OUT."""
    from diffca_med.data.phantom import TRUTH_DIR, make_cohort

    if workers < 1:
        from diffca_med.errors import ConfigError

        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    table = make_cohort(
        out, n_subjects=n_subjects, seed=seed, layout=layout, grid=grid,
        healthy_fraction=healthy_fraction, workers=workers, force=force, progress=True,
    )
    console = Console()
    summary = Table(title=f"phantom: {len(table)} subjects ({layout}, grid {grid}, seed {seed})")
    for col in ("subtype", "subjects", "lesions (mean)", "tumour volume ml (mean)"):
        summary.add_column(col, justify="left" if col == "subtype" else "right")
    for subtype, grp in table.groupby("subtype", sort=True):
        summary.add_row(
            str(subtype), str(len(grp)), f"{grp['n_lesions'].mean():.1f}",
            f"{grp['tumour_volume_ml'].mean():.1f}",
        )
    console.print(summary)
    # paths on one line each (no wrapping), so they can be copied
    console.print(f"data set:      {out}", soft_wrap=True)
    console.print(f"participants:  {out / 'participants.tsv'}", soft_wrap=True)
    console.print(f"healthy twins: {out / TRUTH_DIR} (same relative paths as the images)", soft_wrap=True)
