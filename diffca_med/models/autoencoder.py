"""Latent space (optional): a diffusers ``AutoencoderKL`` trained as stage 0 or loaded.

Images in [0, 1] are mapped to [-1, 1] before the encoder; latents are the posterior
mean (or a sample while training) multiplied by a data-derived scale so that the
diffusion model sees roughly unit-variance latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from diffca_med.errors import ConfigError
from diffca_med.models.config import ModelConfig


def build_autoencoder(config: ModelConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL for ``config`` (C channels in and out)."""
    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.image_size,
    )


def load_autoencoder(path: str, config: ModelConfig) -> AutoencoderKL:
    """Load a pretrained AutoencoderKL from a local folder; its channels must match."""
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: cannot load an AutoencoderKL from local files ({first})") from None
    vc = vae.config
    if vc.in_channels != config.in_channels or vc.latent_channels != config.latent_channels:
        raise ConfigError(
            f"{path}: autoencoder has {vc.in_channels} input / {vc.latent_channels} latent "
            f"channels, the model needs {config.in_channels} / {config.latent_channels}"
        )
    factor = 2 ** (len(vc.block_out_channels) - 1)
    if factor != 2 ** (len(config.vae_channels) - 1):
        raise ConfigError(
            f"{path}: autoencoder downsamples by {factor}; set model.vae_channels to "
            f"{len(vc.block_out_channels)} entries"
        )
    return vae


def autoencoder_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stage-0 loss: MSE reconstruction (in [-1, 1] units) + ``kl_weight`` · KL.

    ``images`` (B, C, H, W) in [0, 1]. Returns ``loss`` plus detached ``rec`` and ``kl``
    (per-element means) and ``latent_std`` of the posterior samples.
    """
    x = images * 2.0 - 1.0
    post = vae.encode(x).latent_dist
    z = post.sample(generator=generator)
    rec = vae.decode(z).sample
    rec_loss = F.mse_loss(rec, x)
    kl = post.kl().mean() / z[0].numel()
    loss = rec_loss + kl_weight * kl
    return {
        "loss": loss,
        "rec": rec_loss.detach(),
        "kl": kl.detach(),
        "latent_std": z.detach().std(),
    }
