"""Salient embeddings of every stored slice, per slice and per subject.

``diffca-med embed MODEL STORE OUT`` writes (column names are stable):

``OUT/slice_embeddings.csv`` — one row per stored slice (all splits and labels):

=====================  ===================================================================
``subject``            subject id (as in the store)
``slice``              axial index in the subject's RAS-reoriented volume
``split``              ``train`` / ``val`` / ``test``
``label``              ``healthy`` / ``tumour`` / ``excluded`` (the store's slice label)
``tumour_pixels``      labelled tumour pixels of the slice at store resolution
``salient_0`` …        the salient embedding ``model.encode(x).salient_embedding``,
``salient_{d-1}``      d = ``model.config.salient_dim`` (unitless)
=====================  ===================================================================

``OUT/subject_embeddings.csv`` — one row per subject: ``subject``, ``split``,
``label`` (``tumour`` when the subject has tumour slices, else ``healthy``),
``n_slices`` (slices averaged: its tumour slices, or its healthy slices when it has
none), ``tumour_pixels`` (sum over those slices), ``salient_0`` … ``salient_{d-1}``
(their mean embedding).

``OUT/embed.json`` — model, store, dimension, number of slices. ``OUT/store/`` holds
the prepared store when DATA was a raw folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from diffca_med.errors import ConfigError, InputError
from diffca_med.fileio import atomic_path, atomic_write_text

SLICE_FILE = "slice_embeddings.csv"
SUBJECT_FILE = "subject_embeddings.csv"
SLICE_KEYS = ["subject", "slice", "split", "label", "tumour_pixels"]
SUBJECT_KEYS = ["subject", "split", "label", "n_slices", "tumour_pixels"]


def salient_names(d: int) -> list[str]:
    """``["salient_0", …, "salient_{d-1}"]``."""
    return [f"salient_{i}" for i in range(d)]


def encode_rows(model, store, rows: np.ndarray, channels: list[int], batch_size: int = 64, on_batch=None) -> np.ndarray:
    """Salient embeddings ``(len(rows), d)`` float32 of the store slices ``rows``, in batches."""
    import torch

    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else "cpu"
    chunks = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            x = torch.as_tensor(np.asarray(store.images[idx][:, channels], np.float32), device=device)
            emb = model.encode(x).salient_embedding
            chunks.append(emb.detach().float().cpu().numpy())
            if on_batch is not None:
                on_batch(len(idx))
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(chunks).astype(np.float32)


def slice_table(store, rows: np.ndarray, embeddings: np.ndarray) -> pd.DataFrame:
    """The ``slice_embeddings.csv`` table for ``rows`` and their embeddings ``(n, d)``."""
    meta = store.index.iloc[rows][["subject", "slice", "split", "label", "tumour_pixels"]].reset_index(drop=True)
    meta["subject"] = meta["subject"].astype(str)
    emb = pd.DataFrame(embeddings, columns=salient_names(embeddings.shape[1]))
    return pd.concat([meta, emb], axis=1)


def subject_table(slices: pd.DataFrame) -> pd.DataFrame:
    """Aggregate a slice table per subject (mean over tumour slices, else healthy slices)."""
    cols = [c for c in slices.columns if c.startswith("salient_")]
    out = []
    for subject, g in slices.groupby("subject", sort=True):
        tumour = g[g["label"] == "tumour"]
        use, label = (tumour, "tumour") if len(tumour) else (g[g["label"] == "healthy"], "healthy")
        if use.empty:
            continue  # only excluded slices: nothing trustworthy to aggregate
        row = {"subject": subject, "split": g["split"].iloc[0], "label": label, "n_slices": len(use),
               "tumour_pixels": int(use["tumour_pixels"].sum())}
        row.update(use[cols].mean().to_dict())
        out.append(row)
    return pd.DataFrame(out, columns=SUBJECT_KEYS + cols)


def run_embed(model_path: str | Path, data: str | Path, out: str | Path, batch_size: int = 64,
              splits: tuple[str, ...] | None = None, progress: bool = True, model=None,
              device: str = "auto") -> dict:
    """Embed every slice of ``data`` (a store or a raw folder) and write the CSVs.

    Args:
        splits: only these splits (default: all).
        model: an already loaded model (``model_path`` then only names it).
        device: where the model runs: ``auto`` (a CUDA GPU when visible), ``cpu``, ``cuda[:N]``.

    Returns:
        The ``embed.json`` content.
    """
    from tqdm.auto import tqdm

    from diffca_med.analysis.counterfactuals import open_model_and_data

    out = Path(out)
    model, store, channels = open_model_and_data(model_path, data, out / "store", model, progress, device)
    rows = store.rows(split=list(splits) if splits else None, labels=None)
    if rows.size == 0:
        raise InputError(f"{store.path}: no slices to embed" + (f" in split(s) {', '.join(splits)}" if splits else ""))
    with tqdm(total=len(rows), unit="slice", desc="embed", disable=not progress) as bar:
        emb = encode_rows(model, store, rows, channels, batch_size, on_batch=bar.update)
    slices = slice_table(store, rows, emb)
    subjects = subject_table(slices)
    info = {"model": str(model_path), "store": str(store.path), "dim": int(emb.shape[1]),
            "n_slices": int(len(slices)), "n_subjects": int(len(subjects)),
            "files": {"slices": SLICE_FILE, "subjects": SUBJECT_FILE}}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SLICE_FILE) as tmp:
        slices.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / SUBJECT_FILE) as tmp:
        subjects.to_csv(tmp, index=False, float_format="%.6g")
    atomic_write_text(out / "embed.json", json.dumps(info, indent=2))
    return info
