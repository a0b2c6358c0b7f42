"""Load a ``.safetensors`` weights file into a module, with one-line errors.

One loader for model folders (:meth:`DiffCAModel.from_pretrained`), training
checkpoints and saved baselines: every tensor of the module must be in the file and
every tensor of the file must fit the module, except the top-level children named in
``skip`` (parts that keep their fresh initialisation, e.g. a new stage 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

from diffca_med.errors import InputError


def load_weights(module: torch.nn.Module, path: str | Path, *, skip: Iterable[str] = (),
                 device: str | torch.device = "cpu") -> None:
    """Load ``path`` into ``module``; raise :class:`InputError` naming the file otherwise.

    ``skip``: names of ``module``'s direct children whose tensors are neither loaded
    nor required.
    """
    skip = set(skip)

    def kept(key: str) -> bool:
        return key.split(".", 1)[0] not in skip

    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(f"{path}: cannot read weights ({err})") from None
    try:
        missing, unexpected = module.load_state_dict({k: v for k, v in state.items() if kept(k)}, strict=False)
    except RuntimeError as err:  # shape mismatches
        last = str(err).strip().splitlines()[-1].strip()
        raise InputError(f"{path}: weights do not match the config ({last})") from None
    missing = [k for k in missing if kept(k)]
    if missing or unexpected:
        raise InputError(
            f"{path}: weights do not match the config (missing {len(missing)}, unexpected "
            f"{len(unexpected)}; e.g. {(list(missing) + list(unexpected))[0]})"
        )
