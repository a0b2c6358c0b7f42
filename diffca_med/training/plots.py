"""Training curves from the CSV logs: loss parts per stage, adversary accuracy and GRL weight.

``RUN/plots/losses.png``: one panel per trained stage, every loss column vs step (log
scale when all values are positive). ``RUN/plots/adversary.png`` (stage 2): the
adversary's accuracy with the chance band 0.5 ± 0.1, and the gradient-reversal weight,
vs step.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diffca_med.fileio import atomic_path
from diffca_med.training.logs import log_path

_NOT_LOSSES = {"step", "stage", "lr", "img_per_s", "elapsed_s", "adv_acc", "grl_weight", "adv_acc_smooth"}


def _read(run_dir: Path, stage: int) -> pd.DataFrame | None:
    path = log_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    return df if len(df) else None


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_losses(run_dir: str | Path) -> Path | None:
    """Write ``RUN/plots/losses.png`` from the stage logs; None when there is no log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    logs = {s: df for s in (0, 1, 2) if (df := _read(run_dir, s)) is not None}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.6), squeeze=False)
    for ax, (stage, df) in zip(axes[0], logs.items()):
        cols = [c for c in df.columns if c not in _NOT_LOSSES and pd.api.types.is_numeric_dtype(df[c])]
        for c in cols:
            ax.plot(df["step"], df[c], label=c, lw=1.2 if c == "loss" else 0.9)
        values = df[cols].to_numpy().ravel() if cols else []
        if len(values) and (values[~pd.isna(values)] > 0).all():
            ax.set_yscale("log")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, run_dir / "plots" / "losses.png")
    plt.close(fig)
    return out


def plot_adversary(run_dir: str | Path) -> Path | None:
    """Write ``RUN/plots/adversary.png`` (stage 2); None without a stage-2 log with ``adv_acc``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    df = _read(run_dir, 2)
    if df is None or "adv_acc" not in df.columns:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.axhspan(0.4, 0.6, color="0.9", label="chance ± 0.1")
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.plot(df["step"], df["adv_acc"], color="C0", label="adversary accuracy")
    if "adv_acc_smooth" in df.columns:
        ax.plot(df["step"], df["adv_acc_smooth"], color="C0", ls="--", lw=0.9, label="smoothed")
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("accuracy on common part")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "grl_weight" in df.columns:
        ax2 = ax.twinx()
        ax2.plot(df["step"], df["grl_weight"], color="C3", label="GRL weight")
        ax2.set_ylabel("gradient-reversal weight")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    ax.set_title("stage 2: adversary on the common part")
    fig.tight_layout()
    out = _save(fig, run_dir / "plots" / "adversary.png")
    plt.close(fig)
    return out


def plot_training(run_dir: str | Path) -> list[Path]:
    """All training plots that the logs under ``run_dir`` allow; returns their paths."""
    return [p for p in (plot_losses(run_dir), plot_adversary(run_dir)) if p is not None]
