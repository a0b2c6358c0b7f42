"""Baselines benchmarked against Diff-CA by ``diffca-med evaluate`` and ``benchmarks/``.

* :class:`~diffca_med.baselines.identity.IdentityBaseline` — the input as its own
  pseudo-healthy image.
* :class:`~diffca_med.baselines.cpca.CPCABaseline` — contrastive PCA embeddings.
* :class:`~diffca_med.baselines.cfg_diffusion.CFGBaseline` — class-conditional
  diffusion, classifier-free guidance toward healthy after partial DDIM inversion.
* :class:`~diffca_med.baselines.diffae_pca.DiffAEPCABaseline` — Diff-CA's stage 1
  alone (one code per image), reduced by PCA.
* :class:`~diffca_med.baselines.ours.DiffCAMethod` — Diff-CA itself, for comparison.

Every method implements :class:`~diffca_med.baselines.base.Method`; saved ones are
folders that :func:`~diffca_med.baselines.base.load_baseline` reads back.
"""

from diffca_med.baselines.base import REGISTRY, Method, load_baseline
from diffca_med.baselines.cfg_diffusion import CFGBaseline
from diffca_med.baselines.cpca import CPCABaseline
from diffca_med.baselines.diffae_pca import DiffAEPCABaseline
from diffca_med.baselines.identity import IdentityBaseline
from diffca_med.baselines.ours import DiffCAMethod

__all__ = [
    "REGISTRY", "Method", "load_baseline", "CFGBaseline", "CPCABaseline", "DiffAEPCABaseline",
    "DiffCAMethod", "IdentityBaseline",
]
