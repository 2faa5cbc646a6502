"""``DBPDataModule``: WebDataset shards in, a pruned stream of (image, text) batches out.

``prepare_data`` (once, on global rank 0) embeds the shards or finds the store in the cache;
``setup`` (every process) prunes the store with all the Trainer's ranks (each takes a share of
the clusters, see ``pruning/collective.py``) or finds the run in the cache, then reads which
samples were kept; ``train_dataloader`` streams the source shards in order and skips the samples
the selection dropped, so no resharding is needed.

With ``selection=`` (any prune run directory) or ``subset=`` (DataComp's subset file) nothing is
embedded or pruned: ``setup`` scans the shards once for the kept identities (cached) and the
stream keeps the samples whose identity is kept (:class:`~dbp_lightning.data.keep.KeptIdentities`).

The cache under ``cache_dir`` (an embedding store, a prune run directory, a selection's scan,
each reused when complete) is described in ``cache.py``; every node must see it (a shared
filesystem).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import pyarrow.parquet as pq
import webdataset as wds

from . import cache
from .config import (EncoderConfig, PruneConfig, check_pool_size, default_workers,
                     pool_size_needed)
from .data.keep import KeptIdentities, KeptSamples
from .data.reshard import reshard
from .data.stream import Epoch, ResampledShards, SampleShuffle, ShuffledShards
from .data.shards import (ShardChanged, count_pool, decode_caption, decode_image, expand_shards,
                          iter_shard, list_shards, shard_name, shard_stamp, with_id)

log = logging.getLogger(__name__)


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


class _Decodable:
    """A keep test that also drops what the stream would drop (an image that does not decode, no
    caption): resharding a selection of another pool writes only samples the stream yields, so
    the new shards' row counts are what an epoch streams."""

    def __init__(self, keep: KeptIdentities):
        self.keep = keep

    def __call__(self, sample: dict) -> bool:
        return self.keep(sample) and decode_image(sample) is not None and \
            decode_caption(sample) is not None

    def per_shard(self) -> dict[str, int]:
        return self.keep.per_shard()


class _CountedEpoch:
    """The train loader, counting what one full pass streams and saying it at its end: the
    samples streamed against those expected, and the kept identities no shard holds."""

    def __init__(self, loader, batches: int, expected: int, where: str, missing: int | None,
                 start=None):
        self.loader, self.batches, self.expected = loader, batches, expected
        self.where, self.missing, self.start = where, missing, start
        self.streamed: int | None = None  # of the last complete pass

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        if self.start is not None:
            self.start()  # the epoch the shuffling is seeded with, before workers start
        streamed = 0
        for batch in self.loader:
            streamed += len(batch[2])
            yield batch
        self.streamed = streamed
        line = (f"DBPDataModule: the epoch streamed {streamed:,} samples{self.where}, "
                f"{self.expected:,} expected")
        if self.missing:
            line += f"; {_count(self.missing, 'kept identity is', 'kept identities are')} in no shard"
        if streamed != self.expected:
            warnings.warn(line + ": the shards changed while streaming?", stacklevel=2)
        else:
            log.info(line)


#: reshard="auto" reshards below this kept fraction ...
AUTO_RESHARD_KEEP = 0.5
#: ... for runs of at least this many epochs (bench_stream.py, local disk: filtering at keep 0.28
#: streams 0.90x as fast as resharded shards, and the one-off reshard pays back after ~8 epochs)
AUTO_RESHARD_EPOCHS = 8


class DBPDataModule(L.LightningDataModule):
    """Prunes WebDataset shards with DBP at setup and streams what it keeps, or streams what a
    prune run (``selection``) or a DataComp subset (``subset``) keeps.

    Args:
        shards: training shards: a brace pattern, a glob, a directory, or a list of these.
        cache_dir: where the embedding store, the prune run and a selection's scan are kept and
            reused (keyed by content: see ``cache.py``).
        encoder: the embedding model for pruning (default: EfficientNet-Lite0 image features);
            unused with ``selection`` or ``subset``.
        prune: stages and options (``input``/``output`` are set here, from ``cache_dir``).
        image_transform: PIL image -> tensor for training; default: the Lightning module's
            ``preprocess_train`` if it has one, else resize-crop 224 and ``ToTensor``.
        tokenizer: list[str] -> tensor; default: the module's ``tokenizer``, else raw strings.
        batch_size: training samples per batch and per process.
        num_workers: dataloader workers (each streams its own shards); None: 4, or the
            cores there are if fewer.
        embed_batch_size: samples per embedding step.
        embed_dtype: "float16" or "float32" for the store.
        val_shards: optional held-out shards, streamed unpruned by ``val_dataloader``.
        reshard: True, False or "auto" (chosen at setup from the kept fraction and the
            Trainer's epochs, with the rule ``benchmarks/bench_stream.py`` supports, and logged).
            True: write the kept samples into new, equally filled shards (in the prune run
            directory, or the selection's cache entry), as many as a multiple of ranks x
            workers, and stream those instead of filtering the source shards: under DDP nothing
            is then left out of an epoch.
        store: an embedding store of ``shards`` already written by ``dbp-lightning embed``
            (with DDP on many GPUs: embedding inside ``fit`` runs on rank 0 alone while the
            other ranks wait); it must list the same shards and ``encoder``. Default: embed
            into ``cache_dir``.
        skip_bad_shards: leave out the shards (training and held-out) that are missing, empty
            or not a tar, with a warning naming each and why (``skipped_shards`` lists them),
            instead of refusing the pool. The cache is keyed by the shards used, so a shard
            fixed later makes a new embedding; with ``store``, the store must hold exactly the
            readable shards (``dbp-lightning embed --skip_bad_shards true`` writes such a store).
        selection: a prune run directory (its ``selection.parquet``: ``kept`` and ``uid``, else
            ``key``), of any pool layout (DataComp's embeddings pruned without a store of ours
            included): train on the samples of ``shards`` whose identity (the json's ``uid``,
            else the key) it keeps. Nothing is embedded or pruned.
        subset: DataComp's subset file, a ``.npy`` of a sorted structured array of dtype
            ``u8,u8`` (a uid's 128 bits, as ``subset.npy`` of a run and other tools write it):
            train on the samples whose json ``uid`` is in it, looked up by DataComp's own rule
            (``divmod(int(uid, 16), 2**64)`` and ``np.searchsorted``); a sample whose json has no
            32-hex uid cannot match and is counted (``report["no_uid"]``). Nothing is embedded
            or pruned.
        recompute: embed and prune again even if the cache has them (with ``store``: prune
            again; with ``selection``/``subset``: scan the shards again), once per DataModule.
        seed: seeds the training stream's shuffling, with the epoch, rank and worker.
        shuffle: shuffle the training stream (validation never is): each worker reads its
            shards in a new order every epoch, through a buffer of ``shuffle_buffer`` samples
            started at ``shuffle_initial`` (open_clip's 5,000 and 1,000; raw samples, before
            decoding).
        resampled: draw shards with replacement (open_clip's ``--dataset-resampled``); an epoch
            is ``train_num_samples`` samples over all ranks, and every rank takes
            ``train_num_samples // (batch_size x ranks)`` steps.
        train_num_samples: samples per epoch with ``resampled`` (required then).
        report: write the prune run's ``report.html`` (as ``dbp-lightning prune`` does) when it
            is pruned here: rank 0 reads the thumbnails it shows from the shards that hold them
            while the other ranks wait; False skips it.

    One of ``prune``/``store`` (prune at setup), ``selection`` and ``subset`` says which samples
    are trained on; two of them are refused. With ``selection`` or ``subset``, ``setup`` writes
    the kept identities once into the cache, sorted 128-bit values (16 bytes per kept sample,
    memory-mapped by every worker, one copy per node), and scans every shard once, as the stream
    reads it, to count the kept samples each shard streams (every rank must take the same number
    of steps), cached by the kept identities and the shards' names and sizes. A kept identity
    that no shard holds is counted, named (``report["not_in_shards"]`` and examples) and warned
    about; each epoch logs the samples streamed against those expected.

    Shards are checked when they are opened for streaming: one that is gone, or whose size or
    mtime differ from what ``setup`` recorded, stops with an error naming it rather than being
    read. ``setup`` itself refuses a shard whose size differs from what the embedding recorded;
    one whose mtime alone differs (a copy, a ``touch``) is taken as the same file and logged:
    comparing contents would read the pool again.

    Under DDP every rank must take the same number of steps with full batches (the contrastive
    loss gathers equal-sized batches from all ranks), so an epoch ends at the fewest full
    batches any rank's shards give; samples beyond that are not seen in that epoch. Balanced
    shards (``reshard``) lose at most a batch per worker.
    """

    def __init__(self, shards: str | list[str], cache_dir: str = "runs/cache",
                 encoder: Optional[EncoderConfig] = None, prune: Optional[PruneConfig] = None,
                 image_transform: Optional[Callable] = None, tokenizer: Optional[Callable] = None,
                 batch_size: int = 256, num_workers: Optional[int] = None, embed_batch_size: int = 256,
                 embed_dtype: str = "float16", val_shards: Optional[str | list[str]] = None,
                 reshard: bool | str = False, store: Optional[str] = None,
                 skip_bad_shards: bool = False, selection: Optional[str] = None,
                 subset: Optional[str] = None, recompute: bool = False, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 5000, shuffle_initial: int = 1000,
                 resampled: bool = False, train_num_samples: Optional[int] = None,
                 report: bool = True):
        super().__init__()
        self.source = _selection_source(prune, store, selection, subset)
        self.skipped_shards: list[tuple[str, str]] = []
        self.shards = self._shards(shards, skip_bad_shards)
        self.val_shards = self._shards(val_shards, skip_bad_shards) if val_shards else None
        self.cache_dir = Path(cache_dir)
        self.encoder = (encoder or EncoderConfig(kind="efficientnet_lite0", model="efficientnet-lite0")).validate()
        self.prune_config = (dataclasses.replace(prune or PruneConfig(), input="-", output="-").validate()
                             if self.source == "prune" else None)
        if self.prune_config is not None:
            self._check_pool_size()
        num_workers = default_workers() if num_workers is None else num_workers
        if batch_size < 1 or num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        self.image_transform, self.tokenizer = image_transform, tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        self.embed_batch_size, self.embed_dtype = embed_batch_size, embed_dtype
        if reshard not in (True, False, "auto"):
            raise ValueError(f"reshard: true, false or auto, got {reshard!r}")
        self.reshard = reshard  # resolved at setup (auto: from the keep rate and the epochs)
        if resampled and not (train_num_samples and train_num_samples > 0):
            raise ValueError("train_num_samples: resampled=True needs the samples per epoch "
                             "(over all ranks), e.g. --data.train_num_samples 1000000")
        self.seed, self.shuffle, self.resampled = seed, shuffle, resampled
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.train_num_samples = train_num_samples
        self.write_report = report
        SampleShuffle(shuffle_buffer, shuffle_initial, seed, Epoch(), 0)  # refuse bad sizes now
        self._epoch, self._passes = Epoch(), 0
        self.store = store
        self.selection_source = selection or subset
        # each cache entry is made again once, then reused by later calls (fit, then validate)
        self._recompute = dict.fromkeys(("store", "prune", "selection"), bool(recompute))
        # the cache is shared by all nodes: embedding it once per node would repeat the work
        self.prepare_data_per_node = False
        self._train_shards: list[str] = self.shards
        self.report: dict = {}
        self._kept: Optional[KeptSamples | KeptIdentities] = None
        self._kept_per_shard: dict[str, int] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        self._run_dir: Optional[Path] = None  # the prune run or the selection's cache entry

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

    def _check_pool_size(self) -> None:
        """Refuse, before anything is embedded, prune options the pool is too small for (a
        default ``semdedup.k`` of 1,000 on a pool of 200): from the shards' sample counts, read
        only until the largest size an option needs is reached."""
        n, exact = count_pool(self.shards, at_least=pool_size_needed(self.prune_config))
        if exact:
            check_pool_size(self.prune_config, n,
                            where="the pool's " + _count(len(self.shards), "shard", "shards"))

    def _take_recompute(self, entry: str) -> bool:
        """Whether to make ``entry`` again now (True once per DataModule with ``recompute``)."""
        again, self._recompute[entry] = self._recompute[entry], False
        return again

    # ------------------------------------------------------------------ cache paths
    @functools.cached_property
    def store_dir(self) -> Path:
        if self.source != "prune":
            raise RuntimeError(f"DBPDataModule: {self.source}= trains without an embedding store")
        if self.store:
            return Path(self.store)
        return cache.store_dir(self.cache_dir, self.shards, self.encoder, self.embed_dtype)

    @functools.cached_property
    def prune_dir(self) -> Path:
        if self.source != "prune":
            raise RuntimeError(f"DBPDataModule: {self.source}= trains on a run made elsewhere: "
                               f"{self.selection_source}")
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
        return (self._run_dir or self.prune_dir) / f"shards-{self._reshard_count()}"

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Embed (once, on global rank 0), unless the cache has the store complete or ``store``
        names one (then check that it is of these shards and this encoder); nothing with
        ``selection`` or ``subset``."""
        if self.source != "prune":
            return
        if self.store:
            cache.check_store(self.store, self.shards, self.encoder)
            return
        _ = self.store_dir  # keyed by the shards as they are now: setup checks they stay so
        cache.ensure_store(self.cache_dir, self.shards, self.encoder, self.embed_dtype,
                           self.embed_batch_size, min(self.num_workers, 2),
                           recompute=self._take_recompute("store"))

    def setup(self, stage: str | None = None) -> None:
        """Prune with every rank (or find the run), or, with ``selection``/``subset``, scan the
        shards for the kept identities with every rank (or find the scan); reshard with every
        rank if asked, then load which samples are kept and the report (every process)."""
        from .distributed import gloo_beside

        if self.source == "prune" and not (self.store_dir / "manifest.json").is_file():
            raise RuntimeError(f"DBPDataModule.setup: no embedding store at {self.store_dir}; call "
                               "prepare_data() first (Trainer.fit and validate call both), or, if "
                               "it ran, a shard changed since (the cache is keyed by the shards' "
                               "names and sizes)")
        # the source shards must be the files the store was embedded from, and stay so
        self._stamps = self._shard_stamps([*self.shards, *(self.val_shards or [])])
        comm = gloo_beside(self.trainer.local_rank) if self._world()[1] > 1 else None
        try:
            if self.source == "prune":
                self._run_dir = cache.ensure_pruned(self.cache_dir, self.store_dir, self.prune_config,
                                                    comm=comm, recompute=self._take_recompute("prune"),
                                                    report=self.write_report)
                self._load_selection()
            else:
                self._run_dir = cache.ensure_selection(
                    self.cache_dir, self.selection_source, self.source, self.shards, self._stamps,
                    num_workers=self.num_workers, comm=comm,
                    recompute=self._take_recompute("selection"))
                self._load_identities()
            self.reshard = self._resolve_reshard()
            if self.reshard:  # every rank writes some of the new shards
                keep = self._kept if self.source == "prune" else _Decodable(self._kept)
                manifest = reshard(self.shards, keep, self.reshard_dir, self._reshard_count(),
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


    def _resolve_reshard(self) -> bool:
        """``reshard="auto"``: reshard when the kept fraction is under :data:`AUTO_RESHARD_KEEP`
        and the run trains at least :data:`AUTO_RESHARD_EPOCHS` epochs, where
        ``benchmarks/bench_stream.py`` found it pays (README); says which and why."""
        if self.reshard != "auto":
            return bool(self.reshard)
        kept = sum(self._kept_per_shard.values())
        pool = (self._kept.n if self.source == "prune"
                else self.report.get("samples_read", 0)) or 1
        epochs = self._planned_epochs(kept)
        choice = kept / pool < AUTO_RESHARD_KEEP and epochs >= AUTO_RESHARD_EPOCHS
        if self._world()[0] == 0:
            log.info("DBPDataModule: reshard=auto -> %s: keeps %.0f%% of the pool over ~%s epochs "
                     "(resharding pays below %.0f%% kept and from %d epochs, "
                     "benchmarks/bench_stream.py)", "reshard" if choice else "filter",
                     100 * kept / pool, "?" if epochs == math.inf else f"{epochs:g}",
                     100 * AUTO_RESHARD_KEEP, AUTO_RESHARD_EPOCHS)
        return choice

    def _planned_epochs(self, kept: int) -> float:
        """Epochs the Trainer will run: max_epochs, or max_steps over this pool's steps per
        epoch; inf when neither bounds it, 1 without a Trainer."""
        if self.trainer is None:
            return 1
        max_epochs = getattr(self.trainer, "max_epochs", None)
        max_steps = getattr(self.trainer, "max_steps", -1)
        if max_steps is not None and max_steps > 0:
            per_epoch = max(kept // (self.batch_size * self._world()[1]), 1)
            steps_epochs = max_steps / per_epoch
            return min(steps_epochs, max_epochs) if max_epochs and max_epochs > 0 else steps_epochs
        return max_epochs if max_epochs and max_epochs > 0 else math.inf

    def _shard_stamps(self, paths: list[str]) -> dict[str, tuple[int, int]]:
        """(bytes, mtime_ns) of ``paths`` as they are now, for the streams to check each shard
        against when they open it. A source shard must still have the size the store's manifest
        recorded for it (``sources``, by shard name): a shard rewritten with another size is
        refused. One whose mtime alone differs (a copy, a ``touch``) is taken as the same file,
        as the cache key takes it, and logged: comparing contents would read the pool again."""
        sources = {}
        if self.source == "prune":
            sources = json.loads((self.store_dir / "manifest.json").read_text()).get("sources", {})
        stamps, touched = {}, []
        for path in paths:
            try:
                stamps[path] = shard_stamp(path)
            except OSError as exc:
                raise RuntimeError(f"shard {path}: {(exc.strerror or str(exc)).lower()} at setup; "
                                   "the pool changed since it was embedded") from exc
            embedded = sources.get(shard_name(path)) if path in self.shards else None
            if not embedded:
                continue
            if stamps[path][0] != embedded["size"]:
                raise RuntimeError(f"shard {path}: changed since it was embedded into "
                                   f"{self.store_dir} ({embedded['size']:,} bytes then, "
                                   f"{stamps[path][0]:,} now); embed it again")
            if stamps[path][1] != embedded["mtime_ns"]:
                touched.append(path)
        if touched:
            log.info("DBPDataModule: %d shard%s (e.g. %s) %s another mtime than when embedded "
                     "into %s and the same size: taken as the same file%s (a copy or a touch)",
                     len(touched), "s" if len(touched) > 1 else "", touched[0],
                     "have" if len(touched) > 1 else "has", self.store_dir,
                     "s" if len(touched) > 1 else "")
        return stamps

    @property
    def selection(self):
        """The selection table (pyarrow), read on access: it holds every key, so the streams
        never load it. The prune run's; with ``selection``, that run's; with ``subset``, one
        ``uid`` column (32 hex digits) of the kept uids."""
        if self.source == "subset":
            import numpy as np
            import pyarrow as pa

            values = np.load(self._selection_dir() / "kept.npy", mmap_mode="r")
            return pa.table({"uid": [f"{int(a):016x}{int(b):016x}"
                                     for a, b in zip(values["f0"], values["f1"])]})
        run = Path(self.selection_source) if self.source == "selection" else self.prune_dir
        return pq.read_table(run / "selection.parquet")

    def _selection_dir(self) -> Path:
        if self._run_dir is None:
            raise RuntimeError("DBPDataModule: call setup() first")
        return self._run_dir

    def _load_selection(self) -> None:
        if not (self.prune_dir / "manifest.json").is_file():
            raise RuntimeError(f"{self.prune_dir}: no complete prune run; prepare_data must run first")
        self.report = json.loads((self.prune_dir / "report.json").read_text())
        # the stream's filter holds one shard's ids at a time, never a set of the whole pool
        self._kept = KeptSamples(self.store_dir, self.prune_dir)
        self._kept_per_shard = self._kept.per_shard()
        if self._world()[0] == 0:  # what fit trains on, and where a curator looks at it
            r = self.report
            html = self.prune_dir / "report.html"
            log.info("DBPDataModule: kept %s of %s samples (%.1f%%; %s) -> %s%s", f"{r['kept']:,}",
                     f"{r['pool']:,}", 100 * r["kept"] / max(r["pool"], 1),
                     " -> ".join(st["stage"] for st in r["stages"]), self.prune_dir,
                     f"; report {html}" if html.is_file() else "")

    def _load_identities(self) -> None:
        """The selection's scan: the keep test, kept samples per shard, the report, and a line
        (a warning when kept identities are in no shard)."""
        scan = json.loads((self._run_dir / "manifest.json").read_text())
        per_shard = {name: counts["streamed"] for name, counts in scan["shards"].items()}
        self._kept = KeptIdentities(self._run_dir / "kept.npy", scan["scan_key"]["encoding"],
                                    uid_only=self.source == "subset", per_shard=per_shard)
        self._kept_per_shard = per_shard
        report = {k: v for k, v in scan.items() if k not in ("shards", "scan_key")}
        run_report = Path(self.selection_source) / "report.json"
        if self.source == "selection" and run_report.is_file():
            report["run"] = json.loads(run_report.read_text())
        self.report = report
        if self._world()[0] != 0:
            return
        dropped = [_count(scan[field], one, many) for field, one, many in (
            ("undecodable", "kept image does not decode", "kept images do not decode"),
            ("no_caption", "kept sample has no caption", "kept samples have no caption"))
            if scan[field]]
        line = (f"DBPDataModule: {self.source} {self.selection_source} keeps "
                f"{_count(scan['kept'], 'identity', 'identities')}; {scan['in_shards']:,} "
                f"{'is' if scan['in_shards'] == 1 else 'are'} in the {_count(len(self.shards), 'shard', 'shards')}, "
                f"{_count(scan['streamed'], 'sample streams', 'samples stream')} each epoch"
                + (f" ({', '.join(dropped)})" if dropped else "")
                + (f"; {_count(scan['no_uid'], 'sample has', 'samples have')} no 32-hex uid in "
                   "the json and cannot match" if scan["no_uid"] else ""))
        if scan["not_in_shards"]:
            examples = ", ".join(scan.get("not_in_shards_examples", [])[:3])
            warnings.warn(f"{line}; {_count(scan['not_in_shards'], 'kept identity is', 'kept identities are')} "
                          f"in no shard (e.g. {examples})", stacklevel=3)
        else:
            log.info(line)

    # ------------------------------------------------------------------ streams
    def _pipeline(self, shards: list[str], keep, train: bool = False) -> wds.WebDataset:
        rank, world = self._world()
        shuffle = train and self.shuffle
        if train and self.resampled:  # each worker draws its own shards, for ever
            stages = [ResampledShards(shards, self.seed, self._epoch, rank)]
        else:
            # split by the Trainer's rank, not webdataset's guess from RANK / torch.distributed
            stages = [wds.SimpleShardList(shards),
                      functools.partial(_every_nth, start=rank, step=world), wds.split_by_worker]
            if shuffle:
                stages.append(ShuffledShards(self.seed, self._epoch, rank))
        # samples read as the embedder read them (_read_shards)
        stages += [functools.partial(_read_shards, stamps=self._stamps),
                   wds.map(with_id)]  # parse the json once per sample, for the filter and the batch
        if keep is not None:
            stages.append(wds.select(keep))
        if shuffle:
            stages.append(SampleShuffle(self.shuffle_buffer, self.shuffle_initial, self.seed,
                                        self._epoch, rank))
        stages += [wds.map(self._to_example), wds.select(_not_none),
                   wds.batched(self.batch_size, partial=world == 1)]
        return wds.DataPipeline(*stages)

    def _to_example(self, sample: dict):
        image, caption = decode_image(sample), decode_caption(sample)
        if image is None or caption is None:
            return None  # the embedder skipped and counted it too
        text = self.tokenizer([caption])[0] if self.tokenizer is not None else caption
        return self.image_transform(image), text, sample["__id__"]

    def _per_worker(self, world_size: int) -> list[list[int]]:
        """Kept samples each worker of each rank streams, split as the stream splits shards (by
        rank, then by worker)."""
        workers = max(self.num_workers, 1)
        return [[sum(self._kept_per_shard.get(shard_name(s), 0)
                     for s in self._train_shards[rank::world_size][w::workers])
                 for w in range(workers)] for rank in range(world_size)]

    def batches_per_rank(self, world_size: int) -> list[int]:
        """Batches each rank's workers produce from the selection, split as the stream splits
        shards (by rank, then by worker); full batches only under DDP."""
        per_batch = (lambda n: math.ceil(n / self.batch_size)) if world_size == 1 else (
            lambda n: n // self.batch_size)
        return [sum(per_batch(n) for n in workers) for workers in self._per_worker(world_size)]

    def train_dataloader(self):
        """(images, texts, ids) batches of the kept samples, each once per epoch per process
        group; shards split by rank, then by worker. At the end of each epoch a line says how
        many samples were streamed and how many were expected."""
        if self._kept is None:
            raise RuntimeError("DBPDataModule.train_dataloader: nothing is pruned yet; call "
                               "prepare_data() and setup() first (Trainer.fit calls both)")
        rank, world = self._world()
        per_rank = self.batches_per_rank(world)
        if world > len(self._train_shards):
            raise ValueError(f"{len(self._train_shards)} shards cannot feed {world} ranks")
        keep = None if self.reshard else self._kept  # resharded tars hold only kept samples
        loader = wds.WebLoader(self._pipeline(self._train_shards, keep, train=True),
                               batch_size=None, num_workers=self.num_workers)
        if self.resampled:  # open_clip's rule: the epoch's samples over the global batch
            n = self.train_num_samples // (self.batch_size * world)
            if n == 0:
                raise ValueError(f"train_num_samples={self.train_num_samples} is less than one "
                                 f"batch of {self.batch_size} on each of {world} ranks")
            per_rank = [n] * world
        n = min(per_rank)  # every rank the same number of steps
        if n == 0:
            raise ValueError(f"rank {per_rank.index(0)} gets no full batch of {self.batch_size}: "
                             "use a smaller batch_size, fewer workers, or reshard=True")
        expected = (sum(self._per_worker(1)[0]) if world == 1 and not self.resampled
                    else n * self.batch_size)
        where = "" if world == 1 else f" on rank {rank} of {world} ({n} full batches)"
        with warnings.catch_warnings():
            # webdataset warns that with_length does not bound the epoch; with_epoch does that
            warnings.filterwarnings("ignore", message=r".with_length\(\) only sets the value")
            loader = loader.with_epoch(n).with_length(n)
        return _CountedEpoch(loader, n, expected, where, self.report.get("not_in_shards"),
                             self._start_epoch)

    def _start_epoch(self) -> None:
        """Before a training pass: the epoch its shuffling is seeded with (the Trainer's, so a
        resumed fit streams what an uninterrupted one would; without a Trainer, the count of
        passes begun)."""
        if self.trainer is not None:
            self._epoch.value = self.trainer.current_epoch
        else:
            self._epoch.value = self._passes
        self._passes += 1

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return wds.WebLoader(self._pipeline(self.val_shards, None), batch_size=None,
                             num_workers=self.num_workers)


def _count(n: int, one: str, many: str) -> str:
    """``n`` with the words that agree with it: "1 shard", "2,000 shards"."""
    return f"{n:,} {one if n == 1 else many}"


def _selection_source(prune, store, selection, subset) -> str:
    """Which argument says what is trained on: ``"prune"`` (``prune``/``store``, or neither),
    ``"selection"`` or ``"subset"``; two of them are refused, and a selection or subset that is
    not there."""
    given = [name for name, value in (("selection", selection), ("subset", subset),
                                      ("prune", prune), ("store", store)) if value is not None]
    chosen = [name for name in given if name in ("selection", "subset")]
    if chosen and len(given) > 1:
        raise ValueError(f"DBPDataModule: {' and '.join(n + '=' for n in given)} {'both' if len(given) == 2 else 'all'} choose the "
                         "training samples; give one of selection= (a prune run directory), subset= "
                         "(a DataComp subset .npy) or prune=/store= (prune at setup); on the command "
                         f"line, drop one with --data.{given[1]} null")
    if "selection" in chosen and not (Path(selection) / "selection.parquet").is_file():
        raise ValueError(f"selection: {selection} has no selection.parquet; give a prune run directory")
    if "subset" in chosen and not Path(subset).is_file():
        raise ValueError(f"subset: no file {subset}; give DataComp's subset .npy (a run's subset.npy)")
    return chosen[0] if chosen else "prune"
