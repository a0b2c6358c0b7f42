"""``diffca-med demo [OUT]``: phantom → prepare → train → pseudo-healthy → embed → subgroups → report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffca_med.cli.common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo_cmd(
        out: Path = typer.Argument(Path("diffca-demo"), help="Output folder (created; re-running continues where it stopped)."),
        subjects: int = typer.Option(60, "--subjects", help="Number of synthetic subjects (at least 6; about 20% are healthy; 70/15/15% train/val/test)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the cohort, the generation and the clustering (same seed, same results)."),
        grid: str = typer.Option("half", "--grid", help="Phantom grid: 'half' (120x120x78, 2 mm), 'full' (240x240x155, 1 mm, the BraTS grid) or 'tiny' (60x60x40, 4 mm)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps of the pseudo-healthy generation. Default: the model's."),
        quick: bool = typer.Option(False, "--quick", help="Smoke test: tiny grid, tiny network, a few training steps (about a minute; results are meaningless)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (step lines only)."),
    ) -> None:
        """Run the whole product on the built-in synthetic cohort with the CPU preset and print what to open.

        Steps: phantom cohort, prepare the slice store, train both stages, pseudo-healthy volumes of the held-out test subjects, salient embeddings of all slices, subgroups against the phantom's participants.tsv, HTML report. Finished steps are skipped when re-run.
        """
        from diffca_med.pipelines.demo import DemoOptions, run_demo

        index = run_demo(out, DemoOptions(n_subjects=subjects, seed=seed, grid=grid, quick=quick, sample_steps=steps),
                         progress=not quiet, say=typer.echo)
        typer.echo(f"done. Open {index.resolve()}")
        typer.echo(f"  volumes: {(out / 'pseudo-healthy').resolve()} (NIfTI beside the originals in {(out / 'data').resolve()})")
        typer.echo(f"  subgroups: {(out / 'subgroups' / 'maps').resolve()}")
