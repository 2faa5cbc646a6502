"""``DBPDataModule``: WebDataset shards in, a pruned stream of (image, text) batches out.

``prepare_data`` (once, on global rank 0) embeds the shards or finds the store in the cache;
``setup`` (every process) prunes the store with all the Trainer's ranks (each takes a share of
the clusters, see ``pruning/collective.py``) or finds the run in the cache, then reads which
samples were kept; ``train_dataloader`` streams the source shards in order and skips the samples
the selection dropped, so no resharding is needed.

The cache under ``cache_dir`` (an embedding store and a prune run directory, each reused when
complete) is described in ``cache.py``; every node must see it (a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import pyarrow.parquet as pq
import webdataset as wds

from . import cache
from .config import EncoderConfig, PruneConfig
from .data.keep import KeptSamples
from .data.reshard import reshard
from .data.shards import (ShardChanged, decode_caption, decode_image, expand_shards, iter_shard,
                          list_shards, shard_name, shard_stamp, with_id)


def _read_shards(src, stamps: dict[str, tuple[int, int]]):
    """webdataset stage: ``{"url": path}`` -> the shard's samples, read as the embedder read them
    (:func:`~dbp_lightning.data.shards.iter_shard`: damage and members out of place are
    handled the same way, so the stream holds exactly the samples the store holds).

    A shard that cannot be opened any more (deleted, moved or made unreadable), or whose size or
    mtime differ from those :meth:`DBPDataModule.setup` recorded, stops the epoch with an error
    naming it: skipping it would let ``with_epoch`` fill the epoch with repeated samples, and
    reading it would filter samples by a selection made from other contents.
    """
    for item in src:
        path = item["url"]
        try:
            yield from iter_shard(path, Counter(), stamp=stamps.get(path))
        except ShardChanged as exc:
            raise RuntimeError(f"{exc} while streaming it; the selection was made from the file "
                               "as it was: run setup again (a new embedding) or restore it") from exc
        except OSError as exc:
            why = (exc.strerror or str(exc)).lower()
            raise RuntimeError(f"shard {exc.filename or path}: {why} while streaming it; the pool "
                               "changed since it was embedded") from exc


def _not_none(example) -> bool:
    return example is not None


def _every_nth(src, start: int, step: int):
    """webdataset node splitter: shards start, start + step, ... (picklable for workers)."""
    return itertools.islice(src, start, None, step)


def default_image_transform():
    from torchvision import transforms as T

    return T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])


class DBPDataModule(L.LightningDataModule):
    """Prunes WebDataset shards with DBP at setup and streams what it keeps.

    Args:
        shards: training shards: a brace pattern, a glob, a directory, or a list of these.
        cache_dir: where the embedding store and the prune run are kept and reused.
        encoder: the embedding model for pruning (default: EfficientNet-Lite0 image features).
        prune: stages and options (``input``/``output`` are set here, from ``cache_dir``).
        image_transform: PIL image -> tensor for training; default: the Lightning module's
            ``preprocess_train`` if it has one, else resize-crop 224 and ``ToTensor``.
        tokenizer: list[str] -> tensor; default: the module's ``tokenizer``, else raw strings.
        batch_size: training samples per batch and per process.
        num_workers: dataloader workers (each streams its own shards).
        embed_batch_size: samples per embedding step.
        embed_dtype: "float16" or "float32" for the store.
        val_shards: optional held-out shards, streamed unpruned by ``val_dataloader``.
        reshard: write the kept samples into new, equally filled shards (in the prune run
            directory), as many as a multiple of ranks x workers, and stream those instead of
            filtering the source shards: under DDP nothing is then left out of an epoch.
        store: an embedding store of ``shards`` already written by ``dbp-lightning embed``
            (with DDP on many GPUs: embedding inside ``fit`` runs on rank 0 alone while the
            other ranks wait); it must list the same shards and ``encoder``. Default: embed
            into ``cache_dir``.
        skip_bad_shards: leave out the shards (training and held-out) that are missing, empty
            or not a tar, with a warning naming each and why (``skipped_shards`` lists them),
            instead of refusing the pool. The cache is keyed by the shards used, so a shard
            fixed later makes a new embedding; with ``store``, the store must hold exactly the
            readable shards (``dbp-lightning embed --skip_bad_shards true`` writes such a store).

    Shards are checked when they are opened for streaming: one that is gone, or whose size or
    mtime differ from what ``setup`` recorded (or, for ``setup`` itself, from what the
    embedding recorded), stops with an error naming it rather than being read.

    Under DDP every rank must take the same number of steps with full batches (the contrastive
    loss gathers equal-sized batches from all ranks), so an epoch ends at the fewest full
    batches any rank's shards give; samples beyond that are not seen in that epoch. Balanced
    shards (``reshard``) lose at most a batch per worker.
    """

    def __init__(self, shards: str | list[str], cache_dir: str = "runs/cache",
                 encoder: Optional[EncoderConfig] = None, prune: Optional[PruneConfig] = None,
                 image_transform: Optional[Callable] = None, tokenizer: Optional[Callable] = None,
                 batch_size: int = 256, num_workers: int = 4, embed_batch_size: int = 256,
                 embed_dtype: str = "float16", val_shards: Optional[str | list[str]] = None,
                 reshard: bool = False, store: Optional[str] = None,
                 skip_bad_shards: bool = False):
        super().__init__()
        self.skipped_shards: list[tuple[str, str]] = []
        self.shards = self._shards(shards, skip_bad_shards)
        self.val_shards = self._shards(val_shards, skip_bad_shards) if val_shards else None
        self.cache_dir = Path(cache_dir)
        self.encoder = (encoder or EncoderConfig(kind="efficientnet_lite0", model="efficientnet-lite0")).validate()
        self.prune_config = dataclasses.replace(prune or PruneConfig(), input="-", output="-").validate()
        if batch_size < 1 or num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        self.image_transform, self.tokenizer = image_transform, tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        self.embed_batch_size, self.embed_dtype = embed_batch_size, embed_dtype
        self.reshard = reshard
        self.store = store
        # the cache is shared by all nodes: embedding it once per node would repeat the work
        self.prepare_data_per_node = False
        self._train_shards: list[str] = self.shards
        self.report: dict = {}
        self._kept: Optional[KeptSamples] = None
        self._kept_per_shard: dict[str, int] = {}
        self._stamps: dict[str, tuple[int, int]] = {}

    def _shards(self, spec, skip_bad: bool) -> list[str]:
        if not skip_bad:
            return expand_shards(spec)
        good, bad = list_shards(spec)
        if bad:
            warnings.warn(f"DBPDataModule: leaving out {len(bad)} unreadable shard"
                          f"{'s' if len(bad) > 1 else ''} (skip_bad_shards): "
                          + "; ".join(f"{p} ({why})" for p, why in bad), stacklevel=3)
            self.skipped_shards += bad
        if not good:
            raise ValueError(f"shards: none of {len(bad)} can be read: "
                             + "; ".join(f"{p} ({why})" for p, why in bad))
        return good

    # ------------------------------------------------------------------ cache paths
    @functools.cached_property
    def store_dir(self) -> Path:
        if self.store:
            return Path(self.store)
        return cache.store_dir(self.cache_dir, self.shards, self.encoder, self.embed_dtype)

    @functools.cached_property
    def prune_dir(self) -> Path:
        return cache.prune_dir(self.cache_dir, self.store_dir, self.prune_config)

    def _world(self) -> tuple[int, int]:
        """(rank, world size) of the Trainer this module feeds; (0, 1) without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _reshard_count(self) -> int:
        """New shards: the source's count rounded up to a multiple of ranks x workers."""
        unit = self._world()[1] * max(self.num_workers, 1)
        return unit * math.ceil(len(self.shards) / unit)

    @property
    def reshard_dir(self) -> Path:
        return self.prune_dir / f"shards-{self._reshard_count()}"

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Embed (once, on global rank 0), unless the cache has the store complete or ``store``
        names one (then check that it is of these shards and this encoder)."""
        if self.store:
            cache.check_store(self.store, self.shards, self.encoder)
            return
        _ = self.store_dir  # keyed by the shards as they are now: setup checks they stay so
        cache.ensure_store(self.cache_dir, self.shards, self.encoder, self.embed_dtype,
                           self.embed_batch_size, min(self.num_workers, 2))

    def setup(self, stage: str | None = None) -> None:
        """Prune with every rank (or find the run), reshard with every rank if asked, then load
        which samples are kept and the report (every process)."""
        from .distributed import gloo_beside

        if not (self.store_dir / "manifest.json").is_file():
            raise RuntimeError(f"DBPDataModule.setup: no embedding store at {self.store_dir}; call "
                               "prepare_data() first (Trainer.fit and validate call both), or, if "
                               "it ran, a shard changed since (the cache is keyed by the shards' "
                               "sizes and mtimes)")
        # the source shards must be the files the store was embedded from, and stay so
        self._stamps = self._shard_stamps([*self.shards, *(self.val_shards or [])])
        comm = gloo_beside(self.trainer.local_rank) if self._world()[1] > 1 else None
        try:
            cache.ensure_pruned(self.cache_dir, self.store_dir, self.prune_config, comm=comm)
            self._load_selection()
            if self.reshard:  # every rank writes some of the new shards
                manifest = reshard(self.shards, self._kept, self.reshard_dir, self._reshard_count(),
                                   comm=comm, stamps=self._stamps)
                self._train_shards = [s["path"] for s in manifest["shards"]]
                self._kept_per_shard = {shard_name(s["path"]): s["rows"] for s in manifest["shards"]}
        finally:
            if comm is not None:
                comm.close()
        if self.reshard:
            self._stamps.update(self._shard_stamps(self._train_shards))
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.image_transform is None:
            self.image_transform = getattr(module, "preprocess_train", None) or default_image_transform()
        if self.tokenizer is None:
            self.tokenizer = getattr(module, "tokenizer", None)


    def _shard_stamps(self, paths: list[str]) -> dict[str, tuple[int, int]]:
        """(bytes, mtime_ns) of ``paths`` as they are now, for the streams to check each shard
        against when they open it. A source shard must still be the file the store was embedded
        from, when the store's manifest recorded it (``sources``) under the same path."""
        sources = json.loads((self.store_dir / "manifest.json").read_text()).get("sources", {})
        stamps = {}
        for path in paths:
            try:
                stamps[path] = shard_stamp(path)
            except OSError as exc:
                raise RuntimeError(f"shard {path}: {(exc.strerror or str(exc)).lower()} at setup; "
                                   "the pool changed since it was embedded") from exc
            embedded = sources.get(shard_name(path)) if path in self.shards else None
            if embedded and embedded.get("path") == path and \
                    stamps[path] != (embedded["size"], embedded["mtime_ns"]):
                raise RuntimeError(f"shard {path}: changed since it was embedded into "
                                   f"{self.store_dir} ({embedded['size']:,} bytes then, "
                                   f"{stamps[path][0]:,} now; mtime_ns {embedded['mtime_ns']} "
                                   f"then, {stamps[path][1]} now); embed it again")
        return stamps

    @property
    def selection(self):
        """The prune run's selection table (pyarrow), read on access: it holds every key, so
        the streams never load it."""
        return pq.read_table(self.prune_dir / "selection.parquet")

    def _load_selection(self) -> None:
        if not (self.prune_dir / "manifest.json").is_file():
            raise RuntimeError(f"{self.prune_dir}: no complete prune run; prepare_data must run first")
        self.report = json.loads((self.prune_dir / "report.json").read_text())
        # the stream's filter holds one shard's ids at a time, never a set of the whole pool
        self._kept = KeptSamples(self.store_dir, self.prune_dir)
        self._kept_per_shard = self._kept.per_shard()

    # ------------------------------------------------------------------ streams
    def _pipeline(self, shards: list[str], keep: Optional[KeptSamples]) -> wds.WebDataset:
        rank, world = self._world()
        # split by the Trainer's rank, not webdataset's guess from RANK / torch.distributed;
        # samples read as the embedder read them (_read_shards)
        stages = [wds.SimpleShardList(shards),
                  functools.partial(_every_nth, start=rank, step=world), wds.split_by_worker,
                  functools.partial(_read_shards, stamps=self._stamps),
                  wds.map(with_id)]  # parse the json once per sample, for the filter and the batch
        if keep is not None:
            stages.append(wds.select(keep))
        stages += [wds.map(self._to_example), wds.select(_not_none),
                   wds.batched(self.batch_size, partial=world == 1)]
        return wds.DataPipeline(*stages)

    def _to_example(self, sample: dict):
        image, caption = decode_image(sample), decode_caption(sample)
        if image is None or caption is None:
            return None  # the embedder skipped and counted it too
        text = self.tokenizer([caption])[0] if self.tokenizer is not None else caption
        return self.image_transform(image), text, sample["__id__"]

    def batches_per_rank(self, world_size: int) -> list[int]:
        """Batches each rank's workers produce from the selection, split as the stream splits
        shards (by rank, then by worker); full batches only under DDP."""
        workers = max(self.num_workers, 1)
        per_batch = (lambda n: math.ceil(n / self.batch_size)) if world_size == 1 else (
            lambda n: n // self.batch_size)
        out = []
        for rank in range(world_size):
            mine = self._train_shards[rank::world_size]
            out.append(sum(per_batch(sum(self._kept_per_shard.get(shard_name(s), 0)
                                         for s in mine[w::workers]))
                           for w in range(workers)))
        return out

    def train_dataloader(self):
        """(images, texts, ids) batches of the kept samples, each once per epoch per process
        group; shards split by rank, then by worker."""
        if self._kept is None:
            raise RuntimeError("DBPDataModule.train_dataloader: nothing is pruned yet; call "
                               "prepare_data() and setup() first (Trainer.fit calls both)")
        rank, world = self._world()
        per_rank = self.batches_per_rank(world)
        if world > len(self._train_shards):
            raise ValueError(f"{len(self._train_shards)} shards cannot feed {world} ranks")
        keep = None if self.reshard else self._kept  # resharded tars hold only kept samples
        loader = wds.WebLoader(self._pipeline(self._train_shards, keep), batch_size=None,
                               num_workers=self.num_workers)
        n = min(per_rank)  # every rank the same number of steps
        if n == 0:
            raise ValueError(f"rank {per_rank.index(0)} gets no full batch of {self.batch_size}: "
                             "use a smaller batch_size, fewer workers, or reshard=True")
        with warnings.catch_warnings():
            # webdataset warns that with_length does not bound the epoch; with_epoch does that
            warnings.filterwarnings("ignore", message=r".with_length\(\) only sets the value")
            return loader.with_epoch(n).with_length(n)

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return wds.WebLoader(self._pipeline(self.val_shards, None), batch_size=None,
                             num_workers=self.num_workers)
