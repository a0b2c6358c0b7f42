"""Find subjects and their files in BraTS 2021, BraTS 2023/2024, MSD Task01 and BIDS folders.

:func:`discover` is the single entry point; it returns one :class:`SubjectFiles` per
subject, sorted by subject id, with images keyed by canonical modality (``t1``, ``t1c``,
``t2``, ``flair``) in the requested order. File-name spellings come from
:mod:`diffca_med.data.modalities`; nothing here decodes voxels.

Layouts (DESIGN §3):

* ``brats2021``: ``<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``
* ``brats2023``: ``<root>/BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f,seg}.nii.gz``
  (any prefix: GLI, MEN, MET, PED, SSA, ...)
* ``msd``: ``<root>/dataset.json`` + 4-D ``imagesTr/*.nii.gz`` + ``labelsTr/*.nii.gz``;
  channel order and label values are read from ``dataset.json``.
* ``bids``: ``sub-<l>/[ses-<s>/]anat/sub-<l>[_ses-<s>][_ce-<agent>]_{T1w,T2w,FLAIR}.nii.gz``
  read with pybids; label maps ``derivatives/<pipeline>/sub-<l>/.../*_dseg.nii.gz``
  (``derivatives/phantom-truth``, the phantom's ground truth, is ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffca_med.data import modalities as M
from diffca_med.errors import ConfigError, InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Derivatives pipelines never read as label maps (the phantom's ground-truth twins).
IGNORED_DERIVATIVES = frozenset({"phantom-truth"})


@dataclass(frozen=True)
class ImageRef:
    """One modality's file; ``channel`` indexes the 4th axis of a 4-D file (MSD)."""

    path: Path
    channel: int | None = None


@dataclass(frozen=True)
class SubjectFiles:
    """All files of one subject, keyed by canonical modality in channel order."""

    subject: str
    images: dict[str, ImageRef]
    seg: Path | None
    allowed_labels: frozenset[int]
    layout: str
    missing: tuple[str, ...] = field(default=(), compare=False)

    def files(self) -> list[Path]:
        """Unique files of this subject (images first, then the label map)."""
        out: list[Path] = []
        for ref in self.images.values():
            if ref.path not in out:
                out.append(ref.path)
        if self.seg is not None:
            out.append(self.seg)
        return out


def parse_modalities(modalities: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a ``--modalities`` value (``"t1c,flair"`` or a list) to canonical names."""
    if modalities is None:
        return M.CANONICAL
    if isinstance(modalities, str):
        modalities = [m for m in modalities.split(",")]
    names = tuple(m.strip().lower() for m in modalities if m.strip())
    if not names:
        raise ConfigError("--modalities: no modality given")
    unknown = [m for m in names if m not in M.CANONICAL]
    if unknown:
        raise ConfigError(
            f"--modalities: unknown modality {', '.join(unknown)} (choose from {', '.join(M.CANONICAL)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--modalities: modality listed twice in {','.join(names)}")
    return names


def _strip_nifti(name: str) -> str | None:
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _strip_nifti(p.name) is not None)


def _subject_dirs(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "derivatives"
    )


def _brats_suffix_map(layout: str) -> dict[str, str]:
    return M.BRATS2021_SUFFIX if layout == "brats2021" else M.BRATS2023_SUFFIX


def _brats_sep(layout: str) -> str:
    return "_" if layout == "brats2021" else "-"


def _looks_brats(root: Path, layout: str) -> bool:
    suffixes = set(_brats_suffix_map(layout).values())
    sep = _brats_sep(layout)
    for sub in _subject_dirs(root)[:20]:
        for f in _nifti_files(sub):
            stem = _strip_nifti(f.name) or ""
            if stem.startswith(sub.name + sep) and stem[len(sub.name) + 1 :] in suffixes - {"t1c"}:
                return True
            if layout == "brats2023" and stem == f"{sub.name}-t1c":
                # t1c alone is shared by no BraTS 2021 name, so it identifies 2023 too
                return True
    return False


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from its files (see the module docstring)."""
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if (root / "dataset_description.json").is_file() or any(
        p.is_dir() and p.name.startswith("sub-") for p in root.iterdir()
    ):
        return "bids"
    if _looks_brats(root, "brats2023"):
        return "brats2023"
    if _looks_brats(root, "brats2021"):
        return "brats2021"
    raise InputError(
        f"{root}: cannot tell the layout (no BraTS 2021/2023 subject folders, no MSD "
        "dataset.json + imagesTr, no BIDS sub-* folders); pass --layout"
    )


def _discover_brats(root: Path, layout: str, mods: tuple[str, ...]) -> list[SubjectFiles]:
    suffix = _brats_suffix_map(layout)
    sep = _brats_sep(layout)
    pattern = (
        re.compile(r"^BraTS2021_\w+$") if layout == "brats2021" else re.compile(r"^BraTS-[A-Za-z]+-[\w-]+$")
    )
    subjects = []
    for sub in _subject_dirs(root):
        if not pattern.match(sub.name):
            continue
        files = {(_strip_nifti(f.name) or ""): f for f in _nifti_files(sub)}
        images, missing = {}, []
        for mod in mods:
            f = files.get(f"{sub.name}{sep}{suffix[mod]}")
            if f is None:
                missing.append(mod)
            else:
                images[mod] = ImageRef(f)
        seg = files.get(f"{sub.name}{sep}{M.BRATS_SEG_SUFFIX}")
        subjects.append(
            SubjectFiles(sub.name, images, seg, M.ALLOWED_LABELS[layout], layout, tuple(missing))
        )
    return subjects


def _discover_msd(root: Path, mods: tuple[str, ...]) -> list[SubjectFiles]:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: MSD dataset.json not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{meta_path}: not valid JSON ({err})") from None
    modality = meta.get("modality") or meta.get("channel_names")
    if not isinstance(modality, dict) or not modality:
        raise InputError(f"{meta_path}: no 'modality' table")
    channel_of: dict[str, int] = {}
    for idx, name in modality.items():
        canon = M.MSD_ALIASES.get(str(name).strip().lower())
        if canon is None:
            raise InputError(f"{meta_path}: unknown modality name {name!r} for channel {idx}")
        channel_of[canon] = int(idx)
    labels = meta.get("labels")
    try:
        allowed = frozenset(int(k) for k in labels) if isinstance(labels, dict) else M.ALLOWED_LABELS["msd"]
    except ValueError:
        raise InputError(f"{meta_path}: 'labels' keys must be integers") from None
    entries = meta.get("training")
    if isinstance(entries, list) and entries:
        pairs = []
        for e in entries:
            img = root / str(e.get("image", "")).lstrip("./") if isinstance(e, dict) else None
            lab = e.get("label") if isinstance(e, dict) else None
            if img is None:
                raise InputError(f"{meta_path}: malformed 'training' entry {e!r}")
            pairs.append((img, root / str(lab).lstrip("./") if lab else None))
    else:
        img_dir = root / "imagesTr"
        pairs = [(f, root / "labelsTr" / f.name) for f in _nifti_files(img_dir) if not f.name.startswith("._")]
    subjects = []
    for img, lab in pairs:
        sid = _strip_nifti(img.name) or img.name
        images, missing = {}, []
        for mod in mods:
            if mod in channel_of:
                images[mod] = ImageRef(img, channel_of[mod])
            else:
                missing.append(mod)
        seg = lab if lab is not None and lab.exists() else None
        if lab is not None and seg is None and (root / "labelsTr").is_dir():
            raise InputError(f"{lab}: label map listed in dataset.json not found")
        subjects.append(SubjectFiles(sid, images, seg, allowed, "msd", tuple(missing)))
    return subjects


def _bids_label_maps(root: Path) -> dict[str, Path]:
    """Subject (+ session) key -> ``*_dseg`` label map in derivatives/ (first pipeline wins)."""
    out: dict[str, Path] = {}
    deriv = root / "derivatives"
    if not deriv.is_dir():
        return out
    for pipeline in sorted(p for p in deriv.iterdir() if p.is_dir()):
        if pipeline.name in IGNORED_DERIVATIVES:
            continue
        for f in sorted(pipeline.glob(f"sub-*/**/*_{M.BIDS_SEG_SUFFIX}.nii*")):
            ents = dict(
                part.split("-", 1) for part in f.name.split("_") if "-" in part and not part.endswith(".nii.gz")
            )
            key = f"sub-{ents.get('sub')}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
            out.setdefault(key, f)
    return out


def _discover_bids(root: Path, mods: tuple[str, ...]) -> list[SubjectFiles]:
    import warnings

    from bids import BIDSLayout

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            layout = BIDSLayout(str(root), validate=False, derivatives=False)
        except Exception as err:  # pybids raises its own BIDS*Error types and ValueError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{root}: pybids cannot read this BIDS folder ({first})") from None
        files = layout.get(datatype="anat", extension=[".nii.gz", ".nii"], return_type="object")
    by_key: dict[str, dict[str, Path]] = {}
    for f in files:
        ents = f.get_entities()
        suffix = ents.get("suffix")
        key = f"sub-{ents['subject']}" + (f"_ses-{ents['session']}" if "session" in ents else "")
        if suffix == "T1w":
            mod = "t1c" if "ceagent" in ents else "t1"
        else:
            mod = {v: k for k, v in M.BIDS_SUFFIX.items() if k != "t1c"}.get(suffix)
        if mod is None:
            continue
        by_key.setdefault(key, {}).setdefault(mod, Path(f.path))
    segs = _bids_label_maps(root)
    subjects = []
    for key in sorted(by_key):
        found = by_key[key]
        images = {m: ImageRef(found[m]) for m in mods if m in found}
        missing = tuple(m for m in mods if m not in found)
        subjects.append(SubjectFiles(key, images, segs.get(key), M.ALLOWED_LABELS["bids"], "bids", missing))
    return subjects


def discover(
    root: str | Path,
    layout: str | None = None,
    modalities: str | Sequence[str] | None = None,
    *,
    skip_incomplete: bool = False,
    skipped: list[str] | None = None,
) -> list[SubjectFiles]:
    """Find all subjects under ``root``.

    Args:
        root: data folder.
        layout: ``brats2021`` | ``brats2023`` | ``msd`` | ``bids``; detected when None.
        modalities: canonical modalities to collect, in channel order (default all four:
            t1, t1c, t2, flair); a comma-separated string is accepted.
        skip_incomplete: drop subjects lacking a requested modality (their ids are
            appended to ``skipped``) instead of raising InputError.

    Returns:
        ``list[SubjectFiles]`` sorted by subject id.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise InputError(f"{root}: folder is empty")
    mods = parse_modalities(modalities)
    if layout is None:
        layout = detect_layout(root)
    elif layout not in M.LAYOUTS:
        raise ConfigError(f"--layout: unknown layout {layout!r} (choose from {', '.join(M.LAYOUTS)})")
    if layout in ("brats2021", "brats2023"):
        subjects = _discover_brats(root, layout, mods)
    elif layout == "msd":
        subjects = _discover_msd(root, mods)
    else:
        subjects = _discover_bids(root, mods)
    if not subjects:
        raise InputError(f"{root}: no {layout} subjects found")
    complete = []
    for s in sorted(subjects, key=lambda s: s.subject):
        if s.missing:
            if not skip_incomplete:
                where = _subject_location(root, s)
                raise InputError(
                    f"{where}: missing modality {', '.join(s.missing)} "
                    f"(expected {_expected_name(s, s.missing[0])}); pass --skip-incomplete to skip such subjects"
                )
            if skipped is not None:
                skipped.append(f"{s.subject} (no {', '.join(s.missing)})")
            continue
        complete.append(s)
    if not complete:
        raise InputError(f"{root}: every subject lacks a requested modality ({', '.join(mods)})")
    return complete


def _subject_location(root: Path, s: SubjectFiles) -> str:
    if s.layout in ("brats2021", "brats2023"):
        return str(root / s.subject)
    if s.images:
        return str(next(iter(s.images.values())).path)
    return f"{root} ({s.subject})"


def _expected_name(s: SubjectFiles, mod: str) -> str:
    if s.layout in ("brats2021", "brats2023"):
        return f"{s.subject}{_brats_sep(s.layout)}{_brats_suffix_map(s.layout)[mod]}.nii.gz"
    if s.layout == "msd":
        return f"a '{M.LAYOUT_NAMES['msd'][mod]}' channel in dataset.json"
    ce = f"_ce-<agent>" if mod == "t1c" else ""
    return f"{s.subject}{ce}_{M.BIDS_SUFFIX[mod]}.nii.gz"
