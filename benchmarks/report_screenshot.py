"""Render a report.html in headless Chromium and check the screenshot is not blank.

A page whose HTML parses can still render as nothing (a broken data URI, CSS hiding
everything); only a browser tells. Exit status 0 when the screenshot has content, 1 when blank.

    python benchmarks/report_screenshot.py runs/demo_prune/report.html --out /tmp/report.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int = 4000,
               timeout: float = 120) -> None:
    """Write a ``width`` x ``height`` screenshot of ``html`` to ``png`` (chromium on PATH)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    # a fresh profile: a second chromium on the default one would hand the job to the first
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                               "--hide-scrollbars", f"--user-data-dir={profile}",
                               f"--screenshot={png}", f"--window-size={width},{height}",
                               Path(html).resolve().as_uri()],
                              check=False, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")


def content_stats(png: str | Path) -> dict:
    """Grey-level standard deviation and the fraction of pixels that are not near-white."""
    grey = np.asarray(Image.open(png).convert("L"), np.float32)
    return {"std": float(grey.std()), "inked": float((grey < 240).mean()), "size": grey.shape[::-1]}


def is_blank(stats: dict) -> bool:
    # a rendered report has text, thumbnails and plots: far above these on any page of it
    return stats["std"] < 5.0 or stats["inked"] < 0.01


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html")
    p.add_argument("--out", default=None, help="PNG path (default: beside the HTML)")
    p.add_argument("--window-size", default="1280,4000", help="WIDTH,HEIGHT in CSS pixels")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.html).with_suffix(".png")
    width, height = (int(v) for v in args.window_size.split(","))
    screenshot(args.html, out, width, height)
    stats = content_stats(out)
    print(f"{out}: {stats['size'][0]}x{stats['size'][1]}, grey std {stats['std']:.1f}, "
          f"{100 * stats['inked']:.1f}% of pixels not white")
    if is_blank(stats):
        print("blank screenshot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
