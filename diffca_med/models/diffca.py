"""``DiffCAModel``: the two-stage Diff-CA model, its training losses and operations.

Parts (all ``nn.Module`` attributes):

* ``vae`` — AutoencoderKL (latent space only; stage 0);
* ``conditioner`` — image → tokens Z (B, T, D), T = K + 1 (stage 1);
* ``denoiser`` — the token-conditioned U-Net (+ its token renderer) (stage 1);
* ``lesion_probe`` — a linear per-token lesion probe, only with ``lesion_evidence_weight`` > 0 (stage 1);
* ``split``, ``adversary``, ``grl``, ``salient_head`` — stage 2.

Inputs ``x`` are float (B, C, H, W) in [0, 1], channels in ``config.modalities``
order, H = W = ``config.image_size``; generated images are clipped to [0, 1].
Saved as a folder ``config.json`` + ``model.safetensors`` (no pickles); the folder is
self-contained (a DINOv3 backbone or pretrained VAE is stored with the weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn

from diffca_med.errors import InputError
from diffca_med.fileio import atomic_path
from diffca_med.models.autoencoder import autoencoder_loss, build_autoencoder, load_autoencoder
from diffca_med.models.conditioning import (
    ConditioningEncoder,
    backbone_config_dict,
    dinov3_from_config_dict,
)
from diffca_med.models.config import ModelConfig
from diffca_med.models.denoiser import Denoiser
from diffca_med.models.sampling import ddim_invert, ddim_sample, noise_to
from diffca_med.models.split import (
    Adversary,
    GRLController,
    InpaintSplitEncoder,
    SplitEncoder,
    image_logits,
    split_losses,
    weighted_loss,
)
from diffca_med.models.weights import load_weights

FORMAT = "diffca-med-model"
FORMAT_VERSION = 2  # 2: grid token renderer (1: one linear layer from the flattened tokens)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class EncodeOutput:
    """common (B, T, D), salient (B, T, D), salient_embedding (B, d), tokens Z (B, T, D)."""

    common: torch.Tensor
    salient: torch.Tensor
    salient_embedding: torch.Tensor
    tokens: torch.Tensor

    @property
    def combined(self) -> torch.Tensor:
        """Ẑ = Ẑ_C + Ẑ_S (B, T, D)."""
        return self.common + self.salient


def _on_model_device(method):
    """Run an inference method with its tensor arguments on the model's device.

    The result (a tensor or an :class:`EncodeOutput`) comes back on the first
    argument's device, so a caller with CPU tensors can use a model on a GPU.
    """

    @functools.wraps(method)
    def wrapper(self, x: torch.Tensor, *args, **kwargs):
        home, here = x.device, self.device
        args = tuple(a.to(here) if isinstance(a, torch.Tensor) else a for a in args)
        out = method(self, x.to(here), *args, **kwargs)
        if isinstance(out, EncodeOutput):
            return EncodeOutput(*(getattr(out, f.name).to(home) for f in dataclasses.fields(out)))
        return out.to(home)

    return wrapper


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device)


def noised_batch(x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion of a training batch: ``(x_t, t, target)``.

    ``x0`` (B, C, H, W) in the diffusion space; ``t`` (B,) long, uniform over the
    ``len(alphas_cumprod)`` training timesteps; ``target`` is what a network of
    ``prediction_type`` predicts (v, ε or x₀). Draws ``t`` then the noise from
    ``generator`` (same generator state, same batch).
    """
    b = x0.shape[0]
    gdev = generator.device if generator is not None else x0.device
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=generator, device=gdev).to(x0.device)
    noise = _randn(x0.shape, generator, x0.device)
    a = alphas_cumprod[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    elif prediction_type == "epsilon":
        target = noise
    else:
        target = x0
    return x_t, t, target


def denoising_losses(denoiser: Denoiser, noised: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     x0: torch.Tensor, tokens: torch.Tensor, prior: torch.Tensor | None,
                     render_weight: float) -> dict[str, torch.Tensor]:
    """Stage-1 loss of a token-conditioned denoiser (Diff-CA and the CFG baseline).

    Args:
        noised: ``(x_t, t, target)`` from :func:`noised_batch`.
        x0: clean image in diffusion space, (B, C, H, W).
        tokens: conditioning tokens (B, T, D); prior: the token render (B, C, H, W) or None.
        render_weight: weight of the render's own MSE to ``x0``.

    Returns:
        ``{"loss", "diffusion"[, "render"]}``; all but ``loss`` detached.
    """
    x_t, t, target = noised
    diffusion = F.mse_loss(denoiser(x_t, t, tokens, prior), target)
    loss, out = diffusion, {"diffusion": diffusion.detach()}
    if prior is not None:
        render = F.mse_loss(prior, x0)
        loss = loss + render_weight * render
        out["render"] = render.detach()
    out["loss"] = loss
    return out


class DiffCAModel(nn.Module):
    """The Diff-CA model for ``config`` (see module docstring for its parts)."""

    def __init__(self, config: ModelConfig, *, _vit: nn.Module | None = None,
                 _vae: nn.Module | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.vae = None
        if config.space == "latent":
            if _vae is not None:
                self.vae = _vae
            elif config.pretrained_vae:
                self.vae = load_autoencoder(config.pretrained_vae, config)
            else:
                self.vae = build_autoencoder(config)
        self.conditioner = ConditioningEncoder(config, vit=_vit)
        self.denoiser = Denoiser(config)
        # stage-1 lesion probe on the semantic tokens (only built when it is trained)
        self.lesion_probe = nn.Linear(config.token_dim, 1) if config.lesion_evidence_weight > 0 else None
        self.split = InpaintSplitEncoder(config) if config.split_mode == "inpaint" else SplitEncoder(config)
        self.adversary = Adversary(config)
        self.grl = GRLController(config)
        self.salient_head = nn.Linear(config.salient_dim, 1)
        # multiplies VAE latents to unit variance; learnt from data during stage 0
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_scale_set", torch.tensor(0, dtype=torch.long))
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
            clip_sample=False,
        )
        self.register_buffer(
            "alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False
        )

    # ----------------------------------------------------------------- stages
    def stage_modules(self, stage: int) -> list[nn.Module]:
        """Modules trained in ``stage`` (0: VAE; 1: conditioner + denoiser; 2: split,
        adversary, GRL controller state and salient head)."""
        if stage == 0:
            return [self.vae] if self.vae is not None else []
        if stage == 1:
            return [m for m in (self.conditioner, self.denoiser, self.lesion_probe) if m is not None]
        if stage == 2:
            return [self.split, self.adversary, self.grl, self.salient_head]
        raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters the optimiser of ``stage`` updates (empty for stage 0 in pixel space)."""
        if stage == 1:
            rest = [p for m in self.stage_modules(1)[1:] for p in m.parameters()]
            return self.conditioner.trainable_parameters() + rest
        params: list[nn.Parameter] = []
        for m in self.stage_modules(stage):
            params += list(m.parameters())
        return params

    def ema_module(self, stage: int) -> nn.Module | None:
        """The part the training loop keeps an EMA of in ``stage`` (when the stage's
        ``ema_decay`` is set): the denoiser in stage 1, the split encoder E in stage 2."""
        return {1: self.denoiser, 2: self.split}.get(stage)

    def set_stage(self, stage: int) -> None:
        """Freeze everything but ``stage``'s parts; those go to train mode, the rest eval."""
        trainable = {id(p) for p in self.trainable_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self.eval()
        for m in self.stage_modules(stage):
            m.train()

    # ------------------------------------------------------------ diffusion space
    def to_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] → the space the U-Net denoises (no grad to VAE)."""
        x = x * 2.0 - 1.0
        if self.vae is None:
            return x
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mean * self.latent_scale

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_diffusion`, clipped to [0, 1]."""
        if self.vae is not None:
            z = self.vae.decode(z / self.latent_scale).sample
        return ((z + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ losses
    def stage_loss(self, stage: int, images: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training loss of ``stage`` on a batch.

        ``images`` (B, C, H, W) in [0, 1]; ``labels`` (B,) long, 0 healthy / 1 tumour.
        Returns ``loss`` (backprop it) and detached scalar tensors to log. In training
        mode, stage 2 also updates the GRL controller (its state is in buffers).
        """
        self._check_images(images)
        if stage == 0:
            return self._stage0_loss(images, generator)
        if stage == 1:
            return self._stage1_loss(images, labels, generator)
        if stage == 2:
            return self._stage2_loss(images, labels, generator)
        raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")

    def _stage0_loss(self, images, generator):
        if self.vae is None:
            raise ValueError("stage 0 trains the autoencoder; this model is in pixel space")
        out = autoencoder_loss(self.vae, images, self.config.vae_kl_weight, generator)
        if self.vae.training:
            with torch.no_grad():
                scale = 1.0 / out["latent_std"].clamp_min(1e-4)
                if int(self.latent_scale_set) == 0:
                    self.latent_scale.fill_(float(scale))
                    self.latent_scale_set.fill_(1)
                else:
                    self.latent_scale.mul_(0.99).add_(0.01 * scale)
        out["latent_scale"] = self.latent_scale.detach().clone()
        return out

    def _diffusion_target(self, x0: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """What the diffusion process generates: x₀, or the scaled residual from the render.

        The render is detached here: it is trained by its own MSE, and the diffusion
        loss should not pull it towards whatever makes the residual easy.
        """
        if self.config.residual_diffusion:
            return (x0 - prior.detach()) * self.config.residual_scale
        return x0

    def _from_target(self, r: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        if self.config.residual_diffusion:
            return prior + r / self.config.residual_scale
        return r

    def _stage1_loss(self, images, labels, generator):
        x0 = self.to_diffusion(images)
        tokens = self.conditioner(images)
        prior = self.denoiser.render(tokens)
        noised = noised_batch(self._diffusion_target(x0, prior), self.alphas_cumprod,
                              self.config.prediction_type, generator)
        out = denoising_losses(self.denoiser, noised, x0, tokens, prior, self.config.render_loss_weight)
        if self.lesion_probe is not None:
            # the stage-2 detector's multiple-instance rule; stage batches are 1:1 healthy:tumour
            token_logits = self.lesion_probe(tokens[:, :self.config.n_queries]).squeeze(-1)
            evidence = F.binary_cross_entropy_with_logits(image_logits(token_logits), labels.float())
            out["loss"] = out["loss"] + self.config.lesion_evidence_weight * evidence
            out["lesion"] = evidence.detach()
        return out

    def _stage2_loss(self, images, labels, generator):
        cfg = self.config
        with torch.no_grad():
            tokens = self.conditioner(images)
        terms, split, logs = split_losses(
            self.split, self.adversary, self.grl, tokens, labels, cfg,
            salient_head=self.salient_head, update_controller=self.split.training,
            generator=generator,
        )
        if cfg.w_denoise > 0:
            zhat = split.common + split.salient
            prior = self.denoiser.render(zhat)
            x_t, t, target = noised_batch(self._diffusion_target(self.to_diffusion(images), prior),
                                          self.alphas_cumprod, cfg.prediction_type, generator)
            pred = self.denoiser(x_t, t, zhat, prior)
            terms["denoise"] = F.mse_loss(pred, target)
        loss = weighted_loss(terms, cfg)
        out = {k: v.detach() for k, v in terms.items()}
        tg = labels == 1
        if tg.any():
            out["tg_salient"] = split.salient[tg].detach().pow(2).mean()
        out.update({k: torch.tensor(v) for k, v in logs.items()})
        out["loss"] = loss
        return out

    # --------------------------------------------------------------- inference
    def _check_images(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise InputError(
                f"images: expected shape (B, {c}, {s}, {s}) for modalities "
                f"{', '.join(self.config.modalities)}, got {tuple(x.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.latent_scale.device

    @torch.no_grad()
    @_on_model_device
    def encode(self, x: torch.Tensor) -> EncodeOutput:
        """Tokens and their split for images ``x`` (B, C, H, W) in [0, 1]."""
        self._check_images(x)
        tokens = self.conditioner(x)
        sp = self.split(tokens)
        return EncodeOutput(sp.common, sp.salient, sp.salient_embedding, tokens)

    @torch.no_grad()
    @_on_model_device
    def salient_support(self, x: torch.Tensor) -> torch.Tensor:
        """Where the split puts something salient: bool (B, H, W) for images (B, C, H, W).

        True in the image cell of every semantic token whose salient part is not zero
        (tokens are anchored on a square grid over the image). With ``split_mode:
        inpaint`` these are the gated lesion tokens, after threshold and dilation; a
        trained additive split leaves almost no token exactly zero (nearly the whole image).
        """
        k = self.config.n_queries
        side = int(round(k**0.5))
        salient = self.encode(x).salient[:, :k]
        if side * side != k:  # no square token grid: no cell to point at
            return torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        grid = (salient.abs().amax(dim=-1) > 0).reshape(-1, 1, side, side).float()
        return F.interpolate(grid, size=tuple(x.shape[-2:]), mode="nearest")[:, 0] > 0.5

    def _model_fn(self, tokens: torch.Tensor, prior: torch.Tensor | None = None):
        if prior is None:
            prior = self.denoiser.render(tokens)

        def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x_t, t, tokens, prior)

        return fn

    def _shape(self, b: int) -> tuple[int, int, int, int]:
        s = self.config.diffusion_size
        return (b, self.config.diffusion_channels, s, s)

    def _steps(self, steps: int | None) -> int:
        return int(steps) if steps is not None else self.config.sample_steps

    @torch.no_grad()
    def generate(self, cond_tokens: torch.Tensor, steps: int | None = None, seed: int = 0,
                 x_start: torch.Tensor | None = None, start_index: int = 0) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] generated from tokens (B, T, D) by DDIM (η = 0).

        Starting point: fresh Gaussian noise from ``seed`` (the same seed gives the
        same output), or ``x_start`` in the diffusion space at DDIM index
        ``start_index`` (from an inversion).
        """
        steps = self._steps(steps)
        if x_start is None:
            g = torch.Generator().manual_seed(int(seed))
            x_start = _randn(self._shape(cond_tokens.shape[0]), g, cond_tokens.device)
            start_index = 0
        prior = self.denoiser.render(cond_tokens)
        clip = None
        if self.vae is None:
            clip = 1.0
            if self.config.residual_diffusion:  # keep render + residual inside [-1, 1]
                k = self.config.residual_scale
                clip = ((-1.0 - prior) * k, (1.0 - prior) * k)
        r = ddim_sample(self._model_fn(cond_tokens, prior), x_start, self.alphas_cumprod,
                        self.config.prediction_type, steps, start_index, clip)
        return self.from_diffusion(self._from_target(r, prior))

    @torch.no_grad()
    def _start(self, x: torch.Tensor, src_tokens: torch.Tensor, noise: str,
               inversion_depth: float, steps: int, seed: int) -> tuple[torch.Tensor, int]:
        prior = self.denoiser.render(src_tokens)
        x0 = self._diffusion_target(self.to_diffusion(x), prior)
        if noise == "inverted":
            return ddim_invert(self._model_fn(src_tokens, prior), x0, self.alphas_cumprod,
                               self.config.prediction_type, steps, inversion_depth)
        if noise == "fresh":
            g = torch.Generator().manual_seed(int(seed))
            eps = _randn(x0.shape, g, x0.device)
            return noise_to(x0, eps, self.alphas_cumprod, steps, inversion_depth)
        raise ValueError(f"noise must be 'fresh' or 'inverted', got {noise!r}")

    @torch.no_grad()
    def _edit(self, x: torch.Tensor, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor,
              noise: str, inversion_depth: float, steps: int | None, seed: int) -> torch.Tensor:
        steps = self._steps(steps)
        if not 0.0 < float(inversion_depth) <= 1.0:
            raise ValueError(f"inversion_depth must be in (0, 1], got {inversion_depth}")
        x_t, k = self._start(x, src_tokens, noise, inversion_depth, steps, seed)
        return self.generate(tgt_tokens, steps=steps, x_start=x_t, start_index=k)

    @torch.no_grad()
    @_on_model_device
    def reconstruct(self, x: torch.Tensor, noise: str = "fresh", inversion_depth: float = 1.0,
                    steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """G(Ẑ) for images ``x`` (B, C, H, W) → (B, C, H, W) in [0, 1].

        ``noise='fresh'``: start from seeded Gaussian noise (with depth < 1, the input
        noised to that depth); ``'inverted'``: DDIM-invert ``x`` (η = 0) to the depth.
        """
        enc = self.encode(x)
        z = enc.combined
        return self._edit(x, z, z, noise, inversion_depth, steps, seed)

    @torch.no_grad()
    @_on_model_device
    def pseudo_healthy(self, x: torch.Tensor, noise: str = "fresh", inversion_depth: float = 1.0,
                       steps: int | None = None, seed: int = 0, paired: bool = False) -> torch.Tensor:
        """G(Ẑ_C): the image with its salient part set to the background value 0.

        ``paired``: return ``clip(x + G(Ẑ_C) − G(Ẑ), 0, 1)`` instead, both generated
        from the same starting noise: only the change the split makes is applied to the
        input, and the reconstruction error both generations share cancels (the image
        away from the salient region stays the input).
        """
        enc = self.encode(x)
        ph = self._edit(x, enc.combined, enc.common, noise, inversion_depth, steps, seed)
        if not paired:
            return ph
        rec = self._edit(x, enc.combined, enc.combined, noise, inversion_depth, steps, seed)
        return (x + ph - rec).clamp(0.0, 1.0)

    @torch.no_grad()
    @_on_model_device
    def swap(self, a: torch.Tensor, b: torch.Tensor, noise: str = "fresh",
             inversion_depth: float = 1.0, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """G(Ẑ_C(a) + Ẑ_S(b)); starting noise from ``a``. a, b (B, C, H, W)."""
        ea, eb = self.encode(a), self.encode(b)
        return self._edit(a, ea.combined, ea.common + eb.salient, noise, inversion_depth, steps, seed)

    @torch.no_grad()
    @_on_model_device
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, alphas: Sequence[float],
                    noise: str = "fresh", inversion_depth: float = 1.0,
                    steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """G(Ẑ_C(a) + (1−α)Ẑ_S(a) + αẐ_S(b)) for each α → (len(alphas), B, C, H, W)."""
        ea, eb = self.encode(a), self.encode(b)
        outs = []
        for alpha in alphas:
            tgt = ea.common + (1.0 - float(alpha)) * ea.salient + float(alpha) * eb.salient
            outs.append(self._edit(a, ea.combined, tgt, noise, inversion_depth, steps, seed))
        return torch.stack(outs, dim=0)

    # ------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/config.json`` + ``path/model.safetensors`` atomically."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "backbone_config": backbone_config_dict(self.conditioner),
            "vae_config": dict(self.vae.config) if self.vae is not None else None,
        }
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "DiffCAModel":
        """Load a folder written by :meth:`save_pretrained` (no network, no pickles).

        The model comes back in eval mode with gradients off; call :meth:`set_stage`
        before training it further.
        """
        path = Path(path)
        cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise InputError(f"{f}: missing (not a diffca-med model folder)")
        try:
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{cfg_file}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{cfg_file}: not a diffca-med model config")
        version = int(meta.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise InputError(f"{cfg_file}: model format version {version} is newer "
                             f"than this diffca-med reads ({FORMAT_VERSION})")
        if version < FORMAT_VERSION:
            raise InputError(f"{cfg_file}: model format version {version} was written by an older "
                             f"diffca-med whose token renderer this one no longer has; retrain the model")
        config = ModelConfig.from_dict(meta["model"], source=str(cfg_file))
        vit = vae = None
        if meta.get("backbone_config"):
            vit = dinov3_from_config_dict(meta["backbone_config"])
        if meta.get("vae_config"):
            from diffusers import AutoencoderKL

            vc = {k: v for k, v in meta["vae_config"].items() if not k.startswith("_")}
            vae = AutoencoderKL.from_config(vc)
        model = cls(config, _vit=vit, _vae=vae)
        load_weights(model, w_file, device=map_location)
        model.to(map_location)
        # inference-ready: eval mode, nothing requires grad (set_stage() re-enables)
        model.eval()
        model.requires_grad_(False)
        return model

    def num_parameters(self, stage: int | None = None) -> int:
        params = self.parameters() if stage is None else self.trainable_parameters(stage)
        return sum(p.numel() for p in params)
