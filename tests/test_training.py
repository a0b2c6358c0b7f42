"""Training: exact resume, atomic checkpoints, SIGKILL, the CLI, 2 CPU processes (DDP/gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffca_med.cli.app import app
from diffca_med.errors import ConfigError
from diffca_med.pipelines.train import train
from diffca_med.training.batches import StepBatchSampler
from diffca_med.training.checkpoint import (
    clean_temporaries,
    list_checkpoints,
    load_model_state,
    read_latest,
    save_checkpoint,
)
from diffca_med.training.config import config_from_dict
from diffca_med.training.loop import warmup_factor

REPO = Path(__file__).resolve().parent.parent

# A very small model and schedule over the tiny store (4 modalities, 32 px).
TINY = {
    "data": {"modalities": ["t1", "t1c", "t2", "flair"], "size": 32},
    "model": {
        "token_dim": 16, "n_queries": 4, "attention_heads": 2, "intensity_bins": 4,
        "scratch_channels": [8, 16], "unet_channels": [8, 16, 16], "norm_groups": 4,
        "cross_query_layers": 1, "split_depth": 1, "adversary_hidden": 16, "salient_dim": 4,
        "grl_warmup_steps": 1, "sample_steps": 2,
    },
    "stage1": {"steps": 3, "batch_size": 4, "grad_accum": 2, "warmup_steps": 2, "ema_decay": 0.9,
               "checkpoint_every": 1, "log_every": 1, "sample_every": 2, "sample_count": 2, "sample_steps": 2},
    "stage2": {"steps": 3, "batch_size": 4, "warmup_steps": 2, "ema_decay": 0.9, "checkpoint_every": 1,
               "log_every": 1, "sample_count": 2, "sample_steps": 2, "match_position_bins": 2},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads competing with
    other processes spin-wait and run small convolutions ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**stage_overrides):
    raw = json.loads(json.dumps(TINY))
    for key, value in stage_overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, source="tiny")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-exact on CPU


def test_warmup_schedule_is_linear_then_constant():
    cfg = tiny_cfg(stage1__lr=1e-4, stage1__warmup_start_lr=1e-6, stage1__warmup_steps=5000)
    f = warmup_factor(cfg.stage1)
    assert f(0) * 1e-4 == pytest.approx(1e-6)
    assert f(2500) * 1e-4 == pytest.approx((1e-6 + 1e-4) / 2)
    assert f(5000) == f(9000) == 1.0


def test_data_order_is_a_function_of_seed_and_step():
    labels = np.array([0] * 10 + [1] * 5)
    full = StepBatchSampler(labels, 4, seed=3, stage=1, total_micro=12)
    batches = list(full)
    late = StepBatchSampler(labels, 4, seed=3, stage=1, start_micro=7, total_micro=12)
    assert list(late) == batches[7:]  # resuming at micro-batch 7 gives the same batches
    for b in batches:  # balanced: 2 healthy + 2 tumour
        assert sorted(labels[b].tolist()) == [0, 0, 1, 1]
    # an epoch of a class covers all its slices once
    healthy = [i for b in batches[:5] for i in b if labels[i] == 0]
    assert sorted(healthy) == list(range(10))
    # two processes see disjoint slices of the same global order
    r0 = StepBatchSampler(labels, 4, seed=3, stage=1, rank=0, world=2).batch(0)
    r1 = StepBatchSampler(labels, 4, seed=3, stage=1, rank=1, world=2).batch(0)
    assert r0 == batches[0] and r1 == batches[1]
    other = StepBatchSampler(labels, 4, seed=4, stage=1, total_micro=12)
    assert list(other) != batches


def test_position_matched_batches_pair_strata_and_resume_exactly():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 40)
    strata = np.concatenate([rng.integers(0, 8, 60), rng.integers(2, 6, 40)])
    strata[:60][strata[:60] == 5] = 6  # no healthy slice in stratum 5: the nearest serves it
    full = StepBatchSampler(labels, 8, seed=0, stage=2, total_micro=40, strata=strata)
    batches = list(full)
    for b in batches:
        healthy, tumour = np.array(b[:4]), np.array(b[4:])
        assert (labels[healthy] == 0).all() and (labels[tumour] == 1).all()
        gap = np.abs(strata[healthy] - strata[tumour])
        assert (gap[strata[tumour] != 5] == 0).all() and (gap[strata[tumour] == 5] == 1).all()
    late = StepBatchSampler(labels, 8, seed=0, stage=2, start_micro=25, total_micro=40, strata=strata)
    assert list(late) == batches[25:]
    # a stratum's healthy slices are walked in turn, not re-drawn at random
    drawn = [i for b in batches for i in b[:4] if strata[i] == 3]
    n3 = int(((strata == 3) & (labels == 0)).sum())
    assert sorted(drawn[:n3]) == sorted(np.flatnonzero((strata == 3) & (labels == 0)).tolist())


def test_checkpoints_are_atomic_pruned_and_pointed_at(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, stage=1, step=step, complete=False, model=model, optimizer=opt, keep=1)
    save_checkpoint(tmp_path, stage=2, step=1, complete=False, model=model, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "stage1-step0000003", "stage2-step0000001"]
    # a half-written checkpoint (killed mid-write) is never picked and is cleaned up
    half = tmp_path / "checkpoints" / ".tmp-stage2-step0000002-dead"
    half.mkdir()
    (half / "state.json").write_text("{")
    assert read_latest(tmp_path).path.name == "stage2-step0000001"
    clean_temporaries(tmp_path)
    assert not half.exists()
    # a lost pointer falls back to the newest complete checkpoint
    (tmp_path / "checkpoints" / "latest.json").unlink()
    assert read_latest(tmp_path).path.name == "stage2-step0000001"
    # no pickles: every file is JSON or safetensors
    files = {p.suffix for p in (tmp_path / "checkpoints" / "stage1-step0000003").iterdir()}
    assert files == {".json", ".safetensors"}
    other = torch.nn.Linear(3, 2)
    load_model_state(list_checkpoints(tmp_path)[0], other)
    assert torch.equal(other.weight, model.weight)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_store, tmp_path):
    """4 sessions (stop in stage 1, stop in stage 2, finish) == 1 uninterrupted run, bit for bit."""
    cfg = tiny_cfg()
    full = train(tiny_store, cfg, tmp_path / "full", progress=False)
    assert [s["stage"] for s in full.stages] == [1, 2]

    run = tmp_path / "parts"
    first = train(tiny_store, cfg, run, stop_at=(1, 2), progress=False)
    assert first.interrupted and not (run / "model").exists()
    assert read_latest(run).stage == 1 and read_latest(run).step == 2 and not read_latest(run).complete
    torch.manual_seed(1234)  # global RNG state must not matter
    second = train(tiny_store, cfg, run, resume=True, stop_at=(2, 1), progress=False)
    assert second.interrupted and read_latest(run).stage == 2
    train(tiny_store, cfg, run, resume=True, progress=False)
    assert_same_weights(tmp_path / "full", run)

    # the logs match too (timing columns aside)
    for stage in (1, 2):
        a = pd.read_csv(tmp_path / "full" / "logs" / f"stage{stage}.csv").drop(columns=["img_per_s", "elapsed_s"])
        b = pd.read_csv(run / "logs" / f"stage{stage}.csv").drop(columns=["img_per_s", "elapsed_s"])
        pd.testing.assert_frame_equal(a, b)
    log2 = pd.read_csv(run / "logs" / "stage2.csv")
    assert {"adv_acc", "grl_weight", "loss", "lr", "img_per_s"} <= set(log2.columns)
    assert list(log2["step"]) == [1, 2, 3]
    for name in ("plots/losses.png", "plots/adversary.png", "samples/stage1-step0000002.png",
                 "samples/stage2-step0000003.png", "train_summary.json", "config.yaml"):
        assert (run / name).is_file(), name

    from diffca_med.models import DiffCAModel

    model = DiffCAModel.from_pretrained(run / "model")
    x = torch.rand(2, 4, 32, 32)
    assert model.encode(x).salient_embedding.shape == (2, 4)


@pytest.mark.slow
def test_cli_train_stage_by_stage(tiny_store, tmp_path):
    """--stage 1 then --stage 2 (from the stage-1 checkpoint); stage 2 alone first is an error."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    runner = CliRunner()
    base = ["train", str(tiny_store), "-c", str(cfg_file), "-o", str(run), "-q"]
    bad = runner.invoke(app, base + ["--stage", "2"])
    assert bad.exit_code == 2 and "stage 2 needs a trained stage 1" in bad.stderr
    one = runner.invoke(app, base + ["--stage", "1", "--set", "stage1.steps=2", "--set", "stage1.sample_every=0"])
    assert one.exit_code == 0, one.output
    assert (run / "model" / "config.json").is_file()
    two = runner.invoke(app, base + ["--stage", "2", "--set", "stage2.steps=2"])
    assert two.exit_code == 0, two.output
    stages = {(c.stage, c.step, c.complete) for c in list_checkpoints(run)}
    assert stages == {(1, 2, True), (2, 2, True)}
    # stage 2 started from the finished stage 1: its frozen parts are unchanged
    s1 = load_file(str(run / "checkpoints" / "stage1-step0000002" / "model.safetensors"))
    final = weights(run)
    assert all(torch.equal(s1[k], final[k]) for k in s1 if k.startswith(("denoiser.", "conditioner.")))
    assert any(not torch.equal(s1[k], final[k]) for k in s1 if k.startswith("split."))
    # stage 2 again with other stage-2 settings: rebuilt fresh on the same stage 1
    again = runner.invoke(app, base + ["--stage", "2", "--set", "stage2.steps=1", "--set", "model.salient_dim=3",
                                       "--set", "model.w_mmd=0.0"])
    assert again.exit_code == 0, again.output
    saved = json.loads((run / "model" / "config.json").read_text())["model"]
    assert saved["salient_dim"] == 3 and saved["w_mmd"] == 0.0
    final = weights(run)
    assert final["salient_head.weight"].shape == (1, 3)
    assert all(torch.equal(s1[k], final[k]) for k in s1 if k.startswith(("denoiser.", "conditioner.")))
    # a stage-1 field cannot change under a finished stage 1: the checkpoint's value is kept
    kept = runner.invoke(app, base + ["--stage", "2", "--set", "stage2.steps=1", "--set", "model.token_dim=8"])
    assert kept.exit_code == 0 and "token_dim" in kept.stderr
    assert json.loads((run / "model" / "config.json").read_text())["model"]["token_dim"] == 16


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffca_med.cli", *args]


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(tiny_store, tmp_path):
    """Kill -9 mid-training, --resume: the result equals an uninterrupted run."""
    raw = json.loads(json.dumps(TINY))
    raw["stage1"].update(steps=6, sample_every=0)
    raw["stage2"].update(steps=1)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train(tiny_store, config_from_dict(raw, source=str(cfg_file)), tmp_path / "ref", progress=False)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", str(tiny_store), "-c", str(cfg_file), "-o", str(run), "-q"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = read_latest(run)
    assert latest is not None and not (run / "model").exists()
    done = subprocess.run(_cli("train", str(tiny_store), "-c", str(cfg_file), "-o", str(run), "-q", "--resume"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_weights(tmp_path / "ref", run)


@pytest.mark.slow
def test_two_cpu_processes_ddp_gloo(tmp_path):
    """torchrun --nproc_per_node 2: Accelerate sees MULTI_CPU (gloo); raw folder prepared on the fly."""
    from diffca_med.data.phantom import make_cohort

    make_cohort(tmp_path / "data", n_subjects=3, seed=2, layout="brats2023", grid="tiny")
    raw = json.loads(json.dumps(TINY))
    raw["stage1"].update(steps=2, sample_every=0)
    raw["stage2"].update(steps=2)
    raw["data"]["val_fraction"] = 0.0
    raw["data"]["test_fraction"] = 0.34
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffca_med.cli", "train", str(tmp_path / "data"), "-c", str(cfg_file), "-o", str(tmp_path / "run"), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["device"] == "cpu"
    assert (tmp_path / "run" / "store" / "store.json").is_file()  # prepared under RUN
    assert proc.stdout.count("model: ") == 1  # only the main process reports
    from diffca_med.models import DiffCAModel

    DiffCAModel.from_pretrained(tmp_path / "run" / "model")


def test_stage2_ema_averages_the_split_encoder_only(tiny_store, tmp_path):
    """stage2.ema_decay keeps an EMA of E (detector, in-painter, summariser) and ends with
    it in the model; stage 1 and the adversary follow the same trajectory either way."""
    averaged = tiny_cfg(model__split_mode="inpaint", stage2__ema_decay=0.5, stage2__steps=4)
    plain = tiny_cfg(model__split_mode="inpaint", stage2__ema_decay=None, stage2__steps=4)
    train(tiny_store, plain, tmp_path / "plain", progress=False)
    train(tiny_store, averaged, tmp_path / "ema", progress=False)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ema")
    assert a.keys() == b.keys()
    split = [k for k in a if k.startswith("split.")]
    moved = [k for k in split if not torch.equal(a[k], b[k])]
    assert split and len(moved) >= 0.9 * len(split), sorted(set(split) - set(moved))
    for k in a:
        if k.startswith(("denoiser.", "conditioner.", "adversary.")):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_latent_model_trains_stage0_then_1_and_2(tiny_store, tmp_path):
    """Latent space: --stage all runs the autoencoder (stage 0) first; its grid shows AE recon."""
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(space="latent", vae_channels=[8, 8], latent_channels=2, render_grid=4,
                        unet_channels=[8, 16], attention_levels=[False, True])
    raw["stage0"] = {"steps": 2, "batch_size": 4, "checkpoint_every": 5, "log_every": 1, "sample_count": 2}
    raw["stage1"].update(steps=1, sample_every=0)
    raw["stage2"].update(steps=1)
    cfg = config_from_dict(raw, source="latent")
    result = train(tiny_store, cfg, tmp_path / "run", progress=False)
    assert [s["stage"] for s in result.stages] == [0, 1, 2]
    assert (tmp_path / "run" / "samples" / "stage0-step0000002.png").is_file()
    log0 = pd.read_csv(tmp_path / "run" / "logs" / "stage0.csv")
    assert "latent_scale" in log0.columns and list(log0["step"]) == [1, 2]
    from diffca_med.models import DiffCAModel

    model = DiffCAModel.from_pretrained(tmp_path / "run" / "model")
    assert float(model.latent_scale) != 1.0  # learnt in stage 0, kept through stages 1-2
    with pytest.raises(ConfigError, match="stage 0 trains the autoencoder"):
        train(tiny_store, tiny_cfg(), tmp_path / "pixel", stage="0", progress=False)


def test_store_must_match_data_section(tiny_store, tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["data"]["size"] = 64
    with pytest.raises(ConfigError, match=r"slices are 32 px but the config asks for 64; set data.size \(--set data.size=32\)"):
        train(tiny_store, config_from_dict(raw), tmp_path / "run", progress=False)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["modalities"] = ["t1c", "flair"]
    with pytest.raises(ConfigError, match="holds modalities"):
        train(tiny_store, config_from_dict(raw), tmp_path / "run", progress=False)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["percentiles"], raw["data"]["upper_value"] = [0.5, 99.5], 1.0  # the old window
    with pytest.raises(ConfigError, match="the store maps brain percentiles"):
        train(tiny_store, config_from_dict(raw), tmp_path / "run", progress=False)


def test_stage_tumour_threshold_that_leaves_no_tumour_slice_is_a_config_error(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match=r"stage2.min_tumour_fraction 0.99 leaves no tumour slice to train on in .* pixels\)"):
        train(tiny_store, tiny_cfg(stage2__min_tumour_fraction=0.99), tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("checkpoints/stage1-*"))  # refused before any training
