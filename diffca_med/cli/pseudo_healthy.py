"""``diffca-med pseudo-healthy MODEL DATA OUT``: tumour-removed counterfactual volumes and anomaly maps."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffca_med.cli.common import DEVICE_HELP, user_errors


def parse_subjects(values: Optional[List[str]]) -> list[str] | None:
    """``--subjects a,b --subjects c`` -> ``["a", "b", "c"]`` (None when not given)."""
    if not values:
        return None
    out = [s.strip() for v in values for s in v.split(",") if s.strip()]
    return out or None


def register(app: typer.Typer) -> None:
    @app.command("pseudo-healthy")
    @user_errors
    def pseudo_healthy_cmd(
        model: Path = typer.Argument(..., help="Trained model folder (config JSON + safetensors, from `diffca-med train`)."),
        data: Path = typer.Argument(..., help="A slice store from `diffca-med prepare`, or a raw BraTS/MSD/BIDS folder (then prepared into OUT/store at the model's size and modalities)."),
        out: Path = typer.Argument(..., help="Output folder: one sub-folder per subject with NIfTI volumes, anomaly map and mask, previews and summary.json; summary.csv for the cohort."),
        subjects: Optional[List[str]] = typer.Option(None, "--subjects", help="Subject ids to process (comma-separated or repeated). Default: all subjects (see --split)."),
        split: Optional[str] = typer.Option(None, "--split", help="Only subjects of this split (train, val or test)."),
        noise: str = typer.Option("fresh", "--noise", help="Starting noise: 'fresh' (seeded Gaussian) or 'inverted' (deterministic DDIM inversion of the input)."),
        paired: bool = typer.Option(False, "--paired/--unpaired", help="--paired: apply to the input only the change the split makes, input + G(common) - G(common + salient) from the same noise (twice the sampling time; the error both generations share cancels). --unpaired: the generated G(common) itself."),
        inversion_depth: float = typer.Option(1.0, "--inversion-depth", help="Fraction of the diffusion trajectory inverted/re-generated, in (0, 1]; smaller keeps more of the input."),
        steps: Optional[int] = typer.Option(None, "--steps", help="DDIM sampling (and inversion) steps. Default: the model's configured sample_steps."),
        seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and batch size give identical outputs."),
        samples: int = typer.Option(1, "--samples", help="With --noise fresh: average this many generations from different seeds (less sampling noise; N times the time)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Slices generated per model call."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        threshold: str = typer.Option("otsu", "--threshold", help="Anomaly-mask threshold: 'otsu' (on the anomaly map inside the brain), 'percentile' or 'fixed'."),
        threshold_value: Optional[float] = typer.Option(None, "--threshold-value", help="For --threshold percentile: the percentile (default 99); for fixed: the anomaly value (normalised intensity units)."),
        combine: str = typer.Option("mean", "--combine", help="How |input - pseudo-healthy| is combined over modalities: 'mean' or 'max'."),
        compose: str = typer.Option("masked", "--compose", help="Volumes in the original grid: 'masked' adds the model's change to the original voxels only inside the dilated anomaly mask and the model's salient support, on slices with as much brain as the training slices (the original elsewhere); 'residual' adds it everywhere in the brain; both keep the original's full-resolution detail. 'direct' writes the generated image itself."),
        dilation: int = typer.Option(2, "--dilation", help="Radius in store pixels by which the anomaly mask is dilated: for the healthy-region fidelity and for --compose masked."),
        components: int = typer.Option(0, "--components", help="With --compose masked: change only the N largest 3-D connected parts of the region (consecutive slices connect), dropping small scattered detections; 0 keeps every part."),
        support: bool = typer.Option(True, "--support/--no-support", help="Keep in the anomaly mask only the model's salient support: the image cells of the tokens its split gates as lesion (with the additive split nearly every cell). Elsewhere |input - pseudo-healthy| is reconstruction error, not anomaly; --no-support thresholds the whole map."),
        previews: int = typer.Option(3, "--previews", help="Number of most affected slices rendered as PNG previews per subject."),
        slices: bool = typer.Option(False, "--slices", help="Also write every counterfactual slice as PNG and the stack as one (D, C, H, W) .npy per subject (under <subject>/slices/)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Generate pseudo-healthy counterfactuals (salient factor set to zero) of every brain slice, put them back into each subject's original NIfTI grid, and write anomaly maps, masks and previews.

        Outputs keep each input's affine and header (sform and qform) and are named after the input files with a _pseudohealthy suffix, so they open on top of the originals in 3D Slicer or ITK-SNAP. Re-running skips subjects already written with the same options.
        """
        from diffca_med.analysis.counterfactuals import AnomalyOptions, GenerationOptions, run_pseudo_healthy

        gen = GenerationOptions(noise=noise, inversion_depth=inversion_depth, steps=steps, seed=seed,
                                batch_size=batch_size, paired=paired, samples=samples)
        ano = AnomalyOptions(combine=combine, threshold=threshold, threshold_value=threshold_value,
                             dilation=dilation, compose=compose, components=components, support=support,
                             previews=previews)
        summaries = run_pseudo_healthy(model, data, out, subjects=parse_subjects(subjects), split=split,
                                       generation=gen, anomaly=ano, write_slices=slices, progress=not quiet,
                                       device=device)
        flagged = sum(1 for s in summaries if s["flags"])
        typer.echo(f"wrote {len(summaries)} subject(s) to {out} ({flagged} with quality flags); cohort table: {out / 'summary.csv'}")
