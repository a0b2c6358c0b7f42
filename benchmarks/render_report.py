"""Render a diffca-med HTML report in a real headless browser and save screenshots.

Usage::

    python benchmarks/render_report.py [REPORT_DIR] [--out SHOTS_DIR]

REPORT_DIR is a `diffca-med report` (or `demo`) output folder holding index.html;
without it a quick demo (`diffca-med demo --quick`) is run into a temporary folder
first. Screenshots of index.html and of the first subject page are written to
SHOTS_DIR (default: REPORT_DIR/screenshots) as index.png and subject.png; look at
them. The browser is started offline-minded (no background networking, no sync, a
throw-away profile); the page itself loads nothing from the network.

Skips cleanly (exit 0, a message) when chromium is not installed
(Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, page: Path, png: Path, size=(1280, 2000), timeout=120) -> float:
    """Screenshot ``page`` into ``png``; returns seconds taken. Raises on failure."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri(),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
            raise RuntimeError(f"{browser} failed on {page} (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", type=Path, help="report folder with index.html (default: run a quick demo)")
    ap.add_argument("--out", type=Path, help="screenshot folder (default: REPORT/screenshots)")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("skipped: no chromium found (apt-get install -y chromium)")
        return 0
    report = args.report
    if report is None:
        work = Path(tempfile.mkdtemp(prefix="diffca-render-"))
        subprocess.run([sys.executable, "-m", "diffca_med.cli", "demo", str(work / "demo"), "--quick", "--quiet"], check=True)
        report = work / "demo" / "report"
    index = report / "index.html"
    if not index.is_file():
        print(f"error: {index}: missing", file=sys.stderr)
        return 2
    pages = sorted((report / "subjects").glob("*.html"))
    out = args.out or report / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    secs = screenshot(browser, index, out / "index.png")
    print(f"index.html -> {out / 'index.png'} ({secs:.1f} s)")
    if pages:
        secs = screenshot(browser, pages[0], out / "subject.png")
        print(f"{pages[0].name} -> {out / 'subject.png'} ({secs:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
