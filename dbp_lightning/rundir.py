"""Write a prune run directory (layout in the README).

A run is written whole into a staging directory beside the output, then swapped in by one
rename (:func:`~dbp_lightning.atomic.atomic_dir`): a rerun into a complete run leaves it intact
until the new one is complete, and a kill or a full disk at any moment leaves one of the two.
The caller holds the output's :func:`~dbp_lightning.lock.directory_lock` from before the work
starts (:func:`claim_output`), so two writers never mix.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from . import __version__, plots
from .atomic import atomic_dir, recover_dir, write_json, write_npy, write_parquet
from .lock import rank_zero_lock
from .pruning.pipeline import PruneResult

log = logging.getLogger(__name__)

#: every path a run directory may hold, relative to it (a run's files, the reshards
#: DBPDataModule makes from it, their locks, and the temporary files of an atomic write): a
#: rerun replaces a directory holding only these, and refuses one holding anything else
RUN_FILES = ("manifest.json", "selection.parquet", "clusters.parquet", "subset.npy",
             "report.json", "report.html", "dedup_pairs.csv", "plots",
             "plots/complexity_scatter.png", "plots/quotas.png", "shards-*", "shards-*/pruned-*.tar",
             "shards-*/reshard.json", ".shards-*.lock", "kept_metadata", "kept_metadata/part-*.parquet",
             ".*.tmp", "*/.*.tmp")


def check_output(out: str | os.PathLike) -> None:
    """Refuse, before any work, an output that a run may not replace (a run swaps the whole
    directory): a file, a directory holding anything a run does not write (every path checked,
    hidden ones included), or a ``manifest.json`` that is not a prune run's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output: {out} is a file, not a run directory")
    if not out.is_dir():
        return
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if not any(_matches(p.relative_to(out).parts, pat) for pat in RUN_FILES))
    if not foreign and (out / "manifest.json").is_file() and not _is_run_manifest(out / "manifest.json"):
        foreign = ["manifest.json (not a prune run's)"]
    if foreign:
        raise ValueError(f"output: {out} holds {len(foreign)} entries that are not part of a prune "
                         f"run ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); a "
                         "run replaces its whole directory, so give an empty or new one")


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    """Whether a relative path matches ``pattern`` component by component (``*`` never
    crosses a ``/``)."""
    pat = pattern.split("/")
    return len(parts) == len(pat) and all(fnmatch.fnmatch(a, b) for a, b in zip(parts, pat))


def _is_run_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"config", "input", "files"} <= set(manifest)


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, wait: float = 0.0, comm=None):
    """Hold ``out``'s lock for the block, after checking that a run may replace it and undoing
    what a killed writer left beside it.

    Args:
        wait: seconds to wait for another live writer (0: refuse at once).
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: rank 0 (the writer) takes
            the lock, and every rank raises if it could not, so that none waits for the others.

    Raises:
        DirectoryBusy: another live process holds the lock (on rank 0: naming it).
        ValueError: ``out`` is not a directory a run may replace (:func:`check_output`).
    """
    def prepare():
        check_output(out)
        recover_dir(out)

    with rank_zero_lock(out, wait=wait, comm=comm, prepare=prepare):
        yield Path(out)


def datacomp_subset(uids, chunk: int = 1 << 20) -> np.ndarray | None:
    """DataComp's subset format: sorted structured array dtype ``u8,u8`` of 128-bit hex uids
    (the high and low 64 bits, as ``divmod(int(uid, 16), 2**64)``); None when some uid is not
    32 hex digits (not a DataComp pool).

    ``uids``: an Arrow string array or a list. Decoded in chunks with NumPy
    (:func:`~dbp_lightning.data.keep.hex_to_u128`), no Python object per uid.
    """
    import pyarrow as pa

    from .data.keep import U128, hex_to_u128

    uids = pa.chunked_array([pa.array(uids, pa.string())]) if isinstance(uids, list) else uids
    uids = pa.chunked_array([uids]) if isinstance(uids, pa.Array) else uids
    out = np.empty(len(uids), U128)
    for start in range(0, len(uids), chunk):
        part = hex_to_u128(uids.slice(start, chunk).combine_chunks())
        if part is None:
            return None
        out[start : start + len(part)] = part
    # by high then low word: np.sort's field-by-field order, without its slower comparisons
    # of structured records
    return out[np.lexsort((out["f1"], out["f0"]))]


def versions() -> dict:
    out = {"python": platform.python_version(), "dbp_lightning": __version__}
    for dist in ("numpy", "faiss-cpu", "faiss-gpu", "pyarrow", "qpsolvers", "osqp"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def write_run(result: PruneResult, out_dir: str | os.PathLike, config: dict,
              input_id: str, shards=None, pool=None) -> Path:
    """Write selection.parquet, clusters.parquet, subset.npy, plots, report.json, manifest.json
    and, given the pool's ``shards``, report.html, then swap them in as ``out_dir`` whole.

    Hold ``out_dir``'s lock (:func:`claim_output`) from before the work that made ``result``.
    A run directory with a manifest is complete. Given the :class:`~dbp_lightning.data.pools.Pool`
    it pruned, the kept rows of its metadata files go to ``kept_metadata/`` (see
    :func:`write_kept_metadata`) and the manifest names its layout.
    """
    final = Path(out_dir)
    with atomic_dir(final) as out:
        files = write_kept_metadata(out, pool.sources, result.kept) if pool is not None else []
        _write_files(result, out, config, input_id, files,
                     {"layout": pool.layout} if pool is not None else {})
        if shards:  # an embedded pool: the curator's report can show the pictures
            from .report import write_report

            try:
                write_report(out, shards, shown_as=final)
            except (OSError, ValueError) as exc:  # the pictures are a view: never lose the run
                if getattr(exc, "errno", None) == errno.ENOSPC:
                    raise
                log.warning("%s: no report.html (%s)", final, exc)
    return final


def write_kept_metadata(out: Path, sources: list[tuple[str, int]], kept: np.ndarray) -> list[str]:
    """Write the kept rows of each source metadata file, every column, to
    ``out/kept_metadata/part-NNNNN.parquet`` (one per source file with a kept row, in pool
    order), one file in memory at a time: a list img2dataset downloads directly
    (``--input_format parquet --url_col url --caption_col text``). Returns the paths written,
    relative to ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    written, start = [], 0
    for i, (path, rows) in enumerate(sources):
        mask = kept[start : start + rows]
        start += rows
        if mask.any():
            table = pq.read_table(path)
            name = f"kept_metadata/part-{i:05d}.parquet"
            write_parquet(out / name, table.filter(pa.array(mask)))
            written.append(name)
    if start != len(kept) and sources:
        raise ValueError(f"the pool's metadata files hold {start} rows, the selection {len(kept)}")
    return written


def _write_files(result: PruneResult, out: Path, config: dict, input_id: str,
                 extra_files: list[str], extra: dict) -> None:
    report = dict(result.report)
    subset = None
    if "uid" in result.selection.column_names:
        subset = datacomp_subset(result.selection.filter(result.selection.column("kept"))
                                 .column("uid"))
    if subset is None:
        report["subset_npy"] = "not written: the uids are not DataComp's 32 hex digits"
    write_parquet(out / "selection.parquet", result.selection)
    files = ["selection.parquet", *extra_files]
    if subset is not None:
        write_npy(out / "subset.npy", subset)
        files.append("subset.npy")
    if result.clusters is not None:
        write_parquet(out / "clusters.parquet", result.clusters)
        files.append("clusters.parquet")
        if "quota" in result.clusters.column_names:
            (out / "plots").mkdir(exist_ok=True)
            plots.complexity_scatter(result.clusters, out / "plots" / "complexity_scatter.png")
            target = int(np.asarray(result.clusters.column("quota")).sum())
            plots.quota_profile(result.clusters, target, out / "plots" / "quotas.png")
            files += ["plots/complexity_scatter.png", "plots/quotas.png"]
    write_json(out / "report.json", report)
    write_json(out / "manifest.json", {"config": config, "input": input_id, **extra,
                                       "versions": versions(), "files": files + ["report.json"]})
