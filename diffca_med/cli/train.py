"""``diffca-med train DATA --config X --out RUN``: train the Diff-CA model.

Multi-device runs go through Accelerate or torchrun, e.g.
``accelerate launch -m diffca_med.cli train DATA --config brats-128 --out RUN`` or
``torchrun --nproc_per_node 2 -m diffca_med.cli train ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffca_med.cli.common import setup_logging, user_errors, warn


def register(app: typer.Typer) -> None:
    @app.command("train")
    @user_errors
    def train_cmd(
        data: Path = typer.Argument(
            ...,
            help="A BraTS 2021/2023, MSD Task01 or BIDS folder (prepared on the fly into RUN/store, "
            "reused when unchanged), or a slice store made by 'diffca-med prepare'.",
        ),
        config: str = typer.Option(
            "cpu-demo",
            "--config",
            "-c",
            help="YAML config file, or the name of a shipped preset: cpu-demo (CPU, minutes), "
            "brats-128 (GPU, pixel space), brats-256-latent (GPU, latent space, DINOv3).",
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            "-o",
            help="Run folder: store/, checkpoints/, logs/, samples/, plots/ and the final model/ go here.",
        ),
        stage: str = typer.Option(
            "all",
            "--stage",
            help="Which stage to train: 0 (autoencoder, latent models only), 1 (image-conditioned "
            "diffusion autoencoder), 2 (common/salient split) or all. --stage 2 on a RUN with a "
            "finished stage 1 trains a fresh split with the config's stage-2 settings.",
        ),
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue from RUN/checkpoints/latest.json to the configured step counts "
            "(same result as an uninterrupted run).",
        ),
        overrides: Optional[List[str]] = typer.Option(
            None,
            "--set",
            help="Override a config value, SECTION.KEY=VALUE (YAML value), e.g. --set stage1.steps=100; repeatable.",
        ),
        force_prepare: bool = typer.Option(
            False,
            "--force-prepare",
            help="Rebuild RUN/store even if it exists, also when it was built from other inputs or data options.",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library messages too."),
    ) -> None:
        """Train the two-stage Diff-CA model: stage 0 (autoencoder, latent models), 1, 2.

        Writes atomic checkpoints every stageN.checkpoint_every steps, a CSV log per stage, sample grids, plots, and the final model folder RUN/model (config.json + safetensors) that DiffCAModel.from_pretrained loads.

        Several processes: accelerate launch -m diffca_med.cli train ... or torchrun --nproc_per_node N -m diffca_med.cli train ...
        """
        setup_logging(verbose)
        from diffca_med.pipelines.train import STAGE_CHOICES, resolve_config_path, train
        from diffca_med.training.config import load_config
        from diffca_med.errors import ConfigError

        if stage not in STAGE_CHOICES:
            raise ConfigError(f"--stage {stage}: must be one of {', '.join(STAGE_CHOICES)}")
        cfg = load_config(resolve_config_path(config), overrides or [])
        result = train(
            data,
            cfg,
            out,
            stage=stage,
            resume=resume,
            force_prepare=force_prepare,
            progress=not quiet,
            info=typer.echo,
            warn=warn,
        )
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            typer.echo(f"model: {result.model_dir} ({result.seconds:.1f} s)")
