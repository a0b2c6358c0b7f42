"""Training of Diff-CA: config, one Accelerate loop for every stage, checkpoints, logs, plots.

- :mod:`~diffca_med.training.config`: YAML -> validated dataclasses (``load_config``).
- :mod:`~diffca_med.training.loop`: ``train_stage`` (Accelerate, bf16, accumulation,
  warm-up, EMA, progress bar, CSV log, sample grids, checkpoints).
- :mod:`~diffca_med.training.batches`: data order and noise as functions of (seed, step).
- :mod:`~diffca_med.training.checkpoint`: atomic, pickle-free checkpoints; ``--resume``.
- :mod:`~diffca_med.training.plots`: loss curves, adversary accuracy and GRL weight.

The whole job (store, stages, final model folder) is :func:`diffca_med.pipelines.train.train`.
"""

from diffca_med.training.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
