"""diffca-med: Diff-CA (diffusion contrastive analysis) for brain MRI.

Separates what healthy and tumour brain scans share (*common*: anatomy, contrast)
from what only tumour scans have (*salient*: the tumour), from a per-image
healthy/tumour label alone, and turns that split into pseudo-healthy
counterfactuals, anomaly maps, salient embeddings, subgroup maps and reports.
"""

__version__ = "0.1.0"
