"""``train``: a data folder or slice store -> a trained Diff-CA model folder.

Steps: Accelerate set-up -> the slice store (DATA itself if it is a store, else
``prepare`` into ``RUN/store``, reused when inputs and options are unchanged) -> the
model (fresh, from the last completed earlier stage, or from the last checkpoint with
``resume``) -> the requested stages through :func:`diffca_med.training.loop.train_stage`
-> ``RUN/model`` (``save_pretrained``), ``RUN/plots/*.png``, ``RUN/train_summary.json``.

``RUN`` layout::

    config.yaml          the resolved configuration of the last start
    store/               the slice store (when DATA was a raw folder)
    checkpoints/         stage<S>-step<NNNNNNN>/ folders + latest.json
    logs/stage<S>.csv    one row per logged step
    samples/             input | reconstruction | pseudo-healthy grids (PNG)
    plots/               losses.png, adversary.png
    model/               the final model (config.json + safetensors)
    train_summary.json   per stage: steps, seconds, images/second; device, processes
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_write_text
from diffca_med.training.checkpoint import (
    CheckpointInfo,
    clean_temporaries,
    last_complete,
    list_checkpoints,
    load_model_state,
    read_latest,
    remove_stage_checkpoints,
)
from diffca_med.training.config import TrainConfig, dump_config

STAGE_CHOICES = ("0", "1", "2", "all")
_PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a shipped preset (``cpu-demo``, ``brats-128``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (_PACKAGED_CONFIGS / f"{name}", _PACKAGED_CONFIGS / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in _PACKAGED_CONFIGS.glob("*.yaml")) if _PACKAGED_CONFIGS.is_dir() else []
    raise ConfigError(f"{name}: config file not found (shipped presets: {', '.join(presets) or 'none'})")


@dataclass
class TrainResult:
    """Where a training run put its outputs and how fast each stage ran."""

    run_dir: Path
    model_dir: Path
    store: Path
    stages: list[dict] = field(default_factory=list)  # per trained stage: figures
    seconds: float = 0.0
    interrupted: bool = False  # stopped by ``stop_at_step``; no model folder written


def make_accelerator(cfg: TrainConfig, warn: Callable[[str], None]):
    """An :class:`accelerate.Accelerator` for this config (bf16 only on GPU).

    ``find_unused_parameters`` is on because a stage's loss may leave some trainable
    parameters without gradient in a step (DDP would otherwise fail).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
    mp = cfg.training.mixed_precision
    if mp == "bf16" and not cuda:
        warn("training.mixed_precision 'bf16' needs a GPU; training in float32 on the CPU")
        mp = "no"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        mixed_precision=mp,
        cpu=not cuda,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def prepare_options(cfg: TrainConfig):
    """The :class:`PrepareOptions` of the config's ``data`` section."""
    from diffca_med.pipelines.prepare import PrepareOptions

    d = cfg.data
    return PrepareOptions(
        layout=d.layout,
        modalities=tuple(d.modalities),
        size=d.size,
        min_brain_fraction=d.min_brain_fraction,
        min_tumour_fraction=d.min_tumour_fraction,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        percentiles=tuple(d.percentiles),
        upper_value=d.upper_value,
        skip_incomplete=d.skip_incomplete,
        zero_nonfinite=d.zero_nonfinite,
    )


def resolve_store(
    data: Path,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    force_prepare: bool = False,
    progress: bool = True,
    info: Callable[[str], None],
    warn: Callable[[str], None],
) -> Path:
    """DATA if it is a slice store (checked against ``cfg.data``), else ``RUN/store`` prepared from it."""
    if (data / "store.json").is_file():
        from diffca_med.data.store import SliceStore, describe_normalisation, normalisation_key

        store = SliceStore(data)
        if list(store.modalities) != list(cfg.data.modalities):
            raise ConfigError(
                f"{data}: the store holds modalities {list(store.modalities)} but the config asks for "
                f"{list(cfg.data.modalities)}; set data.modalities (e.g. --set data.modalities=[{','.join(store.modalities)}])"
            )
        wanted = normalisation_key(cfg.data.percentiles, cfg.data.upper_value)
        if store.normalisation != wanted:
            (p_lo, p_hi), value = store.normalisation
            raise ConfigError(
                f"{data}: the store maps brain percentiles {describe_normalisation(store.normalisation)} but the config asks for "
                f"{describe_normalisation(wanted)}; set data.percentiles and "
                f"data.upper_value (--set data.percentiles=[{p_lo:g},{p_hi:g}] --set data.upper_value={value:g}) "
                f"or prepare the data again"
            )
        if store.size != cfg.data.size:
            raise ConfigError(
                f"{data}: the store's slices are {store.size} px but the config asks for {cfg.data.size}; "
                f"set data.size (--set data.size={store.size})"
            )
        return data
    if not data.is_dir():
        raise InputError(f"{data}: not a folder")
    from diffca_med.pipelines.prepare import prepare

    try:
        result = prepare(
            data, run_dir / "store", prepare_options(cfg), force=force_prepare, progress=progress, info=info, warn=warn
        )
    except ConfigError as err:
        raise ConfigError(str(err).replace("pass --force", "pass --force-prepare")) from None
    return result.store


def _sample_rows(store, count: int) -> np.ndarray:
    """Held-out rows for sample grids, one per subject: the slices with the largest
    tumours, and the most central (largest brain) healthy slices."""
    for split in ("val", "test", "train"):
        tumour = store.rows(split=split, labels="tumour")
        healthy = store.rows(split=split, labels="healthy")
        if len(tumour) + len(healthy):
            break
    index = store.index

    def best_per_subject(rows: np.ndarray, column: str) -> np.ndarray:
        if not len(rows):
            return rows
        df = index.iloc[rows].assign(_row=rows).sort_values([column, "_row"], ascending=[False, True], kind="stable")
        return df.drop_duplicates("subject")["_row"].to_numpy()

    t = best_per_subject(tumour, "tumour_pixels")
    h = best_per_subject(healthy, "brain_pixels")
    n_t = min(len(t), max(count - count // 2, count - len(h)))
    return np.concatenate([t[:n_t], h[: count - n_t]]).astype(np.int64)


def _stages_to_train(cfg: TrainConfig, stage: str) -> list[int]:
    """Stage numbers ``--stage`` asks for, in order (stage 0 only for latent models)."""
    m = cfg.model
    needs_ae = m.space == "latent" and not m.pretrained_vae
    if stage == "all":
        stages = [0, 1, 2] if needs_ae else [1, 2]
        return [s for s in stages if cfg.stage(s).steps > 0]
    if stage not in STAGE_CHOICES:
        raise ConfigError(f"--stage {stage}: must be one of {', '.join(STAGE_CHOICES)}")
    s = int(stage)
    if s == 0 and not needs_ae:
        why = "model.space is 'pixel'" if m.space == "pixel" else "model.pretrained_vae is set"
        raise ConfigError(f"{cfg.source}: stage 0 trains the autoencoder of latent models, but {why}")
    return [s]


def _model_config_from_state(state: dict, cfg: TrainConfig, warn: Callable[[str], None],
                             new_stage: int | None = None):
    """The checkpoint's model config (authoritative on resume); warn where YAML differs.

    ``new_stage`` 2: a fresh stage 2 on a finished stage 1 takes the stage-2 fields
    (``STAGE2_FIELDS``) from the YAML, so the split can be retrained with new settings.
    """
    from diffca_med.models.config import STAGE2_FIELDS, ModelConfig

    saved = dict(state.get("model_config") or {})
    ours = cfg.model.to_dict()
    if new_stage == 2:
        saved.update({k: ours[k] for k in STAGE2_FIELDS})
    changed = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k) and k != "latent_scale")
    if changed:
        warn(f"the checkpoint's model settings differ from the config in {', '.join(changed)}; using the checkpoint's")
    try:
        return ModelConfig(**saved)
    except (TypeError, ConfigError) as err:
        raise InputError(f"checkpoint model_config is unusable: {err}") from None


def _position_strata(store, dataset, bins: int) -> np.ndarray | None:
    """Axial-position bin (0..bins-1) of each training slice, or None when ``bins`` is 0."""
    if bins <= 0:
        return None
    return store.axial_bins(bins)[dataset.indices]


def _stage_dataset(store, dataset, min_tumour_fraction: float, name: str):
    """The training slices of one stage: ``dataset`` itself, or without tumour slices
    thinner than ``min_tumour_fraction`` (ConfigError if that leaves no tumour slice)."""
    if min_tumour_fraction <= 0:
        return dataset
    from diffca_med.data.store import SliceDataset

    strict = SliceDataset(store, split="train", min_tumour_fraction=min_tumour_fraction)
    if (dataset.labels == 1).any() and not (strict.labels == 1).any():
        most = int(store.index["tumour_pixels"].to_numpy()[dataset.indices].max())
        raise ConfigError(f"{name}.min_tumour_fraction {min_tumour_fraction} leaves no tumour slice to train on in "
                          f"{store.path} (the largest has {most} of {store.size ** 2} pixels)")
    return strict


def _build_model(model_cfg, seed: int):
    from diffca_med.models import DiffCAModel

    torch.manual_seed(seed)  # identical initial weights on every process and every start
    return DiffCAModel(model_cfg)


def train(
    data: str | Path,
    cfg: TrainConfig,
    out: str | Path,
    *,
    stage: str = "all",
    resume: bool = False,
    force_prepare: bool = False,
    progress: bool = True,
    info: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    stop_at: tuple[int, int] | None = None,
) -> TrainResult:
    """Train ``stage`` ('0', '1', '2' or 'all') of a Diff-CA model on DATA into RUN=``out``.

    Without ``resume`` the first requested stage starts from its step 0 (from the
    weights of the last completed earlier stage in RUN, or fresh for stages 0/1),
    replacing RUN's checkpoints of that stage and later ones. With ``resume`` training
    continues from ``RUN/checkpoints/latest.json`` to the configured step counts.
    ``stop_at=(stage, step)`` ends the session after that step of that stage, with an
    unfinished checkpoint and no model folder, as if killed right after checkpointing
    there (for tests and time-sliced sessions; ``resume`` continues).
    Raises :class:`ConfigError`/:class:`InputError` with one-line messages.
    """
    t0 = time.perf_counter()
    info = info or (lambda msg: None)
    warn = warn or (lambda msg: None)
    data, run_dir = Path(data), Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a folder")
    stages = _stages_to_train(cfg, stage)
    accelerator = make_accelerator(cfg, warn)
    main = accelerator.is_main_process
    say = info if main else (lambda msg: None)
    shout = warn if main else (lambda msg: None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(run_dir)
    with accelerator.main_process_first():
        store_path = resolve_store(
            data, cfg, run_dir, force_prepare=force_prepare, progress=progress and main, info=say, warn=shout
        )
    from diffca_med.data.store import SliceDataset, SliceStore

    store = SliceStore(store_path)
    dataset = SliceDataset(store, split="train")
    if len(dataset) == 0:
        raise InputError(f"{store_path}: no healthy or tumour slices in the train split")

    # Where to start: a checkpoint to resume, or the last completed earlier stage.
    model_cfg = cfg.model
    start_ckpt: CheckpointInfo | None = None  # weights to load
    resume_ckpt: CheckpointInfo | None = None  # mid-stage training state to restore
    latest = read_latest(run_dir) if resume else None
    load_stages: range | None = None  # stages whose weights start_ckpt gives (None: all)
    if resume and latest is None:
        shout(f"{run_dir}: no checkpoint to resume from; starting from the beginning")
    if latest is not None:
        if latest.complete:
            todo = [s for s in stages if s > latest.stage]
        else:
            if latest.stage not in stages:
                raise ConfigError(
                    f"{run_dir}: the last checkpoint is stage {latest.stage} at step {latest.step} (unfinished); "
                    f"resume it with --stage {latest.stage} or --stage all"
                )
            todo = [s for s in stages if s >= latest.stage]
            resume_ckpt = latest
        start_ckpt = latest
        model_cfg = _model_config_from_state(latest.state, cfg, shout)
        if resume_ckpt is not None:
            st = resume_ckpt.state
            sc = cfg.stage(resume_ckpt.stage)
            was = (st.get("world_size"), st.get("batch_size"), st.get("grad_accum"))
            now = (None, sc.batch_size, sc.grad_accum)
            if was[0] is not None:
                now = (accelerator.num_processes, sc.batch_size, sc.grad_accum)
            if was != now:
                shout(
                    f"{resume_ckpt.path.name} was trained with processes/batch/accumulation {was}, now {now}: "
                    "training continues, but not as the uninterrupted run would have"
                )
        say(f"resuming from {latest.path.name} ({'complete' if latest.complete else 'unfinished'})")
        stages = todo
    else:
        first = stages[0]
        load_stages = range(first)  # a new stage takes only the earlier stages' weights
        prev = last_complete(run_dir, before_stage=first)
        if first == 2 and (prev is None or prev.stage < 1):
            raise ConfigError(f"{run_dir}: stage 2 needs a trained stage 1 in this run folder; run --stage 1 (or all) first")
        needs_ae = cfg.model.space == "latent" and not cfg.model.pretrained_vae
        if first == 1 and needs_ae and prev is None:
            raise ConfigError(
                f"{run_dir}: stage 1 of a latent model needs the stage-0 autoencoder; run --stage 0 first "
                "or set model.pretrained_vae"
            )
        if prev is not None:
            start_ckpt = prev
            model_cfg = _model_config_from_state(prev.state, cfg, shout, new_stage=first)
            say(f"starting stage {first} from {prev.path.name}")
        later = sorted({c.stage for c in list_checkpoints(run_dir) if c.stage >= first})
        if later and main:
            shout(f"{run_dir}: replacing the checkpoints of stage(s) {', '.join(map(str, later))}")
            remove_stage_checkpoints(run_dir, later)
    accelerator.wait_for_everyone()

    model = _build_model(model_cfg, cfg.training.seed)
    if start_ckpt is not None:
        # a new stage takes only the earlier stages' weights; a resume takes everything
        load_model_state(start_ckpt, model, stages=load_stages)
    if main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    sample_count = max(cfg.stage(s).sample_count for s in (0, 1, 2))
    rows = _sample_rows(store, sample_count) if sample_count else np.zeros(0, np.int64)
    samples = torch.from_numpy(np.array(store.images[np.sort(rows)], dtype=np.float32)) if len(rows) else None

    from diffca_med.training.loop import train_stage

    stage_data = {s: _stage_dataset(store, dataset, cfg.stage(s).min_tumour_fraction, f"stage{s}") for s in stages}
    results = []
    for s in stages:
        resume_here = resume_ckpt if (resume_ckpt is not None and resume_ckpt.stage == s) else None
        sc = cfg.stage(s)
        say(
            f"stage {s}: {sc.steps} steps x {sc.batch_size * sc.grad_accum * accelerator.num_processes} images"
            + (f", from step {resume_here.step}" if resume_here else "")
            + f" on {accelerator.num_processes} x {accelerator.device.type}"
        )
        r = train_stage(
            accelerator,
            model,
            cfg,
            s,
            stage_data[s],
            stage_data[s].labels,
            run_dir,
            resume=resume_here,
            sample_images=samples,
            progress=progress,
            stop_at_step=stop_at[1] if stop_at is not None and stop_at[0] == s else None,
            strata=_position_strata(store, stage_data[s], sc.match_position_bins),
        )
        results.append({
            "stage": s,
            "start_step": r.start_step,
            "steps": r.steps,
            "seconds": round(r.seconds, 2),
            "images_per_second": round(r.images_per_second, 2),
            "last_log": r.last,
        })
        if r.interrupted:
            say(f"stage {s}: stopped at step {r.steps} as asked; continue with --resume")
            accelerator.wait_for_everyone()
            return TrainResult(run_dir, run_dir / "model", Path(store_path), results, time.perf_counter() - t0, True)
        say(f"stage {s}: done in {r.seconds:.1f} s ({r.images_per_second:.1f} images/s)")

    model_dir = run_dir / "model"
    if main:
        model.save_pretrained(model_dir)  # atomic: config.json + model.safetensors
        from diffca_med.training.plots import plot_training

        plot_training(run_dir)
        summary = {
            "stages": results,
            "processes": accelerator.num_processes,
            "device": accelerator.device.type,
            "mixed_precision": accelerator.mixed_precision,
            "store": str(store_path),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, model_dir, Path(store_path), results, time.perf_counter() - t0)
