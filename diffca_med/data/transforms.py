"""The MONAI dictionary-transform chain of ``prepare``.

One subject goes through::

    LoadImaged (CheckedNiftiReader: decode once, validate)   image (X, Y, Z[, 4]), seg (X, Y, Z)
    EnsureChannelFirstd                                      image (C0, X, Y, Z), seg (1, X, Y, Z)
    SelectChannelsd        requested modalities, in order    image (C, X, Y, Z)
    BrainMaskd             brain = nonzero in any modality   brain (1, X, Y, Z)
    Orientationd RAS                                         (., R, A, S)
    CropForegroundd        bounding box of the brain         (., x, y, z)
    BrainPercentileNormalised  per modality, inside brain    image in [0, 1], 0 outside brain
    TumourVoxelsPerSliced  tumour voxels per axial slice (source resolution)
    SquareResized          pad in-plane to a square s x s, resize to size x size
                                                             image (C, size, size, z)
    MaskOutsided           image = 0 outside the resized brain mask

Images are resized with area averaging when shrinking (cheap anti-aliasing) and
bilinearly when enlarging; the brain mask the same way then thresholded at 0.5; the
label map with nearest neighbour. Every
geometric step is recorded (:func:`subject_geometry`) so that
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
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resize,
    SpatialPad,
)

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


class BrainMaskd(MapTransform):
    """Brain mask = voxels that are nonzero in any modality (skull-stripped input).

    Writes ``mask_key``: uint8 (1, X, Y, Z) with the image's affine/meta.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "brain", name_key: str = "name"):
        super().__init__([image_key])
        self.image_key, self.mask_key, self.name_key = image_key, mask_key, name_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        img = d[self.image_key]
        mask = (img != 0).any(dim=0, keepdim=True).to(torch.uint8)
        if not bool(mask.any()):
            raise InputError(f"{d.get(self.name_key, 'subject')}: images are all zero (no brain voxels)")
        d[self.mask_key] = mask
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


class SquareResized(MapTransform):
    """Pad in-plane (first two spatial axes) to a square, then resize in-plane to ``size``.

    The through-plane axis is untouched, so every axial slice of the crop survives.
    Padding is symmetric (``before = (s - n) // 2``, as MONAI's SpatialPad). ``modes``
    gives the interpolation per key: ``"image"`` (area when shrinking, bilinear when
    enlarging), ``"mask"`` (the same, then >= 0.5: a binary mask that follows the image's
    support) or ``"nearest"`` (label maps). Records ``{"square": s, "pad": [[bx, ax], [by, ay]]}``
    under ``record_key``.
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
        padder = SpatialPad(spatial_size=(s, s, -1), method="symmetric", mode="constant")
        for key, mode in zip(keys, self.modes):
            img = padder(d[key]) if s != nx or s != ny else d[key]
            if s != self.size:
                if mode in ("image", "mask"):
                    interp = "area" if s >= self.size else "trilinear"
                else:
                    interp = "nearest"
                resize = Resize(spatial_size=(self.size, self.size, -1), mode=interp)
                dtype = img.dtype
                img = resize(img.float() if dtype != torch.float32 else img)
                if mode == "mask":  # area-weighted majority: pixel >= half inside
                    img = (img >= 0.5).to(dtype)
                elif mode == "nearest":
                    img = img.round().to(dtype)
            d[key] = img
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
    channel_indices: Sequence[int],
    has_seg: bool,
    size: int,
    image_reader: CheckedNiftiReader,
    seg_reader: CheckedNiftiReader | None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> Compose:
    """The per-subject MONAI chain (see the module docstring).

    Input dict: ``{"image": path or [paths], "seg": path (optional), "name": str}``.
    Output adds ``brain``, ``intensity`` (C, 2), ``square`` and crop coordinates
    ``foreground_start_coord`` / ``foreground_end_coord`` (RAS voxel indices).
    """
    spatial = ["image", "brain"] + (["seg"] if has_seg else [])
    chain = [LoadImaged(keys="image", reader=image_reader, image_only=True, dtype=np.float32)]
    if has_seg:
        assert seg_reader is not None
        chain.append(LoadImaged(keys="seg", reader=seg_reader, image_only=True, dtype=np.uint8))
    chain += [
        EnsureChannelFirstd(keys=["image"] + (["seg"] if has_seg else [])),
        SelectChannelsd(keys="image", indices=channel_indices),
        BrainMaskd(image_key="image", mask_key="brain"),
        Orientationd(keys=spatial, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        CropForegroundd(keys=spatial, source_key="brain", margin=0, allow_smaller=True),
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
