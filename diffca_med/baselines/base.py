"""The interface every benchmarked method offers to ``diffca-med evaluate``.

A method is anything that turns store slices into a pseudo-healthy counterfactual,
into embeddings, or both. Images are float32 NumPy arrays ``(N, C, H, W)`` in [0, 1],
channels in ``method.modalities`` order, ``H = W = method.image_size``; the
evaluation pipeline selects and resizes store slices to that shape.

Saved methods are folders holding ``baseline.json`` (``{"kind": ..., ...}``) plus
their weights (safetensors or ``.npz`` without pickles); :func:`load_baseline`
rebuilds one from its folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from diffca_med.errors import InputError

if TYPE_CHECKING:
    import torch

BASELINE_FILE = "baseline.json"

#: kind -> class; filled by :func:`register`.
REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator adding a method class to :data:`REGISTRY` under ``cls.kind``."""
    REGISTRY[cls.kind] = cls
    return cls


class Method:
    """Base class: override :meth:`pseudo_healthy` and/or :meth:`embed`.

    Attributes:
        kind: registry key (also the default display name).
        modalities: channel order of the images the method takes.
        image_size: H = W of the images the method takes (pixels).
        makes_counterfactuals / makes_embeddings: which of the two it offers.
    """

    kind: str = "method"
    makes_counterfactuals: bool = False
    makes_embeddings: bool = False

    def __init__(self, modalities: tuple[str, ...], image_size: int):
        self.modalities = tuple(modalities)
        self.image_size = int(image_size)

    @property
    def name(self) -> str:
        return self.kind

    def pseudo_healthy(
        self,
        images: np.ndarray,
        seed: int = 0,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """``(N, C, H, W)`` -> pseudo-healthy ``(N, C, H, W)`` in [0, 1].

        ``progress(n)`` is called after each batch with the number of images done.
        """
        raise TypeError(f"{self.name} makes no counterfactuals")

    def anomaly_support(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray | None:
        """Where the method itself places the anomaly: bool ``(N, H, W)``, or None (it
        does not localise; the whole image counts)."""
        return None

    @staticmethod
    def _generate_in_batches(
        images: np.ndarray,
        batch_size: int,
        generate: Callable[[torch.Tensor, int], torch.Tensor],
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Run ``generate(x, offset)`` over ``(N, C, H, W)`` images in batches.

        ``x`` is a float32 CPU tensor ``(b, C, H, W)`` of the batch starting at image
        ``offset``; the results are concatenated into a float32 array ``(N, C, H, W)``.
        """
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[i : i + batch_size], dtype=np.float32))
            out.append(generate(x, i).float().cpu().numpy())
            if progress is not None:
                progress(len(x))
        return np.concatenate(out) if out else np.zeros_like(images, dtype=np.float32)

    def embed(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """``(N, C, H, W)`` -> ``{"salient": (N, d)[, "common": (N, D)]}``.

        ``salient`` is the method's embedding of what is specific to tumour slices (for
        single-code methods: their only code); ``common`` the shared part, if any.
        """
        raise TypeError(f"{self.name} makes no embeddings")

    def save(self, path: str | Path) -> None:  # pragma: no cover - overridden
        raise TypeError(f"{self.name} cannot be saved")

    def _write_meta(self, folder: Path, **extra) -> None:
        meta = {"kind": self.kind, "modalities": list(self.modalities), "image_size": self.image_size}
        meta.update(extra)
        (folder / BASELINE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_meta(folder: str | Path) -> dict:
    """Parse ``folder/baseline.json``; one-line :class:`InputError` when absent or bad."""
    file = Path(folder) / BASELINE_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{file}: no such file (not a saved baseline)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{file}: unreadable ({err})") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise InputError(f"{file}: missing 'kind'")
    return meta


def load_baseline(folder: str | Path) -> Method:
    """Rebuild a saved baseline from its folder (see the module docstring)."""
    meta = read_meta(folder)
    # Importing the package registers every baseline class.
    import diffca_med.baselines  # noqa: F401

    cls = REGISTRY.get(meta["kind"])
    if cls is None:
        raise InputError(
            f"{Path(folder) / BASELINE_FILE}: unknown baseline kind {meta['kind']!r} "
            f"(known: {', '.join(sorted(REGISTRY))})"
        )
    return cls.load(folder)  # type: ignore[attr-defined]
