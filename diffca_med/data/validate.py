"""Header and voxel checks for input NIfTI files, with one-line errors naming the file.

Two stages, so that every file is decoded exactly once:

* :func:`check_subject_headers` runs in the main process before any work starts. It
  reads only the NIfTI headers (a few hundred bytes each) and catches missing files,
  non-NIfTI files, wrong dimensionality (2-D, 5-D) and modalities of one subject whose
  shapes or affines disagree.
* :func:`decode_image` and :func:`check_labels` run inside the worker that processes the
  subject, on the one decode of each file: truncated/corrupt compressed streams,
  NaN/inf voxels and label values outside the layout's convention.

Every problem raises :class:`diffca_med.errors.InputError` whose message starts with the
file's path (relative to the data root where possible).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from diffca_med.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from diffca_med.data.layouts import SubjectFiles

#: Largest allowed difference between the affines of one subject's files (mm).
AFFINE_TOLERANCE_MM = 1e-3

#: Exceptions nibabel, gzip and zlib raise on unreadable or truncated files.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,  # includes gzip.BadGzipFile
    zlib.error,
    ValueError,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    gzip.BadGzipFile,
)


def display_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` when it lies inside it, else as given."""
    path = Path(path)
    if root is not None:
        try:
            return str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


def load_header(path: Path, root: Path | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file without decoding its voxels (header only).

    Raises InputError for a missing file or one nibabel cannot parse as NIfTI.
    """
    name = display_path(path, root)
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    try:
        img = nib.load(str(path))
    except DECODE_ERRORS as err:
        raise InputError(f"{name}: not a readable NIfTI file ({_reason(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{name}: not a NIfTI file ({type(img).__name__})")
    return img


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    kind = type(err).__name__
    return f"{kind}: {text}" if text else kind


def check_subject_headers(subject: "SubjectFiles", root: Path | None = None) -> dict:
    """Check dimensionality, shape and affine agreement of one subject's files.

    Reads headers only. Returns ``{"shape": (X, Y, Z), "affine": (4, 4) float64}`` of the
    subject's grid. 3-D files must be 3-D; a file referenced with a channel (MSD) must be
    4-D with that channel present. The label map must be 3-D on the same grid.
    """
    ref_shape = ref_affine = None
    ref_name = None
    files: list[tuple[Path, int | None, bool]] = [
        (r.path, r.channel, False) for r in subject.images.values()
    ]
    if subject.seg is not None:
        files.append((subject.seg, None, True))
    seen: set[tuple[Path, int | None]] = set()
    for path, channel, is_seg in files:
        if (path, channel) in seen:
            continue
        seen.add((path, channel))
        name = display_path(path, root)
        img = load_header(path, root)
        shape = tuple(int(s) for s in img.shape)
        if channel is None:
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]  # a trailing singleton axis is harmless
            if len(shape) != 3:
                raise InputError(
                    f"{name}: expected a 3-D volume, found a {len(shape)}-D image of shape {shape}"
                )
        else:
            if len(shape) != 4:
                raise InputError(
                    f"{name}: expected a 4-D multi-channel volume, found a {len(shape)}-D image "
                    f"of shape {shape}"
                )
            if channel >= shape[3]:
                raise InputError(
                    f"{name}: channel {channel} requested but the file has {shape[3]} channels"
                )
            shape = shape[:3]
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(f"{name}: invalid (singular or non-finite) affine in the header")
        if ref_shape is None:
            ref_shape, ref_affine, ref_name = shape, affine, name
            continue
        if shape != ref_shape:
            raise InputError(
                f"{name}: shape {shape} differs from {ref_name} {ref_shape} of the same subject"
            )
        diff = float(np.max(np.abs(affine - ref_affine)))
        if diff > AFFINE_TOLERANCE_MM:
            raise InputError(
                f"{name}: affine differs from {ref_name} of the same subject by up to "
                f"{diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)"
            )
    assert ref_shape is not None and ref_affine is not None
    return {"shape": ref_shape, "affine": ref_affine}


def decode_image(
    img: nib.Nifti1Image,
    name: str,
    *,
    as_float: bool = True,
    zero_nonfinite: bool = False,
    warnings: list[str] | None = None,
) -> np.ndarray:
    """Decode the voxels of ``img`` once, turning decode failures into InputError.

    ``.nii.gz`` files are decompressed in one go with ISA-L when the ``isal`` package is
    installed (:mod:`diffca_med.data.niftigz`), else streamed by nibabel.

    Args:
        img: an opened (header-only) nibabel image.
        name: file name used in messages.
        as_float: return float32 (scaled) data; otherwise the stored dtype, unscaled.
        zero_nonfinite: replace NaN/inf by 0 (and append a warning) instead of failing.
        warnings: list that collects warning lines.

    Returns:
        The voxel array (possibly a read-only view), float32 when ``as_float`` (no float64
        intermediate).
    """
    from diffca_med.data import niftigz

    filename = img.get_filename()
    try:
        if niftigz.available() and filename is not None and str(filename).endswith(".gz"):
            header, raw = niftigz.decode_gz(filename)
            data = niftigz.scaled_float32(header, raw) if as_float else raw
        elif as_float:
            data = img.get_fdata(dtype=np.float32, caching="unchanged")
        else:
            data = np.asarray(img.dataobj)
    except DECODE_ERRORS as err:
        raise InputError(f"{name}: truncated or corrupt image data ({_reason(err)})") from None
    return check_finite(data, name, zero_nonfinite=zero_nonfinite, warnings=warnings)


def check_finite(
    data: np.ndarray, name: str, *, zero_nonfinite: bool = False, warnings: list[str] | None = None
) -> np.ndarray:
    """Fail on NaN/inf voxels (naming the file and the count), or zero them with a warning."""
    # a float sum is finite iff every voxel is (barring overflow, which then takes the
    # exact path): one cheap reduction instead of a full boolean mask per file
    if data.dtype.kind == "f" and not np.isfinite(data.sum()):
        finite = np.isfinite(data)
        if not finite.all():
            count = int(data.size - np.count_nonzero(finite))
            if not zero_nonfinite:
                raise InputError(
                    f"{name}: {count} NaN/inf voxel(s); pass --zero-nonfinite to set them to 0"
                )
            data = np.where(finite, data, data.dtype.type(0))
            if warnings is not None:
                warnings.append(f"{name}: set {count} NaN/inf voxel(s) to 0")
    return data


def check_labels(seg: np.ndarray, allowed: frozenset[int], name: str) -> np.ndarray:
    """Check a decoded label map against the layout's label values; return it as uint8.

    Args:
        seg: label map of any numeric dtype, shape (X, Y, Z).
        allowed: legal label values (0 = background included).
        name: file name used in messages.

    Raises:
        InputError: non-integer values, or values outside ``allowed``.
    """
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)):
            raise InputError(f"{name}: label map contains NaN/inf values")
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            raise InputError(f"{name}: label map contains non-integer values")
        seg = rounded
    if seg.dtype != np.uint8:
        lo, hi = seg.min(), seg.max()
        if lo < 0 or hi > 255:
            bad = sorted({int(v) for v in (lo, hi) if v < 0 or v > 255})
            raise InputError(
                f"{name}: label values {bad} outside this layout's convention {sorted(allowed)}"
            )
    seg8 = seg.astype(np.uint8, copy=False)
    illegal = np.ones(256, dtype=bool)
    illegal[[v for v in allowed if 0 <= v < 256]] = False
    # a 256-entry lookup: one pass, no int64 temporaries (bincount would need 8 bytes/voxel)
    hits = illegal[seg8]
    if hits.any():
        bad = [int(v) for v in np.unique(seg8[hits])]
        raise InputError(
            f"{name}: label values {bad} outside this layout's convention {sorted(allowed)}"
        )
    return seg8
