"""Healthy anatomy of the synthetic cohort: the MNI152 tissue maps on a BraTS-like grid.

The tissue maps come from nilearn's bundled MNI152 2009 template (1 mm, loaded from
nilearn's own package files, no network): grey- and white-matter probability maps and
the brain mask; CSF is the brain mask minus GM and WM. They are resampled once per
grid (cached per process with :func:`functools.lru_cache`) and then deformed per
subject by :func:`subject_tissue` (small similarity transform + smooth random
displacement field), which is what makes every subject's anatomy different.

Geometry. Grids follow the real BraTS files: axes i, j, k run right->left,
anterior->posterior, inferior->superior (affine ``diag(-s, -s, s)``, i.e. LPS voxel
order), and world coordinates are MNI-like RAS millimetres with the grid centred on
the brain, so a world x > 0 is the subject's right hemisphere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The lowest few mm of the MNI brain mask are brainstem cut by the template's field of
# view; cutting at this MNI z keeps the brain inside the 155-slice BraTS grid.
_MNI_Z_CUT_MM = -60.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (X, Y, Z) voxels of ``spacing`` mm (isotropic)."""

    name: str
    shape: tuple[int, int, int]
    spacing: float

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return self.spacing**3 / 1000.0


#: Supported grids: ``full`` is the BraTS grid; ``half`` and ``tiny`` are for quick runs.
GRIDS: dict[str, Grid] = {
    "full": Grid("full", (240, 240, 155), 1.0),
    "half": Grid("half", (120, 120, 78), 2.0),
    "tiny": Grid("tiny", (60, 60, 40), 4.0),
}


@dataclass(frozen=True)
class GridAnatomy:
    """The template's tissue maps on one grid (all float32 arrays of ``grid.shape``).

    ``gm``, ``wm``, ``brain`` are probabilities/fractions in [0, 1]; ``edge_mm`` is the
    distance in mm from each voxel to the outside of the brain; ``bbox`` is a tuple of
    slices enclosing the brain with a margin for the per-subject deformation.
    """

    grid: Grid
    affine: np.ndarray  # (4, 4) voxel -> world (mm, RAS)
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    edge_mm: np.ndarray
    bbox: tuple[slice, slice, slice]


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 GM, WM, brain mask (float32, 197x233x189 at 1 mm) and their affine."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32)
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    z_mm = affine[2, 3] + affine[2, 2] * np.arange(brain.shape[2])
    brain[:, :, z_mm < _MNI_Z_CUT_MM] = 0.0
    gm *= brain
    wm *= brain
    return gm, wm, brain, affine


def grid_affine(grid: Grid, centre_mm: np.ndarray) -> np.ndarray:
    """BraTS-like affine ``diag(-s, -s, s)`` whose central voxel sits at ``centre_mm``."""
    s = grid.spacing
    affine = np.diag([-s, -s, s, 1.0])
    half = (np.asarray(grid.shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - affine[:3, :3] @ half
    return affine


@functools.lru_cache(maxsize=3)
def grid_anatomy(grid_name: str) -> GridAnatomy:
    """Resample the template's tissue maps onto grid ``grid_name`` (cached per process).

    The template is low-pass filtered first when the grid is coarser than 1 mm so
    that the coarse voxels hold partial-volume fractions rather than aliased samples.
    """
    grid = GRIDS[grid_name]
    gm_t, wm_t, brain_t, aff_t = _template()
    idx = np.argwhere(brain_t > 0.5)
    lo = aff_t[:3, :3] @ idx.min(0) + aff_t[:3, 3]
    hi = aff_t[:3, :3] @ idx.max(0) + aff_t[:3, 3]
    affine = grid_affine(grid, (lo + hi) / 2.0)
    affine[:3, 3] = np.round(affine[:3, 3])  # whole-mm origin: the 1 mm grid needs no interpolation

    # grid voxel -> template voxel (both affines are diagonal, so axes separate)
    to_t = np.linalg.inv(aff_t) @ affine
    axes = [to_t[a, a] * np.arange(grid.shape[a]) + to_t[a, 3] for a in range(3)]
    if all(np.allclose(ax, np.round(ax)) for ax in axes):
        # integer voxel offsets (the 1 mm grid): plain indexing, no interpolation
        idx = [np.round(ax).astype(np.int64) for ax in axes]
        ok = [(ix >= 0) & (ix < n) for ix, n in zip(idx, brain_t.shape)]
        sel = np.ix_(*[np.clip(ix, 0, n - 1) for ix, n in zip(idx, brain_t.shape)])
        inside = ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]
        maps = [np.where(inside, vol[sel], 0.0).astype(np.float32) for vol in (gm_t, wm_t, brain_t)]
    else:
        coords = np.meshgrid(*[ax.astype(np.float32) for ax in axes], indexing="ij")
        sigma = np.sqrt(max(grid.spacing**2 - 1.0, 0.0)) / 2.355  # FWHM = voxel size
        maps = []
        for vol in (gm_t, wm_t, brain_t):
            if sigma > 0:
                vol = ndimage.gaussian_filter(vol, sigma, mode="constant")
            maps.append(
                ndimage.map_coordinates(
                    vol, coords, order=1, mode="constant", cval=0.0, output=np.float32
                )
            )
    gm, wm, brain = (np.clip(m, 0.0, 1.0) for m in maps)
    edge_mm = _edge_distance(brain > 0.5, grid.spacing)

    margin = int(np.ceil(14.0 / grid.spacing))  # room for scale + displacement
    nz = np.argwhere(brain > 0.05)
    bbox = tuple(
        slice(max(int(a) - margin, 0), min(int(b) + margin + 1, n))
        for a, b, n in zip(nz.min(0), nz.max(0), grid.shape)
    )
    for arr in (gm, wm, brain, edge_mm):
        arr.setflags(write=False)
    return GridAnatomy(grid, affine, gm, wm, brain, edge_mm, bbox)  # type: ignore[arg-type]


def _edge_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm, float32) from each voxel of ``mask`` to the outside, at ~4 mm precision.

    Computed on a grid subsampled to about 4 mm and repeated back (a full-resolution
    exact transform of the 1 mm grid takes seconds and tumour placement needs no more).
    """
    k = max(1, int(round(4.0 / spacing)))
    coarse = ndimage.distance_transform_edt(mask[::k, ::k, ::k], sampling=k * spacing)
    for axis in range(3):
        coarse = np.repeat(coarse, k, axis=axis)
    return np.ascontiguousarray(coarse[: mask.shape[0], : mask.shape[1], : mask.shape[2]], dtype=np.float32)


def smooth_field(
    shape: tuple[int, ...], ctrl_spacing: float, rng: np.random.Generator, n: int = 1
) -> np.ndarray:
    """``n`` smooth random fields of ``shape`` (float32, about unit std), shape (n, *shape).

    Tensor product of Gaussian bumps every ``ctrl_spacing`` voxels along each axis with
    random N(0, 1) weights: cheap (a few small matrix products) even on the full grid.
    """
    bases = []
    for length in shape:
        n_ctrl = int(np.ceil(length / ctrl_spacing)) + 2
        centres = (np.arange(n_ctrl) - 1.0) * ctrl_spacing
        x = np.arange(length, dtype=np.float64)[:, None]
        b = np.exp(-0.5 * ((x - centres[None, :]) / (0.7 * ctrl_spacing)) ** 2)
        b /= np.sqrt((b**2).sum(axis=1, keepdims=True))  # unit-variance output
        bases.append(b.astype(np.float32))
    weights = rng.standard_normal((n,) + tuple(b.shape[1] for b in bases)).astype(np.float32)
    out = np.einsum("nabc,xa,yb,zc->nxyz", weights, *bases, optimize=True)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass
class SubjectTissue:
    """One subject's deformed tissue maps (float32, ``grid.shape``; see GridAnatomy)."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray


def random_similarity(rng: np.random.Generator, spacing: float) -> np.ndarray:
    """A small random rotation (<= 5 deg per axis), scale (0.95-1.05, +-2 % per axis) and shift (<= 2 mm).

    Returns the (3, 4) voxel-space matrix mapping output-centred voxel coordinates to
    source-centred ones.
    """
    angles = np.deg2rad(rng.uniform(-5.0, 5.0, 3))
    c, s = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    scale = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    # inverse map (output -> source): divide by the scale
    lin = rz @ ry @ rx @ np.diag(1.0 / scale)
    shift = rng.uniform(-2.0, 2.0, 3) / spacing
    return np.concatenate([lin, shift[:, None]], axis=1)


def subject_tissue(anat: GridAnatomy, rng: np.random.Generator) -> SubjectTissue:
    """Deform the grid's tissue maps with a random similarity + smooth displacement.

    The displacement has control points every 40 mm and about 2.5 mm amplitude.
    Only the brain's bounding box (with margin) is resampled; outside it is zero.
    """
    grid = anat.grid
    sim = random_similarity(rng, grid.spacing)
    bb = anat.bbox
    box_shape = tuple(s.stop - s.start for s in bb)
    disp = smooth_field(box_shape, 40.0 / grid.spacing, rng, n=3) * (2.5 / grid.spacing)

    centre = (np.asarray(grid.shape, dtype=np.float64) - 1.0) / 2.0
    axes = [np.arange(s.start, s.stop, dtype=np.float64) - centre[a] for a, s in enumerate(bb)]
    coords = np.empty((3,) + box_shape, dtype=np.float32)
    for a in range(3):
        coords[a] = (
            sim[a, 0] * axes[0][:, None, None]
            + sim[a, 1] * axes[1][None, :, None]
            + sim[a, 2] * axes[2][None, None, :]
            + (sim[a, 3] + centre[a])
        ).astype(np.float32)
        coords[a] += disp[a]
    out = []
    for vol in (anat.gm, anat.wm, anat.brain):
        full = np.zeros(grid.shape, dtype=np.float32)
        full[bb] = ndimage.map_coordinates(
            vol, coords, order=1, mode="constant", cval=0.0, output=np.float32
        )
        out.append(full)
    return SubjectTissue(*out)
