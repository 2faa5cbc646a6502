"""How much the machine's fonts would change the demo's clip art without the pinned font set.

Renders the first --n Open Clip Art SVGs that hold ``<text>`` twice, each in a fresh process:
with the project's fonts (``dbp_lightning/data/fonts.py``, what ``data demo`` does) and with
whatever fontconfig finds on this machine, and counts the renders that differ. Run it before and
after installing fonts (Debian's fonts-liberation, fonts-noto-core, ...): the pinned renders
stay the same (their digest is printed), the system ones change.

    python benchmarks/check_fonts.py
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import subprocess
import sys

from dbp_lightning.data.demo import OPENCLIPART_ROOT

RENDER = """
import hashlib, sys
import dbp_lightning.data.fonts as fonts
if sys.argv[1] == "system":
    fonts.pin_fonts = lambda: "system"  # fontconfig's own configuration: every installed font
from dbp_lightning.data.demo import render
for path in sys.stdin.read().split("\\n"):
    print(hashlib.sha1(render(path, 64) or b"").hexdigest())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    paths = sorted(glob.glob(f"{OPENCLIPART_ROOT}/**/*.svg", recursive=True))
    if not paths:
        sys.exit(f"no Open Clip Art under {OPENCLIPART_ROOT}: apt-get install openclipart-svg")
    with_text = [p for p in paths if b"<text" in open(p, "rb").read()][: args.n]
    digests = {}
    for mode in ("pinned", "system"):
        done = subprocess.run([sys.executable, "-c", RENDER, mode], input="\n".join(with_text),
                              capture_output=True, text=True, check=True)
        digests[mode] = done.stdout.split()
    fonts = subprocess.run(["fc-list"], capture_output=True, text=True).stdout.count("\n") \
        if subprocess.run(["which", "fc-list"], capture_output=True).returncode == 0 else "unknown"
    differ = sum(a != b for a, b in zip(digests["pinned"], digests["system"]))
    pinned = hashlib.sha1("".join(digests["pinned"]).encode()).hexdigest()[:16]
    print(f"{len(with_text)} clip-art SVGs with <text>; fonts fontconfig finds on this machine: {fonts}")
    print(f"renders that differ between the pinned fonts and the machine's: {differ}")
    print(f"digest of the pinned renders: {pinned}")


if __name__ == "__main__":
    main()
