"""Benchmark: Diff-CA against its baselines on the synthetic cohort, one reproducible run.

Steps (each cached in ``--work``; a re-run skips finished steps unless ``--fresh``):

1. build the phantom cohort (true healthy twins under ``derivatives/phantom-truth``);
2. ``prepare`` it into a slice store with the CPU preset's data options (``--config``);
3. train Diff-CA with the preset (``diffca_med.pipelines.train.train``);
4. train the classifier-free-guidance diffusion baseline: same denoiser config and the
   same stage-1 schedule, through the same training loop;
5. fit cPCA (train-split slices) and DiffAE-PCA (our stage-1 codes of the train split);
6. evaluate every method on the test subjects (``diffca_med.pipelines.evaluate``):
   identity, Diff-CA, CFG diffusion, cPCA, DiffAE-PCA;
7. time plain decoding of the cohort's files (``benchmarks/prepare.py``'s timer) against
   step 2 for the prepare ratio (``--prepare-bench``: also that script's own 20-subject run);
8. write ``RESULTS.md``: one row per method and one column per metric, the date, the
   machine, the command, the run time, the speed figures and the targets of issue 5.

Usage::

    python benchmarks/run_all.py [--subjects 48] [--config cpu-demo] [--set KEY=VALUE ...]
                                 [--slice-stride 2] [--work DIR] [--results benchmarks/RESULTS.md]
                                 [--prepare-bench] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORDER = ["identity", "diffca", "cfg_diffusion", "cpca", "diffae_pca"]
#: evaluations that use the trained Diff-CA run (DiffAE-PCA uses its stage 1)
DEPENDENTS = ("diffca", "diffca_fresh", "diffae_pca")
LABELS = {
    "identity": "identity (input unchanged)",
    "diffca": "**Diff-CA (ours)**",
    "diffca_fresh": "Diff-CA (ours), fresh noise",
    "cfg_diffusion": "CFG diffusion (Sanchez et al. 2022)",
    "cpca": "cPCA (contrastive)",
    "diffae_pca": "DiffAE + PCA (stage 1 alone)",
}


def machine() -> str:
    """CPU model and core count (lscpu), Python and torch versions."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


class Steps:
    """Per-step wall times, kept in ``work/steps.json`` so reused steps keep their time."""

    def __init__(self, work: Path, report_only: bool = False):
        self.file = work / "steps.json"
        self.times: dict[str, dict] = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.reused: set[str] = set()
        self.skipped: list[str] = []
        self.report_only = report_only

    def run(self, name: str, done: bool, fn):
        if self.report_only and not (done and name in self.times):
            self.skipped.append(name)
            print(f"[{name}] not done; skipped (--report-only)", flush=True)
            return None
        if done and name in self.times:
            self.reused.add(name)
            print(f"[{name}] reused ({self.times[name]['seconds']:.1f} s when it ran)", flush=True)
            return self.times[name].get("info")
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        info = fn()
        self.times[name] = {"seconds": round(time.perf_counter() - t0, 2), "info": info}
        self.file.write_text(json.dumps(self.times, indent=1))
        print(f"[{name}] {self.times[name]['seconds']:.1f} s", flush=True)
        return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=48, help="phantom subjects (20%% of them healthy)")
    p.add_argument("--grid", default="half", help="phantom grid: full, half or tiny")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--config", default="cpu-demo", help="training config file or shipped preset")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override KEY=VALUE (repeatable), e.g. stage1.steps=5")
    p.add_argument("--val-fraction", type=float, default=0.125, help="subjects in the validation split")
    p.add_argument("--test-fraction", type=float, default=0.25,
                   help="subjects in the test split (enough tumour subjects for subgroup scores)")
    p.add_argument("--slice-stride", type=int, default=2, help="evaluate every n-th slice per subject")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps at evaluation (default: the model's)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffca-bench-all",
                   help="working folder (cohort, store, runs, metrics); reused across runs")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown report to write")
    p.add_argument("--fresh", action="store_true", help="ignore cached steps in --work")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing new: write RESULTS.md from the steps already finished in --work "
                        "(missing ones are listed as not run)")
    p.add_argument("--also-fresh", action="store_true",
                   help="also evaluate Diff-CA from fresh noise (the default is DDIM-inverted noise)")
    p.add_argument("--prepare-bench", action="store_true",
                   help="also run benchmarks/prepare.py (builds and prepares 20 full-size subjects: minutes)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()[0]
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))

    from diffca_med.baselines import CPCABaseline, DiffAEPCABaseline, IdentityBaseline
    from diffca_med.baselines.cfg_diffusion import train_cfg_baseline
    from diffca_med.data.phantom import make_cohort
    from diffca_med.data.store import SliceStore
    from diffca_med.models import DiffCAModel
    from diffca_med.pipelines.evaluate import (
        EvaluateOptions,
        SamplingOptions,
        evaluate_method,
        load_method,
        write_outputs,
    )
    from diffca_med.pipelines.prepare import prepare
    from diffca_med.pipelines.train import prepare_options, resolve_config_path, train
    from diffca_med.training.config import dump_config, load_config

    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, report_only=args.report_only)
    cohort, store_dir = work / "cohort", work / "store"
    truth = cohort / "derivatives" / "phantom-truth"
    overrides = list(args.overrides) + [f"data.val_fraction={args.val_fraction}",
                                        f"data.test_fraction={args.test_fraction}"]
    cfg = load_config(resolve_config_path(args.config), overrides)

    # 1-2. cohort and store
    def build_cohort():
        make_cohort(cohort, n_subjects=args.subjects, seed=args.seed, grid=args.grid, force=True, progress=True)

    steps.run("phantom", (cohort / "participants.tsv").is_file(), build_cohort)
    steps.run("prepare", (store_dir / "store.json").is_file(), lambda: round(prepare(
        cohort, store_dir, prepare_options(cfg), force=True, progress=True).seconds, 2))
    store = SliceStore(store_dir)

    # 3. ours
    ours_dir = work / "ours"

    def train_ours():
        res = train(store_dir, cfg, ours_dir, progress=True, info=print, warn=print)
        return {"stages": res.stages, "seconds": round(res.seconds, 2)}

    if (ours_dir / "config.yaml").is_file() and (ours_dir / "config.yaml").read_text() != dump_config(cfg):
        # the preset (or a --set) changed since the cached run: retrain, and redo what uses it
        print("[train_diffca] the cached run has another configuration: retraining it and "
              "re-running the steps that use it", flush=True)
        for path in (ours_dir, work / "methods" / "diffae_pca", *(work / "eval" / n for n in DEPENDENTS)):
            shutil.rmtree(path, ignore_errors=True)
        for name in ("train_diffca", "fit_diffae_pca", *(f"evaluate_{n}" for n in DEPENDENTS)):
            steps.times.pop(name, None)
    ours_info = steps.run("train_diffca", (ours_dir / "model" / "config.json").is_file(), train_ours)

    # 4. CFG baseline
    cfg_dir = work / "methods" / "cfg_diffusion"

    def train_cfg():
        method, figures = train_cfg_baseline(store_dir, cfg, work / "cfg_run", progress=True, warn=print)
        method.save(cfg_dir)
        figures["denoiser_parameters"] = sum(p.numel() for p in method.model.denoiser.parameters())
        return figures

    cfg_info = steps.run("train_cfg_diffusion", (cfg_dir / "baseline.json").is_file(), train_cfg)

    # 5. cPCA, DiffAE-PCA, identity
    train_rows = store.rows(split="train")
    channels = [store.modalities.index(m) for m in cfg.model.modalities]
    labels = store.index["label"].to_numpy()[train_rows]

    def train_images(rows):
        return np.array(store.images[rows][:, channels], dtype=np.float32)

    def fit_cpca():
        imgs = train_images(train_rows)
        CPCABaseline.fit(imgs[labels == "healthy"], imgs[labels == "tumour"], tuple(cfg.model.modalities),
                         n_components=cfg.model.salient_dim, seed=args.seed).save(work / "methods" / "cpca")

    def fit_diffae():
        model = DiffCAModel.from_pretrained(ours_dir / "model")
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(train_rows, size=min(2000, len(train_rows)), replace=False))
        DiffAEPCABaseline.fit(model, train_images(rows), seed=args.seed).save(work / "methods" / "diffae_pca")

    steps.run("fit_cpca", (work / "methods" / "cpca" / "baseline.json").is_file(), fit_cpca)
    steps.run("fit_diffae_pca", (work / "methods" / "diffae_pca" / "baseline.json").is_file(), fit_diffae)
    IdentityBaseline(tuple(cfg.model.modalities), store.size).save(work / "methods" / "identity")

    # 6. evaluation
    opts = EvaluateOptions(split="test", threshold_split="val", slice_stride=args.slice_stride, seed=args.seed)
    sampling = SamplingOptions(steps=args.steps)
    paths = {"diffca": ours_dir / "model", "diffca_fresh": ours_dir / "model",
             **{n: work / "methods" / n for n in ORDER if not n.startswith("diffca")}}
    order = ORDER[:2] + (["diffca_fresh"] if args.also_fresh else []) + ORDER[2:]
    results = {}
    for name in order:
        out = work / "eval" / name

        def run_eval(name=name, out=out):
            how = SamplingOptions(noise="fresh", steps=args.steps) if name == "diffca_fresh" else sampling
            method = load_method(paths[name], how)
            result = evaluate_method(method, store, truth, None, opts, info=print)
            result["model"] = str(paths[name])
            write_outputs(result, out)

        steps.run(f"evaluate_{name}", (out / "metrics.json").is_file(), run_eval)
        if (out / "metrics.json").is_file():
            results[name] = json.loads((out / "metrics.json").read_text())

    # 7. prepare speed: prepare's time (step 2) against plain nibabel decoding of the same
    # files with the same number of processes (benchmarks/prepare.py's timer), on this
    # cohort; --prepare-bench also runs that script on its 20 full-size subjects.
    def decode_cohort():
        import importlib.util

        from diffca_med.data.layouts import discover

        spec = importlib.util.spec_from_file_location("prepare_bench", HERE / "prepare.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["prepare_bench"] = mod  # its worker function must pickle by module name
        spec.loader.exec_module(mod)
        files = [str(f) for s in discover(cohort) for f in s.files()]
        for f in files:  # page cache warm, as for prepare right after the phantom was written
            Path(f).read_bytes()
        return {"files": len(files), "seconds": round(mod.time_decode(files, os.cpu_count() or 1), 2),
                "workers": os.cpu_count()}

    decode_info = steps.run("decode_cohort", "decode_cohort" in steps.times, decode_cohort)

    def prepare_bench():
        cmd = [sys.executable, str(HERE / "prepare.py"), "--repeats", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln.strip() for ln in proc.stdout.splitlines()
                 if ln.startswith(("decode", "prepare", "ratio")) or ln[:1].isdigit()]
        return {"command": " ".join(cmd[1:]), "lines": lines, "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-400:] if proc.returncode else ""}

    prep_info = None
    if args.prepare_bench:
        prep_info = steps.run("prepare_benchmark", "prepare_benchmark" in steps.times, prepare_bench)

    total = time.perf_counter() - t_start
    load = (load_start, os.getloadavg()[0])
    write_results(args.results, results, steps, ours_info, cfg_info, (decode_info, prep_info), command, started, total, store,
                  cfg, args.steps or cfg.model.sample_steps, load, ours_dir / "model")
    print(f"wrote {args.results}")


def _num(r: dict, *path):
    d = r
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    if d == "inf":
        return float("inf")
    return d


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def target_lines(results: dict) -> list[str]:
    """Issue 5's targets, each checked on the figures of this run."""
    lines = []
    if "diffca" not in results:
        return ["- not measurable: Diff-CA was not evaluated in this run"]
    ours = results["diffca"]

    def ahead(metric_path, label, rivals, fmt):
        mine = _num(ours, *metric_path)
        others = {n: _num(results[n], *metric_path) for n in rivals if n in results}
        others = {n: v for n, v in others.items() if v is not None}
        if mine is None or not others:
            lines.append(f"- {label}: not measurable in this run")
            return
        best = max(others, key=lambda n: others[n])
        ok = mine > others[best]
        lines.append(f"- {label}: ours {_f(mine, fmt)} vs best baseline {LABELS[best]} {_f(others[best], fmt)} "
                     f"→ **{'met' if ok else 'NOT met'}**")

    ahead(("counterfactual", "tumour_psnr"), "tumour-region PSNR vs twin ahead of every baseline",
          ["identity", "cfg_diffusion"], "{:.2f} dB")
    ahead(("counterfactual", "detection", "auprc"), "anomaly AUPRC ahead of every baseline",
          ["identity", "cfg_diffusion"], "{:.3f}")
    ahead(("embedding", "subgroups", "ari"), "subgroup ARI ahead of every baseline",
          ["cpca", "diffae_pca"], "{:.3f}")
    hp = _num(ours, "counterfactual", "healthy_psnr")
    lines.append(f"- out-of-tumour PSNR ≥ 25 dB: ours {_f(hp, '{:.2f}')} dB → "
                 f"**{'met' if hp is not None and hp >= 25 else 'NOT met'}**")
    return lines


def write_results(path: Path, results, steps, ours_info, cfg_info, prep_info, command, started, total, store, cfg,
                  ddim_steps: int, load: tuple[float, float], model_dir: Path):
    from diffca_med.pipelines.evaluate import markdown_table

    names = [n for n in list(LABELS) if n in results]
    r0 = results[names[0]]
    idx = store.index
    test = idx[idx["split"] == "test"]
    lines = [
        "# Benchmark: Diff-CA vs baselines on the synthetic cohort",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end "
        "(the cores are shared: timings are upper bounds)",
        f"- command: `{command}`",
        f"- run time of this invocation: {total / 60:.1f} min"
        + (f" (steps reused from an earlier run in the same work folder: {', '.join(sorted(steps.reused))})"
           if steps.reused else ""),
        f"- per-step wall times: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in steps.times.items()),
        f"- data: {store.meta['source_root']} — {len(store.subjects)} phantom subjects, store {store.size}×{store.size}, "
        f"modalities {', '.join(cfg.model.modalities)}; evaluated on the test split: {r0['subjects']} subjects, "
        f"{r0['slices']} slices (1 in {r0['options']['slice_stride']} per subject; {r0['tumour_slices']} tumour), "
        f"of {test['subject'].nunique()} test subjects / {len(test)} slices",
        f"- generation: DDIM {ddim_steps} steps; "
        "Diff-CA from DDIM-inverted noise (depth 1; the 'fresh noise' row, if any: seeded Gaussian noise); "
        "CFG diffusion inverted to depth 0.5, guidance 3",
        "",
        "## Results (test subjects)",
        "",
        markdown_table([results[n] for n in names], [LABELS[n] for n in names]),
        "Tumour-region metrics follow the BraTS 2023 inpainting evaluation (intensity window = 0.5/99.5 "
        "percentiles of the input with the tumour voided; PSNR with data range 1; SSIM averaged inside the "
        "mask), computed per subject and modality in store space against the true healthy twin, then "
        "averaged. Healthy region = brain outside the tumour dilated by "
        f"{r0['options']['dilation']} px. Detection: |input − pseudo-healthy| (mean over modalities) inside the "
        "brain; the Dice threshold is the best one on the validation subjects. Probes: subject-grouped "
        f"{r0['options']['folds']}-fold logistic (balanced accuracy) / ridge (R²). Subgroups: k-means "
        "(k = number of subtypes) on the per-subject mean salient embedding of tumour slices, ARI/NMI vs "
        "phantom subtype. '–' = the method does not produce that output.",
        "",
        "Reference: the unchanged input scores "
        f"{_f(_num(r0, 'counterfactual', 'input_tumour_psnr'), '{:.2f}')} dB / SSIM "
        f"{_f(_num(r0, 'counterfactual', 'input_tumour_ssim'))} inside the tumour against the twin.",
        "",
        "## Targets (issue 5)",
        "",
        *target_lines(results),
        "",
        "## Speed",
        "",
    ]
    from diffca_med.models import DiffCAModel

    ours_model = DiffCAModel.from_pretrained(model_dir) if (model_dir / "config.json").is_file() else None
    n_den = sum(p.numel() for p in ours_model.denoiser.parameters()) if ours_model is not None else 0
    if ours_model is not None:
        lines.append(f"- model sizes: Diff-CA {ours_model.num_parameters() / 1e6:.2f} M parameters, of which the "
                 f"denoiser (U-Net + token renderer) {n_den / 1e6:.2f} M"
                 + (f"; CFG diffusion denoiser {cfg_info['denoiser_parameters'] / 1e6:.2f} M (same config), "
                    "trained with Diff-CA's stage-1 schedule (steps, batch, learning rate, EMA) by the same loop"
                    if cfg_info and "denoiser_parameters" in cfg_info else ""))
    if steps.skipped:
        lines.append(f"- steps not finished when this report was written (`--report-only`): {', '.join(steps.skipped)}")
    if ours_info:
        for s in ours_info.get("stages", []):
            lines.append(f"- Diff-CA training, stage {s['stage']}: {s['steps']} steps in {s['seconds']:.0f} s, "
                         f"{s['images_per_second']:.1f} images/s")
        lines.append(f"- Diff-CA training, all stages: {ours_info.get('seconds', float('nan')) / 60:.1f} min")
    if cfg_info:
        lines.append(f"- CFG diffusion training: {cfg_info['steps']} steps in {cfg_info['seconds']:.0f} s, "
                     f"{cfg_info['images_per_second']:.1f} images/s")
    for n in ("diffca", "cfg_diffusion"):
        t = results.get(n, {}).get("timing", {})
        if "seconds_per_subject_volume" in t:
            lines.append(f"- {LABELS[n]} pseudo-healthy sampling: {t['seconds_per_slice']:.3f} s per slice, "
                         f"{t['seconds_per_subject_volume']:.1f} s per subject volume "
                         f"(× the mean number of stored slices per subject)")
    decode_info, prep_info = prep_info
    prep_s = steps.times.get("prepare", {}).get("seconds")
    if decode_info and prep_s:
        lines.append(
            f"- prepare of this cohort: {prep_s:.1f} s ({len(store)} slices, {len(store) / prep_s:.0f} slices/s) vs "
            f"plain nibabel decoding of its {decode_info['files']} files with {decode_info['workers']} processes "
            f"{decode_info['seconds']:.1f} s → ratio {prep_s / decode_info['seconds']:.2f} "
            f"({store.meta['source_root']}, grid of the phantom above)")
    if prep_info:
        lines.append(f"- prepare vs plain nibabel decoding (`{prep_info['command']}`):")
        lines += [f"    - {ln}" for ln in prep_info["lines"]]
        if prep_info.get("returncode"):
            lines.append(f"    - benchmarks/prepare.py failed: {prep_info.get('stderr_tail', '')}")
    else:
        lines.append("- benchmarks/prepare.py (20 full-size subjects) not run here (--prepare-bench runs it)")
    lines.append("")
    lines.append("Raw metrics: `metrics.json` per method under the work folder's `eval/`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
