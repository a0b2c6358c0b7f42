"""Analyses on top of a trained model and a slice store.

* :mod:`~diffca_med.analysis.counterfactuals` — pseudo-healthy volumes in the original
  NIfTI grid, anomaly maps and masks, previews (``diffca-med pseudo-healthy``);
* :mod:`~diffca_med.analysis.anomaly` — anomaly map, thresholds, healthy-region fidelity;
* :mod:`~diffca_med.analysis.embeddings` — salient embeddings per slice and per subject
  (``diffca-med embed``);
* :mod:`~diffca_med.analysis.subgroups` — clusters, PCA/UMAP maps and clinical
  associations (``diffca-med subgroups``);
* :mod:`~diffca_med.analysis.metrics`, :mod:`~diffca_med.analysis.probes` — evaluation.

Submodules are imported on demand (they pull in torch, matplotlib, UMAP).
"""
