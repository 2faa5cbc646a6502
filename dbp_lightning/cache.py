"""The caches shared by ``DBPDataModule``, ``compare`` and ``demo``, each entry keyed by what
determines its content.

``<cache_dir>/embeddings-<hash>/``: an embedding store. Its key (:func:`store_key`, kept beside
the store as ``cache-key.json``) is what the embeddings depend on: each shard's name and size in
bytes, the encoder's config with a weights or model file it names replaced by that file's
identity (:func:`file_identity`: size and a hash of its first and last MiB), the dtype, the
json fields stored, and :data:`EMBEDDING_REVISION`. Not in it: package versions (a pyarrow or
torch upgrade keeps the store), mtimes and paths (a copy of the pool or of the weights keeps it).
At 10^8 images an embedding is GPU-days; a needless one is the costly mistake here.

``<cache_dir>/prune-<hash>/``: a prune run, keyed by the store's manifest and the options of
the stages it runs (:func:`prune_key`).

``<cache_dir>/selection-<hash>/``: for ``DBPDataModule(selection=...)`` or ``(subset=...)``:
the kept identities (``kept.npy``, 16 bytes per kept sample) and what a scan of the shards found
of them, keyed by the kept identities' content and the shards' names and sizes
(:func:`ensure_selection`).

A directory with its ``manifest.json`` is complete and reused; one ``logging.info`` line says
why an entry was reused or made. A killed embedding resumes shard by shard, a killed prune or
scan starts again. ``recompute=True`` makes an entry again even when it is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncoderConfig, PruneConfig
from .data.shards import shard_name

log = logging.getLogger(__name__)

#: bump when a change to this package changes the embeddings it computes (preprocessing,
#: pooling, what a store holds): every cached store is then made again. Never for an upgrade
#: of another library: those keep the cache (a library that changed the numbers would be a bug
#: to pin against, not a reason to re-embed 10^8 images on every upgrade).
EMBEDDING_REVISION = 1

#: bytes hashed at each end of a weights file: not the whole file (a ViT-L checkpoint is 1.7 GB
#: and every rank computes the key); a fine-tuned checkpoint of the same size differs there
FILE_ENDS = 1 << 20

#: the file beside a cached store that records its key (to say why another key missed it)
KEY_FILE = "cache-key.json"


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> dict:
    """What a weights or model file holds, not where it is or when it was written: its size and
    16 hex digits of the sha256 of its first and last MiB; for a directory (a
    sentence-transformers model), that of every file under it by relative path."""
    path = Path(path)
    if path.is_dir():
        return {"files": {str(f.relative_to(path)): file_identity(f)
                          for f in sorted(path.rglob("*")) if f.is_file()}}
    size = path.stat().st_size
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(FILE_ENDS))
        if size > FILE_ENDS:
            f.seek(max(size - FILE_ENDS, FILE_ENDS))
            sha.update(f.read(FILE_ENDS))
    return {"bytes": size, "ends": sha.hexdigest()[:16]}


def encoder_identity(encoder: EncoderConfig) -> dict:
    """``encoder.identity()`` with ``checkpoint`` and a ``model`` that is a file or directory
    replaced by their :func:`file_identity`: moving or copying the weights keeps the key,
    replacing them changes it."""
    fields = encoder.identity()
    for name in ("checkpoint", "model"):
        value = fields.get(name)
        if value and os.path.exists(value):
            fields[name] = file_identity(value)
    return fields


def encoder_key(encoder: EncoderConfig) -> dict:
    """What features computed by ``encoder`` depend on (the evaluation cache uses it too)."""
    return {"encoder": encoder_identity(encoder), "revision": EMBEDDING_REVISION}


def store_key(shards: list[str], encoder: EncoderConfig, dtype: str) -> dict:
    """What a store of ``shards`` embedded by ``encoder`` depends on (see the module's doc)."""
    from .embed import SCORE_FIELDS

    return {"revision": EMBEDDING_REVISION,
            "shards": [[shard_name(p), os.path.getsize(p)] for p in shards],
            "encoder": encoder_identity(encoder), "dtype": dtype,
            "metadata_fields": list(SCORE_FIELDS)}


def store_dir(cache_dir: str | os.PathLike, shards: list[str], encoder: EncoderConfig,
              dtype: str) -> Path:
    """Where the store of ``shards`` embedded by ``encoder`` lives (whether or not it exists)."""
    return Path(cache_dir) / f"embeddings-{digest(store_key(shards, encoder, dtype))}"


#: the prune options as :func:`prune_key` was defined: always in the key. An option added since
#: counts only when set away from its default (which must reproduce the runs made before it
#: existed), so adding one keeps every cached run.
_PRUNE_KEYED = {
    "": ("stages", "seed", "gpu"),
    "semdedup": ("k", "niter", "sample", "passes", "eps", "target_fraction", "block_size"),
    "clip_score": ("column", "threshold", "fraction"),
    "select": ("target_fraction", "target_size", "k", "niter", "tol", "sample", "num_neighbors",
               "temperature", "min_per_cluster", "balance_ratio", "solver"),
}
#: the option groups each stage reads; a group of a stage not run is left out of the key
_STAGE_OPTIONS = {"semdedup": "semdedup", "clip_score": "clip_score", "dbp": "select",
                  "ssp": "select", "random": "select"}
#: what names the run's input and output, or where its estimates run (the same bytes on any
#: backend: see pruning/backend.py), not how it prunes
_PRUNE_IO = ("input", "output", "metadata", "backend")


def _keyed(options, always: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for f in dataclasses.fields(options):
        if f.name in skip:
            continue
        value = getattr(options, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in always or value != default:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def prune_key(config: PruneConfig) -> dict:
    """The options a prune run's selection depends on: the stages, the seed, and the options of
    the stages run (changing a stage's options that is not run keeps the run)."""
    key = _keyed(config, _PRUNE_KEYED[""], skip=_PRUNE_IO + tuple(_PRUNE_KEYED))
    for group in sorted({_STAGE_OPTIONS[s] for s in config.stages if s in _STAGE_OPTIONS}):
        key[group] = _keyed(getattr(config, group), _PRUNE_KEYED[group])
    return key


def prune_dir(cache_dir: str | os.PathLike, store: Path, config: PruneConfig) -> Path:
    """Where the prune run of ``store`` under ``config`` lives (input/output do not count).

    Keyed by the complete store's fingerprint (a store named by the user may be rewritten in
    place), so the store must exist.
    """
    from .store import fingerprint

    return Path(cache_dir) / f"prune-{digest({'store': fingerprint(store), 'prune': prune_key(config)})}"


def check_store(store: str | os.PathLike, shards: list[str], encoder: EncoderConfig) -> None:
    """Raise ValueError naming ``store`` unless it is a complete store of ``shards`` by ``encoder``."""
    from .store import EmbeddingStore

    manifest = EmbeddingStore(store).manifest  # complete, and its files match
    listed = {s["name"] for s in manifest["shards"] + manifest.get("empty_shards", [])}
    wanted = {shard_name(s) for s in shards}
    if listed != wanted:
        extra, missing = sorted(listed - wanted), sorted(wanted - listed)
        raise ValueError(f"store: {store} does not hold these shards (missing {missing[:3]}, "
                         f"extra {extra[:3]})")
    made_by = manifest.get("encoder")
    wanted_by = encoder.identity()
    if made_by is not None and made_by != json.loads(json.dumps(wanted_by)):
        raise ValueError(f"store: {store} was embedded by {made_by}, not by the encoder {wanted_by}")


#: seconds a job waits for another that fills the same cache entry (under the collectives'
#: two-hour timeout, which the other ranks wait on meanwhile)
LOCK_WAIT = 3600.0


def ensure_store(cache_dir: str | os.PathLike, shards: list[str], encoder: EncoderConfig,
                 dtype: str = "float16", batch_size: int = 256, num_workers: int = 2,
                 recompute: bool = False) -> Path:
    """The complete store of ``shards`` under ``encoder``, embedding (or resuming) it if needed.

    Args:
        recompute: embed again even if the cache has the store complete; the new store
            replaces it in one rename when complete (a kill meanwhile keeps the old one).
    """
    from .atomic import atomic_dir, recover_dir, write_json
    from .embed import embed_shards
    from .lock import directory_lock

    key = store_key(shards, encoder, dtype)
    out = Path(cache_dir) / f"embeddings-{digest(key)}"
    if not recompute and (out / "manifest.json").is_file():
        log.info("embedding cache: reusing %s (%s)", out, _describe_store(key))
        return out
    # another job may be embedding the same store into the shared cache: wait, then reuse
    with directory_lock(out, wait=LOCK_WAIT):
        if not recompute and (out / "manifest.json").is_file():
            log.info("embedding cache: reusing %s, which another job embedded meanwhile", out)
            return out
        embed = dict(encoder=encoder, batch_size=batch_size, num_workers=num_workers, dtype=dtype,
                     trainer_kwargs={"devices": 1})
        if recompute:
            log.info("embedding cache: embedding %d shard%s into %s again: recompute=True",
                     len(shards), "" if len(shards) == 1 else "s", out)
            recover_dir(out)
            with atomic_dir(out) as stage:
                write_json(stage / KEY_FILE, key)
                embed_shards(shards, str(stage), **embed)
        else:
            log.info("embedding cache: embedding %d shard%s into %s: %s", len(shards),
                     "" if len(shards) == 1 else "s", out,
                     _why_new(out, key))
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / KEY_FILE, key)
            embed_shards(shards, str(out), **embed)
    return out


def _describe_store(key: dict) -> str:
    encoder = key["encoder"]
    weights = encoder.get("checkpoint")
    weights = (f", weights of {weights['bytes']:,} bytes ({weights['ends']})"
               if isinstance(weights, dict) and "bytes" in weights else "")
    return (f"{len(key['shards'])} shards by name and size, encoder {encoder['kind']} "
            f"{encoder['model'] if isinstance(encoder['model'], str) else 'from a file'}"
            f"{weights}, {key['dtype']}; package versions, paths and mtimes are not part of the key")


def _why_new(out: Path, key: dict) -> str:
    """Why ``out`` is not in the cache: the parts of ``key`` in which the nearest cached store
    differs, or that there is none."""
    if out.is_dir():
        return "an unfinished embedding is resumed"
    others = []
    for path in sorted(out.parent.glob(f"embeddings-*/{KEY_FILE}")):
        try:
            others.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    older = [d for d in out.parent.glob("embeddings-*")
             if (d / "manifest.json").is_file() and not (d / KEY_FILE).is_file()]
    note = (f" ({len(older)} entr{'ies' if len(older) > 1 else 'y'} made before the cache was keyed "
            "by content, with package versions and mtimes, cannot be matched)" if older else "")
    if not others:
        return "no store of these shards by this encoder in the cache yet" + note
    name, nearest = min(others, key=lambda other: len(_key_differences(other[1], key)))
    return f"the nearest cached store, {name}, differs in " + "; ".join(_key_differences(nearest, key)) + note


def _key_differences(old: dict, new: dict) -> list[str]:
    out = []
    for part in ("revision", "dtype", "metadata_fields"):
        if old.get(part) != new.get(part):
            out.append(f"{part} {old.get(part)} -> {new.get(part)}")
    old_encoder, new_encoder = old.get("encoder", {}), new.get("encoder", {})
    for field in sorted(set(old_encoder) | set(new_encoder)):
        if old_encoder.get(field) != new_encoder.get(field):
            out.append(f"encoder.{field} {json.dumps(old_encoder.get(field))} -> "
                       f"{json.dumps(new_encoder.get(field))}")
    before, now = dict(map(tuple, old.get("shards", []))), dict(map(tuple, new.get("shards", [])))
    resized = [n for n in now if n in before and before[n] != now[n]]
    if resized:
        out.append(f"the size of {len(resized)} shard{'s' if len(resized) > 1 else ''} (e.g. "
                   f"{resized[0]}: {before[resized[0]]:,} -> {now[resized[0]]:,} bytes)")
    for names, what in (([n for n in now if n not in before], "not in it"),
                        ([n for n in before if n not in now], "in it, not given now")):
        if names:
            out.append(f"{len(names)} shard{'s' if len(names) > 1 else ''} {what} (e.g. {names[0]})")
    return out


def ensure_pruned(cache_dir: str | os.PathLike, store: Path, config: PruneConfig,
                  progress: bool = True, comm=None, recompute: bool = False,
                  report: bool = False) -> Path:
    """The complete prune run of ``store`` under ``config``, running it if needed.

    With ``comm`` (a :mod:`~dbp_lightning.pruning.collective` collective), every rank calls
    this: they take rank 0's view of whether the run exists, prune together, rank 0 writes, and
    all return once it is written. ``recompute``: prune again even if the run is complete (it
    replaces the old run whole, reshards included), the same on every rank. ``report``: write
    the run's report.html too (as ``prune`` does) when the store's shards are at hand.
    """
    from .pruning.collective import Local
    from .data.pools import open_input
    from .pruning.embeddings import as_embeddings
    from .pruning.pipeline import prune
    from .rundir import claim_output, write_run
    from .store import source_shards

    comm = comm or Local()
    out = prune_dir(cache_dir, store, config)
    missing = np.array([recompute or not (out / "manifest.json").is_file()])
    if comm.broadcast(missing if comm.rank == 0 else None)[0]:  # one decision for all ranks
        # another job may be pruning the same run into the shared cache: wait for it, then
        # take its run rather than prune it again
        with claim_output(out, wait=LOCK_WAIT, comm=comm):
            missing = np.array([recompute or not (out / "manifest.json").is_file()])
            if comm.broadcast(missing if comm.rank == 0 else None)[0]:
                if comm.rank == 0:
                    log.info("prune cache: pruning %s into %s: %s", store, out,
                             "recompute=True" if recompute else
                             "no run of this store under these stages and options yet")
                config = dataclasses.replace(config, input=str(store), output=str(out))
                pool = open_input(config)
                emb = as_embeddings(pool.embeddings, name=str(store), comm=comm)
                result = prune(emb, config, metadata=pool.metadata,
                               progress=progress and comm.rank == 0, comm=comm)
                if comm.rank == 0:
                    write_run(result, out, config.to_dict(), pool.fingerprint,
                              shards=source_shards(store) if report else None)
            elif comm.rank == 0:
                log.info("prune cache: reusing %s, which another job pruned meanwhile", out)
    elif comm.rank == 0:
        log.info("prune cache: reusing %s (the run of %s under the same stages and options)",
                 out, store)
    comm.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# selection= / subset=: the kept identities and a scan of the shards for them

#: bump when what a scan counts changes (the stream's rule for a usable sample)
SCAN_REVISION = 1


def _broadcast_json(comm, obj) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (the others pass anything)."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8).copy() if comm.rank == 0 else None
    return json.loads(comm.broadcast(data).tobytes())


def ensure_selection(cache_dir: str | os.PathLike, source: str | os.PathLike, kind: str,
                     shards: list[str], stamps: dict[str, tuple[int, int]] | None = None,
                     num_workers: int = 2, comm=None, recompute: bool = False) -> Path:
    """The cache entry that streams ``shards`` filtered by a run's selection or a subset file:
    ``kept.npy`` and ``manifest.json`` (what the scan found), made if needed.

    Args:
        source: a prune run directory (``kind="selection"``; its ``selection.parquet``, from
            any pool layout) or DataComp's subset ``.npy`` (``kind="subset"``).
        stamps: (bytes, mtime_ns) per shard path that the shard must still have when scanned.
        num_workers: processes reading shards at once (dataloader workers) on each rank.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective; every rank calls this and
            scans every world-size-th shard; rank 0 reads the source and writes.
        recompute: scan the shards again even if the entry is complete.

    Rank 0 reads the kept identities from ``source`` on every call (16 bytes per kept sample,
    sorted: seconds at 10^8), since the entry is keyed by them, with the shards' names and
    sizes. The scan reads every shard once, as the stream reads it, and decodes the kept images
    (the stream drops one that does not decode): it knows exactly how many kept samples each
    shard streams, which every rank needs to take the same number of steps. Once per entry.
    """
    from .atomic import write_json, write_npy
    from .data.keep import kept_of_run, kept_of_subset
    from .lock import rank_zero_lock
    from .pruning.collective import Local

    comm = comm or Local()
    values = None
    if comm.rank == 0:
        try:
            if kind == "selection":
                values, encoding = kept_of_run(source)
            else:
                values, encoding = kept_of_subset(source), "hex"
            sha = hashlib.sha256(values.tobytes()).hexdigest()
            key = {"kind": kind, "encoding": encoding, "kept": sha, "revision": SCAN_REVISION,
                   "shards": [[shard_name(p), os.path.getsize(p)] for p in shards]}
            out = Path(cache_dir) / f"selection-{digest(key)}"
            info = {"dir": str(out), "key": key, "count": len(values),
                    "complete": not recompute and (out / "manifest.json").is_file()}
        except (OSError, ValueError) as exc:
            info = {"error": str(exc)}
    info = _broadcast_json(comm, info if comm.rank == 0 else None)
    if "error" in info:
        raise ValueError(info["error"])
    out, key = Path(info["dir"]), info["key"]
    if info["complete"]:
        if comm.rank == 0:
            log.info("selection cache: reusing %s (the scan of the %d shards for the %s kept "
                     "identities of %s)", out, len(shards), f"{info['count']:,}", source)
        comm.barrier()
        return out
    with rank_zero_lock(out, wait=LOCK_WAIT, comm=comm):
        done = np.array([not recompute and (out / "manifest.json").is_file()])
        if comm.broadcast(done if comm.rank == 0 else None)[0]:
            return out
        if comm.rank == 0:
            log.info("selection cache: scanning %d shards into %s for the %s kept identities of "
                     "%s: %s", len(shards), out, f"{info['count']:,}", source,
                     "recompute=True" if recompute else "not scanned for these yet")
            (out / "manifest.json").unlink(missing_ok=True)
            for old in out.glob("shards-*"):  # reshards of an earlier scan
                shutil.rmtree(old, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            write_npy(out / "kept.npy", values)
        comm.barrier()
        manifest = _scan(out, key, shards, stamps or {}, num_workers, comm, info["count"])
        if comm.rank == 0:
            manifest.update(source=str(source), kind=kind)
            if manifest["not_in_shards"]:
                manifest["not_in_shards_examples"] = _missing_examples(out, key["encoding"], kind,
                                                                       source, manifest)
            del manifest["_missing"]
            write_json(out / "manifest.json", manifest)
        comm.barrier()
    return out


def _scan(out: Path, key: dict, shards: list[str], stamps: dict, num_workers: int, comm,
          count: int) -> dict:
    """Every rank scans its share of ``shards``; rank 0 gets the totals (the others, None)."""
    from .data.keep import SCAN_FIELDS, KeptIdentities

    kept = KeptIdentities(out / "kept.npy", key["encoding"], uid_only=key["kind"] == "subset")
    mine = list(range(comm.rank, len(shards), comm.world_size))
    counts = np.full((len(shards), len(SCAN_FIELDS)), -1, np.int64)
    found = np.zeros(count, np.uint8)  # 1 byte per kept identity, for the moment of the scan
    for i, (shard_counts, positions) in zip(mine, _scan_shards([shards[i] for i in mine], kept,
                                                                stamps, num_workers)):
        counts[i] = shard_counts
        found[positions] = 1
    comm.reduce_max(counts)  # each row is filled by one rank
    comm.reduce_max(found)
    if comm.rank != 0:
        return {}
    totals = dict(zip(SCAN_FIELDS, counts.sum(axis=0).tolist()))
    found_count = int(np.count_nonzero(found))
    return {"kept": count, "in_shards": found_count, "not_in_shards": count - found_count,
            "samples_matched": totals["matched"], "streamed": totals["streamed"],
            "undecodable": totals["undecodable"], "no_caption": totals["no_caption"],
            "no_uid": totals["no_uid"], "samples_read": totals["read"],
            "bytes_per_kept": 16, "scan_key": key,
            "shards": {shard_name(p): dict(zip(SCAN_FIELDS, row.tolist()))
                       for p, row in zip(shards, counts)},
            "_missing": np.flatnonzero(found == 0)[:5]}


def _scan_one(item):
    """One shard's :func:`~dbp_lightning.data.keep.scan_shard` (module level: picklable)."""
    from .data.keep import scan_shard

    path, kept, stamp = item
    return scan_shard(path, kept, stamp)


def _as_is(item):
    return item


class _Items:
    """A map-style dataset applying :func:`_scan_one` to each item."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return _scan_one(self.items[i])


def _scan_shards(paths: list[str], kept, stamps: dict, num_workers: int):
    """The scan of each path in order, ``num_workers`` processes reading at once (torch's
    dataloader workers, as the training stream uses)."""
    items = [(p, kept, stamps.get(p)) for p in paths]
    if num_workers <= 0 or len(paths) <= 1:
        yield from map(_scan_one, items)
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(_Items(items), batch_size=None, collate_fn=_as_is,
                          num_workers=min(num_workers, len(paths)))


def _missing_examples(out: Path, encoding: str, kind: str, source, manifest: dict) -> list[str]:
    """Up to five kept identities that no shard holds, as text (a hashed key is looked up in
    the run's selection again, only when some are missing)."""
    values = np.load(out / "kept.npy", mmap_mode="r")[manifest["_missing"]]
    if encoding == "hex":
        return [f"{int(v['f0']):016x}{int(v['f1']):016x}" for v in values]
    import pyarrow.parquet as pq

    from .data.keep import _kept_ids, hash_to_u128
    from .pruning.pipeline import id_column

    wanted = {(int(v["f0"]), int(v["f1"])) for v in values}
    path = Path(source) / "selection.parquet"
    names = pq.read_schema(path).names
    column = id_column(names)
    columns = ["kept", column] + (["key"] if column == "uid" and "key" in names else [])
    examples = []
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        ids = _kept_ids(batch, column).to_pylist()
        for identity, v in zip(ids, hash_to_u128(ids)):
            if (int(v["f0"]), int(v["f1"])) in wanted:
                examples.append(identity)
        if len(examples) >= len(wanted):
            break
    return examples
