"""The one font set the demo's SVGs are rendered with, whatever fonts the machine has.

cairosvg draws an SVG's ``<text>`` through cairo, which asks fontconfig for a face; fontconfig
answers from every font installed and from the machine's alias rules, so installing a package
that brings fonts (Debian's ``chromium`` does) changed the clip art with text, and with it the
demo's table. Here fontconfig reads a configuration of the project's own instead
(``FONTCONFIG_FILE``): one directory, matplotlib's DejaVu/STIX/Computer Modern fonts (matplotlib
is pinned in ``requirements/constraints.txt``, so the README's first command installs the same
files everywhere), and none of the system's rules. What still differs between machines is the
cairo/FreeType build that rasterises the glyphs (Debian's, the same within a release).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_PINNED: str | None = None  # the font set's fingerprint once this process is pinned


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (located without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib is not installed: the demo renders with its fonts; "
                           "install the project as the README says")
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"


def font_fingerprint(directory: Path) -> str:
    """16 hex digits of the fonts' names, sizes and bytes: the same fingerprint, the same renders."""
    from ..atomic import files_fingerprint

    return files_fingerprint(directory, directory.glob("*.ttf"))


def pin_fonts() -> str:
    """Point fontconfig at the project's font set, in this process and the workers it starts;
    returns the set's fingerprint. Call before cairo draws any text in this process (fontconfig
    reads its configuration once); :func:`~dbp_lightning.data.demo.render` does."""
    global _PINNED
    if _PINNED is not None:
        return _PINNED
    from ..atomic import atomic_path

    fonts = font_dir()
    fingerprint = font_fingerprint(fonts)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbp_lightning" / "fonts"
    conf = home / f"fonts-{fingerprint}.conf"
    text = ('<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">\n'
            f"<fontconfig>\n  <dir>{fonts}</dir>\n  <cachedir>{home / 'cache'}</cachedir>\n"
            "</fontconfig>\n")
    if not conf.is_file() or conf.read_text() != text:
        conf.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(conf) as tmp:
            tmp.write_text(text)
    os.environ["FONTCONFIG_FILE"] = str(conf)
    _PINNED = fingerprint
    return fingerprint
