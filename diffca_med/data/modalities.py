"""Canonical modality names and how each supported layout spells them.

Inside the project the four structural MRI contrasts are always called by their
canonical names :data:`CANONICAL` (``t1``, ``t1c``, ``t2``, ``flair``). Each on-disk
layout (DESIGN §3, docs/architecture.md) names them differently; the plain dicts below
map canonical name -> the layout's spelling, and their inverses map back. Layout
discovery (``diffca_med.data.layouts``) and the phantom writer both use them, so a
file name is defined in exactly one place.

Label conventions of the tumour maps are kept here too (:data:`TUMOUR_LABELS`),
because they travel with the layout just like the file names.
"""

from __future__ import annotations

#: Canonical modality names, in the project's default channel order.
CANONICAL: tuple[str, ...] = ("t1", "t1c", "t2", "flair")

#: Human-readable description of each canonical modality.
DESCRIPTIONS: dict[str, str] = {
    "t1": "T1-weighted, native (pre-contrast)",
    "t1c": "T1-weighted after gadolinium contrast",
    "t2": "T2-weighted",
    "flair": "T2-FLAIR (fluid-attenuated inversion recovery)",
}

#: BraTS 2021: ``BraTS2021_XXXXX/BraTS2021_XXXXX_<suffix>.nii.gz`` (canonical -> suffix).
BRATS2021_SUFFIX: dict[str, str] = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}

#: BraTS 2023/2024: ``BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-<suffix>.nii.gz``
#: (canonical -> suffix; the same for the MEN/MET/PED/SSA prefixes).
BRATS2023_SUFFIX: dict[str, str] = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}

#: Suffix of the tumour label map in both BraTS layouts.
BRATS_SEG_SUFFIX: str = "seg"

#: MSD Task01_BrainTumour: canonical modality of each channel of the 4-D image, in order
#: (channel 0 FLAIR, 1 T1w, 2 T1gd, 3 T2w).
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1c", "t2")

#: MSD ``dataset.json`` "modality" entries as the real Task01 writes them
#: (channel index as a string -> name).
MSD_MODALITY_JSON: dict[str, str] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}

#: MSD modality name (as found in a ``dataset.json``, compared case-insensitively)
#: -> canonical name. Includes spellings seen in the wild.
MSD_ALIASES: dict[str, str] = {
    "flair": "flair",
    "t2-flair": "flair",
    "t1w": "t1",
    "t1": "t1",
    "t1gd": "t1c",
    "t1ce": "t1c",
    "t1c": "t1c",
    "t2w": "t2",
    "t2": "t2",
}

#: BIDS anat suffix of each canonical modality; ``t1c`` is a ``T1w`` with a ``ce-``
#: entity (``sub-01_ce-gadolinium_T1w.nii.gz``), see :data:`BIDS_CE_ENTITY`.
BIDS_SUFFIX: dict[str, str] = {"t1": "T1w", "t1c": "T1w", "t2": "T2w", "flair": "FLAIR"}

#: Value of the ``ce-`` entity the phantom writes for ``t1c`` (any value marks contrast
#: enhancement; discovery should accept any ``ce-<agent>`` on a ``T1w``).
BIDS_CE_ENTITY: str = "gadolinium"

#: Suffix of the BIDS-derivative tumour label map (``..._dseg.nii.gz``).
BIDS_SEG_SUFFIX: str = "dseg"

#: Canonical name -> the layout's spelling, per layout (MSD: channel name in dataset.json).
LAYOUT_NAMES: dict[str, dict[str, str]] = {
    "brats2021": BRATS2021_SUFFIX,
    "brats2023": BRATS2023_SUFFIX,
    "msd": {MSD_CHANNELS[int(k)]: v for k, v in MSD_MODALITY_JSON.items()},
    "bids": BIDS_SUFFIX,
}

#: Layout spelling -> canonical name, for the layouts whose spelling is unambiguous
#: (BIDS needs the ``ce-`` entity to tell ``t1`` from ``t1c``).
FROM_LAYOUT: dict[str, dict[str, str]] = {
    "brats2021": {v: k for k, v in BRATS2021_SUFFIX.items()},
    "brats2023": {v: k for k, v in BRATS2023_SUFFIX.items()},
    "msd": dict(MSD_ALIASES),
}

#: Tumour sub-region -> label value, per layout. Sub-regions: ``NCR`` necrotic /
#: non-enhancing tumour core, ``ED`` peritumoural oedema, ``ET`` enhancing tumour.
#: BraTS 2024 adds 4 = resection cavity (RC) to the 2023 values. MSD Task01 calls its
#: label 2 "non-enhancing tumor", which we treat as the NCR sub-region. BIDS has no
#: convention of its own: the phantom writes the BraTS 2023 values in ``_dseg`` maps.
TUMOUR_LABELS: dict[str, dict[str, int]] = {
    "brats2021": {"NCR": 1, "ED": 2, "ET": 4},
    "brats2023": {"NCR": 1, "ED": 2, "ET": 3},
    "msd": {"ED": 1, "NCR": 2, "ET": 3},
    "bids": {"NCR": 1, "ED": 2, "ET": 3},
}

#: Label values legal in each layout's label maps (0 = background). BraTS 2023 also
#: admits 4 (the 2024 resection cavity); BIDS follows BraTS 2023.
ALLOWED_LABELS: dict[str, frozenset[int]] = {
    "brats2021": frozenset({0, 1, 2, 4}),
    "brats2023": frozenset({0, 1, 2, 3, 4}),
    "msd": frozenset({0, 1, 2, 3}),
    "bids": frozenset({0, 1, 2, 3, 4}),
}

#: MSD ``dataset.json`` "labels" entries as the real Task01 writes them.
MSD_LABELS_JSON: dict[str, str] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}

#: The layouts the project reads and the phantom writes.
LAYOUTS: tuple[str, ...] = ("brats2023", "brats2021", "msd", "bids")
