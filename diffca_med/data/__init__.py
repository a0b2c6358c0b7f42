"""Data room: layouts, validation, MONAI transforms, the slice store and the phantom.

Public API (imported lazily so that ``import diffca_med.data`` stays cheap)::

    from diffca_med.data import SliceStore, SliceDataset, balanced_sampler, discover, make_cohort
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SliceStore": "diffca_med.data.store",
    "SliceDataset": "diffca_med.data.store",
    "balanced_sampler": "diffca_med.data.store",
    "slices_to_volume": "diffca_med.data.store",
    "discover": "diffca_med.data.layouts",
    "SubjectFiles": "diffca_med.data.layouts",
    "ImageRef": "diffca_med.data.layouts",
    "split_subjects": "diffca_med.data.splits",
    "make_cohort": "diffca_med.data.phantom",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffca_med.data' has no attribute {name!r}")
