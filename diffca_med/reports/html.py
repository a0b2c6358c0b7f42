"""Self-contained HTML reports: one page per subject and a cohort index.

Inputs are the folders the analysis commands write:

* ``counterfactuals`` — a ``diffca-med pseudo-healthy`` output folder (``run.json``,
  ``<subject>/summary.json``, ``<subject>/previews/*.png``);
* ``subgroups`` (optional) — a ``diffca-med subgroups`` output folder
  (``clusters.csv`` with ``umap_0/1`` or ``pca_0/1``, ``summary.json``,
  ``associations.csv``).

Output folder::

    OUT/index.html                 cohort table (links to the subject pages), cohort map,
                                   clinical associations
    OUT/subjects/<id>.html         per subject (file name: the id with characters other
                                   than letters, digits, ``.``, ``_``, ``-`` replaced,
                                   plus a short hash when anything was replaced)

Pages are rendered with Jinja2 with autoescaping on, so every string from the data
(subject ids, file paths, clinical values) is HTML-escaped; images are embedded as
base64 ``data:`` URIs and the CSS is inline, so pages open offline and can be moved.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import diffca_med
from diffca_med.errors import InputError
from diffca_med.fileio import atomic_path

TEMPLATES = Path(__file__).parent / "templates"
FLAG_HELP = (
    "poor reconstruction (healthy-region PSNR under 20 dB: the model changes what it should keep), "
    "large anomaly (over 20% of the brain), tumour missed (under 10% of the labelled tumour in the "
    "anomaly mask), anomaly without a labelled tumour."
)


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every string from the data is escaped, not only in .html files
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def page_name(subject: str) -> str:
    """A safe, unique file name for a subject's page."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", subject).lstrip(".") or "subject"
    if safe != subject:
        safe += "-" + hashlib.sha1(subject.encode("utf-8")).hexdigest()[:8]
    return f"{safe}.html"


def data_uri_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def _fmt_p(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(v):
        return "—"
    return f"{v:.2e}" if v < 1e-3 else f"{v:.3f}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable JSON ({err})") from None


def load_counterfactuals(folder: Path) -> tuple[dict, list[dict]]:
    """``run.json`` and the subject summaries of a ``pseudo-healthy`` output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    run = _read_json(folder / "run.json")
    summaries = []
    for path in sorted(folder.glob("*/summary.json")):
        summaries.append(_read_json(path) | {"_folder": str(path.parent)})
    if not summaries:
        raise InputError(f"{folder}: no subject summaries (run `diffca-med pseudo-healthy` first)")
    return run, summaries


def _map_columns(clusters: pd.DataFrame) -> tuple[str, str, str] | None:
    for name in ("umap", "pca"):
        if f"{name}_0" in clusters.columns and f"{name}_1" in clusters.columns:
            return f"{name}_0", f"{name}_1", name.upper()
    return None


def cohort_map_png(clusters: pd.DataFrame, highlight: str | None = None) -> bytes | None:
    """PNG bytes: subjects on the cohort map coloured by cluster, one highlighted."""
    cols = _map_columns(clusters)
    if cols is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cx, cy, name = cols
    fig, ax = plt.subplots(figsize=(4.8, 4.0), dpi=100)
    cmap = matplotlib.colormaps["tab10"]
    for i, c in enumerate(sorted(clusters["cluster"].unique())):
        sel = clusters["cluster"] == c
        colour = "lightgrey" if c < 0 else cmap(i % 10)
        ax.scatter(clusters.loc[sel, cx], clusters.loc[sel, cy], s=28, color=colour,
                   label="noise" if c < 0 else f"cluster {c}", edgecolors="none")
    if highlight is not None:
        me = clusters[clusters["subject"].astype(str) == highlight]
        if len(me):
            ax.scatter(me[cx], me[cy], s=260, facecolors="none", edgecolors="black", linewidths=2.2, label="this subject")
            ax.scatter(me[cx], me[cy], s=30, color="black", marker="x")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"subjects · {name} of salient embeddings", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _subject_view(summary: dict, clusters: pd.DataFrame | None) -> dict:
    cluster = "—"
    if clusters is not None:
        hit = clusters[clusters["subject"].astype(str) == summary["subject"]]
        if len(hit):
            cluster = str(int(hit["cluster"].iloc[0]))
    fid = summary.get("fidelity", {})
    thr = summary.get("threshold", {})
    return {
        "subject": summary["subject"],
        "split": summary.get("split", ""),
        "cluster": cluster,
        "anomaly_ml": _fmt(summary.get("anomaly_volume_ml"), 2),
        "tumour_ml": _fmt(summary.get("tumour_volume_ml"), 2),
        "has_label": summary.get("tumour_volume_ml") is not None,
        "dice": _fmt(summary.get("dice_vs_label"), 3),
        "psnr": _fmt(fid.get("psnr"), 1),
        "ssim": _fmt(fid.get("ssim"), 3),
        "threshold": f"{thr.get('method', '?')} = {_fmt(thr.get('value'), 4)} ({thr.get('combine', 'mean')} over modalities)",
        "flags": list(summary.get("flags", [])),
        "page": "subjects/" + page_name(summary["subject"]),
    }


def build_report(counterfactuals: str | Path, out: str | Path, subgroups: str | Path | None = None,
                 title: str = "diffca-med report") -> Path:
    """Write ``index.html`` and one page per subject into ``out``; returns the index path."""
    run, summaries = load_counterfactuals(Path(counterfactuals))
    clusters = associations = None
    subgroups_text = ""
    if subgroups is not None:
        sg = Path(subgroups)
        if not (sg / "clusters.csv").is_file():
            raise InputError(f"{sg}: no clusters.csv (run `diffca-med subgroups` first)")
        clusters = pd.read_csv(sg / "clusters.csv", dtype={"subject": str})
        if (sg / "associations.csv").is_file():
            associations = pd.read_csv(sg / "associations.csv")
        if (sg / "summary.json").is_file():
            info = _read_json(sg / "summary.json")
            lev = info.get("levels", {}).get("subject", {})
            subgroups_text = (f"{info.get('method', '?')} clustering of subject embeddings: k = {lev.get('k', '?')}, "
                              f"silhouette = {_fmt(lev.get('silhouette'), 3)}.")
    env = _env()
    common = {
        "title": title,
        "version": diffca_med.__version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": run.get("model", "?"),
    }
    map_name = ""
    if clusters is not None and _map_columns(clusters):
        map_name = _map_columns(clusters)[2]
    views = [_subject_view(s, clusters) for s in summaries]
    out = Path(out)
    with atomic_path(out) as tmp:
        (tmp / "subjects").mkdir(parents=True)
        subject_tpl = env.get_template("subject.html")
        for summary, view in zip(summaries, views):
            folder = Path(summary["_folder"])
            previews = []
            for rel in summary.get("previews", []):
                png = folder / rel
                if png.is_file():
                    previews.append({"src": data_uri_png(png.read_bytes()),
                                     "caption": f"axial slice {Path(rel).stem.split('_')[-1]}"})
            map_png = cohort_map_png(clusters, summary["subject"]) if clusters is not None else None
            gen = run.get("generation", {})
            html = subject_tpl.render(
                **common,
                s=view,
                index_href="../index.html",
                previews=previews,
                map_src=data_uri_png(map_png) if map_png else None,
                map_name=map_name,
                sources=[(k, v if v is not None else "—") for k, v in summary.get("source_files", {}).items()],
                outputs=sorted(summary.get("outputs", {}).items()),
                generation=", ".join(f"{k}={v}" for k, v in gen.items()),
            )
            (tmp / view["page"]).write_text(html, encoding="utf-8")
        cohort_png = cohort_map_png(clusters) if clusters is not None else None
        assoc_rows = []
        if associations is not None:
            for _, a in associations.iterrows():
                assoc_rows.append({"level": a["level"], "column": a["column"], "test": a["test"],
                                   "statistic": _fmt(a["statistic"], 2), "p_value": _fmt_p(a["p_value"]),
                                   "n": int(a["n"]), "effect": _fmt(a["effect"], 2), "ari": _fmt(a.get("ari"), 2)})
        anomaly = run.get("anomaly", {})
        index = env.get_template("index.html").render(
            **common,
            store=run.get("store", "?"),
            subjects=views,
            cohort_map=data_uri_png(cohort_png) if cohort_png else None,
            map_name=map_name,
            subgroups_text=subgroups_text,
            associations=assoc_rows,
            combine=anomaly.get("combine", "mean"),
            threshold=anomaly.get("threshold", "otsu"),
            flag_help=FLAG_HELP,
        )
        (tmp / "index.html").write_text(index, encoding="utf-8")
    return out / "index.html"

