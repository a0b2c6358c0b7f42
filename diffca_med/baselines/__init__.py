"""Baselines benchmarked against Diff-CA by ``diffca-med evaluate`` and ``benchmarks/``.

* :class:`~diffca_med.baselines.identity.IdentityBaseline` — the input as its own
  pseudo-healthy image.
* :class:`~diffca_med.baselines.cpca.CPCABaseline` — contrastive PCA embeddings.

Every method implements :class:`~diffca_med.baselines.base.Method`; saved ones are
folders that :func:`~diffca_med.baselines.base.load_baseline` reads back.
"""

from diffca_med.baselines.base import REGISTRY, Method, load_baseline
from diffca_med.baselines.cpca import CPCABaseline
from diffca_med.baselines.identity import IdentityBaseline

__all__ = ["REGISTRY", "Method", "load_baseline", "CPCABaseline", "IdentityBaseline"]
