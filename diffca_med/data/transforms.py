"""The MONAI dictionary-transform chain of ``prepare``.

One subject goes through::

    LoadBrainCropd         decode each file once (CheckedNiftiReader: float32, validated),
                           channels in requested order, brain = nonzero in any modality,
                           crop all to the brain's bounding box   image (C, x, y, z), brain/seg (1, x, y, z)
    Orientationd RAS       (on the small box: cheap flips)        (., r, a, s)
    BrainPercentileNormalised  per modality, inside brain    image in [0, 1], 0 outside brain
    TumourVoxelsPerSliced  tumour voxels per axial slice (source resolution)
    SquareResized          pad in-plane to a square s x s, resize to size x size
                                                             image (C, size, size, z)
    MaskOutsided           image = 0 outside the resized brain mask

Images are resized with area averaging when shrinking (cheap anti-aliasing) and
bilinearly when enlarging; the brain mask the same way then thresholded at 0.5; the
label map with nearest neighbour. Every geometric step is recorded by the caller
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

#: Default intensity percentiles (inside the brain) mapped to 0 and 1.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)


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
        brain = volumes[0] != 0
        for vol in volumes[1:]:
            brain |= vol != 0
        nonzero = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if any(idx.size == 0 for idx in nonzero):
            raise InputError(f"{d.get('name', 'subject')}: images are all zero (no brain voxels)")
        start = [int(idx[0]) for idx in nonzero]
        end = [int(idx[-1]) + 1 for idx in nonzero]
        box = tuple(slice(a, b) for a, b in zip(start, end))
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
        meta = {"affine": torch.as_tensor(shifted), "original_affine": affine, "space": "RAS"}
        image = np.stack([vol[box] for vol in volumes])  # (C, x, y, z), only the box copied
        d["image"] = MetaTensor(torch.from_numpy(image), meta=dict(meta))
        d["brain"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(brain[box], dtype=np.uint8)[None]), meta=dict(meta))
        if d.get("seg") is not None:
            assert self.seg_reader is not None
            seg, _ = self._decode(self.seg_reader, d["seg"])
            d["seg"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(seg[box])[None]), meta=dict(meta))
        d["crop_start"], d["crop_end"] = start, end
        d["source_affine"], d["source_shape"] = affine, [int(v) for v in brain.shape]
        del d["files"], d["channels"]
        return d


class BrainPercentileNormalised(MapTransform):
    """Per-modality percentile normalisation computed inside the brain only.

    For each channel c: ``lo, hi = percentile(image[c][brain], (lower, upper))`` and
    ``image[c] = clip((image[c] - lo) / (hi - lo), 0, 1)``, then 0 outside the brain.
    MONAI's ScaleIntensityRangePercentilesd takes percentiles over the whole volume
    (mostly background), which is why this transform exists. The (lo, hi) pairs, in the
    image's intensity units, go to ``stats_key`` as a (C, 2) list.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "brain",
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        stats_key: str = "intensity",
    ):
        super().__init__(keys)
        self.mask_key, self.percentiles, self.stats_key = mask_key, percentiles, stats_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        brain = np.asarray(d[self.mask_key][0]).astype(bool)
        for key in self.key_iterator(d):
            img = d[key]
            arr = np.array(img.detach().cpu().numpy(), dtype=np.float32, copy=True)
            stats = []
            for c in range(arr.shape[0]):
                vals = arr[c][brain]
                lo, hi = (float(v) for v in np.percentile(vals, self.percentiles))
                scale = 1.0 / (hi - lo) if hi > lo else 0.0
                chan = arr[c]
                chan -= lo
                chan *= scale
                np.clip(chan, 0.0, 1.0, out=chan)
                chan[~brain] = 0.0
                stats.append([lo, hi])
            d[key] = MetaTensor(torch.from_numpy(arr), meta=img.meta) if isinstance(img, MetaTensor) else torch.from_numpy(arr)
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
            seg = torch.as_tensor(d[self.seg_key])[0]
            d[self.out_key] = (seg > 0).sum(dim=(0, 1)).numpy().astype(np.int64)
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


class SquareResized(MapTransform):
    """Pad in-plane (first two spatial axes) to a square, then resize in-plane to ``size``.

    The through-plane axis is untouched, so every axial slice of the crop survives.
    Padding is symmetric (``before = (s - n) // 2``, as MONAI's SpatialPad). ``modes``
    gives the interpolation per key: ``"image"`` (area when shrinking, bilinear when
    enlarging), ``"mask"`` (the same, then >= 0.5: a binary mask that follows the image's
    support) or ``"nearest"`` (label maps). Records ``{"square": s, "pad": [[bx, ax], [by, ay]]}``
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
            if mode in ("image", "mask"):
                kind = "area" if s >= self.size else "linear"
            elif mode == "nearest":
                kind = "nearest"
            else:
                raise ValueError(f"unknown SquareResized mode {mode!r}")
            wx = resize_matrix(nx, pad[0][0], s, self.size, kind)
            wy = resize_matrix(ny, pad[1][0], s, self.size, kind)
            planes = x.permute(0, 3, 1, 2).to(torch.float32)  # (C, D, nx, ny)
            out = torch.matmul(torch.matmul(wx, planes), wy.T)  # (C, D, size, size)
            out = out.permute(0, 2, 3, 1)  # (C, size, size, D)
            if mode == "mask":  # area-weighted majority: pixel >= half inside
                out = (out >= 0.5).to(dtype)
            elif mode == "nearest":
                out = out.round().to(dtype)
            out = out.contiguous()
            d[key] = MetaTensor(out, meta=meta) if meta is not None else out
        d[self.record_key] = {"square": s, "pad": pad}
        return d


class MaskOutsided(MapTransform):
    """Zero the image outside the (resized) brain mask, so mask and image agree exactly."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "brain"):
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask = d[self.mask_key].to(torch.bool)
        for key in self.key_iterator(d):
            d[key] = d[key] * mask
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
        BrainPercentileNormalised(keys="image", mask_key="brain", percentiles=percentiles),
        TumourVoxelsPerSliced(seg_key="seg", ref_key="image"),
        SquareResized(
            keys=spatial, size=size, modes=["image", "mask"] + (["nearest"] if has_seg else [])
        ),
        MaskOutsided(keys="image", mask_key="brain"),
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
