"""The built-in synthetic cohort ("phantom"): brain MRI with tumours and their healthy twins.

:func:`make_cohort` writes ``n_subjects`` subjects in one of the project's layouts
(docs/architecture.md, "Subject ids and the synthetic cohort"):

* anatomy: the MNI152 2009 tissue maps, deformed per subject (see
  :mod:`diffca_med.data.phantom_anatomy`);
* four modalities (t1, t1c, t2, flair) synthesised from tissue fractions with realistic
  relative contrasts (T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR GM > WM > CSF; T1c = T1
  plus enhancement), each with its own global scale, smooth multiplicative bias field
  and Rician noise; background (outside the brain) is exactly 0, as in skull-stripped
  BraTS;
* tumours of three subtypes (:mod:`diffca_med.data.phantom_tumours`) with mass effect,
  confined in z so that tumour subjects keep tumour-free brain slices; a fraction of
  subjects is healthy;
* for every image the healthy twin (same deformation, bias field and noise, no tumour,
  no mass effect) under ``OUT/derivatives/phantom-truth/<same relative path>``;
* ``OUT/participants.tsv`` (subtype, lesion count, volume, centroid, hemisphere, age, sex).

Every subject draws from its own random generator seeded by ``(seed, index)``, so the
files do not depend on the number of worker processes, and the same seed gives
byte-identical files.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from diffca_med.data import phantom_writers as W
from diffca_med.data.modalities import CANONICAL, LAYOUTS
from diffca_med.data.phantom_anatomy import GRIDS, GridAnatomy, grid_anatomy, smooth_field, subject_tissue
from diffca_med.data.phantom_tumours import SUBTYPES, Tumour, grow_tumour
from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path

TRUTH_DIR = W.TRUTH_DIR

#: Relative intensity of (CSF, GM, WM) per modality, before per-subject jitter.
TISSUE_INTENSITY: dict[str, tuple[float, float, float]] = {
    "t1": (0.30, 0.62, 0.85),
    "t1c": (0.33, 0.66, 0.87),  # slight enhancement of perfused grey matter
    "t2": (1.00, 0.62, 0.45),
    "flair": (0.12, 0.68, 0.52),
}

#: Extra signal of the thin band at the brain surface (cortical veins, dural sinuses),
#: which only enhances after contrast (faint, as in T1c scans).
SURFACE_VESSELS: dict[str, float] = {"t1": 0.0, "t1c": 0.35, "t2": 0.0, "flair": 0.0}

#: Columns of participants.tsv, in order.
PARTICIPANT_COLUMNS: tuple[str, ...] = (
    "participant_id", "subtype", "n_lesions", "tumour_volume_ml",
    "centroid_i", "centroid_j", "centroid_k", "centroid_x", "centroid_y", "centroid_z",
    "hemisphere", "age", "sex",
)

_SCANNER_SCALE = 1000.0  # raw intensities in the hundreds to low thousands, like BraTS


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of subject ``index`` (independent of worker count)."""
    return np.random.default_rng([int(seed), int(index), 0x5EED])


def plan_subtypes(n_subjects: int, seed: int, healthy_fraction: float) -> list[str]:
    """Subtype of each subject: ``round(n * healthy_fraction)`` healthy ones, the rest
    cycling through :data:`SUBTYPES` (balanced), in a seeded random order."""
    rng = np.random.default_rng([int(seed), 0xC0407])
    n_healthy = int(round(n_subjects * healthy_fraction))
    n_tumour = n_subjects - n_healthy
    tumours = [SUBTYPES[i % len(SUBTYPES)] for i in range(n_tumour)]
    plan = tumours + ["healthy"] * n_healthy
    order = rng.permutation(n_subjects)
    return [plan[i] for i in order]


@dataclass
class _Modality:
    """Per-subject acquisition of one modality: tissue intensities, scale, bias, noise."""

    tissue: tuple[float, float, float]
    scale: float
    sigma: float
    bias: np.ndarray  # float32, anatomy bbox shape
    n1: np.ndarray
    n2: np.ndarray


def _fractions(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, ...]:
    """(CSF, GM, WM) fractions summing to 1 inside the brain (CSF = brain - GM - WM) and
    a surface band 4 b (1 - b) of the soft brain mask b (1 at its 0.5 edge), float32."""
    csf = np.clip(brain - gm - wm, 0.0, None)
    inv = np.float32(1.0) / np.maximum(gm + wm + csf, np.float32(1e-3))
    b = np.clip(brain, 0.0, 1.0)
    return csf * inv, gm * inv, wm * inv, np.float32(4.0) * b * (np.float32(1.0) - b)


def _tissue_signal(fractions: tuple[np.ndarray, ...], tissue: tuple, vessels: float) -> np.ndarray:
    """Noise-free relative signal: tissue intensities weighted by fractions, float32."""
    f_csf, f_gm, f_wm, surface = fractions
    out = f_csf * np.float32(tissue[0])
    out += f_gm * np.float32(tissue[1])
    out += f_wm * np.float32(tissue[2])
    if vessels:
        out += surface * np.float32(vessels)
    return out


def _acquire(signal: np.ndarray, brain: np.ndarray, mod: _Modality, where: tuple) -> np.ndarray:
    """Scale, bias and Rician noise on ``signal`` (a sub-box ``where`` of the bbox).

    Only +, *, sqrt and rounding, so a sub-box gives exactly the same values as the
    whole box. Values are rounded to integers like scanner data (still stored float32).
    """
    s = signal * np.float32(mod.scale) * mod.bias[where]
    a = s + np.float32(mod.sigma) * mod.n1[where]
    b = np.float32(mod.sigma) * mod.n2[where]
    out = np.sqrt(a * a + b * b)
    np.rint(out, out=out)
    out[brain <= 0.5] = 0.0
    return out


def _tumour_signal(t: Tumour, m: str, tissue: tuple) -> np.ndarray:
    """Signal in the tumour box: tissue (after mass effect) mixed with the lesion parts."""
    base = _tissue_signal(_fractions(t.gm, t.wm, t.brain), tissue, SURFACE_VESSELS[m])
    inten = t.intensity
    fc = np.clip(t.f_ncr + t.f_et, 0.0, 1.0)
    w = np.float32(t.ed_weight) * t.f_all
    tex = t.texture
    out = (1 - fc) * ((1 - w) * base + w * np.float32(inten["ed"][m]) * tex)
    out += t.f_ncr * np.float32(inten["ncr"][m]) * tex + t.f_et * np.float32(inten["et"][m]) * tex
    return out.astype(np.float32)


def _draw_modality(m: str, shape: tuple, spacing: float, rng: np.random.Generator) -> _Modality:
    """Draw the acquisition of modality ``m`` over a box of ``shape`` (the anatomy bbox):
    tissue intensities +-5 %, global scale x0.7-1.4, bias field exp(0.12 * smooth field
    with 60 mm control spacing), noise sigma 1.2-3 % of the scale."""
    tissue = tuple(v * rng.uniform(0.95, 1.05) for v in TISSUE_INTENSITY[m])
    scale = _SCANNER_SCALE * rng.uniform(0.7, 1.4)
    sigma = scale * rng.uniform(0.012, 0.03)
    bias = np.exp(0.12 * smooth_field(shape, 60.0 / spacing, rng)[0]).astype(np.float32)
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    return _Modality(tissue, scale, sigma, bias, n1, n2)


@dataclass
class PhantomSubject:
    """One synthesised subject: float32 volumes (X, Y, Z) per canonical modality, the
    twins, the internal label map (0/NCR/ED/ET, uint8) and its participants row."""

    images: dict[str, np.ndarray]
    twins: dict[str, np.ndarray]
    labels: np.ndarray
    row: dict


def synthesise_subject(grid: str, subtype: str, seed: int, index: int) -> PhantomSubject:
    """Synthesise subject ``index`` of a cohort (``subtype`` 'healthy' or a tumour subtype)."""
    anat = grid_anatomy(grid)
    rng = subject_rng(seed, index)
    tissue = subject_tissue(anat, rng)
    age = int(rng.integers(25, 81))
    sex = "F" if rng.random() < 0.5 else "M"
    labels = np.zeros(anat.grid.shape, dtype=np.uint8)
    tumour = grow_tumour(subtype, tissue, anat, rng) if subtype != "healthy" else None

    bb = anat.bbox
    bb_shape = tuple(s.stop - s.start for s in bb)
    brain = tissue.brain[bb]
    fractions = _fractions(tissue.gm[bb], tissue.wm[bb], brain)
    everything = tuple(slice(None) for _ in range(3))
    if tumour is not None:
        box = tumour.box
        rel = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, bb))
        if any(r.start < 0 or r.stop > n for r, n in zip(rel, bb_shape)):
            raise RuntimeError("tumour box outside the anatomy bounding box")  # a bug, not input
        labels[box] = tumour.labels
    twins, images = {}, {}
    # one modality at a time, so only one set of noise fields is in memory
    for m in CANONICAL:
        mod = _draw_modality(m, bb_shape, anat.grid.spacing, rng)
        twin = np.zeros(anat.grid.shape, dtype=np.float32)
        twin[bb] = _acquire(_tissue_signal(fractions, mod.tissue, SURFACE_VESSELS[m]), brain, mod, everything)
        twins[m] = twin
        if tumour is None:
            images[m] = twin
        else:
            images[m] = twin.copy()
            images[m][box] = _acquire(_tumour_signal(tumour, m, mod.tissue), tumour.brain, mod, rel)
        del mod
    row = participant_row(labels, anat, subtype, age, sex)
    return PhantomSubject(images, twins, labels, row)


def participant_row(labels: np.ndarray, anat: GridAnatomy, subtype: str, age: int, sex: str) -> dict:
    """participants.tsv values measured on the label map (internal codes or any > 0)."""
    from scipy import ndimage

    from diffca_med.data.phantom_tumours import ET, NCR

    tumour = labels > 0
    n_vox = int(tumour.sum())
    row = {"subtype": subtype, "age": age, "sex": sex}
    if n_vox == 0:
        nan = float("nan")
        row.update(n_lesions=0, tumour_volume_ml=0.0, centroid_i=nan, centroid_j=nan,
                   centroid_k=nan, centroid_x=nan, centroid_y=nan, centroid_z=nan,
                   hemisphere="none")
        return row
    core = (labels == NCR) | (labels == ET)
    _, n_lesions = ndimage.label(core, structure=np.ones((3, 3, 3)))
    ijk = np.argwhere(tumour).mean(axis=0)
    xyz = anat.affine[:3, :3] @ ijk + anat.affine[:3, 3]
    row.update(
        n_lesions=int(n_lesions),
        tumour_volume_ml=round(n_vox * anat.grid.voxel_ml, 3),
        centroid_i=round(float(ijk[0]), 2), centroid_j=round(float(ijk[1]), 2),
        centroid_k=round(float(ijk[2]), 2),
        centroid_x=round(float(xyz[0]), 2), centroid_y=round(float(xyz[1]), 2),
        centroid_z=round(float(xyz[2]), 2),
        hemisphere="right" if xyz[0] >= 0 else "left",
    )
    return row


def _make_one(args: tuple) -> dict:
    """Worker: synthesise subject ``index`` and write it under ``root``; return its row."""
    root, layout, grid, subtype, seed, index = args
    subj = synthesise_subject(grid, subtype, seed, index)
    sid = W.subject_id(layout, index)
    W.write_subject(Path(root), layout, sid, subj.images, subj.twins, subj.labels,
                    grid_anatomy(grid).affine)
    return {"participant_id": sid, **subj.row}


def check_options(n_subjects: int, seed: int, layout: str, grid: str, healthy_fraction: float) -> None:
    """Raise :class:`ConfigError` (one line) for an out-of-range option."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if grid not in GRIDS:
        raise ConfigError(f"--grid: unknown grid {grid!r} (choose from {', '.join(GRIDS)})")
    if n_subjects < 1:
        raise ConfigError(f"--n-subjects: must be at least 1, got {n_subjects}")
    if seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ConfigError(f"--healthy-fraction: must be between 0 and 1, got {healthy_fraction}")


def make_cohort(
    out: str | os.PathLike,
    n_subjects: int = 20,
    seed: int = 0,
    layout: str = "brats2023",
    grid: str = "half",
    healthy_fraction: float = 0.2,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Write a synthetic cohort at ``out`` and return its participants table.

    Args:
        out: output folder; must not exist or be empty unless ``force``.
        n_subjects: number of subjects (>= 1).
        seed: master seed (>= 0); the same seed gives byte-identical files.
        layout: ``brats2023``, ``brats2021``, ``msd`` or ``bids``.
        grid: ``full`` (240x240x155, 1 mm), ``half`` (120x120x78, 2 mm) or
            ``tiny`` (60x60x40, 4 mm).
        healthy_fraction: fraction of subjects without a tumour.
        workers: worker processes (default: all cores, at most one per subject).
        force: replace an existing non-empty ``out``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The participants table (one row per subject, columns :data:`PARTICIPANT_COLUMNS`),
        also written to ``out/participants.tsv`` (missing values as ``n/a``).
    """
    check_options(n_subjects, seed, layout, grid, healthy_fraction)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: folder exists and is not empty (use --force to overwrite it)")
    subtypes = plan_subtypes(n_subjects, seed, healthy_fraction)
    workers = max(1, min(workers or os.cpu_count() or 1, n_subjects))
    grid_anatomy(grid)  # load the template once here; forked workers inherit the cache

    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        jobs = [(str(tmp), layout, grid, subtypes[i], seed, i) for i in range(n_subjects)]
        bar = tqdm(total=n_subjects, desc="phantom subjects", unit="subject", disable=not progress)
        rows: list[dict] = []
        try:
            if workers == 1:
                for job in jobs:
                    rows.append(_make_one(job))
                    bar.update()
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for row in pool.map(_make_one, jobs):
                        rows.append(row)
                        bar.update()
        finally:
            bar.close()
        table = pd.DataFrame(rows, columns=list(PARTICIPANT_COLUMNS))
        table.to_csv(tmp / "participants.tsv", sep="\t", index=False, na_rep="n/a")
        from diffca_med import __version__

        generated_by = {"Name": "diffca-med phantom", "Version": __version__,
                        "Description": f"seed={seed} grid={grid} n_subjects={n_subjects} "
                                       f"healthy_fraction={healthy_fraction}"}
        W.write_dataset_files(tmp, layout, list(table["participant_id"]), generated_by)
    return table


def read_participants(root: str | os.PathLike) -> pd.DataFrame:
    """Read ``root/participants.tsv`` as written by :func:`make_cohort`."""
    return pd.read_csv(Path(root) / "participants.tsv", sep="\t", na_values=["n/a"],
                       keep_default_na=False)
