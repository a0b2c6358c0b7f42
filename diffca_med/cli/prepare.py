"""``diffca-med prepare DATA OUT``: ingest a BraTS / MSD / BIDS folder into a slice store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from diffca_med.cli.common import user_errors, warn
from diffca_med.data.store_writer import DEFAULT_MIN_BRAIN_FRACTION, DEFAULT_MIN_TUMOUR_FRACTION


def summary_table(summary) -> Table:
    """Rich table: subjects and slices per label per split."""
    table = Table(title="slice store: subjects, and slices per label", show_lines=False)
    for col in ("split", "subjects", "w/ tumour", "healthy", "tumour", "excluded"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for row in summary.itertuples(index=False):
        table.add_row(
            row.split, str(row.subjects), str(row.tumour_subjects), str(row.healthy), str(row.tumour), str(row.excluded),
            style="bold" if row.split == "total" else None,
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("prepare")
    @user_errors
    def prepare_cmd(
        data: Path = typer.Argument(..., help="Input folder: BraTS 2021, BraTS 2023/2024 (GLI/MEN/MET/PED/SSA), MSD Task01 (dataset.json + imagesTr) or BIDS."),
        out: Path = typer.Argument(..., help="Output slice-store folder (written under a temporary name, renamed when complete)."),
        layout: Optional[str] = typer.Option(None, "--layout", help="Input layout: brats2023, brats2021, msd or bids. Default: detected from the files."),
        modalities: Optional[str] = typer.Option(None, "--modalities", help="Comma-separated channels to keep, in this order (canonical names t1, t1c, t2, flair). Default: t1,t1c,t2,flair."),
        size: int = typer.Option(64, "--size", help="Slice size in pixels (H = W) after cropping to the brain and padding to a square."),
        min_brain_fraction: float = typer.Option(DEFAULT_MIN_BRAIN_FRACTION, "--min-brain-fraction", help="A slice is used (healthy or tumour) only if its brain area is at least this fraction of the subject's largest axial brain cross-section; otherwise it is 'excluded'."),
        min_tumour_fraction: float = typer.Option(DEFAULT_MIN_TUMOUR_FRACTION, "--min-tumour-fraction", help="A slice is 'tumour' if its tumour area (label > 0) is at least this fraction of the slice (size x size pixels; 0.005 = 20 pixels at size 64). A slice with any tumour voxel but less area is 'excluded'; one with none is 'healthy'."),
        val_fraction: float = typer.Option(0.15, "--val-fraction", help="Fraction of subjects (per stratum: with / without tumour) in the validation split."),
        test_fraction: float = typer.Option(0.15, "--test-fraction", help="Fraction of subjects (per stratum) in the test split."),
        seed: int = typer.Option(0, "--seed", help="Seed of the subject-level split."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes, one subject each at a time. Default: all cores."),
        skip_incomplete: bool = typer.Option(False, "--skip-incomplete", help="Skip subjects that lack a requested modality (listed in a warning) instead of failing."),
        zero_nonfinite: bool = typer.Option(False, "--zero-nonfinite", help="Set NaN/inf voxels to 0 (with a warning) instead of failing."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if OUT already holds a store of the same inputs and options, or replace one built from different ones."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
    ) -> None:
        """Turn a folder of brain MRI volumes into a validated, subject-split store of 2-D axial slices.

        Per subject: load, reorient to RAS, crop to the brain (nonzero in any modality), normalise each modality inside the brain, its 0.5th percentile to 0 and its median to 0.3 (a lesion cannot move the median much, unlike a top percentile), clipped to [0, 1], pad to a square and resize to --size. Every axial slice of the brain's bounding box is stored and labelled healthy / tumour / excluded; subjects are split train/val/test, stratified by tumour presence.

        Re-running with the same inputs and options reuses the existing store; --force rebuilds it.
        """
        from diffca_med.pipelines.prepare import PrepareOptions, prepare

        opts = PrepareOptions(
            layout=layout, modalities=modalities, size=size, min_brain_fraction=min_brain_fraction,
            min_tumour_fraction=min_tumour_fraction, val_fraction=val_fraction, test_fraction=test_fraction,
            seed=seed, skip_incomplete=skip_incomplete, zero_nonfinite=zero_nonfinite,
        )
        console = Console()
        result = prepare(
            data, out, opts, workers=workers or os.cpu_count(), force=force, progress=not quiet,
            info=lambda msg: typer.echo(msg), warn=warn,
        )
        if not quiet:
            console.print(summary_table(result.summary))
        verb = "reused" if result.reused else "wrote"
        typer.echo(f"{verb} {result.store} ({result.summary.iloc[-1]['subjects']} subjects) in {result.seconds:.1f} s")
