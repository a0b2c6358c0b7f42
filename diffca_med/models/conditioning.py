"""Conditioning encoder: image → tokens ``Z = [T ; t_int]`` of shape (B, K+1, D).

* a backbone gives patch tokens (B, P, D): a small CNN trained jointly (``scratch``) or
  a frozen DINOv3 ViT from transformers (``dinov3``, loaded from local files only);
* a cross-query module (K learned queries cross-attending to the patch tokens,
  Perceiver-IO style) turns them into K semantic tokens ``T`` (B, K, D);
* a small CNN over per-modality soft intensity histograms gives the intensity token
  ``t_int`` (B, 1, D) (the paper's colour token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffca_med.errors import ConfigError
from diffca_med.models.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map.

    Unlike GroupNorm it uses no statistics over space, so a feature depends only on its
    receptive field (a bright lesion in one corner cannot shift every feature).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ScratchBackbone(nn.Module):
    """Small CNN: (B, C, H, W) in [0, 1] → patch tokens (B, (H/2^s)·(W/2^s), D).

    Each stage halves the resolution; a learned positional embedding tells the
    cross-query module where each patch lies (the queries can then pick regions).
    Normalisation layers are GroupNorm, or :class:`ChannelNorm` with
    ``backbone_norm: channel`` (spatially local features).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        chans = list(config.scratch_channels)
        g = config.norm_groups

        def norm(c: int) -> nn.Module:
            return ChannelNorm(c) if config.backbone_norm == "channel" else nn.GroupNorm(g, c)

        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, chans[0], 3, padding=1)]
        prev = chans[0]
        for c in chans:
            layers += [
                norm(prev), nn.SiLU(), nn.Conv2d(prev, c, 3, stride=2, padding=1),
                norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
            ]
            prev = c
        layers += [norm(prev), nn.SiLU(), nn.Conv2d(prev, config.token_dim, 1)]
        self.net = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(chans)
        self.pos = nn.Parameter(torch.randn(side * side, config.token_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x * 2.0 - 1.0)  # (B, D, h, w)
        return f.flatten(2).transpose(1, 2) + self.pos


def channel_map(n_in: int) -> torch.Tensor:
    """Fixed (3, n_in) matrix mapping MRI channels onto an RGB backbone's 3 inputs.

    1 channel → grey; 2 → (c0, c1, mean); 3 → identity; more → consecutive groups
    averaged (channel i feeds output ``floor(3 i / n_in)``).
    """
    m = torch.zeros(3, n_in)
    if n_in == 1:
        m[:, 0] = 1.0
    elif n_in == 2:
        m[0, 0] = m[1, 1] = 1.0
        m[2, :] = 0.5
    else:
        for i in range(n_in):
            m[(3 * i) // n_in, i] = 1.0
        m = m / m.sum(dim=1, keepdim=True)
    return m


def load_dinov3(path: str):
    """Load a DINOv3 ViT from a local folder or an existing hub cache (no download)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: cannot load a DINOv3 model from local files ({first})") from None


class DinoV3Backbone(nn.Module):
    """Frozen DINOv3 ViT: (B, C, H, W) in [0, 1] → projected patch tokens (B, P, D).

    The MRI channels are mapped to 3 by :func:`channel_map`, ImageNet-normalised and
    resized to ``backbone_input_size``; the CLS and register tokens are dropped. Only
    the linear projection to D is trained.
    """

    def __init__(self, config: ModelConfig, vit: nn.Module | None = None):
        super().__init__()
        self.vit = vit if vit is not None else load_dinov3(config.dinov3_path)
        vcfg = self.vit.config
        patch = int(vcfg.patch_size)
        if config.backbone_input_size % patch:
            raise ConfigError(
                f"model.backbone_input_size: {config.backbone_input_size} is not a multiple "
                f"of the DINOv3 patch size {patch}"
            )
        self.skip = 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0)
        self.size = config.backbone_input_size
        self.register_buffer("cmap", channel_map(config.in_channels), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Sequential(nn.LayerNorm(vcfg.hidden_size), nn.Linear(vcfg.hidden_size, config.token_dim))
        self.vit.requires_grad_(False)
        self.vit.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # always frozen
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("oc,bchw->bohw", self.cmap, x)
        rgb = F.interpolate(rgb, size=(self.size, self.size), mode="bilinear", align_corners=False)
        rgb = (rgb - self.mean) / self.std
        with torch.no_grad():
            h = self.vit(pixel_values=rgb).last_hidden_state[:, self.skip:]
        return self.proj(h)


class CrossQueryLayer(nn.Module):
    """Queries ← cross-attention to patch tokens, then self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int, self_attention: bool = True):
        super().__init__()
        self.nq, self.nkv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ns = self.self_attn = None
        if self_attention:
            self.ns = nn.LayerNorm(dim)
            self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.nm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kvn = self.nkv(kv)
        q = q + self.cross(self.nq(q), kvn, kvn, attn_mask=bias, need_weights=False)[0]
        if self.self_attn is not None:
            s = self.ns(q)
            q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.nm(q))


def _anchor_distances(n_queries: int, side: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Query anchors vs patch centres on a (side × side) patch grid.

    Returns the Euclidean (K, P) and Chebyshev (K, P) distances in patch units and the
    anchor spacing. Anchors lie on the most square grid of K points spread over the grid.
    """
    rows = int(n_queries ** 0.5)
    while n_queries % rows:
        rows -= 1
    cols = n_queries // rows
    ay = (torch.arange(rows).float() + 0.5) * side / rows - 0.5
    ax = (torch.arange(cols).float() + 0.5) * side / cols - 0.5
    anchors = torch.stack(torch.meshgrid(ay, ax, indexing="ij"), dim=-1).reshape(-1, 2)
    py, px = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    patches = torch.stack([py, px], dim=-1).reshape(-1, 2)
    chebyshev = (anchors[:, None] - patches[None]).abs().amax(dim=-1)
    return torch.cdist(anchors, patches), chebyshev, max(side / rows, side / cols)


def window_mask(n_queries: int, n_patches: int, window: int) -> torch.Tensor | None:
    """Hard cross-attention mask (K, P): 0 where query k may look, −inf elsewhere.

    Query k sees the patches within Chebyshev distance ``window`` + half the anchor
    spacing of its anchor, so ``window`` 0 with K = P is "token k = patch k" and each
    token describes only its own region (what the stage-2 in-painting split needs).
    None for a non-square patch grid.
    """
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches:
        return None
    _, chebyshev, spacing = _anchor_distances(n_queries, side)
    visible = chebyshev <= window + 0.5 * spacing + 1e-6
    return torch.zeros(n_queries, n_patches).masked_fill(~visible, float("-inf"))


def locality_bias(n_queries: int, n_patches: int, sigma: float) -> torch.Tensor:
    """Initial cross-attention logit bias (K, P): −d²/(2σ²) between query k's anchor and
    patch p, d in patch units.

    Anchors lie on the most square grid of K points spread over the (√P × √P) patch
    grid, so each query starts by pooling its own region (spatially arranged tokens)
    and learns from there; this makes the tokens carry the image much sooner than
    queries that must discover locations by themselves.
    """
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches:
        return torch.zeros(n_queries, n_patches)
    euclid, _, _ = _anchor_distances(n_queries, side)
    return -euclid.pow(2) / (2.0 * sigma**2)


class CrossQuery(nn.Module):
    """K learned queries → K semantic tokens (B, K, D) from patch tokens (B, P, D).

    With ``query_locality`` > 0 the cross-attention logits get a learnable additive
    bias (K, P) initialised by :func:`locality_bias` (built at the first call, when P
    is known, so any backbone's patch grid works; saved with the weights). With
    ``query_window`` >= 0 a fixed :func:`window_mask` is added as well, and with
    ``query_self_attention`` off the queries never exchange information: token k then
    depends only on the patches around its anchor.
    """

    def __init__(self, config: ModelConfig, n_patches: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(config.n_queries, config.token_dim) * 0.02)
        self.layers = nn.ModuleList(
            CrossQueryLayer(config.token_dim, config.attention_heads, config.query_self_attention)
            for _ in range(config.cross_query_layers)
        )
        self.bias = None
        if config.query_locality > 0:
            self.bias = nn.Parameter(locality_bias(config.n_queries, n_patches, config.query_locality))
        mask = window_mask(config.n_queries, n_patches, config.query_window) if config.query_window >= 0 else None
        self.register_buffer("window", mask, persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        bias = self.bias
        if self.window is not None:
            bias = self.window if bias is None else bias + self.window
        for layer in self.layers:
            q = layer(q, patches, bias)
        return q


class IntensityToken(nn.Module):
    """One token (B, 1, D) from per-modality intensity statistics of the foreground.

    Foreground = pixels above 1 % (the store's images are zero outside the brain).
    ``intensity_statistics`` ``histogram``: a Gaussian-kernel histogram over
    ``intensity_bins`` centres in [0, 1] plus mean and standard deviation per modality;
    ``quantiles``: ``intensity_bins`` quantiles from the 10th to the 90th percentile plus
    median and interquartile range (robust to a small lesion's tail). A 1-D CNN over the
    bins mixes the modalities.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        bins = config.intensity_bins
        self.kind = config.intensity_statistics
        self.register_buffer("centres", torch.linspace(0.0, 1.0, bins), persistent=False)
        # the profile's quantiles, then the quartiles for median and IQR
        levels = torch.cat([torch.linspace(0.1, 0.9, bins), torch.tensor([0.25, 0.5, 0.75])])
        self.register_buffer("levels", levels, persistent=False)
        self.width = 1.0 / bins
        c = config.in_channels
        self.conv = nn.Sequential(
            nn.Conv1d(c, 32, 3, padding=1), nn.SiLU(), nn.Conv1d(32, 32, 3, padding=1), nn.SiLU()
        )
        self.mlp = nn.Sequential(
            nn.Linear(32 * bins + 2 * c, 2 * config.token_dim), nn.SiLU(),
            nn.Linear(2 * config.token_dim, config.token_dim),
        )

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality profile (B, C, bins) and two summaries (B, 2C) of the foreground:
        soft histogram, mean and standard deviation; or quantiles, median and IQR."""
        flat = x.flatten(2)  # (B, C, N)
        fg = (flat.amax(dim=1, keepdim=True) > 0.01).float()  # (B, 1, N)
        if self.kind == "quantiles":
            return self._quantiles(flat, fg > 0)
        w = fg / fg.sum(dim=2, keepdim=True).clamp_min(1.0)
        k = torch.exp(-0.5 * ((flat.unsqueeze(-1) - self.centres) / self.width) ** 2)  # (B,C,N,bins)
        hist = (k * w.unsqueeze(-1)).sum(dim=2)
        hist = hist / hist.sum(dim=2, keepdim=True).clamp_min(1e-6)
        mean = (flat * w).sum(dim=2)
        var = ((flat - mean.unsqueeze(-1)) ** 2 * w).sum(dim=2)
        return hist, torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)

    def _quantiles(self, flat: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # background as NaN so that nanquantile sees only the foreground; an empty slice → 0
        vals = flat.masked_fill(~fg, float("nan"))
        q = torch.nanquantile(vals, self.levels, dim=2).permute(1, 2, 0).nan_to_num(0.0)  # (B, C, bins+3)
        profile, (q25, q50, q75) = q[..., :-3], q[..., -3:].unbind(-1)
        return profile, torch.cat([q50, q75 - q25], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        profile, summary = self.statistics(x)
        scale = profile.shape[-1] if self.kind == "histogram" else 4.0  # unit-order inputs
        h = self.conv(profile * scale).flatten(1)
        return self.mlp(torch.cat([h, summary * 4.0], dim=1)).unsqueeze(1)


class ConditioningEncoder(nn.Module):
    """Image (B, C, H, W) in [0, 1] → tokens Z (B, K+1, D), layer-normalised."""

    def __init__(self, config: ModelConfig, vit: nn.Module | None = None):
        super().__init__()
        if config.backbone == "dinov3":
            self.backbone: nn.Module = DinoV3Backbone(config, vit)
            n_patches = (config.backbone_input_size // int(self.backbone.vit.config.patch_size)) ** 2
        else:
            self.backbone = ScratchBackbone(config)
            n_patches = (config.image_size // 2 ** len(config.scratch_channels)) ** 2
        self.cross_query = CrossQuery(config, n_patches)
        self.intensity = IntensityToken(config)
        self.norm = nn.LayerNorm(config.token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        semantic = self.cross_query(self.backbone(x))
        return self.norm(torch.cat([semantic, self.intensity(x)], dim=1))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything except a frozen DINOv3 ViT."""
        frozen = set()
        if isinstance(self.backbone, DinoV3Backbone):
            frozen = {id(p) for p in self.backbone.vit.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]


def backbone_config_dict(encoder: ConditioningEncoder) -> dict | None:
    """The DINOv3 config as a dict (saved beside the weights), or None for scratch."""
    if isinstance(encoder.backbone, DinoV3Backbone):
        return encoder.backbone.vit.config.to_dict()
    return None


def dinov3_from_config_dict(data: dict) -> nn.Module:
    """An (untrained) DINOv3 ViT with the architecture ``data`` describes."""
    from transformers import AutoConfig, AutoModel

    data = dict(data)
    model_type = data.pop("model_type", "dinov3_vit")
    cfg = AutoConfig.for_model(model_type, **data)
    return AutoModel.from_config(cfg)


__all__ = [
    "ConditioningEncoder", "CrossQuery", "locality_bias", "window_mask", "IntensityToken", "ScratchBackbone", "DinoV3Backbone",
    "channel_map", "load_dinov3", "backbone_config_dict", "dinov3_from_config_dict",
]
