"""Subject-level train/val/test splits, seeded and stratified by tumour presence.

Slices of one brain are not independent, so a subject's slices always share one split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffca_med.errors import ConfigError

SPLITS = ("train", "val", "test")


def split_subjects(
    subjects: Sequence[str],
    has_tumour: Sequence[bool],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, str]:
    """Assign each subject to ``train``/``val``/``test``.

    Within each stratum (with / without tumour) the subjects are shuffled with ``seed``
    and ``round(n * fraction)`` go to test, then val; the rest train. Training keeps at
    least one subject of every stratum that has two or more. Same inputs and seed give
    the same split, independent of the input order.

    Returns:
        subject id -> split name.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
            "and sum to less than 1"
        )
    if len(subjects) != len(has_tumour):
        raise ValueError("subjects and has_tumour differ in length")
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for flag in (True, False):
        group = sorted(s for s, t in zip(subjects, has_tumour) if bool(t) == flag)
        order = [group[i] for i in rng.permutation(len(group))]
        n = len(order)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 2 and n_test + n_val >= n:  # keep one for training
            excess = n_test + n_val - (n - 1)
            take = min(excess, n_val)
            n_val -= take
            n_test -= excess - take
        for i, s in enumerate(order):
            out[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out
