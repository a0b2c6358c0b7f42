"""``prepare``: a folder of brain MRI volumes -> a validated, subject-split slice store.

Steps: discover subjects (:mod:`diffca_med.data.layouts`) -> check every header
(shape, dimensionality, affines; main process, no voxel decoding) -> reuse check
(fingerprint of input files + options) -> per subject, in parallel processes: decode
each file once, validate voxels/labels, run the MONAI chain
(:mod:`diffca_med.data.transforms`), slice, save the part -> assemble the store,
label slices, split subjects (:mod:`diffca_med.data.store_writer`) -> rename the
temporary folder onto OUT.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import diffca_med
from diffca_med.data.layouts import SubjectFiles, discover, parse_modalities
from diffca_med.data.splits import split_subjects
from diffca_med.data.store import STORE_FORMAT, ras_to_display
from diffca_med.data.store_writer import (
    DEFAULT_MIN_BRAIN_FRACTION,
    DEFAULT_MIN_TUMOUR_FRACTION,
    min_tumour_pixels,
    summarise,
    write_part,
    write_store,
)
from diffca_med.data.transforms import (
    DEFAULT_PERCENTILES,
    DEFAULT_UPPER_VALUE,
    CheckedNiftiReader,
    build_chain,
    ras_orientation,
    run_chain,
)
from diffca_med.data.validate import check_subject_headers
from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path


@dataclass
class PrepareOptions:
    """Options of ``prepare`` that shape the store (all but ``workers``/``force`` enter the fingerprint)."""

    layout: str | None = None
    modalities: tuple[str, ...] | str | None = None
    size: int = 64
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION
    min_tumour_fraction: float = DEFAULT_MIN_TUMOUR_FRACTION
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    upper_value: float = DEFAULT_UPPER_VALUE
    skip_incomplete: bool = False
    zero_nonfinite: bool = False

    def check(self) -> None:
        if not 8 <= int(self.size) <= 1024:
            raise ConfigError(f"--size {self.size}: must be between 8 and 1024 pixels")
        if not 0 <= self.min_brain_fraction <= 1:
            raise ConfigError(f"--min-brain-fraction {self.min_brain_fraction}: must be in [0, 1]")
        if not 0 <= self.min_tumour_fraction <= 1:
            raise ConfigError(f"--min-tumour-fraction {self.min_tumour_fraction}: must be in [0, 1]")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentiles {self.percentiles}: need 0 <= lower < upper <= 100")
        if not 0 < self.upper_value <= 1:
            raise ConfigError(f"upper_value {self.upper_value}: must be in (0, 1]")


@dataclass
class PrepareResult:
    store: Path
    reused: bool
    summary: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _stat_files(subjects: list[SubjectFiles]) -> list[list]:
    out = []
    for s in subjects:
        for f in s.files():
            try:
                st = f.stat()
            except OSError:
                raise InputError(f"{f}: file not found") from None
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(subjects: list[SubjectFiles], options: dict) -> str:
    """sha256 of the input files (path, size, mtime) and the store-shaping options."""
    payload = json.dumps({"files": _stat_files(subjects), "options": options, "format": STORE_FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _files_record(s: SubjectFiles) -> dict:
    return {
        "images": {m: {"path": str(r.path.resolve()), "channel": r.channel} for m, r in s.images.items()},
        "seg": str(s.seg.resolve()) if s.seg is not None else None,
    }


def process_subject(subject: SubjectFiles, key: str, parts: str, cfg: dict) -> dict:
    """Decode, validate and slice one subject; save its arrays under ``parts``.

    Runs in a worker process. Returns the per-subject record :func:`write_store` needs
    (slice counts, geometry, warnings); InputErrors propagate with their one-line message.
    """
    root = Path(cfg["root"])
    image_reader = CheckedNiftiReader(root=root, zero_nonfinite=cfg["zero_nonfinite"])
    seg_reader = CheckedNiftiReader(root=root, labels=subject.allowed_labels) if subject.seg else None
    paths: list[Path] = []
    for ref in subject.images.values():
        if ref.path not in paths:
            paths.append(ref.path)
    chain = build_chain(
        has_seg=subject.seg is not None,
        size=cfg["size"],
        image_reader=image_reader,
        seg_reader=seg_reader,
        percentiles=tuple(cfg["percentiles"]),
        upper_value=float(cfg["upper_value"]),
    )
    data: dict = {
        "files": [str(p) for p in paths],
        "channels": [(paths.index(ref.path), ref.channel) for ref in subject.images.values()],
        "seg": str(subject.seg) if subject.seg is not None else None,
        "name": subject.subject,
    }
    out = run_chain(chain, data)

    affine = np.asarray(out["source_affine"], dtype=np.float64)
    shape = list(out["source_shape"])
    start, end = list(out["crop_start"]), list(out["crop_end"])
    ornt = ras_orientation(affine)
    # the same box in the reoriented (RAS) full volume
    ras_shape, ras_start, ras_end = [0, 0, 0], [0, 0, 0], [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(ornt):
        j = int(new_axis)
        ras_shape[j] = shape[axis]
        ras_start[j] = start[axis] if flip > 0 else shape[axis] - end[axis]
        ras_end[j] = end[axis] if flip > 0 else shape[axis] - start[axis]
    first_slice = ras_start[2]  # axial index of the first stored slice in the RAS volume

    img = out["image"]
    # (C, size, size, D) over (x, y, z) -> (D, C, H, W) display slices
    images = ras_to_display(np.moveaxis(np.asarray(img.numpy(), dtype=np.float32), -1, 0))
    brain = ras_to_display(np.moveaxis(np.asarray(out["brain"].numpy())[0], -1, 0)).astype(np.uint8)
    if subject.seg is not None:
        seg = ras_to_display(np.moveaxis(np.asarray(out["seg"].numpy())[0], -1, 0)).astype(np.uint8)
    else:
        seg = np.zeros_like(brain)
    parts_paths = write_part(Path(parts), key, images, seg, brain)
    tumour_voxels = np.asarray(out["tumour_voxels"], dtype=np.int64)
    geometry = {
        "shape": shape,
        "affine": affine.tolist(),
        "source_crop_start": start,
        "source_crop_end": end,
        "ornt": ornt.tolist(),
        "ras_shape": ras_shape,
        "crop_start": ras_start,
        "crop_end": ras_end,
        "square": int(out["square"]["square"]),
        "pad": out["square"]["pad"],
        "size": int(cfg["size"]),
        "first_slice": int(first_slice),
        "n_slices": int(images.shape[0]),
        "intensity": {m: [float(v) for v in lohi] for m, lohi in zip(subject.images, out["intensity"])},
    }
    return {
        "subject": subject.subject,
        "parts": parts_paths,
        "n_slices": int(images.shape[0]),
        "first_slice": int(first_slice),
        "tumour_voxels": tumour_voxels.tolist(),
        "tumour_pixels": (seg > 0).sum(axis=(1, 2)).tolist(),
        "brain_pixels": brain.sum(axis=(1, 2), dtype=np.int64).tolist(),
        "has_tumour": bool(tumour_voxels.sum() > 0),
        "has_seg": subject.seg is not None,
        "geometry": geometry,
        "files": _files_record(subject),
        "warnings": image_reader.warnings,
    }


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; no oversubscription


def _run_all(subjects: list[SubjectFiles], parts: Path, cfg: dict, workers: int, progress: bool) -> list[dict]:
    keys = [f"{i:06d}" for i in range(len(subjects))]
    bar = tqdm(total=len(subjects), desc="prepare", unit="subject", disable=not progress)
    results: list[dict | None] = [None] * len(subjects)
    try:
        if workers <= 1:
            for i, s in enumerate(subjects):
                results[i] = process_subject(s, keys[i], str(parts), cfg)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(process_subject, s, keys[i], str(parts), cfg): i for i, s in enumerate(subjects)}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        err = fut.exception()
                        if err is not None:
                            for p in pending:
                                p.cancel()
                            pool.shutdown(wait=True, cancel_futures=True)
                            raise err
                        results[futures[fut]] = fut.result()
                        bar.update(1)
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and not (out / "store.json").is_file() and any(out.iterdir()):
        raise InputError(f"{out}: exists, is not empty and is not a slice store; choose another OUT")


def _differences(old: dict, new: dict) -> str:
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(changed) if changed else "input files changed"


def prepare(
    data: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    info: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Build (or reuse) the slice store of ``data`` at ``out``.

    Args:
        data: input folder (BraTS 2021/2023, MSD Task01 or BIDS).
        out: store folder; written under a temporary name and renamed when complete.
        options: store-shaping options (:class:`PrepareOptions`).
        workers: processes (default ``os.cpu_count()``); 1 runs in this process.
        force: rebuild even when a store with the same fingerprint exists, and replace a
            store built from other inputs/options.
        info, warn: callbacks for one-line messages (default: ignore).

    Raises:
        InputError / ConfigError with a one-line message; nothing is left at ``out``
        (or an existing store there is untouched).
    """
    t0 = time.perf_counter()
    opts = options or PrepareOptions()
    opts.check()
    info = info or (lambda msg: None)
    warn = warn or (lambda msg: None)
    data, out = Path(data), Path(out)
    mods = parse_modalities(opts.modalities)
    skipped: list[str] = []
    subjects = discover(data, opts.layout, mods, skip_incomplete=opts.skip_incomplete, skipped=skipped)
    warnings: list[str] = []
    if skipped:
        warnings.append(f"skipped {len(skipped)} incomplete subject(s): {', '.join(skipped)}")
        warn(warnings[-1])
    layout = subjects[0].layout
    store_options = dict(asdict(opts), layout=layout, modalities=list(mods), percentiles=list(opts.percentiles))
    fp = fingerprint(subjects, store_options)

    _check_out(out)
    if (out / "store.json").is_file():
        try:
            old = json.loads((out / "store.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") == fp and not force:
            info(f"reusing existing store {out} (same inputs and options; --force rebuilds)")
            index = pd.read_csv(out / "index.csv", keep_default_na=False)
            subj = pd.read_csv(out / "subjects.csv", keep_default_na=False)
            return PrepareResult(out, True, summarise(index, subj), warnings, time.perf_counter() - t0)
        if not force:
            raise ConfigError(
                f"{out}: a store built from different inputs or options exists "
                f"({_differences(old.get('options', {}), store_options)}); pass --force to rebuild it"
            )

    for s in tqdm(subjects, desc="check headers", unit="subject", disable=not progress or len(subjects) < 50):
        check_subject_headers(s, data)

    n_workers = max(1, min(int(workers or os.cpu_count() or 1), len(subjects)))
    cfg = {
        "root": str(data),
        "size": int(opts.size),
        "percentiles": list(opts.percentiles),
        "upper_value": float(opts.upper_value),
        "zero_nonfinite": bool(opts.zero_nonfinite),
    }
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        results = _run_all(subjects, tmp / "parts", cfg, n_workers, progress)
        for r in results:
            for line in r["warnings"]:
                warnings.append(line)
                warn(line)
        unlabelled = [r["subject"] for r in results if not r["has_seg"]]
        if unlabelled:
            warnings.append(
                f"{len(unlabelled)} subject(s) have no tumour label map; their slices are labelled "
                f"'excluded' (healthy is never assumed): {', '.join(unlabelled)}"
            )
            warn(warnings[-1])
        splits = split_subjects(
            [r["subject"] for r in results], [r["has_tumour"] for r in results],
            opts.val_fraction, opts.test_fraction, opts.seed,
        )
        meta = {
            "format": STORE_FORMAT,
            "diffca_med_version": diffca_med.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "layout": layout,
            "source_root": str(data.resolve()),
            "modalities": list(mods),
            "size": int(opts.size),
            "thresholds": {
                "min_brain_fraction": opts.min_brain_fraction,
                "min_tumour_fraction": opts.min_tumour_fraction,
                "min_tumour_pixels": min_tumour_pixels(opts.size, opts.min_tumour_fraction),
            },
            "percentiles": list(opts.percentiles),
            "upper_value": float(opts.upper_value),
            "split": {"seed": opts.seed, "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction},
            "slice_orientation": "rows anterior->posterior, columns left->right: slice[h, w] = ras[w, H-1-h]",
            "skipped_subjects": skipped,
            "options": store_options,
            "fingerprint": fp,
        }
        write_store(
            tmp, results, splits, meta, size=int(opts.size),
            min_brain_fraction=opts.min_brain_fraction, min_tumour_fraction=opts.min_tumour_fraction,
        )
        index = pd.read_csv(tmp / "index.csv", keep_default_na=False)
        subj = pd.read_csv(tmp / "subjects.csv", keep_default_na=False)
    return PrepareResult(out, False, summarise(index, subj), warnings, time.perf_counter() - t0)
