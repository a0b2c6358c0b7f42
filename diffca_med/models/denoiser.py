"""The token-conditioned denoiser: a diffusers ``UNet2DConditionModel`` conditioned on Z.

Three paths carry the tokens Z (B, T, D) into the U-Net, each switchable in
:class:`ModelConfig` because a U-Net conditioned by cross-attention alone learns a
generic brain and ignores its tokens at CPU budgets (DESIGN §5):

* cross-attention to Z at the low-resolution levels (``attention_levels``);
* AdaGN scale/shift in every ResNet block from the flattened tokens
  (``pooled_conditioning``; diffusers' ``class_embed_type="projection"`` added to the
  time embedding with ``resnet_time_scale_shift="scale_shift"``, as in DiffAE);
* a coarse image rendered from Z alone by :class:`TokenRenderer`, concatenated to the
  noisy input (``render_prior``) and trained with a direct MSE to the clean target.

All three are functions of Z only, so G(Z) stays a generator conditioned on tokens
and the stage-2 split acts through them.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffca_med.models.conditioning import locality_bias
from diffca_med.models.config import ModelConfig


def upsampling_decoder(config: ModelConfig, side: int) -> list[nn.Module]:
    """Layers from a (``unet_channels[-1]``, side, side) map to the diffusion image.

    (nearest ×2 upsample, two 3×3 conv + GroupNorm + SiLU) blocks, widths following
    ``unet_channels`` backwards, until the diffusion size; then a 3×3 conv to the
    diffusion channels.
    """
    c = config.unet_channels[-1]
    widths = list(reversed(config.unet_channels))
    blocks: list[nn.Module] = []
    i = 0
    while side < config.diffusion_size:
        out = widths[min(i + 1, len(widths) - 1)]
        blocks += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(config.norm_groups, out), nn.SiLU(),
            nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(config.norm_groups, out), nn.SiLU(),
        ]
        c, side, i = out, side * 2, i + 1
    blocks.append(nn.Conv2d(c, config.diffusion_channels, 3, padding=1))
    return blocks


class TokenRenderer(nn.Module):
    """Tokens (B, T, D) → coarse image (B, C_d, S, S) in the diffusion space.

    The K semantic tokens are placed on a (g × g) feature map, g = ``render_grid``:
    cell features = Σ_k A[cell, k] · W·token_k, with one projection W shared by all
    tokens and a learnt token-to-cell mixing A (softmax over tokens) initialised from
    the query anchors of :func:`~diffca_med.models.conditioning.locality_bias` (with
    K = g² it starts as token k → cell k). The intensity token scales and shifts
    every cell. (upsample + conv) blocks then bring the map to the diffusion size S.

    Why a shared projection rather than one linear layer from all flattened tokens
    (``benchmarks/token_renderer_ablation.py``, conditioner + renderer trained as a
    plain autoencoder for 750 steps on the 30-subject CPU cohort, brain PSNR test /
    train): the flattened layer memorised the 1 108 training slices (17.5 / 21.4 dB),
    while 64 tokens on an 8 × 8 grid reached 22.1 / 23.0 dB. No input from the noisy
    image: this is what Z alone says.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        g, k = config.render_grid, config.n_queries
        c = config.unet_channels[-1]
        self.g, self.c = g, c
        self.cell = nn.Linear(config.token_dim, c)
        self.film = nn.Linear(config.token_dim, 2 * c)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        sigma = 0.5 * g / k ** 0.5  # half the anchor spacing, in cells
        self.mixing = nn.Parameter(locality_bias(k, g * g, sigma).t().contiguous())  # (g², K) logits
        first = [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(config.norm_groups, c), nn.SiLU()]
        self.net = nn.Sequential(*first, *upsampling_decoder(config, g))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        semantic, intensity = tokens[:, :-1], tokens[:, -1]
        cells = torch.einsum("pk,bkc->bcp", self.mixing.softmax(dim=1), self.cell(semantic))
        f = cells.reshape(-1, self.c, self.g, self.g)
        scale, shift = self.film(intensity).chunk(2, dim=1)
        f = f * (1.0 + scale[..., None, None]) + shift[..., None, None]
        return self.net(f)


def build_unet(config: ModelConfig) -> UNet2DConditionModel:
    """The diffusers U-Net with cross-attention only where ``attention_levels`` says."""
    levels = list(config.attention_levels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    in_ch = config.diffusion_channels * (2 if config.render_prior else 1)
    kwargs = dict(
        sample_size=config.diffusion_size,
        in_channels=in_ch,
        out_channels=config.diffusion_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if levels[-1] else None,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_groups,
        cross_attention_dim=config.token_dim,
        attention_head_dim=max(1, config.token_dim // config.attention_heads),
    )
    if config.pooled_conditioning:
        kwargs.update(
            class_embed_type="projection",
            projection_class_embeddings_input_dim=config.n_tokens * config.token_dim,
            resnet_time_scale_shift="scale_shift",
        )
    return UNet2DConditionModel(**kwargs)


class Denoiser(nn.Module):
    """Predicts the diffusion target (v, ε or x₀) of ``x_t`` given timesteps and Z.

    Shapes: ``x_t`` (B, C_d, S, S), ``t`` (B,) long, ``tokens`` (B, T, D);
    ``prior`` (B, C_d, S, S) is the renderer's output (computed if not given).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = build_unet(config)
        self.renderer = TokenRenderer(config) if config.render_prior else None

    def render(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return self.renderer(tokens) if self.renderer is not None else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        if self.renderer is not None:
            if prior is None:
                prior = self.renderer(tokens)
            x_t = torch.cat([x_t, prior], dim=1)
        extra = {}
        if self.config.pooled_conditioning:
            extra["class_labels"] = tokens.flatten(1)
        return self.unet(x_t, t, encoder_hidden_states=tokens, return_dict=False, **extra)[0]
