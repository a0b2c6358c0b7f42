"""Measure issue-4 targets on a finished `diffca-med demo` folder (synthetic cohort).

Usage::

    python benchmarks/counterfactuals.py DEMO_OUT [--dilation 2] [--ph PH_DIR] [--subgroups SG_DIR] [--json out.json]

For every subject with pseudo-healthy volumes (the demo makes them for the held-out
test split), against the phantom's true healthy twin
(``DEMO_OUT/data/derivatives/phantom-truth/...``), in the original NIfTI grid, on the
written ``*_pseudohealthy.nii.gz`` files:

* intensities of input, pseudo-healthy and twin are mapped to [0, 1] between the
  input volume's 0.5th and 99.5th percentiles inside the brain, and clipped. This
  window is fixed by the benchmark, not taken from the store, so the figures keep one
  meaning whatever normalisation ``prepare`` used (stores before Nov 2026 used exactly
  this window; the current median-anchored one would make every error ~2× smaller);
* **inside** = the labelled tumour (seg > 0) dilated by ``--dilation`` voxels (3-D);
  **outside** = brain voxels (input > 0 in any modality) not inside;
* PSNR (dB, data range 1) of pseudo-healthy vs twin inside and outside, and of the
  unchanged input vs twin inside (the identity baseline); pooled over the subjects'
  voxels and modalities (one MSE per region).

Targets: inside PSNR ≥ identity + 3 dB; outside PSNR ≥ 25 dB.

Subgroups: adjusted Rand index of ``subgroups/clusters.csv`` (subject level) against
the phantom ``subtype`` in ``participants.tsv``, over all subjects and over the test
subjects (target ≥ 0.6).

Geometry: each output NIfTI against its input: shape, affine, orientation codes
(nibabel) and size/origin/spacing/direction (SimpleITK).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage


def _psnr(sq_err_sum: float, n: int) -> float:
    if n == 0:
        return float("nan")
    mse = sq_err_sum / n
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def geometry_ok(src: Path, out: Path) -> dict:
    import SimpleITK as sitk

    a, b = nib.load(str(src)), nib.load(str(out))
    shape_ok = a.shape[:3] == b.shape[:3]
    affine_ok = bool(np.allclose(a.affine, b.affine))
    codes_ok = nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
    ia, ib = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    if ia.GetDimension() == 4:  # MSD: compare the spatial part
        ia = ia[:, :, :, 0]
    itk_ok = (ia.GetSize() == ib.GetSize() and np.allclose(ia.GetOrigin(), ib.GetOrigin())
              and np.allclose(ia.GetSpacing(), ib.GetSpacing()) and np.allclose(ia.GetDirection(), ib.GetDirection()))
    return {"shape": shape_ok, "affine": affine_ok, "axcodes": codes_ok, "simpleitk": bool(itk_ok)}


def measure(demo: Path, dilation: int = 2, ph: Path | None = None, subgroups: Path | None = None) -> dict:
    from diffca_med.analysis.metrics import brain_window, percentile_normalise
    from diffca_med.data.phantom_writers import TRUTH_DIR
    from diffca_med.data.store import SliceStore
    from diffca_med.pipelines.evaluate import twin_path

    data = demo / "data"
    truth = data / TRUTH_DIR
    ph = ph or demo / "pseudo-healthy"
    summaries = [json.loads(p.read_text()) for p in sorted(ph.glob("*/summary.json"))]
    if not summaries:
        raise SystemExit(f"{ph}: no pseudo-healthy outputs")
    store = SliceStore(summaries[0]["store"])
    acc = {k: [0.0, 0] for k in ("ph_in", "id_in", "ph_out", "id_out")}
    per_subject, geometry = [], []
    for s in summaries:
        subject = s["subject"]
        seg_file = s["source_files"].get("seg")
        seg = np.asanyarray(nib.load(seg_file).dataobj) > 0 if seg_file else None
        inputs = {m: np.asanyarray(nib.load(s["source_files"][m]).dataobj).astype(np.float32) for m in s["modalities"]}
        brain = np.any([v > 0 for v in inputs.values()], axis=0)
        inside = ndimage.binary_dilation(seg, iterations=dilation) & brain if seg is not None and seg.any() else np.zeros_like(brain)
        outside = brain & ~inside
        row = {"subject": subject, "tumour_voxels": int(seg.sum()) if seg is not None else 0}
        sub = {k: [0.0, 0] for k in acc}
        for m in s["modalities"]:
            src = Path(s["source_files"][m])
            out = ph / subject / s["outputs"][m]
            geometry.append({"file": out.name, **geometry_ok(src, out)})
            lo, hi = brain_window(inputs[m], brain)

            def norm(v):
                return percentile_normalise(v, lo, hi)

            x = norm(inputs[m])
            p = norm(np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32))
            t = norm(np.asanyarray(nib.load(str(twin_path(store, src, truth))).dataobj).astype(np.float32))
            for key, img, region in (("ph_in", p, inside), ("id_in", x, inside), ("ph_out", p, outside), ("id_out", x, outside)):
                err = float(((img[region] - t[region]) ** 2).sum())
                for store_acc in (acc, sub):
                    store_acc[key][0] += err
                    store_acc[key][1] += int(region.sum())
        row.update({f"psnr_{k}": _psnr(*sub[k]) for k in sub})
        per_subject.append(row)
    result = {
        "subjects": len(summaries),
        "dilation_voxels": dilation,
        "psnr_inside_pseudo_healthy": _psnr(*acc["ph_in"]),
        "psnr_inside_identity": _psnr(*acc["id_in"]),
        "psnr_outside_pseudo_healthy": _psnr(*acc["ph_out"]),
        "psnr_outside_identity": _psnr(*acc["id_out"]),
        "per_subject": per_subject,
        "geometry_all_ok": all(all(v for k, v in g.items() if k != "file") for g in geometry),
        "geometry_files": len(geometry),
    }
    result["inside_gain_db"] = result["psnr_inside_pseudo_healthy"] - result["psnr_inside_identity"]
    clusters_file = (subgroups or demo / "subgroups") / "clusters.csv"
    if clusters_file.is_file():
        from sklearn.metrics import adjusted_rand_score

        clusters = pd.read_csv(clusters_file, dtype={"subject": str})
        part = pd.read_csv(data / "participants.tsv", sep="\t", dtype=str).set_index("participant_id")
        truth = part.reindex(clusters["subject"])["subtype"].values
        result["ari_all_subjects"] = float(adjusted_rand_score(truth, clusters["cluster"]))
        result["n_clusters"] = int(clusters["cluster"].nunique())
        test = set(store.subjects_table.loc[store.subjects_table["split"] == "test", "subject"].astype(str))
        sel = clusters["subject"].isin(test).values
        if sel.sum() >= 2:
            result["ari_test_subjects"] = float(adjusted_rand_score(truth[sel], clusters["cluster"].values[sel]))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a finished `diffca-med demo` output folder")
    ap.add_argument("--dilation", type=int, default=2, help="3-D dilation of the tumour mask in voxels")
    ap.add_argument("--ph", type=Path, help="another pseudo-healthy output folder (default: DEMO_OUT/pseudo-healthy)")
    ap.add_argument("--subgroups", type=Path, help="another subgroups folder (default: DEMO_OUT/subgroups)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    r = measure(args.demo, args.dilation, args.ph, args.subgroups)
    print(f"subjects with pseudo-healthy volumes: {r['subjects']}")
    print(f"inside dilated tumour: PSNR pseudo-healthy {r['psnr_inside_pseudo_healthy']:.2f} dB vs identity "
          f"{r['psnr_inside_identity']:.2f} dB (gain {r['inside_gain_db']:+.2f} dB; target >= +3)")
    print(f"outside: PSNR pseudo-healthy {r['psnr_outside_pseudo_healthy']:.2f} dB (target >= 25; identity "
          f"{r['psnr_outside_identity']:.2f} dB)")
    if "ari_all_subjects" in r:
        print(f"subject clusters vs subtype: ARI {r['ari_all_subjects']:.3f} (all), "
              f"{r.get('ari_test_subjects', float('nan')):.3f} (test); k = {r['n_clusters']} (target >= 0.6)")
    print(f"geometry of {r['geometry_files']} output files matches the inputs: {r['geometry_all_ok']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
