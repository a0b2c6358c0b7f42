"""Diff-CA models: conditioning encoder, denoiser, common/salient split, DiffCAModel."""

from diffca_med.models.config import ModelConfig
from diffca_med.models.diffca import DiffCAModel, EncodeOutput

__all__ = ["DiffCAModel", "EncodeOutput", "ModelConfig"]
