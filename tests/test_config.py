"""Training configuration: shipped presets, key/type checks, --set overrides, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffca_med.cli.app import app
from diffca_med.errors import ConfigError
from diffca_med.pipelines.train import resolve_config_path
from diffca_med.training.config import apply_overrides, config_from_dict, dump_config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["cpu-demo", "brats-128", "brats-256-latent"])
def test_shipped_presets_load_and_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.image_size == cfg.data.size
    assert list(cfg.model.modalities) == list(cfg.data.modalities)
    assert resolve_config_path(name).name == f"{name}.yaml"  # preset names resolve
    # the dump reads back to the same configuration
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_gpu_presets_use_their_devices_settings():
    pixel = load_config(CONFIGS / "brats-128.yaml")
    latent = load_config(CONFIGS / "brats-256-latent.yaml")
    assert pixel.training.mixed_precision == "bf16" and pixel.model.space == "pixel" and pixel.data.size == 128
    assert latent.model.space == "latent" and latent.data.size == 256 and latent.model.backbone == "dinov3"
    assert latent.model.dinov3_path  # a placeholder the user must point at a local DINOv3 folder
    assert latent.stage1.warmup_start_lr == pytest.approx(1e-6) and latent.stage1.lr == pytest.approx(1e-4)
    assert latent.stage1.warmup_steps == 5000


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "stage1.stpes" in msg and "did you mean 'stage1.steps'" in msg
    path.write_text("trainng:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainng'; did you mean 'training'"):
        load_config(path)
    path.write_text("model:\n  tokn_dim: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'model.token_dim'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("stage1:\n  steps: 1.5\n", "'stage1.steps' must be int"),
        ("stage1:\n  steps: true\n", "'stage1.steps' must be int"),
        ("stage2:\n  lr: fast\n", "'stage2.lr' must be float"),
        ("training:\n  mixed_precision: fp16\n", "'training.mixed_precision' must be one of"),
        ("data:\n  modalities: t1c\n", "'data.modalities' must be list of str"),
        ("stage1: 3\n", "'stage1' must be a mapping"),
        ("stage1:\n  batch_size: 0\n", "'stage1.batch_size' must be >= 1"),
        ("stage2:\n  min_tumour_fraction: 1.5\n", "'stage2.min_tumour_fraction' must be in [0, 1)"),
        ("stage0:\n  ema_decay: 0.99\n", "'stage0.ema_decay': stage 0 (the autoencoder) keeps no EMA"),
        ("data:\n  size: 64\nmodel:\n  image_size: 32\n", "disagrees with 'data.size'"),
        ("stage1: [\n", "YAML syntax error"),
    ],
)
def test_bad_values_are_config_errors(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_checked_like_the_file():
    cfg = load_config(CONFIGS / "cpu-demo.yaml", ["stage1.steps=7", "stage2.lr=3e-4", "data.modalities=[t1, flair]"])
    assert cfg.stage1.steps == 7 and cfg.stage2.lr == pytest.approx(3e-4)
    assert cfg.model.modalities == ["t1", "flair"]  # set once, in data
    with pytest.raises(ConfigError, match=r"--set 'stage1.stepz=3': unknown key 'stage1.stepz'; did you mean 'stage1.steps'"):
        load_config(CONFIGS / "cpu-demo.yaml", ["stage1.stepz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["stage1.steps"])
    with pytest.raises(ConfigError, match="'stage1.steps' must be int"):
        load_config(CONFIGS / "cpu-demo.yaml", ["stage1.steps=many"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "stage1.stepz=3"], "did you mean 'stage1.steps'"),
        (["--set", "stage1.steps=x"], "'stage1.steps' must be int"),
        (["--stage", "3"], "--stage 3: must be one of"),
        (["--config", "no-such-preset"], "no-such-preset: config file not found"),
    ],
)
def test_cli_config_errors_one_line_exit_2(tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage2:\n  warmup_step: 10\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path), "-c", str(path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {path}: unknown key 'stage2.warmup_step'; did you mean 'stage2.warmup_steps'?" in result.stderr
