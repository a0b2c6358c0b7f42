"""``diffca-med evaluate MODEL STORE OUT``: score a model (or a saved baseline) on a slice store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffca_med.cli.common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @user_errors
    def evaluate_cmd(
        model: Path = typer.Argument(..., help="A trained Diff-CA model folder (from `diffca-med train`) or a saved baseline folder (holding baseline.json)."),
        store: Path = typer.Argument(..., help="Slice store folder (from `diffca-med prepare`)."),
        out: Path = typer.Argument(..., help="Output folder for metrics.json and metrics.md (created if missing; the two files are replaced atomically)."),
        ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="Folder of true healthy twins: the twin of input file DATA/P is DIR/P (for the built-in phantom: DATA/derivatives/phantom-truth). Enables the tumour-region PSNR/SSIM/MSE vs the twin."),
        participants: Optional[Path] = typer.Option(None, "--participants", help="Clinical table (TSV/CSV with participant_id) giving 'subtype' and 'hemisphere' for the probes and subgroup scores. Default: participants.tsv in the store's data folder, if present."),
        split: str = typer.Option("test", "--split", help="Split whose subjects are evaluated: train, val or test."),
        threshold_split: str = typer.Option("val", "--threshold-split", help="Split on which the anomaly threshold with the best Dice is chosen before it is applied to --split."),
        dilation: int = typer.Option(3, "--dilation", help="Pixels (at store resolution) by which the tumour mask is dilated before the healthy region (brain outside it) is scored."),
        slice_stride: int = typer.Option(1, "--slice-stride", help="Evaluate every n-th slice of each subject (generation is the costly part; 1 = all slices)."),
        noise: str = typer.Option("inverted", "--noise", help="Starting noise of generative models: 'inverted' (DDIM inversion of the input, deterministic) or 'fresh' (seeded Gaussian noise)."),
        inversion_depth: float = typer.Option(1.0, "--inversion-depth", help="Fraction of the diffusion trajectory to invert (0-1] when --noise inverted."),
        steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps for generation. Default: the model's configured step count."),
        batch_size: int = typer.Option(32, "--batch-size", help="Slices generated per batch."),
        folds: int = typer.Option(5, "--folds", help="Folds of the subject-grouped cross-validated probes."),
        seed: int = typer.Option(0, "--seed", help="Seed for sampling noise, probes and clustering (same seed -> same metrics)."),
    ) -> None:
        """Benchmark metrics of one model on the held-out subjects of a store.

        Healthy-region fidelity (PSNR/SSIM vs the input outside the dilated tumour), tumour-region PSNR/SSIM/MSE vs the true healthy twin computed as the BraTS 2023 inpainting challenge does (with --ground-truth), anomaly detection (pixel AUPRC, best Dice, Dice at the validation threshold, slice AUROC), linear probes of the salient embedding and the common part, and subject-level subgroup agreement with the phantom subtype (ARI, NMI, silhouette). Writes OUT/metrics.json and OUT/metrics.md.
        """
        from diffca_med.errors import ConfigError
        from diffca_med.pipelines.evaluate import (
            EvaluateOptions,
            SamplingOptions,
            evaluate_method,
            load_method,
            markdown_table,
            write_outputs,
        )

        if noise not in ("inverted", "fresh"):
            raise ConfigError(f"--noise: must be 'inverted' or 'fresh', got {noise!r}")
        if not 0.0 < inversion_depth <= 1.0:
            raise ConfigError(f"--inversion-depth: must be in (0, 1], got {inversion_depth}")
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps: must be >= 1, got {steps}")
        opts = EvaluateOptions(
            split=split, threshold_split=threshold_split, dilation=dilation, slice_stride=slice_stride,
            batch_size=batch_size, seed=seed, folds=folds,
        )
        opts.check()
        method = load_method(model, SamplingOptions(noise=noise, inversion_depth=inversion_depth, steps=steps))
        result = evaluate_method(method, store, ground_truth, participants, opts, info=typer.echo)
        result["model"] = str(model)
        path = write_outputs(result, out)
        typer.echo(markdown_table([result]), nl=False)
        typer.echo(f"wrote {path} and {path.with_name('metrics.md')}")
