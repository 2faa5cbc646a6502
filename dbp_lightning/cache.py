"""The embedding and prune cache shared by ``DBPDataModule``, ``compare`` and ``demo``.

``<cache_dir>/embeddings-<hash>/``: an embedding store, keyed by the shards' names, sizes and
mtimes, the encoder config (and its weights file), the dtype and the package versions.
``<cache_dir>/prune-<hash>/``: a prune run directory, keyed by the store and the prune config.
A directory with its ``manifest.json`` is complete and reused; a killed embedding resumes shard
by shard, a killed prune starts again (it is the cheap part).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from .config import EncoderConfig, PruneConfig
from .data.shards import shard_name


def _file_stamp(path: Optional[str]):
    """(path, bytes, mtime_ns) of a weights or config file, so replacing it invalidates the cache."""
    if path and os.path.exists(path):
        return (path, os.path.getsize(path), os.stat(path).st_mtime_ns)
    return path


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shards_fingerprint(paths: list[str]) -> list[tuple]:
    """(name, bytes, mtime_ns) per shard: what the cache key sees of the input."""
    return [(shard_name(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


def encoder_key(encoder: EncoderConfig) -> dict:
    """What an embedding by ``encoder`` depends on: its config, its weights and config files
    (replacing one changes the key) and the package versions. ``encoder.identity()``: a store
    embedded before ``random_init`` existed keeps its key."""
    from .rundir import versions

    return {"encoder": encoder.identity(), "versions": versions(),
            "files": [_file_stamp(encoder.checkpoint), _file_stamp(encoder.model)]}


def store_dir(cache_dir: str | os.PathLike, shards: list[str], encoder: EncoderConfig,
              dtype: str) -> Path:
    """Where the store of ``shards`` embedded by ``encoder`` lives (whether or not it exists)."""
    key = digest({"shards": shards_fingerprint(shards), **encoder_key(encoder), "dtype": dtype})
    return Path(cache_dir) / f"embeddings-{key}"


def prune_dir(cache_dir: str | os.PathLike, store: Path, config: PruneConfig) -> Path:
    """Where the prune run of ``store`` under ``config`` lives (input/output do not count).

    Keyed by the complete store's fingerprint (a store named by the user may be rewritten in
    place), so the store must exist.
    """
    from .store import fingerprint

    stages = dataclasses.replace(config, input="-", output="-").to_dict()
    return Path(cache_dir) / f"prune-{digest({'store': fingerprint(store), 'prune': stages})}"


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
                 dtype: str = "float16", batch_size: int = 256, num_workers: int = 2) -> Path:
    """The complete store of ``shards`` under ``encoder``, embedding (or resuming) it if needed."""
    from .embed import embed_shards
    from .lock import directory_lock

    out = store_dir(cache_dir, shards, encoder, dtype)
    if not (out / "manifest.json").is_file():
        # another job may be embedding the same store into the shared cache: wait, then reuse
        with directory_lock(out, wait=LOCK_WAIT):
            if not (out / "manifest.json").is_file():
                embed_shards(shards, str(out), encoder, batch_size, num_workers, dtype,
                             trainer_kwargs={"devices": 1})
    return out


def ensure_pruned(cache_dir: str | os.PathLike, store: Path, config: PruneConfig,
                  progress: bool = True, comm=None) -> Path:
    """The complete prune run of ``store`` under ``config``, running it if needed.

    With ``comm`` (a :mod:`~dbp_lightning.pruning.collective` collective), every rank calls
    this: they take rank 0's view of whether the run exists, prune together, rank 0 writes, and
    all return once it is written.
    """
    import numpy as np

    from .pruning.collective import Local
    from .pruning.pipeline import load_input, prune
    from .rundir import claim_output, write_run

    comm = comm or Local()
    out = prune_dir(cache_dir, store, config)
    missing = np.array([not (out / "manifest.json").is_file()])
    if comm.broadcast(missing if comm.rank == 0 else None)[0]:  # one decision for all ranks
        # another job may be pruning the same run into the shared cache: wait for it, then
        # take its run rather than prune it again
        with claim_output(out, wait=LOCK_WAIT, comm=comm):
            missing = np.array([not (out / "manifest.json").is_file()])
            if comm.broadcast(missing if comm.rank == 0 else None)[0]:
                config = dataclasses.replace(config, input=str(store), output=str(out))
                emb, metadata, input_id = load_input(config, comm)
                result = prune(emb, config, metadata=metadata,
                               progress=progress and comm.rank == 0, comm=comm)
                if comm.rank == 0:
                    write_run(result, out, config.to_dict(), input_id)
    comm.barrier()
    return out
