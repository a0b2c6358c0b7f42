"""``diffca-med embed MODEL STORE OUT``: salient embeddings per slice and per subject (CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffca_med.cli.common import DEVICE_HELP, user_errors


def register(app: typer.Typer) -> None:
    @app.command("embed")
    @user_errors
    def embed_cmd(
        model: Path = typer.Argument(..., help="Trained model folder (from `diffca-med train`)."),
        store: Path = typer.Argument(..., help="A slice store from `diffca-med prepare` (or a raw BraTS/MSD/BIDS folder, prepared into OUT/store)."),
        out: Path = typer.Argument(..., help="Output folder for slice_embeddings.csv, subject_embeddings.csv and embed.json."),
        split: Optional[List[str]] = typer.Option(None, "--split", help="Only slices of these splits (repeatable: train, val, test). Default: all."),
        batch_size: int = typer.Option(64, "--batch-size", help="Slices encoded per model call."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Export the salient embedding of every slice, and per subject the mean over its tumour slices.

        slice_embeddings.csv: subject, slice, split, label, tumour_pixels, salient_0 ... salient_{d-1}.
        subject_embeddings.csv: subject, split, label, n_slices, tumour_pixels, salient_0 ... (mean over the subject's tumour slices, or its healthy slices when it has none).
        """
        from diffca_med.analysis.embeddings import run_embed

        info = run_embed(model, store, out, batch_size=batch_size, splits=tuple(split) if split else None, progress=not quiet,
                         device=device)
        typer.echo(f"wrote {info['n_slices']} slice and {info['n_subjects']} subject embeddings (d = {info['dim']}) to {out}")
