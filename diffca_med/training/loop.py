"""One Accelerate training loop for every stage of Diff-CA.

The stage decides only *what* is trained (``model.set_stage``,
``model.trainable_parameters``, ``model.ema_module``) and *which loss*
(``model.stage_loss``); the loop does the rest the same way for stages 0, 1 and 2:
devices and DDP (Accelerate), bf16 autocast on GPU, gradient accumulation, a linear
learning-rate warm-up then constant, an EMA of the stage's ``ema_module`` (Diff-CA:
the denoiser in stage 1, the split encoder E in stage 2), a progress bar with loss and
images/second, the CSV log, sample grids and atomic checkpoints.

Determinism: every micro-batch's slice indices, noise and timesteps are drawn from
(seed, stage, step, micro-batch, process) (see :mod:`diffca_med.training.batches`), so a
run resumed from a checkpoint reproduces the uninterrupted run. On CPU this is bit-exact;
on GPU, non-deterministic CUDA kernels (atomics in convolution/attention backward,
bf16 reductions) make resumed and uninterrupted runs agree only to floating-point
noise, and a different number of processes changes the data order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffca_med.training.batches import StepBatchSampler, step_generator
from diffca_med.training.checkpoint import CheckpointInfo, load_training_state, save_checkpoint
from diffca_med.training.config import StageConfig, TrainConfig
from diffca_med.training.logs import CsvLog, log_path
from diffca_med.training.samples import write_sample_grid


class StageLoss(nn.Module):
    """Routes ``forward`` to ``model.stage_loss`` so DDP and autocast wrap the loss call.

    Calling ``model.stage_loss`` directly on a DDP-wrapped model would bypass DDP's
    forward hooks (no gradient synchronisation); wrapping it as ``forward`` fixes that.
    """

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return self.model.stage_loss(self.stage, images, labels, generator=generator)


def warmup_factor(stage_cfg: StageConfig):
    """LR multiplier at optimiser step ``s``: linear from warmup_start_lr to lr, then 1."""
    start = stage_cfg.warmup_start_lr / stage_cfg.lr
    n = stage_cfg.warmup_steps

    def factor(step: int) -> float:
        if n <= 0 or step >= n:
            return 1.0
        return start + (1.0 - start) * step / n

    return factor


@dataclass
class StageResult:
    """What one stage's training did (figures of this process's run of it)."""

    stage: int
    start_step: int
    steps: int
    seconds: float
    images: int  # images processed in this session, all processes
    last: dict = field(default_factory=dict)  # the last logged row
    interrupted: bool = False  # stopped early by ``stop_at_step``

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _param_groups(params: Any) -> tuple[list, list[torch.Tensor]]:
    """Normalise ``trainable_parameters`` output to (groups or params, flat list)."""
    items = list(params)
    if items and isinstance(items[0], dict):
        flat = [p for g in items for p in g["params"]]
        return items, flat
    return items, items


def _scalar_means(outs: list[dict]) -> dict[str, torch.Tensor]:
    keys = [k for k, v in outs[0].items() if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))]
    means = {}
    for k in keys:
        vals = [torch.as_tensor(o[k], dtype=torch.float32).detach().reshape(()) for o in outs if k in o]
        means[k] = torch.stack([v.float().cpu() for v in vals]).mean()
    return means


def _mean_over_processes(accelerator, means: dict[str, torch.Tensor], device) -> tuple[list[str], torch.Tensor]:
    """Average logged scalars over processes; a key missing on a process (e.g. no
    tumour in its batch) is left out of that key's mean instead of desynchronising."""
    names = sorted(means)
    if accelerator.num_processes == 1:
        return names, torch.stack([means[k] for k in names]) if names else torch.zeros(0)
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([names])[0]  # the main process's keys, on every process
    vals = torch.stack([means.get(k, torch.tensor(float("nan"))) for k in shared]).to(device)
    everyone = accelerator.gather(vals[None]).reshape(accelerator.num_processes, len(shared))
    return shared, everyone.float().nanmean(dim=0)


def _model_config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def train_stage(
    accelerator,
    model: nn.Module,
    cfg: TrainConfig,
    stage: int,
    dataset: Dataset,
    labels: np.ndarray,
    run_dir: str | Path,
    *,
    resume: CheckpointInfo | None = None,
    sample_images: torch.Tensor | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    strata: np.ndarray | None = None,
) -> StageResult:
    """Train ``stage`` of ``model`` for ``cfg.stage<N>.steps`` optimiser steps.

    ``dataset[i]`` -> dict with ``image`` (C, H, W) in [0, 1] and ``label`` (0/1);
    ``labels`` (N,) the same labels as an array (for class balance without reading
    images). ``resume``: a checkpoint of this stage whose weights are already in
    ``model``; optimiser, scheduler, EMA and RNG states are restored from it and
    training continues at its step. ``sample_images`` (B, C, H, W): held-out slices
    for the sample grids. Writes checkpoints, ``logs/stage<N>.csv`` and
    ``samples/stage<N>-step<NNNNNNN>.png`` under ``run_dir``; returns a
    :class:`StageResult`. The model ends with the EMA weights in ``model.ema_module(stage)``
    when an EMA is kept. ``stop_at_step``: end the session after that step with an
    unfinished checkpoint, exactly as a run killed right after checkpointing there
    (``--resume`` continues it); the result then has ``interrupted=True``. ``strata``
    (N,): bins the balanced batches pair tumour with healthy slices by (see
    ``StepBatchSampler``).
    """
    sc = cfg.stage(stage)
    run_dir = Path(run_dir)
    seed = cfg.training.seed
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    model.to(device)
    model.set_stage(stage)
    groups, flat = _param_groups(model.trainable_parameters(stage))
    if not flat:
        raise RuntimeError(f"stage {stage}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=sc.lr, betas=tuple(sc.betas), weight_decay=sc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(sc))
    ema = None
    averaged = model.ema_module(stage)  # the part this stage keeps an EMA of, if any
    if averaged is not None and sc.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(averaged.parameters(), decay=sc.ema_decay, update_after_step=sc.ema_update_after_step)
        ema.to(device)

    start = 0
    elapsed_before = 0.0
    if resume is not None:
        load_training_state(resume, optimizer=optimizer, scheduler=scheduler, ema=ema, rng=main)
        start = resume.step
        elapsed_before = float(resume.state.get("elapsed_s", 0.0))

    wrapped = accelerator.prepare(StageLoss(model, stage))

    sampler = StepBatchSampler(
        labels,
        sc.batch_size,
        seed=seed,
        stage=stage,
        start_micro=start * sc.grad_accum,
        total_micro=sc.steps * sc.grad_accum,
        rank=rank,
        world=world,
        balanced=sc.balanced,
        strata=strata,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.training.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)

    log = CsvLog(log_path(run_dir, stage), keep_until_step=start) if main else None
    bar = tqdm(
        total=sc.steps,
        initial=start,
        desc=f"stage {stage}",
        unit="step",
        disable=not (main and progress),
        dynamic_ncols=True,
    )
    images_per_step = sc.batch_size * sc.grad_accum * world
    t_begin = t_last = time.perf_counter()
    last_logged_step = start
    last_row: dict = {}
    model_cfg = _model_config_dict(model)

    def checkpoint(step: int, complete: bool) -> None:
        if main:
            save_checkpoint(
                run_dir,
                stage=stage,
                step=step,
                complete=complete,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                ema=None if complete else ema,  # a complete stage holds the EMA weights in the model
                state={
                    "seed": seed,
                    "world_size": world,
                    "batch_size": sc.batch_size,
                    "grad_accum": sc.grad_accum,
                    "data_position": {"micro_batches": step * sc.grad_accum},
                    "elapsed_s": elapsed_before + time.perf_counter() - t_begin,
                    "model_config": model_cfg,
                },
                keep=cfg.training.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    def samples(step: int) -> None:
        if main and sample_images is not None and sc.sample_count > 0:
            params = list(averaged.parameters()) if ema is not None else []
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            try:
                write_sample_grid(
                    model,
                    sample_images[: sc.sample_count].to(device),
                    run_dir / "samples" / f"stage{stage}-step{step:07d}.png",
                    steps=sc.sample_steps,
                    seed=seed,
                    stage=stage,
                )
            finally:
                if ema is not None:
                    ema.restore(params)
                model.set_stage(stage)  # back to this stage's train/eval modes
        accelerator.wait_for_everyone()

    # set_stage put the stage's parts in train mode and the frozen rest in eval mode
    for step in range(start, sc.steps):
        outs = []
        for micro in range(sc.grad_accum):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            targets = batch["label"].to(device, non_blocking=True).long()
            gen = step_generator(device, seed, stage, step, micro, rank)
            sync = micro == sc.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
            with ctx:
                out = wrapped(images, targets, gen)
                accelerator.backward(out["loss"] / sc.grad_accum)
            outs.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()})
        if sc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(flat, sc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(averaged.parameters())
        done = step + 1
        bar.update(1)

        if done % sc.log_every == 0 or done == sc.steps:
            means = _scalar_means(outs)
            names, stacked = _mean_over_processes(accelerator, means, device)
            now = time.perf_counter()
            rate = images_per_step * (done - last_logged_step) / max(now - t_last, 1e-9)
            t_last, last_logged_step = now, done
            row = {"step": done, "stage": stage}
            row.update({k: float(v) for k, v in zip(names, stacked.float().cpu())})
            row.update({
                "lr": scheduler.get_last_lr()[0],
                "img_per_s": rate,
                "elapsed_s": elapsed_before + now - t_begin,
            })
            last_row = row
            if main:
                log.append(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{rate:.1f}")

        t_io = time.perf_counter()
        if done < sc.steps and done % sc.checkpoint_every == 0:
            checkpoint(done, complete=False)
        if done < sc.steps and sc.sample_every and done % sc.sample_every == 0:
            samples(done)
        t_last += time.perf_counter() - t_io  # images/second counts training time only
        if stop_at_step is not None and done >= stop_at_step and done < sc.steps:
            if done % sc.checkpoint_every:
                checkpoint(done, complete=False)
            bar.close()
            accelerator.free_memory()
            seconds = time.perf_counter() - t_begin
            return StageResult(stage, start, done, seconds, images_per_step * (done - start), last_row, True)
    bar.close()

    if ema is not None and start < sc.steps:
        ema.copy_to(averaged.parameters())
    seconds = time.perf_counter() - t_begin
    if start < sc.steps:
        checkpoint(sc.steps, complete=True)
        samples(sc.steps)
    if device.type == "cuda":  # gc + cache release; a needless ~0.5 s on CPU
        accelerator.free_memory()
    return StageResult(stage, start, sc.steps, seconds, images_per_step * (sc.steps - start), last_row)
