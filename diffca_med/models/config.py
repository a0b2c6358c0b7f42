"""``ModelConfig``: every architecture choice of a Diff-CA model in one flat dataclass.

The defaults are the CPU preset's sizes (32×32 pixel space, a scratch CNN backbone, a
1.1 M parameter U-Net), with the original global tokens and additive split, which is
what a model folder without those fields means; ``configs/*.yaml`` switch on local
tokens and the in-painting split and override sizes in their ``model:`` section. The
dataclass is saved as ``config.json`` beside the weights, so a model folder always
rebuilds the same network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffca_med.errors import ConfigError

CANONICAL_MODALITIES = ("t1", "t1c", "t2", "flair")

#: Fields that shape only stage 2 (the split, adversary and their losses): a new stage-2
#: run on top of a trained stage 1 takes these from the YAML, the rest from stage 1.
STAGE2_FIELDS = (
    "split_mode", "gate_dilation", "gate_threshold", "inpaint_masks", "w_detect", "w_inpaint", "w_salient_rec", "adversarial_fill", "salient_dim", "split_depth", "adversary_hidden", "adversary_pooling", "grl_init", "grl_min",
    "grl_max", "grl_gain", "grl_target", "grl_ema", "grl_warmup_steps", "w_token_rec", "w_bg_salient",
    "w_adv", "w_denoise", "w_mmd", "w_salient_cls",
)


@dataclass
class ModelConfig:
    """Architecture and loss settings of :class:`~diffca_med.models.DiffCAModel`.

    Sizes are in pixels (images) or channels/features; loss weights are unitless.
    """

    # --- data -----------------------------------------------------------------------
    modalities: list[str] = field(default_factory=lambda: ["t1c", "flair"])
    """Input channels, in the slice store's order (canonical names)."""
    image_size: int = 32
    """Input height = width in pixels."""
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 50.0])
    intensity_upper_value: float = 0.3
    """The store normalisation the model was trained on (``data.percentiles`` and
    ``data.upper_value``); raw data given to the model is prepared the same way. A
    saved config without them predates the median anchor: [0.5, 99.5] and 1.0."""

    # --- space: pixel, or the latent of an AutoencoderKL (stage 0) -------------------
    space: str = "pixel"
    """``pixel`` or ``latent``."""
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    """AutoencoderKL block widths; the latent is ``image_size / 2**(len-1)`` wide."""
    latent_channels: int = 4
    vae_kl_weight: float = 1e-6
    """Weight of the KL term of the stage-0 loss (per-element mean units)."""
    pretrained_vae: str | None = None
    """Local folder of a diffusers AutoencoderKL to load instead of training stage 0."""

    # --- conditioning encoder ---------------------------------------------------------
    backbone: str = "scratch"
    """``scratch`` (small CNN trained jointly) or ``dinov3`` (frozen transformers model)."""
    dinov3_path: str | None = None
    """Local folder (or hub id already in the local cache) of a DINOv3 ViT."""
    backbone_input_size: int = 224
    """Side in pixels the image is resized to before DINOv3 (multiple of its patch)."""
    scratch_channels: list[int] = field(default_factory=lambda: [32, 64])
    """Widths of the scratch CNN stages; each stage halves the resolution."""
    backbone_norm: str = "group"
    """Scratch CNN normalisation: ``group`` (GroupNorm, statistics over the whole image)
    or ``channel`` (per-pixel LayerNorm: features see only their receptive field)."""
    token_dim: int = 64
    """Width D of every conditioning token."""
    n_queries: int = 64
    """K learned queries of the cross-query module (semantic tokens)."""
    cross_query_layers: int = 2
    query_locality: float = 1.0
    """σ (patch units) of the initial locality bias of each query's cross-attention; 0: none."""
    query_window: int = -1
    """Hard cross-attention window (patches around each query's anchor); −1: global."""
    query_self_attention: bool = True
    """Self-attention between the queries (off: token k depends only on its window)."""
    attention_heads: int = 4
    intensity_bins: int = 16
    """Soft-histogram bins (or quantiles) per modality for the intensity token."""
    intensity_statistics: str = "histogram"
    """What the intensity token summarises per modality over the brain: ``histogram``
    (soft histogram + mean and standard deviation) or ``quantiles`` (``intensity_bins``
    quantiles from the 10th to the 90th percentile + median and interquartile range).
    Quantiles describe the same contrast but barely move with a lesion of a few percent
    of the slice, whose bright or dark tail a histogram shows plainly; the intensity
    token is never split in stage 2, so what it shows of the lesion stays in Ẑ_C."""

    # --- denoiser ---------------------------------------------------------------------
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    """Cross-attention to Z per U-Net level (keep it at 8×8 or below on CPU)."""
    layers_per_block: int = 1
    norm_groups: int = 8
    pooled_conditioning: bool = True
    """AdaGN scale/shift of every ResNet block from the flattened tokens (DiffAE-style)."""
    render_prior: bool = True
    """Concatenate a coarse image decoded from Z alone to the U-Net input."""
    residual_diffusion: bool = False
    """Diffuse the residual ``(x₀ − render(Z)) · residual_scale`` instead of x₀ itself;
    the image is ``render(Z) + residual``. Needs ``render_prior``."""
    residual_scale: float = 3.0
    """Gain bringing the (small) residual nearer unit variance for the noise schedule."""
    render_grid: int = 8
    """Side of the render decoder's first feature map (upsampled to the input size)."""

    # --- diffusion --------------------------------------------------------------------
    prediction_type: str = "v_prediction"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sample_steps: int = 20
    """Default DDIM step count for sampling and inversion."""

    # --- stage-1 loss -----------------------------------------------------------------
    render_loss_weight: float = 1.0
    """Weight of the direct MSE between the render decoder's output and the target."""
    lesion_evidence_weight: float = 0.0
    """> 0: stage 1 also trains a linear per-token lesion probe (``DiffCAModel.lesion_probe``)
    from the image labels (multiple instance: image logit = log-mean-exp of the K token
    logits, BCE), with this weight. A departure from the paper's label-free
    stage 1 that uses only the labels the method already has: the denoising loss alone lets
    small lesions (a few pixels) go from the tokens, and stage 2 cannot split what Z lacks."""

    # --- stage 2: common/salient split ---------------------------------------------
    split_mode: str = "additive"
    """``additive``: Ẑ_C = Z + Δ(Z), Ẑ_S decoded from the salient embedding;
    ``inpaint``: a per-token detector gates tokens and a healthy-token in-painter fills
    them, Ẑ_C = (1−g)·Z + g·fill, Ẑ_S = Z − Ẑ_C (needs spatial tokens: ``n_queries`` a
    square, ideally ``query_window`` 0 without query self-attention)."""
    gate_dilation: int = 1
    """``inpaint``: the gate is grey-dilated this many times by the 4-neighbour cross
    (lesion borders; the cross costs less healthy tissue than a 3 × 3 square)."""
    gate_threshold: float = 0.0
    """``inpaint``: at inference, token gates below this are set to 0 (before dilation)."""
    inpaint_masks: str = "blocks"
    """``inpaint``: what the in-painter learns to fill on healthy images: ``blocks``
    (one random square of 1–4 grid tokens) or ``gates`` (the thresholded, dilated gate of
    a tumour image of the same batch, so it trains on the shapes and sizes it fills in use;
    blocks where the batch has no tumour image or that gate is empty; needs
    ``gate_threshold`` > 0)."""
    w_detect: float = 1.0
    """``inpaint``: multiple-instance loss of the token detector from image labels."""
    w_inpaint: float = 1.0
    """``inpaint``: masked-token reconstruction of the in-painter on healthy images."""
    w_salient_rec: float = 1.0
    """``inpaint``: reconstruction of the salient summary from the salient embedding."""
    adversarial_fill: bool = False
    """``inpaint``: the adversary's reversed gradient (and the MMD term, if weighted)
    also trains the in-painter, so filled lesion tokens cannot be told from healthy
    tokens; its masked-token loss on healthy images keeps the fill healthy. Without
    it the fill is a plain regression (a detectable signature) and the adversary's
    gradient reaches only the gate."""
    salient_dim: int = 16
    """Dimension d of the salient embedding (from the CLS token)."""
    split_depth: int = 2
    """Transformer layers of the split encoder E."""
    adversary_hidden: int = 64
    adversary_pooling: str = "mean"
    """What the adversary and the MMD term see of Ẑ_C: ``mean`` over tokens (B, D) or
    ``flat`` (B, T·D). With ``flat``, keep ``w_mmd`` 0: its Mahalanobis term inverts a
    (T·D)² covariance every step (1.5 s/step on the CPU preset instead of 0.07 s)."""
    grl_init: float = 0.1
    grl_min: float = 0.0
    grl_max: float = 1.0
    grl_gain: float = 0.01
    """Multiplicative step of the GRL controller per unit of accuracy error."""
    grl_target: float = 0.5
    """Adversary accuracy the controller aims at (chance for balanced batches)."""
    grl_ema: float = 0.9
    """Smoothing of the adversary accuracy seen by the controller."""
    grl_warmup_steps: int = 50
    """Stage-2 steps before the controller starts adapting the weight."""
    w_token_rec: float = 1.0
    w_bg_salient: float = 1.0
    w_adv: float = 1.0
    w_denoise: float = 0.0
    """Frozen-denoiser loss conditioned on Ẑ (costs a U-Net forward+backward)."""
    w_mmd: float = 1.0
    """MMD between Ẑ_C of target and Z of background images (peer term)."""
    w_salient_cls: float = 1.0
    """Logistic loss of a linear healthy/tumour head on the salient embedding."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def n_tokens(self) -> int:
        """T = K semantic tokens + 1 intensity token."""
        return self.n_queries + 1

    @property
    def diffusion_size(self) -> int:
        """Side of the tensor the U-Net denoises (pixels or latent cells)."""
        if self.space == "latent":
            return self.image_size // 2 ** (len(self.vae_channels) - 1)
        return self.image_size

    @property
    def diffusion_channels(self) -> int:
        return self.latent_channels if self.space == "latent" else self.in_channels

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""

        def bad(name: str, why: str) -> None:
            raise ConfigError(f"model.{name}: {why}")

        if not self.modalities:
            bad("modalities", "needs at least one modality")
        for m in self.modalities:
            if m not in CANONICAL_MODALITIES:
                bad("modalities", f"unknown modality {m!r} (use {', '.join(CANONICAL_MODALITIES)})")
        if len(set(self.modalities)) != len(self.modalities):
            bad("modalities", "repeated modality")
        if self.space not in ("pixel", "latent"):
            bad("space", f"must be 'pixel' or 'latent', got {self.space!r}")
        if self.backbone not in ("scratch", "dinov3"):
            bad("backbone", f"must be 'scratch' or 'dinov3', got {self.backbone!r}")
        if self.backbone == "dinov3" and not self.dinov3_path:
            bad("dinov3_path", "required when backbone is 'dinov3'")
        if self.prediction_type not in ("v_prediction", "epsilon", "sample"):
            bad("prediction_type", "must be v_prediction, epsilon or sample")
        if self.beta_schedule not in ("squaredcos_cap_v2", "linear", "scaled_linear"):
            bad("beta_schedule", "must be squaredcos_cap_v2, linear or scaled_linear")
        if len(self.attention_levels) != len(self.unet_channels):
            bad("attention_levels", "needs one entry per unet_channels entry")
        down = 2 ** (len(self.unet_channels) - 1)
        if self.diffusion_size % down:
            bad("image_size", f"diffusion size {self.diffusion_size} not divisible by {down}")
        s_down = 2 ** len(self.scratch_channels)
        if self.backbone == "scratch" and self.image_size % s_down:
            bad("image_size", f"{self.image_size} not divisible by {s_down} (scratch_channels)")
        if self.space == "latent" and self.image_size % 2 ** (len(self.vae_channels) - 1):
            bad("image_size", "not divisible by the VAE downsampling")
        if self.diffusion_size % self.render_grid or self.render_grid > self.diffusion_size:
            bad("render_grid", f"must divide the diffusion size {self.diffusion_size}")
        for name in ("token_dim", "n_queries", "cross_query_layers", "attention_heads",
                     "intensity_bins", "salient_dim", "split_depth", "num_train_timesteps",
                     "sample_steps", "image_size", "layers_per_block", "norm_groups"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be a positive integer")
        if self.token_dim % self.attention_heads:
            bad("token_dim", "must be divisible by attention_heads")
        for c in list(self.unet_channels) + list(self.scratch_channels):
            if c % self.norm_groups:
                bad("norm_groups", f"must divide every channel width (got {c})")
        if self.inpaint_masks not in ("blocks", "gates"):
            bad("inpaint_masks", f"must be 'blocks' or 'gates', got {self.inpaint_masks!r}")
        if self.split_mode == "inpaint" and self.inpaint_masks == "gates" and self.gate_threshold <= 0:
            bad("inpaint_masks", "'gates' needs gate_threshold > 0 (an unthresholded gate covers every token)")
        if self.intensity_statistics not in ("histogram", "quantiles"):
            bad("intensity_statistics", f"must be 'histogram' or 'quantiles', got {self.intensity_statistics!r}")
        if self.backbone_norm not in ("group", "channel"):
            bad("backbone_norm", f"must be 'group' or 'channel', got {self.backbone_norm!r}")
        if self.split_mode not in ("additive", "inpaint"):
            bad("split_mode", f"must be 'additive' or 'inpaint', got {self.split_mode!r}")
        if self.split_mode == "inpaint" and int(self.n_queries ** 0.5) ** 2 != self.n_queries:
            bad("n_queries", "must be a square number (a token grid) for split_mode 'inpaint'")
        if self.gate_dilation < 0:
            bad("gate_dilation", "must be >= 0")
        if self.adversary_pooling not in ("mean", "flat"):
            bad("adversary_pooling", "must be 'mean' or 'flat'")
        if self.residual_diffusion and not self.render_prior:
            bad("residual_diffusion", "needs render_prior: true")
        if self.lesion_evidence_weight < 0:
            bad("lesion_evidence_weight", "must be >= 0")
        if self.residual_scale <= 0:
            bad("residual_scale", "must be > 0")
        if self.query_window < -1:
            bad("query_window", "must be -1 (global) or >= 0")
        if self.query_locality < 0:
            bad("query_locality", "must be >= 0")
        if not 0.0 <= self.grl_ema < 1.0:
            bad("grl_ema", "must be in [0, 1)")
        if self.grl_min > self.grl_max:
            bad("grl_min", "must be <= grl_max")

    # ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model") -> "ModelConfig":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of model options")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model option(s): {', '.join(unknown)}")
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(cls)}
        if "intensity_percentiles" not in data:  # written before the field: the old window
            data = {**data, "intensity_percentiles": [0.5, 99.5], "intensity_upper_value": 1.0}
        for key, value in data.items():
            _check_type(source, key, value, defaults[key])
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


def _check_type(source: str, key: str, value: Any, default: Any) -> None:
    """Raise ConfigError unless ``value`` has the type of the field's default."""
    def fail(kind: str) -> None:
        raise ConfigError(f"{source}: model.{key} must be {kind}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
    elif isinstance(default, list):
        if not isinstance(value, list):
            fail("a list")
        inner = type(default[0]) if default else None
        for v in value:
            if inner is bool and not isinstance(v, bool):
                fail("a list of true/false")
            if inner is int and (isinstance(v, bool) or not isinstance(v, int)):
                fail("a list of integers")
            if inner is str and not isinstance(v, str):
                fail("a list of names")
    elif isinstance(default, str) or default is None:
        if value is not None and not isinstance(value, str):
            fail("a string")
