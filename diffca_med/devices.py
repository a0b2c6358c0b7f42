"""Which torch device inference runs on (``--device`` of the generating commands).

Training picks its devices through Accelerate (``accelerate launch``); the commands
that only run a trained model (``pseudo-healthy``, ``embed``, ``swap``,
``interpolate``) take ``--device auto|cpu|cuda|cuda:N`` and go through
:func:`resolve_device` (``demo`` uses ``auto``).
"""

from __future__ import annotations

import torch

from diffca_med.errors import ConfigError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``'auto'`` → the first CUDA GPU when one is visible, else the CPU.

    ``'cpu'``, ``'cuda'`` and ``'cuda:N'`` are taken as given, after checking that
    the GPU exists (a one-line :class:`ConfigError` otherwise).
    """
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} asked for, but torch sees no CUDA GPU on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device: {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device
