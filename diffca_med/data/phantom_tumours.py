"""Synthetic brain tumours of distinct subtypes, grown inside one subject's anatomy.

A tumour lives in a local box of the grid. Inside the box it (1) pushes the
surrounding tissue radially away from its centre (mass effect, exactly zero beyond a
cut-off radius inside the box), (2) defines the tumour sub-regions NCR (necrotic /
non-enhancing core), ED (oedema) and ET (enhancing tumour) as irregular level sets,
and (3) carries per-component relative intensities for the four modalities.
Everything outside the box is left to the healthy twin, so a tumour volume and its
twin differ only near the tumour.

Subtypes (:data:`SUBTYPES`):

``ring_enhancing``
    one necrotic core (NCR) with an enhancing rim (ET) and a moderate oedema (ED)
    around it; strong mass effect. Dark core with a bright rim on T1c.
``infiltrative``
    a non-enhancing core (labelled NCR, the BraTS "non-enhancing tumour core") in a
    large diffuse oedema that follows white matter; no ET; weak mass effect.
    Bright on T2/FLAIR, nothing on T1c.
``multifocal_nodular``
    2-4 small enhancing nodules (ET, larger ones with a tiny necrotic centre) in a
    large shared oedema; mild mass effect. Bright dots on T1c, big FLAIR signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from diffca_med.data.phantom_anatomy import GridAnatomy, SubjectTissue, smooth_field

SUBTYPES: tuple[str, ...] = ("ring_enhancing", "infiltrative", "multifocal_nodular")

# Internal sub-region codes of Tumour.labels; writers translate them to a layout's values.
NCR, ED, ET = 1, 2, 3
REGION_NAMES = {NCR: "NCR", ED: "ED", ET: "ET"}

#: Relative intensity of each tumour component per modality (healthy WM on T1 ~ 0.85),
#: per subtype. "ncr" of ``infiltrative`` is non-enhancing solid tumour, not necrosis.
TUMOUR_INTENSITY: dict[str, dict[str, dict[str, float]]] = {
    "ring_enhancing": {
        "ncr": {"t1": 0.28, "t1c": 0.30, "t2": 0.95, "flair": 0.50},
        "et": {"t1": 0.60, "t1c": 1.40, "t2": 0.70, "flair": 0.78},
        "ed": {"t1": 0.52, "t1c": 0.54, "t2": 0.88, "flair": 0.98},
    },
    "infiltrative": {
        "ncr": {"t1": 0.46, "t1c": 0.48, "t2": 0.90, "flair": 0.95},
        "et": {"t1": 0.46, "t1c": 0.48, "t2": 0.90, "flair": 0.95},  # unused (no ET)
        "ed": {"t1": 0.56, "t1c": 0.58, "t2": 0.78, "flair": 0.88},
    },
    "multifocal_nodular": {
        "ncr": {"t1": 0.35, "t1c": 0.38, "t2": 0.90, "flair": 0.60},
        "et": {"t1": 0.66, "t1c": 1.50, "t2": 0.66, "flair": 0.75},
        "ed": {"t1": 0.50, "t1c": 0.52, "t2": 0.90, "flair": 1.02},
    },
}


@dataclass
class Tumour:
    """A grown tumour. Box arrays have the shape of ``grid[box]``.

    ``labels`` uint8 codes (0, NCR, ED, ET); ``gm``/``wm``/``brain`` the tissue maps after
    mass effect; ``f_ncr``/``f_et``/``f_all`` float32 partial-volume fractions of the
    core components and of the whole lesion; ``texture`` a smooth ~1-mean modulation;
    ``intensity`` component -> modality -> relative intensity; ``ed_weight`` the
    fraction of an oedematous voxel's signal that is oedema.
    """

    subtype: str
    box: tuple[slice, slice, slice]
    labels: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    f_ncr: np.ndarray
    f_et: np.ndarray
    f_all: np.ndarray
    texture: np.ndarray
    intensity: dict[str, dict[str, float]]
    ed_weight: float
    n_designed: int
    params: dict = field(default_factory=dict)


def _sizes(subtype: str, rng: np.random.Generator, spacing: float) -> dict:
    """Random nominal sizes (mm) of a subtype; radii never below ~1.3 voxels."""
    lo = 1.3 * spacing
    if subtype == "ring_enhancing":
        r_core = rng.uniform(max(10.0, 2.5 * spacing), 20.0)
        r_ed = r_core * rng.uniform(1.35, 1.8)
        return {"r_core": r_core, "r_ed": r_ed, "r_ext": r_ed * 1.2, "R": r_core,
                "push": rng.uniform(0.3, 0.45)}
    if subtype == "infiltrative":
        r_core = rng.uniform(max(8.0, 2.0 * spacing), 16.0)
        r_ed = rng.uniform(20.0, 32.0)
        return {"r_core": r_core, "r_ed": r_ed, "r_ext": r_ed * 1.25, "R": r_core,
                "push": rng.uniform(0.12, 0.22)}
    if subtype == "multifocal_nodular":
        k = int(rng.integers(2, 5))
        radii = rng.uniform(max(3.0, lo), max(7.5, lo + 1.0), k)
        spread = rng.uniform(16.0, 26.0) + 2.0 * spacing
        r_ed_i = radii * rng.uniform(2.0, 3.0, k) + 6.0
        return {"radii": radii, "spread": spread, "r_ed_i": r_ed_i,
                "r_core": float(radii.max()), "r_ext": spread + float(r_ed_i.max()) * 1.15,
                "R": float(radii.max()), "push": rng.uniform(0.2, 0.3)}
    raise ValueError(f"unknown tumour subtype {subtype!r}")


def _place(tissue: SubjectTissue, anat: GridAnatomy, sizes: dict, rng: np.random.Generator) -> np.ndarray:
    """Pick a centre (voxel coords) in white matter, deep enough in the brain and with
    brain slices left above and below the tumour's z-extent."""
    s = anat.grid.spacing
    brain = tissue.brain > 0.5
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    i = np.arange(anat.grid.shape[0])
    x_mm = (anat.affine[0, 0] * i + anat.affine[0, 3])[:, None, None]  # world x of each voxel
    for shrink in (1.0, 0.85, 0.7, 0.55, 0.4):
        ext = sizes["r_ext"] * shrink / s + 2
        z_lo, z_hi = zs[0] + ext, zs[-1] - ext
        cand = (tissue.wm > 0.5) & (anat.edge_mm >= sizes["r_core"] * shrink + 6.0)
        cand[:, :, : max(int(np.ceil(z_lo)), 0)] = False
        cand[:, :, int(np.floor(z_hi)) + 1 :] = False
        cand &= np.abs(x_mm) >= 8.0  # off the midline: a clear hemisphere
        idx = np.argwhere(cand)
        if len(idx):
            if shrink < 1.0:
                _scale_sizes(sizes, shrink)
            return idx[rng.integers(len(idx))] + rng.uniform(-0.5, 0.5, 3)
    # pathological anatomy: fall back to the deepest white-matter voxel
    idx = np.argwhere(tissue.wm > 0.5)
    _scale_sizes(sizes, 0.4)
    return idx[np.argmax(anat.edge_mm[tuple(idx.T)])].astype(np.float64)


def _scale_sizes(sizes: dict, f: float) -> None:
    for key in ("r_core", "r_ed", "r_ext", "R", "spread"):
        if key in sizes:
            sizes[key] *= f
    for key in ("radii", "r_ed_i"):
        if key in sizes:
            sizes[key] = sizes[key] * f


def _random_shape_matrix(rng: np.random.Generator) -> np.ndarray:
    """Random rotation times an anisotropic scaling of unit determinant (ellipsoids)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    axes = rng.uniform(0.8, 1.25, 3)
    axes /= np.cbrt(axes.prod())
    return np.diag(1.0 / axes) @ q


def _norm_mm(mat: np.ndarray, off: np.ndarray, spacing: float) -> np.ndarray:
    """Length in mm of ``mat @ off`` at every voxel (off: (3, *shape) voxel offsets)."""
    out = np.zeros(off.shape[1:], dtype=np.float32)
    for a in range(3):
        v = mat[a, 0] * off[0] + mat[a, 1] * off[1] + mat[a, 2] * off[2]
        out += v * v
    return np.sqrt(out) * np.float32(spacing)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (the mask itself if <= 1)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def grow_tumour(
    subtype: str, tissue: SubjectTissue, anat: GridAnatomy, rng: np.random.Generator
) -> Tumour:
    """Grow one tumour of ``subtype`` in ``tissue`` (see the module docstring)."""
    s = anat.grid.spacing
    sizes = _sizes(subtype, rng, s)
    centre = _place(tissue, anat, sizes, rng)

    r_mass = sizes["R"]
    r_cut = min(2.0 * r_mass, sizes["r_ext"] + 6.0)  # mass effect is zero beyond (mm)
    hw = int(np.ceil(max(sizes["r_ext"] * 1.3, r_cut) / s)) + 2
    # clipped to the anatomy's bounding box (outside it there is no brain to change)
    box = tuple(
        slice(max(int(np.floor(c)) - hw, b.start), min(int(np.ceil(c)) + hw + 1, b.stop))
        for c, b in zip(centre, anat.bbox)
    )
    shape = tuple(b.stop - b.start for b in box)
    c_loc = centre - np.array([b.start for b in box], dtype=np.float64)
    off = np.stack(np.meshgrid(
        *[np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(shape, c_loc)],
        indexing="ij",
    ))  # (3, *shape) voxel offsets from the centre
    r_mm = np.sqrt((off * off).sum(0)) * np.float32(s)

    # --- mass effect: source radius r - A*phi(r), phi peaking at R, tapered to 0 at r_cut
    amp = sizes["push"] * r_mass
    taper = np.clip((r_cut - r_mm) / (0.4 * r_cut), 0.0, 1.0)
    taper = taper * taper * (3 - 2 * taper)
    factor = 1.0 - (amp / r_mass) * np.exp(0.5 * (1.0 - (r_mm / r_mass) ** 2)) * taper
    moved = taper > 0
    # only the moved voxels are resampled; the rest keep their exact values
    src = (c_loc[:, None].astype(np.float32) + off[:, moved] * factor[moved]).astype(np.float32)
    warped = []
    for vol in (tissue.gm, tissue.wm, tissue.brain):
        local = np.ascontiguousarray(vol[box])
        local[moved] = ndimage.map_coordinates(local, src, order=1, mode="nearest", output=np.float32)
        warped.append(local)
    gm, wm, brain_f = warped
    brain = brain_f > 0.5
    parenchyma = brain & ((gm + wm) > 0.35 * np.maximum(brain_f, 1e-3))

    # --- sub-regions as irregular level sets
    ctrl = max(8.0 / s, 1.5)
    n1, n2, tex = smooth_field(shape, ctrl, rng, n=3)
    shape_m = _random_shape_matrix(rng)
    shape_m = shape_m.astype(np.float32)
    d_mm = _norm_mm(shape_m, off, s)
    labels = np.zeros(shape, dtype=np.uint8)
    n_designed = 1
    if subtype == "ring_enhancing":
        level = d_mm / sizes["r_core"] + 0.12 * n1
        core = _largest_component((level < 1.0) & brain)
        ncr_frac = rng.uniform(0.4, 0.6)
        labels[core] = ET
        labels[core & (level < ncr_frac)] = NCR
        ed = (d_mm / sizes["r_ed"] + 0.15 * n2 - 0.3 * (wm - 0.5)) < 1.0
        sizes["ncr_frac"] = ncr_frac
    elif subtype == "infiltrative":
        core = _largest_component(((d_mm / sizes["r_core"] + 0.22 * n1) < 1.0) & brain)
        labels[core] = NCR
        ed = (d_mm / sizes["r_ed"] + 0.22 * n2 - 0.45 * (wm - 0.5)) < 1.0
    else:
        radii, r_ed_i = sizes["radii"], sizes["r_ed_i"]
        centres = _nodule_centres(radii, sizes["spread"], s, parenchyma, c_loc, rng)
        n_designed = len(centres)
        core = np.zeros(shape, dtype=bool)
        ed_level = np.full(shape, np.inf, dtype=np.float32)
        for ci, i in centres:
            ri, rei = radii[i], r_ed_i[i]
            o = off - (ci - c_loc).astype(np.float32)[:, None, None, None]
            dn = _norm_mm(shape_m, o, s)
            nod = _largest_component(((dn / ri + 0.1 * n1) < 1.0) & brain)
            core |= nod
            labels[nod] = ET
            if ri >= 5.5:
                labels[nod & (dn / ri < 0.45)] = NCR
            ed_level = np.minimum(ed_level, np.sqrt((o * o).sum(0)) * np.float32(s / rei))
        ed = (ed_level + 0.18 * n2 - 0.3 * (wm - 0.5)) < 1.0
    ed &= parenchyma & ~core
    lesion = core | ed
    # drop oedema islands not attached to the tumour core
    lab, _ = ndimage.label(lesion)
    keep = np.unique(lab[core])
    lesion &= np.isin(lab, keep[keep > 0])
    labels[lesion & ~core] = ED
    labels[~lesion] = 0

    # --- partial-volume fractions for the intensities
    # (partial volume of ~0.6 voxel; infiltrative oedema fades over ~4 mm more)
    sig = 0.6
    f_ncr = ndimage.gaussian_filter((labels == NCR).astype(np.float32), sig, truncate=3.0)
    f_et = ndimage.gaussian_filter((labels == ET).astype(np.float32), sig, truncate=3.0)
    sig_ed = float(np.clip(4.0 / s, 0.8, 2.0)) if subtype == "infiltrative" else 0.8
    f_all = np.clip(ndimage.gaussian_filter(lesion.astype(np.float32), sig_ed, truncate=3.0), 0.0, 1.0)
    texture = (1.0 + 0.08 * tex).astype(np.float32)

    jitter = {c: {m: v * rng.uniform(0.93, 1.07) for m, v in mods.items()}
              for c, mods in TUMOUR_INTENSITY[subtype].items()}
    params = {k: (v.tolist() if isinstance(v, np.ndarray) else float(v)) for k, v in sizes.items()}
    params["centre_vox"] = centre.tolist()
    return Tumour(
        subtype=subtype, box=box, labels=labels, gm=gm, wm=wm, brain=brain_f,
        f_ncr=f_ncr, f_et=f_et, f_all=f_all.astype(np.float32), texture=texture,
        intensity=jitter, ed_weight=float(rng.uniform(0.55, 0.8)),
        n_designed=n_designed, params=params,
    )


def _nodule_centres(
    radii: np.ndarray, spread: float, spacing: float, parenchyma: np.ndarray,
    c_loc: np.ndarray, rng: np.random.Generator,
) -> list[tuple[np.ndarray, int]]:
    """(box-voxel centre, index into ``radii``) of separated nodules around ``c_loc``,
    inside brain tissue; a nodule that finds no room is left out."""
    centres: list[tuple[np.ndarray, int]] = []
    for i, r in enumerate(radii):
        for _ in range(100):
            if i == 0:
                cand = c_loc.copy()
            else:
                v = rng.standard_normal(3)
                cand = c_loc + v / np.linalg.norm(v) * rng.uniform(0.5, 1.0) * spread / spacing
            ijk = np.round(cand).astype(int)
            if np.any(ijk < 0) or np.any(ijk >= parenchyma.shape) or not parenchyma[tuple(ijk)]:
                continue
            # keep nodules apart by at least 2 voxels of tissue
            if all(np.linalg.norm(cand - c) * spacing >= r + radii[j] + 2 * spacing
                   for c, j in centres):
                centres.append((cand, i))
                break
    return centres
