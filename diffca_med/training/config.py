"""Training configuration: a YAML file -> typed, validated dataclasses.

A config file has six sections::

    data:     options of the slice store (modalities, size, thresholds, split)
    model:    the model's options (``diffca_med.models.ModelConfig``)
    stage0:   autoencoder training (latent models only)
    stage1:   image-conditioned diffusion autoencoder
    stage2:   common/salient split
    training: seed, mixed precision, data-loader workers

Every key is checked: an unknown or mistyped key is a :class:`ConfigError` that names
the key and the file and suggests the closest valid key; a value of the wrong type is
one too. ``overrides`` (``["stage1.steps=100", ...]``, the CLI's ``--set``) are applied
to the YAML before validation, so they are checked the same way. Values of overrides
are parsed as YAML scalars (``1e-4``, ``true``, ``[t1, flair]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffca_med.errors import ConfigError

STAGES = (0, 1, 2)
SECTIONS = ("data", "model", "stage0", "stage1", "stage2", "training")


@dataclass
class DataConfig:
    """Options of the slice store (``prepare``) built when DATA is a raw folder.

    They mirror :class:`diffca_med.pipelines.prepare.PrepareOptions`; ``modalities``
    and ``size`` also set the model's input channels and image size (set once here).
    When DATA is already a store, its modalities and size must equal these.
    """

    modalities: list[str] = field(default_factory=lambda: ["t1c", "flair"])
    size: int = 32  # slice side in pixels (H = W)
    layout: str | None = None  # brats2021 | brats2023 | msd | bids; None = detect
    min_brain_fraction: float = 0.3  # slices with less brain (of the slice area) are 'excluded'
    min_tumour_fraction: float = 0.005  # tumour area (of the slice) for a 'tumour' slice
    val_fraction: float = 0.15  # fraction of subjects
    test_fraction: float = 0.15  # fraction of subjects
    split_seed: int = 0  # seed of the subject split
    percentiles: list[float] = field(default_factory=lambda: [0.5, 50.0])  # intensity normalisation:
    upper_value: float = 0.3  # the lower percentile maps to 0, the upper one to upper_value
    skip_incomplete: bool = False  # skip subjects missing a modality instead of failing
    zero_nonfinite: bool = False  # replace NaN/Inf voxels by 0 instead of failing


@dataclass
class StageConfig:
    """Optimisation schedule of one training stage. ``steps`` counts optimiser steps."""

    steps: int = 1000  # optimiser steps (0 = skip the stage)
    batch_size: int = 16  # images per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # learning rate after warm-up
    warmup_start_lr: float = 1e-6  # learning rate at step 0
    warmup_steps: int = 5000  # linear warm-up length, then constant
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0  # None = no clipping
    ema_decay: float | None = None  # EMA of the denoiser (stage 1) or split encoder E (stage 2); None = no EMA
    ema_update_after_step: int = 0
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    log_every: int = 10  # steps between CSV log rows / progress-bar updates
    sample_every: int = 0  # steps between sample-grid PNGs (0 = only at the end)
    sample_count: int = 4  # held-out slices in a sample grid
    sample_steps: int = 10  # DDIM steps for sample grids
    balanced: bool = True  # healthy:tumour 1:1 in every micro-batch
    match_position_bins: int = 0  # >0: pair each tumour slice with a healthy slice from the same
    # of this many bins of axial position (so position alone cannot tell the halves apart)
    min_tumour_fraction: float = 0.0  # >0: this stage trains only on tumour slices with at least
    # this fraction of tumour pixels (stricter than the store's own threshold; 0 = all of them)


@dataclass
class TrainingConfig:
    """Run-wide settings."""

    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 only takes effect on GPU
    num_workers: int = 0  # DataLoader worker processes per training process
    keep_checkpoints: int = 1  # checkpoints kept per stage (the newest ones)


@dataclass
class TrainConfig:
    """A whole training configuration; ``model`` is the model package's ModelConfig."""

    data: DataConfig
    model: Any
    stage0: StageConfig
    stage1: StageConfig
    stage2: StageConfig
    training: TrainingConfig
    source: str = "<config>"  # the file it came from, for messages

    def stage(self, index: int) -> StageConfig:
        """The :class:`StageConfig` of stage ``index`` (0, 1 or 2)."""
        if index not in STAGES:
            raise ConfigError(f"{self.source}: no stage {index} (stages are 0, 1, 2)")
        return getattr(self, f"stage{index}")

    def to_dict(self) -> dict:
        """Plain-data form (YAML/JSON-able) that :func:`config_from_dict` reads back."""
        out = {}
        for name in ("data", "model", "stage0", "stage1", "stage2", "training"):
            out[name] = _plain(getattr(self, name))
        return out


_SECTIONS = {
    "data": DataConfig,
    "stage0": StageConfig,
    "stage1": StageConfig,
    "stage2": StageConfig,
    "training": TrainingConfig,
}


def _model_config_class():
    # Imported lazily, from the light config module (not the networks).
    from diffca_med.models.config import ModelConfig

    return ModelConfig


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _plain(obj.to_dict())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- checking


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    """``; did you mean 'prefix.closest'?`` (difflib), or the list of valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against type annotation ``tp``; raise on mismatch."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where} must be one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} items, got {value!r}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _build_dataclass(cls: type, data: Any, where: str, source: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{where}.{key}'{_suggest(str(key), fields, where + '.')}")
        tp = hints.get(key, Any)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build_dataclass(tp, value, f"{where}.{key}", source)
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: '{where}.{key}'")
    try:
        obj = cls(**kwargs)
    except ConfigError as err:  # the class's own validation (names the field)
        raise ConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: '{where}': {err}") from None
    return obj


def _check_stage(stage: StageConfig, name: str, source: str) -> None:
    positive = ("batch_size", "grad_accum", "checkpoint_every", "log_every", "sample_steps")
    for key in positive:
        if getattr(stage, key) < 1:
            raise ConfigError(f"{source}: '{name}.{key}' must be >= 1, got {getattr(stage, key)}")
    for key in ("steps", "warmup_steps", "sample_every", "sample_count", "ema_update_after_step"):
        if getattr(stage, key) < 0:
            raise ConfigError(f"{source}: '{name}.{key}' must be >= 0, got {getattr(stage, key)}")
    if stage.lr <= 0 or stage.warmup_start_lr <= 0:
        raise ConfigError(f"{source}: '{name}.lr' and '{name}.warmup_start_lr' must be > 0")
    if stage.ema_decay is not None and not 0.0 < stage.ema_decay < 1.0:
        raise ConfigError(f"{source}: '{name}.ema_decay' must be in (0, 1), got {stage.ema_decay}")
    if stage.ema_decay is not None and name == "stage0":
        raise ConfigError(f"{source}: '{name}.ema_decay': stage 0 (the autoencoder) keeps no EMA")
    if len(stage.betas) != 2 or not all(0.0 <= b < 1.0 for b in stage.betas):
        raise ConfigError(f"{source}: '{name}.betas' must be two numbers in [0, 1)")
    if not 0.0 <= stage.min_tumour_fraction < 1.0:
        raise ConfigError(f"{source}: '{name}.min_tumour_fraction' must be in [0, 1), got {stage.min_tumour_fraction}")


def _check(cfg: TrainConfig) -> None:
    src = cfg.source
    d = cfg.data
    if not 8 <= d.size <= 1024:
        raise ConfigError(f"{src}: 'data.size' must be between 8 and 1024, got {d.size}")
    if len(d.percentiles) != 2 or not 0 <= d.percentiles[0] < d.percentiles[1] <= 100:
        raise ConfigError(f"{src}: 'data.percentiles' must be [lower, upper] with 0 <= lower < upper <= 100")
    if not 0 < d.upper_value <= 1:
        raise ConfigError(f"{src}: 'data.upper_value' must be in (0, 1], got {d.upper_value}")
    if not d.modalities:
        raise ConfigError(f"{src}: 'data.modalities' must name at least one modality")
    if not 0.0 <= d.val_fraction + d.test_fraction < 1.0 or min(d.val_fraction, d.test_fraction) < 0:
        raise ConfigError(f"{src}: 'data.val_fraction' + 'data.test_fraction' must be in [0, 1)")
    for i in STAGES:
        _check_stage(cfg.stage(i), f"stage{i}", src)
    if cfg.training.num_workers < 0:
        raise ConfigError(f"{src}: 'training.num_workers' must be >= 0")
    if cfg.training.keep_checkpoints < 1:
        raise ConfigError(f"{src}: 'training.keep_checkpoints' must be >= 1")


def _build_model_config(data: Any, source: str, data_cfg: DataConfig) -> Any:
    """The model config, with ``modalities``/``image_size`` and the intensity
    normalisation taken from ``data``."""
    cls = _model_config_class()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: 'model' must be a mapping of keys to values, got {data!r}")
    data = dict(data)
    for key, value in (("modalities", list(data_cfg.modalities)), ("image_size", data_cfg.size)):
        if key in data and data[key] != value:
            twin = "data.modalities" if key == "modalities" else "data.size"
            raise ConfigError(
                f"{source}: 'model.{key}' ({data[key]!r}) disagrees with '{twin}' ({value!r}); set it once, in '{twin}'"
            )
        data[key] = value
    data["intensity_percentiles"] = [float(v) for v in data_cfg.percentiles]
    data["intensity_upper_value"] = float(data_cfg.upper_value)
    if dataclasses.is_dataclass(cls):
        return _build_dataclass(cls, data, "model", source)
    try:  # a non-dataclass config object validates its own keys
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: 'model': {err}") from None


# --------------------------------------------------------------------------- overrides


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. stage1.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be SECTION.KEY, e.g. stage1.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _check_override_key(parts: list[str], text: str) -> None:
    """Name the ``--set`` item itself (not the YAML file) when its key is wrong."""
    valid = list(SECTIONS)
    if parts[0] not in valid:
        raise ConfigError(f"--set {text!r}: unknown section '{parts[0]}'{_suggest(parts[0], valid)}")
    cls = _SECTIONS.get(parts[0]) or _model_config_class()
    for depth, part in enumerate(parts[1:], start=1):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in names:
            key = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {text!r}: unknown key '{key}'{_suggest(part, names, key.rsplit('.', 1)[0] + '.')}")
        cls = typing.get_type_hints(cls).get(part)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set ``SECTION.KEY=VALUE`` items into the raw config mapping (a copy)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = _parse_override(text)
        _check_override_key(parts, text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


# --------------------------------------------------------------------------- loading


def config_from_dict(data: Any, source: str = "<config>") -> TrainConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`TrainConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    valid = list(SECTIONS)
    for key in data:
        if key not in valid:
            raise ConfigError(f"{source}: unknown section '{key}'{_suggest(str(key), valid)}")
    sections = {
        name: _build_dataclass(cls, data.get(name), name, source) for name, cls in _SECTIONS.items()
    }
    model = _build_model_config(data.get("model"), source, sections["data"])
    cfg = TrainConfig(model=model, source=source, **sections)
    _check(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, override and validate the YAML config at ``path``.

    Raises :class:`ConfigError` (one line naming the file) on a missing file, a YAML
    syntax error, an unknown key (with a did-you-mean suggestion) or a wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    data = apply_overrides(data or {}, overrides) if overrides else data
    return config_from_dict(data, source=str(path))


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what a run records beside its outputs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
