"""Training throughput per stage and the fraction of the machine's matmul FLOP/s it reaches.

For each stage of a config: build the model, time ``--steps`` optimiser steps (forward,
backward, AdamW step; the config's batch size; after ``--warmup`` untimed steps) on
slices of a store (or random images when no store is given: speed does not depend on
pixel values), count one step's FLOPs with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; forward + backward), and compare
``FLOPs/step x steps/s`` with the peak of a large ``torch.matmul`` measured in the same
run (float32 on CPU; bf16 on GPU when the config trains in bf16).

    .venv/bin/python benchmarks/train_speed.py --config cpu-demo [--store STORE] [--json OUT]

On a GPU each row also gives the peak allocated GPU memory of the timed steps (MiB).
Prints one row per stage and the load average (other processes on the machine lower
every figure; compare runs on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffca_med  # noqa: E402,F401  (before torch: sets OMP_WAIT_POLICY=PASSIVE, as the CLI runs)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffca_med.pipelines.train import resolve_config_path  # noqa: E402
from diffca_med.training.config import load_config  # noqa: E402


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) over ``repeats`` runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def batches(store_path: str | None, cfg, batch_size: int, n: int, seed: int = 0):
    """``n`` (images (B, C, H, W), labels (B,)) batches, half healthy / half tumour."""
    rng = np.random.default_rng(seed)
    c, s = len(cfg.data.modalities), cfg.data.size
    labels = torch.tensor([0] * (batch_size // 2) + [1] * (batch_size - batch_size // 2))
    if store_path is None:
        return [(torch.rand(batch_size, c, s, s, generator=torch.Generator().manual_seed(i)), labels) for i in range(n)]
    from diffca_med.data.store import SliceDataset

    ds = SliceDataset(store_path, split="train")
    out = []
    for _ in range(n):
        idx = np.concatenate([
            rng.choice(np.flatnonzero(ds.labels == k), size=int((labels == k).sum()), replace=True) for k in (0, 1)
        ])
        items = [ds[int(i)] for i in idx]
        out.append((torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])))
    return out


def bench_stage(model, stage: int, cfg, data, device, autocast_dtype, warmup: int, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    sc = cfg.stage(stage)
    model.set_stage(stage)
    params = model.trainable_parameters(stage)
    opt = torch.optim.AdamW(params, lr=sc.lr)
    gen = torch.Generator(device=device)

    def step(i: int) -> None:
        images, labels = data[i % len(data)]
        images, labels = images.to(device), labels.to(device)
        gen.manual_seed(i)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model.stage_loss(stage, images, labels, generator=gen)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    with counter:
        step(warmup)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(warmup + 1 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    b = data[0][0].shape[0]
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "peak_memory_mib": peak_mb,
        "stage": stage,
        "batch_size": b,
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds_per_step": seconds / steps,
        "images_per_second": b * steps / seconds,
        "gflops_per_step": flops / 1e9,
        "achieved_gflops_per_s": flops * steps / seconds / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cpu-demo", help="config file or shipped preset name")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.KEY=VALUE override")
    ap.add_argument("--store", default=None, help="slice store to read batches from (default: random images)")
    ap.add_argument("--stages", default=None, help="comma-separated stages (default: those the config trains)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps per stage")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--matmul-size", type=int, default=None, help="side of the peak matmul (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--random-dinov3", action="store_true",
                    help="for a dinov3-backbone config: a randomly initialised ViT-B/16-sized DINOv3 instead of "
                         "the config's dinov3_path (speed does not depend on the weights; no download)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and cfg.training.mixed_precision == "bf16"
    autocast_dtype = torch.bfloat16 if bf16 else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peak = peak_matmul_flops(device, peak_dtype, n)

    from diffca_med.models import DiffCAModel

    torch.manual_seed(cfg.training.seed)
    vit = None
    if args.random_dinov3 and cfg.model.backbone == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        vit = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12, patch_size=16, num_register_tokens=4,
                                             image_size=cfg.model.backbone_input_size))
    model = DiffCAModel(cfg.model, _vit=vit).to(device)
    if args.stages:
        stages = [int(s) for s in args.stages.split(",")]
    else:
        stages = ([0] if cfg.model.space == "latent" and not cfg.model.pretrained_vae else []) + [1, 2]
    rows = []
    for s in stages:
        data = batches(args.store, cfg, cfg.stage(s).batch_size, 8)
        row = bench_stage(model, s, cfg, data, device, autocast_dtype, args.warmup, args.steps)
        row["fraction_of_peak"] = row["achieved_gflops_per_s"] * 1e9 / peak
        rows.append(row)
    result = {
        "config": str(resolve_config_path(args.config)),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "peak_matmul_gflops_per_s": peak / 1e9,
        "peak_matmul": f"{n}x{n} {str(peak_dtype).replace('torch.', '')}",
        "load_average_1min": os.getloadavg()[0],
        "stages": rows,
    }
    print(f"device: {result['device']}; peak matmul {result['peak_matmul']}: {result['peak_matmul_gflops_per_s']:.1f} GFLOP/s; "
          f"load average {result['load_average_1min']:.2f}")
    print(f"{'stage':>5} {'batch':>5} {'params':>9} {'s/step':>8} {'img/s':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>8}"
          f" {'GPU MiB':>8}")
    for r in rows:
        print(f"{r['stage']:>5} {r['batch_size']:>5} {r['trainable_parameters']:>9} {r['seconds_per_step']:>8.3f} "
              f"{r['images_per_second']:>8.1f} {r['gflops_per_step']:>10.3f} {r['achieved_gflops_per_s']:>8.1f} "
              f"{100 * r['fraction_of_peak']:>7.1f}% {r['peak_memory_mib'] or 0:>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
