"""Class-conditional diffusion with classifier-free guidance toward "healthy".

The counterfactual baseline of Sanchez et al. 2022 ("What is healthy? Generative
counterfactual diffusion for lesion localization"), also MONAI's classifier-free
guidance anomaly-detection tutorial:

* **training** — the same denoiser as Diff-CA (:class:`diffca_med.models.denoiser.Denoiser`
  built from the same :class:`~diffca_med.models.config.ModelConfig`, same schedule and
  prediction type), conditioned instead of on image tokens on a learned *class* token
  set: healthy, tumour, or — with probability ``p_uncond`` — the null class. Trained by
  Diff-CA's own loop (:func:`diffca_med.training.loop.train_stage`, stage-1 schedule),
  so the budget (steps, batch, learning rate, EMA) is the same as our stage 1. It
  diffuses x₀ itself even when the config asks Diff-CA for residual diffusion around the
  token render: guidance mixes the predictions of two classes, whose renders differ, so
  both must live in one space;
* **pseudo-healthy** — deterministic DDIM inversion of the input with the
  unconditional model to ``inversion_depth`` of the trajectory, then DDIM sampling
  with the guided prediction ``u + w·(c_healthy − u)`` (``w = guidance``). Both DDIM
  directions are Diff-CA's (:mod:`diffca_med.models.sampling`).

Saved as a folder: ``baseline.json`` (kind, model config, p_uncond, guidance,
inversion depth) and ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn

from diffca_med.baselines.base import Method, read_meta, register
from diffca_med.errors import InputError
from diffca_med.fileio import atomic_path
from diffca_med.models.config import ModelConfig
from diffca_med.models.denoiser import Denoiser
from diffca_med.models.sampling import ddim_invert, ddim_sample
from diffca_med.models.weights import load_weights

WEIGHTS = "model.safetensors"
HEALTHY, TUMOUR, NULL = 0, 1, 2


class CFGDiffusion(nn.Module):
    """Class-conditional denoiser with a null class, trainable by ``train_stage(stage=1)``.

    Attributes:
        denoiser: :class:`Denoiser` (U-Net + token renderer) of ``config``.
        class_tokens: ``(3, T, D)`` learned conditioning for healthy / tumour / null.
    """

    def __init__(self, config: ModelConfig, p_uncond: float = 0.15):
        super().__init__()
        if config.space != "pixel":
            raise InputError("the classifier-free-guidance baseline runs in pixel space (model.space: pixel)")
        self.config = config
        self.p_uncond = float(p_uncond)
        self.denoiser = Denoiser(config)
        self.class_tokens = nn.Parameter(torch.randn(3, config.n_tokens, config.token_dim) * 0.02)
        sched = DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                              beta_schedule=config.beta_schedule,
                              prediction_type=config.prediction_type, clip_sample=False)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)

    # --- the interface of diffca_med.training.loop.train_stage ---------------------
    def set_stage(self, stage: int) -> None:
        for p in self.parameters():
            p.requires_grad_(True)
        self.train()

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        return list(self.parameters())

    def ema_module(self, stage: int) -> nn.Module | None:
        return self.denoiser if stage == 1 else None

    def stage_loss(self, stage: int, images: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Denoising loss with the class dropped to null with probability ``p_uncond``.

        ``images`` (B, C, H, W) in [0, 1]; ``labels`` (B,) 0 healthy / 1 tumour.
        """
        from diffca_med.models.diffca import denoising_losses, noised_batch

        x0 = images * 2.0 - 1.0
        gdev = generator.device if generator is not None else images.device
        drop = (torch.rand(len(labels), generator=generator, device=gdev) < self.p_uncond).to(images.device)
        cls = torch.where(drop, torch.full_like(labels, NULL), labels.long())
        tokens = self.class_tokens[cls]
        prior = self.denoiser.render(tokens)
        # Same noising, targets and losses as Diff-CA's stage 1 (shared code, same schedule).
        noised = noised_batch(x0, self.alphas_cumprod, self.config.prediction_type, generator)
        return denoising_losses(self.denoiser, noised, x0, tokens, prior, self.config.render_loss_weight)

    @property
    def device(self) -> torch.device:
        return self.class_tokens.device

    # --- counterfactuals --------------------------------------------------------------
    @torch.no_grad()
    def pseudo_healthy(self, x: torch.Tensor, guidance: float = 3.0, inversion_depth: float = 0.5,
                       steps: int | None = None) -> torch.Tensor:
        """Invert ``x`` (B, C, H, W) in [0, 1] unconditionally, decode guided toward healthy."""
        steps = int(steps or self.config.sample_steps)
        b = x.shape[0]
        null = self.class_tokens[NULL].expand(b, -1, -1)
        healthy = self.class_tokens[HEALTHY].expand(b, -1, -1)
        both = torch.cat([null, healthy])
        p_null, p_both = self.denoiser.render(null), self.denoiser.render(both)

        def uncond(x_t, t):
            return self.denoiser(x_t, t, null, p_null)

        def guided(x_t, t):
            u, c = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both, p_both).chunk(2)
            return u + guidance * (c - u)

        pt = self.config.prediction_type
        x_t, k = ddim_invert(uncond, x * 2.0 - 1.0, self.alphas_cumprod, pt, steps, inversion_depth)
        z = ddim_sample(guided, x_t, self.alphas_cumprod, pt, steps, k, clip=1.0)
        return ((z + 1.0) / 2.0).clamp(0.0, 1.0)


@register
class CFGBaseline(Method):
    """:class:`CFGDiffusion` behind the benchmark interface."""

    kind = "cfg_diffusion"
    makes_counterfactuals = True

    def __init__(self, model: CFGDiffusion, guidance: float = 3.0, inversion_depth: float = 0.5,
                 steps: int | None = None):
        super().__init__(tuple(model.config.modalities), model.config.image_size)
        self.model = model.eval()
        self.guidance, self.inversion_depth, self.steps = float(guidance), float(inversion_depth), steps

    def set_sampling(self, sampling) -> None:
        """Apply :class:`~diffca_med.pipelines.evaluate.SamplingOptions` (None = keep).

        Starting noise is always the DDIM inversion (the method's definition)."""
        if sampling.inversion_depth is not None:
            self.inversion_depth = float(sampling.inversion_depth)
        if sampling.steps is not None:
            self.steps = int(sampling.steps)

    def pseudo_healthy(self, images: np.ndarray, seed: int = 0, batch_size: int = 32,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        def generate(x: torch.Tensor, offset: int) -> torch.Tensor:
            # Deterministic: the starting noise is the DDIM inversion, so no seed is used.
            return self.model.pseudo_healthy(x.to(self.model.device), self.guidance, self.inversion_depth, self.steps)

        return self._generate_in_batches(images, batch_size, generate, progress)

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(state, str(tmp / WEIGHTS))
            self._write_meta(tmp, model=self.model.config.to_dict(), p_uncond=self.model.p_uncond,
                             guidance=self.guidance, inversion_depth=self.inversion_depth)

    @classmethod
    def load(cls, path: str | Path) -> "CFGBaseline":
        meta = read_meta(path)
        file = Path(path) / WEIGHTS
        config = ModelConfig.from_dict(meta.get("model", {}), source=str(Path(path) / "baseline.json"))
        model = CFGDiffusion(config, p_uncond=meta.get("p_uncond", 0.15))
        load_weights(model, file)
        return cls(model, meta.get("guidance", 3.0), meta.get("inversion_depth", 0.5))


def train_cfg_baseline(
    store: str | Path,
    cfg,
    run_dir: str | Path,
    *,
    p_uncond: float = 0.15,
    guidance: float = 3.0,
    inversion_depth: float = 0.5,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> tuple[CFGBaseline, dict]:
    """Train the baseline on ``store``'s training split with ``cfg`` (a TrainConfig).

    Uses ``cfg.model`` for the denoiser and ``cfg.stage1`` for the schedule, so it gets
    Diff-CA's denoiser size and stage-1 training budget. Checkpoints and logs go to
    ``run_dir``. Returns the trained method and ``{"steps", "seconds",
    "images_per_second"}``.
    """
    from diffca_med.data.store import SliceDataset, SliceStore
    from diffca_med.pipelines.train import make_accelerator
    from diffca_med.training.loop import train_stage

    accelerator = make_accelerator(cfg, warn or (lambda msg: None))
    dataset = SliceDataset(SliceStore(store), split="train")
    if len(dataset) == 0:
        raise InputError(f"{store}: no healthy or tumour slices in the train split")
    torch.manual_seed(cfg.training.seed)
    model = CFGDiffusion(cfg.model, p_uncond=p_uncond)
    result = train_stage(accelerator, model, cfg, 1, dataset, dataset.labels, run_dir,
                         sample_images=None, progress=progress)
    model.to("cpu")
    figures = {"steps": result.steps, "seconds": round(result.seconds, 2),
               "images_per_second": round(result.images_per_second, 2)}
    return CFGBaseline(model, guidance, inversion_depth), figures
