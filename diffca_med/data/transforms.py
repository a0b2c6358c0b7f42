"""The MONAI dictionary-transform chain of ``prepare``.

One subject goes through::

    LoadBrainCropd         decode each file once (CheckedNiftiReader: float32, validated),
                           channels in requested order, brain = nonzero in any modality,
                           crop all to the brain's bounding box   image (C, x, y, z), brain/seg (1, x, y, z)
    Orientationd RAS       (on the box only: cheap flips)         (., r, a, s)
    BrainPercentiles       per-modality 0.5 % and median inside the brain (source resolution)
    TumourVoxelsPerSliced  tumour voxels per axial slice (source resolution)
    SquareResized          pad in-plane to a square s x s, resize to size x size
                                                                  image (C, size, size, z)
    NormaliseInBraind      [lo, hi] -> [0, 1] inside the brain, 0 outside; brain mask

Images and the brain mask are resized with exact area averaging when shrinking
(anti-aliased) and bilinearly when enlarging (the mask then thresholded at 0.5); the
label map with nearest neighbour. The expensive full-resolution work is the decoding
itself: everything after ``LoadBrainCropd`` runs on the brain's box or on the small
resized stack. Every geometric step is recorded by the caller
(``diffca_med.pipelines.prepare.process_subject``) so that
:func:`diffca_med.data.store.slices_to_volume` can undo it exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from monai.transforms import Compose, MapTransform, Orientationd

from diffca_med.data.validate import DECODE_ERRORS, _reason, check_labels, decode_image, display_path
from diffca_med.errors import InputError

#: Default intensity percentiles (inside the brain): the lower one maps to 0, the upper
#: one to ``DEFAULT_UPPER_VALUE``. The median, not a top percentile, anchors the scale
#: because lesions move the top of the histogram: on the synthetic cohort, between a
#: tumour subject and its own healthy twin the FLAIR 99.5th percentile differs by 12.9 %
#: on average (up to 22 %), the median by 1.0 % (up to 3.4 %) — a top-percentile scale
#: makes all healthy tissue of tumour subjects darker, a label shortcut for any model.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 50.0)
#: Where the upper percentile lands; 0.3 keeps CSF in T2 (p99.5 ≈ 0.9) below the clip at 1.
DEFAULT_UPPER_VALUE: float = 0.3


class CheckedNiftiReader(NibabelReader):
    """MONAI NIfTI reader that decodes each file once and validates what it decoded.

    Images are returned as float32 (no float64 intermediate); NaN/inf voxels raise
    :class:`InputError` unless ``zero_nonfinite``. Label maps (``labels`` given) are
    checked against the layout's label values and returned as uint8. Decode failures of
    truncated/corrupt files become one-line InputErrors naming the file.

    Warnings (e.g. zeroed voxels) are collected in ``self.warnings``.
    """

    def __init__(
        self,
        root: Path | None = None,
        labels: frozenset[int] | None = None,
        zero_nonfinite: bool = False,
    ):
        super().__init__()
        self.root = root
        self.labels = labels
        self.zero_nonfinite = zero_nonfinite
        self.warnings: list[str] = []

    def read(self, data, **kwargs):
        try:
            return super().read(data, **kwargs)
        except DECODE_ERRORS as err:
            names = ", ".join(display_path(p, self.root) for p in np.atleast_1d(data))
            raise InputError(f"{names}: not a readable NIfTI file ({_reason(err)})") from None

    def _get_array_data(self, img, filename):
        name = display_path(filename, self.root)
        if self.labels is None:
            return decode_image(
                img, name, as_float=True, zero_nonfinite=self.zero_nonfinite, warnings=self.warnings
            )
        seg = decode_image(img, name, as_float=False)
        if seg.ndim == 4 and seg.shape[3] == 1:
            seg = seg[..., 0]
        return check_labels(seg, self.labels, name)


class SelectChannelsd(MapTransform):
    """Keep the channels ``indices`` (in that order) of a channel-first image."""

    def __init__(self, keys: KeysCollection, indices: Sequence[int]):
        super().__init__(keys)
        self.indices = list(indices)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if list(range(img.shape[0])) != self.indices:
                d[key] = img[self.indices]
        return d


def _axis_slice(start: int, end: int, reverse: bool) -> slice:
    """Slice selecting [start, end) of one axis, backwards when ``reverse``."""
    if not reverse:
        return slice(start, end)
    return slice(end - 1, start - 1 if start > 0 else None, -1)


def _xyz(arr_zyx: np.ndarray) -> torch.Tensor:
    """(C, z, y, x) numpy array -> (C, x, y, z) torch view (x fastest in memory, no copy)."""
    return torch.from_numpy(arr_zyx).permute(0, 3, 2, 1)


def _zyx(t: torch.Tensor) -> torch.Tensor:
    """(C, x, y, z) tensor -> contiguous (C, z, y, x) (a free view when x is fastest)."""
    return t.permute(0, 3, 2, 1).contiguous()


class LoadBrainCropd(MapTransform):
    """Load a subject's files, build the brain mask and crop to it before anything else.

    Fuses MONAI's LoadImaged + EnsureChannelFirstd + channel selection +
    CropForegroundd for speed: LoadImage turns every decoded volume, which nibabel
    returns in Fortran order, into a C-contiguous copy of the *full* grid (and stacks the
    modalities in another full copy); on a 240x240x155 BraTS subject those copies cost
    about as much as the decoding. Here each file is decoded once through
    :class:`CheckedNiftiReader` (float32, validated), the brain mask (nonzero in any
    requested modality) and its bounding box are computed on the decoded arrays, and only
    the box is copied.

    Input keys: ``files`` (unique paths), ``channels`` (per requested modality: (file
    index, channel in a 4-D file or None)), optional ``seg`` (path), ``name``.

    Output: ``image`` MetaTensor (C, x, y, z) float32, ``brain`` (1, x, y, z) uint8,
    ``seg`` (1, x, y, z) uint8 if given, all with affine = source affine shifted to the
    box; ``crop_start`` / ``crop_end`` (source voxel indices, end exclusive),
    ``source_affine`` (4, 4) and ``source_shape`` (X, Y, Z).
    """

    def __init__(self, image_reader: CheckedNiftiReader, seg_reader: CheckedNiftiReader | None = None):
        super().__init__(["files"])
        self.image_reader, self.seg_reader = image_reader, seg_reader

    @staticmethod
    def _decode(reader: CheckedNiftiReader, path: str) -> tuple[np.ndarray, np.ndarray]:
        img = reader.read(path)
        return reader._get_array_data(img, path), np.asarray(img.affine, dtype=np.float64)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        decoded = [self._decode(self.image_reader, p) for p in d["files"]]
        affine = decoded[0][1]
        volumes = []
        for file_idx, channel in d["channels"]:
            arr = decoded[file_idx][0]
            volumes.append(arr[..., channel] if channel is not None else (arr[..., 0] if arr.ndim == 4 else arr))
        # work on (z, y, x) views: C-contiguous for NIfTI's Fortran-ordered data, so every
        # pass below streams through memory and nothing is transposed
        brain_t = volumes[0].T != 0
        scratch = np.empty_like(brain_t)
        for vol in volumes[1:]:
            np.not_equal(vol.T, 0, out=scratch)
            brain_t |= scratch
        zy = brain_t.any(axis=2)
        nonzero = [np.flatnonzero(brain_t.any(axis=(0, 1))), np.flatnonzero(zy.any(axis=0)), np.flatnonzero(zy.any(axis=1))]
        if any(idx.size == 0 for idx in nonzero):
            raise InputError(f"{d.get('name', 'subject')}: images are all zero (no brain voxels)")
        start = [int(idx[0]) for idx in nonzero]  # (x, y, z)
        end = [int(idx[-1]) + 1 for idx in nonzero]
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
        ornt = ras_orientation(affine)
        flips = [False, False, False]
        if np.array_equal(ornt[:, 0], [0, 1, 2]):
            # axes already in R, A, S order (BraTS: LPS): reverse the flipped axes while
            # copying the box, which is free; Orientationd then has nothing left to do.
            # Axis permutations (e.g. sagittal acquisitions) are left to Orientationd.
            flips = [bool(f < 0) for f in ornt[:, 1]]
            shifted = shifted @ nib.orientations.inv_ornt_aff(ornt, [b - a for a, b in zip(start, end)])
        box_t = tuple(_axis_slice(start[ax], end[ax], flips[ax]) for ax in (2, 1, 0))
        meta = {"affine": torch.as_tensor(shifted), "original_affine": affine, "space": "RAS"}
        # only the box is copied, into (C, z, y, x) memory presented as (C, x, y, z)
        image_t = np.empty((len(volumes), *(end[ax] - start[ax] for ax in (2, 1, 0))), dtype=np.float32)
        for c, vol in enumerate(volumes):
            image_t[c] = vol.T[box_t]
        d["image"] = MetaTensor(_xyz(image_t), meta=dict(meta))
        d["brain"] = MetaTensor(_xyz(brain_t[box_t].astype(np.uint8)[None]), meta=dict(meta))
        if d.get("seg") is None:
            d.pop("seg", None)
        else:
            assert self.seg_reader is not None
            seg, _ = self._decode(self.seg_reader, d["seg"])
            d["seg"] = MetaTensor(_xyz(np.ascontiguousarray(seg.T[box_t])[None]), meta=dict(meta))
        shape = [int(v) for v in reversed(brain_t.shape)]
        d["crop_start"], d["crop_end"] = start, end
        d["source_affine"], d["source_shape"] = affine, shape
        del d["files"], d["channels"]
        return d


class BrainPercentiles(MapTransform):
    """Per-modality intensity percentiles inside the brain, at the source resolution.

    For each channel c: ``lo, p = percentile(image[c][brain], (lower, upper))`` and
    ``hi = lo + (p − lo) / upper_value``, so that lo maps to 0, p to ``upper_value`` and
    hi to 1; ``(lo, hi)`` is written to ``stats_key`` as a (C, 2) list in the image's
    intensity units. MONAI's
    ScaleIntensityRangePercentilesd takes percentiles over the whole volume (mostly
    background), which is why this transform exists; :class:`NormaliseInBraind` applies
    them. Brains larger than ``max_samples`` voxels use an evenly strided subsample (a
    1 mm BraTS brain has ~1.5 M voxels; the percentile's rank error stays below 0.02 %).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "brain",
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        stats_key: str = "intensity",
        max_samples: int = 200_000,
        upper_value: float = DEFAULT_UPPER_VALUE,
    ):
        super().__init__(keys)
        self.mask_key, self.percentiles, self.stats_key = mask_key, percentiles, stats_key
        self.upper_value = float(upper_value)
        self.max_samples = int(max_samples)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask_zyx = _zyx(torch.as_tensor(d[self.mask_key]))  # (1, z, y, x)
        inside = np.flatnonzero(mask_zyx.numpy().ravel())
        if inside.size > self.max_samples:  # an even, deterministic subsample of the brain
            inside = inside[:: int(np.ceil(inside.size / self.max_samples))]
        for key in self.key_iterator(d):
            x = _zyx(torch.as_tensor(d[key]))
            flat = x.reshape(x.shape[0], -1).numpy()
            stats = []
            for c in range(x.shape[0]):
                lo, p = (float(v) for v in np.percentile(flat[c, inside], self.percentiles))
                stats.append([lo, lo + (p - lo) / self.upper_value])
            d[self.stats_key] = stats
        return d


class TumourVoxelsPerSliced(MapTransform):
    """Count tumour voxels (label > 0) per axial slice at the source resolution.

    Run after cropping and before resizing, so that a slice called healthy truly has no
    tumour voxel (nearest-neighbour downsampling can drop small lesions). Writes an int64
    array of length z under ``out_key``; zeros when there is no label map.
    """

    def __init__(self, seg_key: str = "seg", ref_key: str = "image", out_key: str = "tumour_voxels"):
        super().__init__([ref_key])
        self.seg_key, self.ref_key, self.out_key = seg_key, ref_key, out_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.seg_key in d:
            seg_zyx = _zyx(torch.as_tensor(d[self.seg_key]))[0].numpy()  # (z, y, x), contiguous
            d[self.out_key] = np.count_nonzero(seg_zyx.reshape(seg_zyx.shape[0], -1), axis=1).astype(np.int64)
        else:
            d[self.out_key] = np.zeros(int(d[self.ref_key].shape[-1]), dtype=np.int64)
        return d


def resize_matrix(n: int, before: int, square: int, size: int, mode: str) -> torch.Tensor:
    """(size, n) matrix resampling one in-plane axis of ``n`` pixels, placed at offset
    ``before`` in a zero-padded line of ``square`` pixels, to ``size`` pixels.

    ``mode="area"``: exact fractional-area averaging (anti-aliased shrinking);
    ``"linear"``: linear interpolation, half-pixel centres (torch ``align_corners=False``);
    ``"nearest"``: nearest neighbour, half-pixel centres (torch ``nearest-exact``).
    Padding is never materialised: its columns would only multiply zeros.
    """
    i = np.arange(size, dtype=np.float64)[:, None]
    j = np.arange(before, before + n, dtype=np.float64)[None, :]
    scale = square / size
    if mode == "area":
        overlap = np.minimum((i + 1) * scale, j + 1) - np.maximum(i * scale, j)
        w = np.clip(overlap, 0.0, None) / scale
    elif mode == "linear":
        src = np.clip((i + 0.5) * scale - 0.5, 0.0, square - 1)
        w = np.clip(1.0 - np.abs(src - j), 0.0, None)
    elif mode == "nearest":
        src = np.minimum(np.floor((i + 0.5) * scale), square - 1)
        w = (src == j).astype(np.float64)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return torch.from_numpy(w.astype(np.float32))


def _select(xt: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Apply one-hot (nearest) resize matrices (size, n) to (C, z, ny, nx) by indexing.

    Rows of the matrices that fall in the padding select nothing and give 0.
    """
    iy, ix = wy.argmax(dim=1), wx.argmax(dim=1)
    keep_y, keep_x = wy.sum(dim=1) > 0, wx.sum(dim=1) > 0
    out = xt[:, :, iy][:, :, :, ix]  # (C, z, size, size)
    return out * (keep_y[:, None] & keep_x[None, :]).to(out.dtype)


class SquareResized(MapTransform):
    """Pad in-plane (first two spatial axes) to a square, then resize in-plane to ``size``.

    The through-plane axis is untouched, so every axial slice of the crop survives.
    Padding is symmetric (``before = (s - n) // 2``, as MONAI's SpatialPad). ``modes``
    gives the interpolation per key: ``"image"`` (area when shrinking, bilinear when
    enlarging), ``"mask"`` (the same, then >= 0.5: a binary mask that follows the image's
    support), ``"fraction"`` (the same, float: fraction of each pixel inside the mask) or
    ``"nearest"`` (label maps). Records ``{"square": s, "pad": [[bx, ax], [by, ay]]}``
    under ``record_key``.

    Pad + resize run as two small matrix products per slice (:func:`resize_matrix`):
    several times faster on CPU than MONAI's SpatialPad + Resize (adaptive pooling) on
    a full BraTS crop, and exact in the area weights. Input (C, nx, ny, D) -> (C, size,
    size, D); MetaTensor metadata is kept, the affine is not updated (the geometry record
    of ``prepare`` describes the mapping).
    """

    def __init__(self, keys: KeysCollection, size: int, modes: Sequence[str], record_key: str = "square"):
        super().__init__(keys)
        self.size = int(size)
        self.modes = list(modes)
        self.record_key = record_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        nx, ny = (int(v) for v in d[keys[0]].shape[1:3])
        s = max(nx, ny)
        pad = [[(s - nx) // 2, s - nx - (s - nx) // 2], [(s - ny) // 2, s - ny - (s - ny) // 2]]
        for key, mode in zip(keys, self.modes):
            img = d[key]
            meta = img.meta if isinstance(img, MetaTensor) else None
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            dtype = x.dtype
            if mode in ("image", "mask", "fraction"):
                kind = "area" if s >= self.size else "linear"
            elif mode == "nearest":
                kind = "nearest"
            else:
                raise ValueError(f"unknown SquareResized mode {mode!r}")
            wx = resize_matrix(nx, pad[0][0], s, self.size, kind)
            wy = resize_matrix(ny, pad[1][0], s, self.size, kind)
            xt = x.permute(0, 3, 2, 1)  # (C, z, ny, nx)
            if mode == "nearest":  # pure selection: gather rows/columns, no arithmetic
                out = _select(xt, wy, wx)
            else:
                xt = xt.to(torch.float32).contiguous()  # free for x-fastest input
                out = torch.matmul(xt, wx.T)  # (C, z, ny, size): one large GEMM
                out = torch.matmul(wy, out)  # (C, z, size, size)
            out = out.permute(0, 3, 2, 1)  # (C, size, size, z)
            if mode == "mask":  # area-weighted majority: pixel >= half inside
                out = (out >= 0.5).to(dtype)
            d[key] = MetaTensor(out, meta=meta) if meta is not None else out
        d[self.record_key] = {"square": s, "pad": pad}
        return d


class NormaliseInBraind(MapTransform):
    """Map each modality's [lo, hi] to [0, 1] inside the brain, after in-plane resizing.

    With ``f`` the resized brain fraction (``SquareResized`` mode ``"fraction"``) and
    ``a = 1 / (hi - lo)``: ``image = clip(a * R(x) - a * lo * f, 0, 1) * (f >= 0.5)`` and
    ``brain = (f >= 0.5)``. Since the input is 0 outside the brain and resizing is linear,
    ``a * R(x) - a * lo * f = R((a * (x - lo)) * brain)``: exactly normalising inside the
    brain at source resolution and then resizing, except that the clip comes after the
    averaging — but it runs on the small resized stack instead of the full crop.
    """

    def __init__(self, keys: KeysCollection = "image", fraction_key: str = "brain", stats_key: str = "intensity"):
        super().__init__(keys)
        self.fraction_key, self.stats_key = fraction_key, stats_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        frac = d[self.fraction_key]
        meta = frac.meta if isinstance(frac, MetaTensor) else None
        f = frac.as_tensor() if meta is not None else torch.as_tensor(frac)
        mask = f >= 0.5
        for key in self.key_iterator(d):
            img = d[key]
            x = (img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)).to(torch.float32)
            out = torch.empty_like(x)
            for c, (lo, hi) in enumerate(d[self.stats_key]):
                a = 1.0 / (hi - lo) if hi > lo else 0.0
                torch.add(x[c] * a, f[0], alpha=-a * lo, out=out[c])
            out.clamp_(0.0, 1.0).mul_(mask)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        d[self.fraction_key] = MetaTensor(mask.to(torch.uint8), meta=meta) if meta is not None else mask.to(torch.uint8)
        return d


def ras_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (3, 2) taking the file's voxel axes to RAS."""
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )


def build_chain(
    *,
    has_seg: bool,
    size: int,
    image_reader: CheckedNiftiReader,
    seg_reader: CheckedNiftiReader | None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    upper_value: float = DEFAULT_UPPER_VALUE,
) -> Compose:
    """The per-subject MONAI chain (see the module docstring).

    Input dict: see :class:`LoadBrainCropd`. Output: ``image`` (C, size, size, z),
    ``brain`` and ``seg`` (1, size, size, z) over RAS (x, y, z) of the brain's box, plus
    ``intensity`` (C, 2), ``square``, ``tumour_voxels`` (z,), ``crop_start``/``crop_end``,
    ``source_affine``, ``source_shape``.
    """
    spatial = ["image", "brain"] + (["seg"] if has_seg else [])
    chain = [
        LoadBrainCropd(image_reader, seg_reader),
        Orientationd(keys=spatial, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        BrainPercentiles(keys="image", mask_key="brain", percentiles=percentiles, upper_value=upper_value),
        TumourVoxelsPerSliced(seg_key="seg", ref_key="image"),
        SquareResized(
            keys=spatial, size=size, modes=["image", "fraction"] + (["nearest"] if has_seg else [])
        ),
        NormaliseInBraind(keys="image", fraction_key="brain"),
    ]
    return Compose(chain, log_stats=False)


def run_chain(chain: Compose, data: dict) -> dict:
    """Apply ``chain``; an InputError raised inside a transform surfaces unwrapped.

    MONAI wraps every exception of a transform in ``RuntimeError("applying transform
    ...")``; expected input problems must reach the user as their one-line message.
    """
    try:
        return chain(data)
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, InputError):
                raise cause from None
            cause = cause.__cause__
        raise
