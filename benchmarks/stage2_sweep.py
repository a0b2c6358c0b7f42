"""Stage-2 design sweep: retrain only the common/salient split on a finished demo's
stage 1, over several seeds, and measure what one stage-2 change trades.

    python benchmarks/stage2_sweep.py DEMO --name NAME [--seeds 0 1 2]
        [--set stage2.match_position_bins=4 ...] [--work DIR] [--ph-split val] [--json OUT.json]

``DEMO`` is a finished ``diffca-med demo`` folder (its ``run/`` holds the stage-1
checkpoint, the store and the resolved ``config.yaml``; its ``data/`` the phantom's true
healthy twins). For each seed S the sweep

1. copies the run's final stage-1 checkpoint into ``WORK/NAME-sS/checkpoints`` and trains
   stage 2 there with ``DEMO/run/config.yaml``, ``training.seed=S`` and the ``--set``
   overrides, as ``diffca-med train STORE --stage 2`` does (stage 1 stays bit-identical,
   only the split changes);
2. measures the stage-2 probes of ``model_quality.py`` (salient embedding, pooled common
   part, the same position-matched, a fresh adversary on Ẑ_C) on the validation and the
   test subjects;
3. makes pseudo-healthy volumes of the ``--ph-split`` subjects with the defaults of
   ``diffca-med pseudo-healthy`` (batch 64) and measures the
   pseudo-healthy volumes against the true twins with ``counterfactuals.py`` (inside-tumour
   PSNR gain over the unchanged input, PSNR outside);
4. reads the in-training adversary from ``logs/stage2.csv``: mean batch accuracy after
   step 100 and the share of logged steps inside 0.5 ± 0.1.

Designs are chosen on the validation subjects; the test rows are for the report. A seed
whose folder already holds its figures (made with the same ``--set``) is not retrained; a
folder left without them by an interrupted sweep is deleted and redone.
Prints a markdown table, one row per seed, and the mean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: logged steps before this are the GRL warm-up and are left out of the in-training figures
ADVERSARY_FROM_STEP = 100

COLUMNS = [
    ("val salient", "val", "salient_embedding_bacc"),
    ("val common", "val", "common_pooled_bacc"),
    ("val common, pos.-matched", "val", "common_pooled_bacc_position_matched"),
    ("val fresh adversary", "val", "fresh_adversary_bacc"),
    ("test salient", "test", "salient_embedding_bacc"),
    ("test common", "test", "common_pooled_bacc"),
    ("test common, pos.-matched", "test", "common_pooled_bacc_position_matched"),
    ("test fresh adversary", "test", "fresh_adversary_bacc"),
]


def in_training_adversary(log_csv: Path) -> dict:
    import pandas as pd

    d = pd.read_csv(log_csv)
    d = d[d["step"] > ADVERSARY_FROM_STEP]
    return {"adv_acc_mean": float(d["adv_acc"].mean()),
            "adv_in_band": float(((d["adv_acc"] - 0.5).abs() <= 0.1).mean())}


def one_seed(demo: Path, run: Path, seed: int, overrides: list[str], ph_split: str) -> dict:
    """Train stage 2 for ``seed`` into ``run`` and return its figures (cached in run/sweep.json)."""
    from counterfactuals import measure
    from model_quality import evaluate

    from diffca_med.analysis.counterfactuals import GenerationOptions, run_pseudo_healthy
    from diffca_med.data.phantom_writers import TRUTH_DIR
    from diffca_med.data.store import SliceStore
    from diffca_med.fileio import atomic_write_text
    from diffca_med.models import DiffCAModel
    from diffca_med.pipelines.train import train
    from diffca_med.training.checkpoint import checkpoint_dir, last_complete
    from diffca_med.training.config import load_config

    cached = run / "sweep.json"
    if cached.is_file():
        figures = json.loads(cached.read_text())
        if figures["set"] != overrides:
            raise SystemExit(f"{run}: made with --set {' '.join(figures['set']) or '(none)'}; "
                             "use another --name or delete the folder")
        return figures
    stage1 = last_complete(demo / "run", before_stage=2)
    if stage1 is None or stage1.stage != 1:
        raise SystemExit(f"{demo / 'run'}: no finished stage-1 checkpoint")
    if run.exists():
        shutil.rmtree(run)
    checkpoint_dir(run).mkdir(parents=True)
    shutil.copytree(stage1.path, checkpoint_dir(run) / stage1.path.name)
    store_dir = demo / "run" / "store"
    cfg = load_config(demo / "run" / "config.yaml", [f"training.seed={seed}", *overrides])
    train(store_dir, cfg, run, stage="2", progress=False)

    model, store = DiffCAModel.from_pretrained(run / "model"), SliceStore(store_dir)
    figures: dict = {"seed": seed, "set": overrides}
    for split in ("val", "test"):
        figures[split] = evaluate(model, store, split, reconstruction=False, truth=demo / "data" / TRUTH_DIR)["probes"]
    ph = run / f"pseudo-healthy-{ph_split}"
    run_pseudo_healthy(run / "model", store_dir, ph, split=ph_split, generation=GenerationOptions(batch_size=64),
                       progress=False)
    cf = measure(demo, ph=ph)
    figures["pseudo_healthy"] = {"split": ph_split, "inside_gain_db": cf["inside_gain_db"],
                                 "outside_psnr_db": cf["psnr_outside_pseudo_healthy"]}
    figures["in_training"] = in_training_adversary(run / "logs" / "stage2.csv")
    atomic_write_text(cached, json.dumps(figures, indent=2) + "\n")
    return figures


def table(rows: list[dict], ph_split: str) -> str:
    """Markdown: one row per seed, then the mean; balanced accuracies to 3 decimals, dB to 2."""
    head = ["seed", *(c[0] for c in COLUMNS), f"{ph_split} PH gain (dB)", f"{ph_split} PH outside (dB)",
            "adversary in training", "in 0.5 ± 0.1"]
    formats = ["{:.3f}"] * len(COLUMNS) + ["{:+.2f}", "{:.2f}", "{:.3f}", "{:.0%}"]

    def cells(r: dict) -> list[float]:
        return [*(r[split][key] for _, split, key in COLUMNS), r["pseudo_healthy"]["inside_gain_db"],
                r["pseudo_healthy"]["outside_psnr_db"], r["in_training"]["adv_acc_mean"],
                r["in_training"]["adv_in_band"]]

    values = [cells(r) for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, v in [*((str(r["seed"]), v) for r, v in zip(rows, values)), ("mean", np.mean(values, axis=0))]:
        lines.append("| " + " | ".join([label, *(f.format(x) for f, x in zip(formats, v))]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a finished `diffca-med demo` output folder")
    ap.add_argument("--name", required=True, help="name of this design (folder prefix under --work)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage-2 seeds (default 0 1 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for stage 2, as `diffca-med train --set`; repeatable")
    ap.add_argument("--work", type=Path, default=Path("stage2-sweep"), help="folder of the runs (default ./stage2-sweep)")
    ap.add_argument("--ph-split", default="val", help="split whose pseudo-healthy volumes are measured (default val)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    from diffca_med.fileio import atomic_write_text

    if not (args.demo / "run" / "config.yaml").is_file():
        ap.error(f"{args.demo}: not a finished `diffca-med demo` folder (no run/config.yaml)")
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args.demo, args.work / f"{args.name}-s{seed}", seed, args.overrides, args.ph_split))
        print(f"{args.name} seed {seed}: done", file=sys.stderr)
    print(f"design {args.name}: {' '.join(args.overrides) or '(the demo config)'}")
    print(table(rows, args.ph_split))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
