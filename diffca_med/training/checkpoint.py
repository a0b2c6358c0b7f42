"""Atomic training checkpoints, without pickles.

A checkpoint is a folder ``RUN/checkpoints/stage<S>-step<NNNNNNN>/``:

=====================  ==========================================================
``model.safetensors``  every parameter and buffer of the (unwrapped) model
``optimizer.*``        optimiser tensors (``.safetensors``) + param groups (``.json``)
``scheduler.json``     the LR scheduler's state
``ema.*``              EMA shadow parameters of the denoiser + counters (stage 1)
``rng.*``              torch (CPU and CUDA), NumPy and Python RNG states of process 0
``state.json``         stage, step, whether the stage is complete, world size, seed,
                       the model config, the data position, elapsed seconds
=====================  ==========================================================

Tensors are stored as safetensors and everything else as JSON, so loading never
unpickles. A checkpoint is written under a temporary name and renamed into place
when complete; then ``RUN/checkpoints/latest.json`` (the pointer ``--resume`` reads)
is replaced atomically, and older checkpoints of the same stage beyond ``keep`` are
removed. A process killed at any moment therefore leaves the previous checkpoint and
pointer intact and loses at most ``checkpoint_every`` steps.

Only the RNG states of process 0 are stored: the training loop reseeds every random
draw from (seed, stage, step, process), so the other processes need none.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from diffca_med.errors import InputError
from diffca_med.fileio import atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^stage(\d)-step(\d{7})$")


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint is and what it holds (from its ``state.json``)."""

    path: Path
    stage: int
    step: int
    complete: bool  # the stage finished at this checkpoint
    state: dict


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:07d}"


# --------------------------------------------------------------------------- parts


def _optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(idx), {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups, "plain": plain}))


def _optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["plain"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _ema_to_files(ema: Any, folder: Path) -> None:
    sd = ema.state_dict()
    shadow = sd.pop("shadow_params")
    sd.pop("collected_params", None)
    save_file(
        {f"shadow.{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(shadow)},
        str(folder / "ema.safetensors"),
    )
    (folder / "ema.json").write_text(json.dumps(sd))


def _ema_from_files(ema: Any, folder: Path) -> None:
    tensors = load_file(str(folder / "ema.safetensors"))
    sd = json.loads((folder / "ema.json").read_text())
    shadow = [tensors[k] for k in sorted(tensors)]
    if len(shadow) != len(ema.shadow_params):
        raise InputError(f"{folder}: EMA holds {len(shadow)} tensors, the model needs {len(ema.shadow_params)}")
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    sd["shadow_params"] = [t.to(device) for t in shadow]
    ema.load_state_dict(sd)


def _rng_to_files(folder: Path) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    save_file(tensors, str(folder / "rng.safetensors"))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    (folder / "rng.json").write_text(json.dumps(meta))


def _rng_from_files(folder: Path) -> None:
    tensors = load_file(str(folder / "rng.safetensors"))
    meta = json.loads((folder / "rng.json").read_text())
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# --------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | Path,
    *,
    stage: int,
    step: int,
    complete: bool,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: Any = None,
    state: dict | None = None,
    keep: int = 1,
) -> Path:
    """Write a checkpoint atomically, point ``latest.json`` at it, prune old ones.

    ``state`` is merged into ``state.json`` (JSON-able values only). Returns the
    checkpoint folder. Call on the main process only.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(stage, step)
    final = root / name
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            _optimizer_to_files(optimizer, tmp)
        if scheduler is not None:
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        if ema is not None:
            _ema_to_files(ema, tmp)
        _rng_to_files(tmp)
        info = {"format_version": FORMAT_VERSION, "stage": stage, "step": step, "complete": complete}
        info.update(state or {})
        (tmp / "state.json").write_text(json.dumps(info, indent=1))
        if final.exists():  # re-running a stage over an old checkpoint of the same name
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, json.dumps({"path": name, "stage": stage, "step": step, "complete": complete}))
    _prune(root, stage, keep, current=name)
    return final


def _prune(root: Path, stage: int, keep: int, current: str) -> None:
    """Keep the newest ``keep`` checkpoints of ``stage`` (always ``current``)."""
    same = sorted(
        (p for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name)) and int(m.group(1)) == stage),
        key=lambda p: p.name,
    )
    newer_first = [p for p in reversed(same) if p.name != current]
    for path in newer_first[max(keep - 1, 0):]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stage_checkpoints(run_dir: str | Path, stages: list[int]) -> None:
    """Delete every checkpoint of ``stages`` (a stage re-run from its start)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if p.is_dir() and m and int(m.group(1)) in stages:
            shutil.rmtree(p, ignore_errors=True)
    pointer = root / LATEST
    try:
        target = json.loads(pointer.read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        target = None
    if target is not None and not (root / target).is_dir():
        remaining = list_checkpoints(run_dir)
        if remaining:
            c = remaining[-1]
            atomic_write_text(pointer, json.dumps({"path": c.path.name, "stage": c.stage, "step": c.step, "complete": c.complete}))
        else:
            pointer.unlink()


def clean_temporaries(run_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a killed run."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- find


def _info(path: Path) -> CheckpointInfo | None:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not (path / "model.safetensors").is_file():
        return None
    return CheckpointInfo(path, int(state["stage"]), int(state["step"]), bool(state["complete"]), state)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """All complete checkpoint folders under RUN, oldest (stage, step) first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    infos = [i for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (i := _info(p))]
    return sorted(infos, key=lambda i: (i.stage, i.step))


def read_latest(run_dir: str | Path) -> CheckpointInfo | None:
    """The checkpoint ``latest.json`` points at; the newest one if the pointer is lost."""
    root = checkpoint_dir(run_dir)
    try:
        pointer = json.loads((root / LATEST).read_text())
        info = _info(root / pointer["path"])
        if info is not None:
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def last_complete(run_dir: str | Path, before_stage: int) -> CheckpointInfo | None:
    """The final checkpoint of the latest completed stage earlier than ``before_stage``."""
    done = [c for c in list_checkpoints(run_dir) if c.complete and c.stage < before_stage]
    return done[-1] if done else None


# --------------------------------------------------------------------------- load


def load_model_state(info: CheckpointInfo, model: torch.nn.Module, stages=None) -> None:
    """Load a checkpoint's weights into ``model`` (strict: every tensor must match).

    ``stages``: skip the parts (``model.stage_modules``) of every other stage, which
    keep their fresh initialisation; None loads everything.
    """
    from diffca_med.models.weights import load_weights

    skip: set[str] = set()
    if stages is not None:
        others = [m for s in (0, 1, 2) if s not in stages for m in model.stage_modules(s)]
        skip = {n for n, m in model.named_children() if any(m is x for x in others)}
    load_weights(model, info.path / "model.safetensors", skip=skip)


def load_training_state(
    info: CheckpointInfo,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: Any = None,
    rng: bool = True,
) -> None:
    """Restore optimiser, scheduler, EMA and (process-0) RNG states from a checkpoint."""
    folder = info.path
    if optimizer is not None:
        _optimizer_from_files(optimizer, folder)
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise InputError(f"{folder}: no EMA state, but the config asks for an EMA")
        _ema_from_files(ema, folder)
    if rng:
        _rng_from_files(folder)
