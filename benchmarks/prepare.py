"""Benchmark: ``prepare`` against merely decoding the same NIfTI files with nibabel.

Builds (once) a full-grid (240x240x155, 1 mm) BraTS 2023 phantom of 20 subjects, then in
one run measures

* decode: ``nibabel.load(f).get_fdata(dtype=float32)`` of every file ``prepare`` reads
  (4 modalities + label map per subject), serially and with the same number of worker
  processes as ``prepare``;
* prepare: the full ``diffca_med.pipelines.prepare.prepare`` (discovery, header checks,
  decode + validation, MONAI chain, slicing, store assembly) with ``--workers`` = all cores,
  into a fresh store each repeat;

and prints prepare / decode ratios and slices per second. Target: ratio <= 1.5.

Usage::

    python benchmarks/prepare.py [--data DIR] [--subjects 20] [--workers N] [--size 64] [--repeats 3] [--no-isal]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np


def decode(path: str) -> int:
    """Decode one file the plain way; return its voxel count (keeps the work observable)."""
    return int(nib.load(path).get_fdata(dtype=np.float32).size)


def time_decode(files: list[str], workers: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1:
        for f in files:
            decode(f)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(decode, files, chunksize=1))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "diffca-bench-phantom-full-20",
                        help="phantom folder; built there if missing (default: a folder in the temp dir)")
    parser.add_argument("--subjects", type=int, default=20, help="phantom subjects to build when --data is missing")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for prepare and parallel decode")
    parser.add_argument("--size", type=int, default=64, help="store slice size")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (interleaved); the fastest counts")
    parser.add_argument("--no-isal", action="store_true",
                        help="decode in prepare with nibabel's gzip stream instead of ISA-L (for comparison)")
    args = parser.parse_args()
    if args.no_isal:
        from diffca_med.data import niftigz

        niftigz.igzip = None  # forked workers inherit this

    from diffca_med.data.layouts import discover
    from diffca_med.data.phantom import make_cohort
    from diffca_med.data.store import SliceStore
    from diffca_med.pipelines.prepare import PrepareOptions, prepare

    if not (args.data / "participants.tsv").is_file():
        print(f"building a {args.subjects}-subject full-grid phantom at {args.data} (once) ...", flush=True)
        t0 = time.perf_counter()
        make_cohort(args.data, n_subjects=args.subjects, seed=0, layout="brats2023", grid="full", progress=True)
        print(f"  built in {time.perf_counter() - t0:.1f} s")

    subjects = discover(args.data)
    files = [str(f) for s in subjects for f in s.files()]
    size_mb = sum(os.path.getsize(f) for f in files) / 1e6
    for f in files:  # warm the page cache so both timings read from memory
        Path(f).read_bytes()
    print(f"{len(subjects)} subjects, {len(files)} files, {size_mb:.0f} MB compressed, workers={args.workers}, "
          f"prepare decodes with {'nibabel' if args.no_isal else 'ISA-L (isal)'}", flush=True)

    # interleave the timings so that load from other processes on the machine hits all
    # three alike; the fastest of each counts
    work = Path(tempfile.mkdtemp(prefix="diffca-bench-store-"))
    serial, parallel, prep = [], [], []
    try:
        for i in range(args.repeats):
            parallel.append(time_decode(files, args.workers))
            out = work / f"store{i}"
            t0 = time.perf_counter()
            prepare(args.data, out, PrepareOptions(size=args.size), workers=args.workers, progress=False)
            prep.append(time.perf_counter() - t0)
            serial.append(time_decode(files, 1))
            print(f"  repeat {i + 1}: decode {parallel[-1]:.2f} s ({args.workers} processes), "
                  f"{serial[-1]:.2f} s (serial); prepare {prep[-1]:.2f} s", flush=True)
        n_slices = len(SliceStore(work / "store0"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    paired = sorted(p / d for p, d in zip(prep, parallel))
    serial, parallel, prep = min(serial), min(parallel), min(prep)

    print(f"decode, serial               : {serial:7.2f} s")
    print(f"decode, {args.workers} processes          : {parallel:7.2f} s")
    print(f"prepare, {args.workers} workers (best of {args.repeats}): {prep:7.2f} s   ({n_slices} slices, "
          f"{n_slices / prep:.0f} slices/s)")
    print(f"ratio prepare / decode (same processes): {prep / parallel:.2f}")
    print(f"ratio prepare / decode (serial)        : {prep / serial:.2f}")
    print(f"per-repeat ratios (same processes)     : {', '.join(f'{r:.2f}' for r in paired)}")


if __name__ == "__main__":
    main()
