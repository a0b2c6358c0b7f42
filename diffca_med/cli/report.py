"""``diffca-med report COUNTERFACTUALS OUT``: self-contained HTML pages per subject and an index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffca_med.cli.common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("report")
    @user_errors
    def report_cmd(
        counterfactuals: Path = typer.Argument(..., help="A `diffca-med pseudo-healthy` output folder."),
        out: Path = typer.Argument(..., help="Report folder: index.html and subjects/*.html (written under a temporary name, renamed when complete)."),
        subgroups: Optional[Path] = typer.Option(None, "--subgroups", help="A `diffca-med subgroups` output folder: adds clusters, the cohort map (with each subject highlighted) and the clinical associations."),
        title: str = typer.Option("diffca-med report", "--title", help="Title of the pages."),
    ) -> None:
        """Write one self-contained HTML page per subject (source files and model, most affected slices input | pseudo-healthy | anomaly, anomaly and tumour volumes, healthy-region fidelity, cohort map position and cluster, quality flags) and an index.html with the cohort table."""
        from diffca_med.reports.html import build_report

        index = build_report(counterfactuals, out, subgroups=subgroups, title=title)
        typer.echo(f"open {index}")
