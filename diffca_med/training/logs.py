"""The CSV log of training: one row per logged step, one file per stage.

``RUN/logs/stage<S>.csv`` has the columns ``step, stage, loss``, then the model's other
scalars (loss parts, ``adv_acc``, ``grl_weight``, ... in first-seen order), then
``lr, img_per_s, elapsed_s``. The file is rewritten atomically at every logged step,
so a killed run leaves a complete file; on resume, rows after the checkpoint's step
are dropped so the log matches an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from diffca_med.fileio import atomic_write_text

_FIRST = ["step", "stage", "loss"]
_LAST = ["lr", "img_per_s", "elapsed_s"]


def log_path(run_dir: str | Path, stage: int) -> Path:
    return Path(run_dir) / "logs" / f"stage{stage}.csv"


class CsvLog:
    """Accumulates rows in memory and rewrites ``path`` atomically on every append."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None):
        """Open ``path``; with ``keep_until_step`` keep its rows with step <= it, else start empty."""
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns: list[str] = list(_FIRST)
        if keep_until_step is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                for name in reader.fieldnames or []:
                    if name not in self.columns and name not in _LAST:
                        self.columns.append(name)
                for row in reader:
                    try:
                        if int(row["step"]) <= keep_until_step:
                            self.rows.append(row)
                    except (KeyError, ValueError):
                        continue

    def append(self, row: dict) -> None:
        for key in row:
            if key not in self.columns and key not in _LAST:
                self.columns.append(key)
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns + _LAST, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
