"""``dbp-lightning embed``: WebDataset shards -> an embedding store, through ``Trainer.predict``.

The same code runs on one CPU, one GPU, or DDP over GPUs and nodes (launched by torchrun,
SLURM or Lightning's own launcher; not ``ddp_spawn``): each rank takes every
world-size-th shard, each dataloader worker every num_workers-th of those, and a worker yields a
shard as chunks of decoded, preprocessed samples. :class:`ShardWriter` collects a shard's chunks
and writes ``<shard>.npy`` + ``<shard>.parquet`` and last ``<shard>.done.json``, each atomically;
a shard with a done file is never embedded again, so a killed run resumes where it stopped.
Each rank refuses a shard that repeats a sample id of a shard it wrote before (finished runs
included) as soon as it is embedded; when every rank has finished, rank 0 checks ids across all
shards and writes ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .atomic import write_json, write_npy, write_parquet
from .data.shards import (caption_fault, count_pool, decode_caption, decode_image, expand_shards,
                          iter_shard, list_shards, sample_id, shard_name, shard_stamp)
from .encoders import Encoder, EncoderConfig, build_encoder
from .lock import DirectoryBusy, directory_lock
from .store import FORMAT, VERSION, EmbeddingStore

DONE = ".done.json"


def _json_fields(raw: bytes | None, fields: tuple[str, ...]) -> dict:
    """Numeric fields of a sample's json (LAION ``similarity``, DataComp
    ``clip_l14_similarity_score``); None where missing or not a number."""
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    out = {}
    for f in fields:
        value = meta.get(f) if isinstance(meta, dict) else None
        out[f] = float(value) if isinstance(value, (int, float)) else None
    return out


def is_done(out_dir: Path, shard: str) -> bool:
    """Whether ``shard`` has been embedded into ``out_dir`` from the file as it is now: a done
    file that recorded another size or mtime (the shard was replaced or fixed since) does not
    count, and the shard is embedded again."""
    done = out_dir / f"{shard_name(shard)}{DONE}"
    if not done.is_file():
        return False
    source = json.loads(done.read_text()).get("source")
    if source is None:  # written before stamps were recorded
        return True
    try:
        return shard_stamp(shard) == (source["size"], source["mtime_ns"])
    except OSError:
        return False  # gone: reading it will say so


def id_hashes(ids) -> np.ndarray:
    """int64 hashes of sample ids (Python's: the same within a process, which is all the checks
    below need; a hit is confirmed on the ids themselves)."""
    return np.fromiter((hash(i) for i in ids), np.int64, len(ids))


class SeenIds:
    """The hashes of every sample id seen so far, 8 bytes per id and no Python string kept (10^8
    ids: 0.8 GB, where a set of the ids would take ~13 GB). Sorted runs, merged whenever the newest
    is at least as long as the one before, so a lookup searches O(log n) runs."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """bool per hash: seen before."""
        hit = np.zeros(len(hashes), bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            hit |= run[at] == hashes
        return hit

    def add(self, hashes: np.ndarray) -> None:
        if not len(hashes):
            return
        run = np.sort(hashes)
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")
        self.runs.append(run)


def _ids(out_dir: Path, name: str) -> list[str]:
    return pq.read_table(out_dir / f"{name}.parquet", columns=["uid"]).column("uid").to_pylist()


def repeated_within(ids: list[str], hashes: np.ndarray) -> str | None:
    """An id that ``ids`` holds twice, or None (hashes first; a repeated hash is confirmed)."""
    if len(np.unique(hashes)) == len(hashes):
        return None
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def name_repeat(out_dir: Path, earlier: list[str], candidates: set[str]) -> tuple[str, str] | None:
    """(id, shard) for the first of ``earlier`` (shard paths, all embedded into ``out_dir``)
    that holds one of ``candidates``; None when none does (the hashes collided)."""
    for shard in earlier:
        name = shard_name(shard)
        if (out_dir / f"{name}.parquet").is_file():
            found = candidates.intersection(_ids(out_dir, name))
            if found:
                return min(found), shard
    return None


class ShardChunks(IterableDataset):
    """Chunks of decoded samples from this rank's and this worker's share of the shards.

    Each item: ``{"shard", "last", "keys", "uids", "images", "texts", "counts"}``; ``images`` a
    float tensor (b, 3, H, W) when the encoder needs images, ``texts`` tokenized captions when
    it needs text; ``counts`` (on the last chunk of a shard) what was skipped and why.
    """

    def __init__(self, shards: list[str], out_dir: str, encoder: Encoder, chunk_size: int = 256,
                 rank: int = 0, world_size: int = 1, metadata_fields: tuple[str, ...] = ()):
        # rank and world size of the Trainer that embeds, not of torch.distributed: embedding
        # may run single-device inside a DDP job (DBPDataModule.prepare_data)
        self.shards = shards[rank::world_size]
        self.out_dir = Path(out_dir)
        self.chunk_size = chunk_size
        self.metadata_fields = tuple(metadata_fields)
        self.transform = encoder.image_transform if encoder.needs_image else None
        self.tokenize = encoder.tokenize if encoder.needs_text else None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            if not is_done(self.out_dir, shard):
                if (self.out_dir / f"{shard_name(shard)}{DONE}").is_file():
                    warnings.warn(f"{shard}: changed since it was embedded into {self.out_dir} "
                                  "(size or mtime differ); embedding it again", stacklevel=2)
                yield from self._chunks(shard)

    def _chunks(self, shard: str) -> Iterator[dict]:
        counts: Counter = Counter()
        notes: dict = {}
        buf: list[tuple] = []
        stamp = shard_stamp(shard)  # the file these embeddings come from
        for sample in iter_shard(shard, counts, notes, stamp=stamp):
            counts["read"] += 1
            # a pair is only usable for CLIP training with both halves, whatever the encoder
            # embeds, so the store and the training stream hold the same samples
            image, caption = decode_image(sample), decode_caption(sample)
            if image is None:
                counts["undecodable_image"] += 1
                continue
            if caption is None:
                counts[caption_fault(sample)] += 1
                continue
            buf.append((sample["__key__"], sample_id(sample), image, caption,
                        _json_fields(sample.get("json"), self.metadata_fields)))
            if len(buf) == self.chunk_size:
                yield self._chunk(shard, buf, last=False, counts=None)
                buf = []
        source = {"path": shard, "size": stamp[0], "mtime_ns": stamp[1]}
        yield self._chunk(shard, buf, last=True, counts=dict(counts), notes=notes, source=source)

    def _chunk(self, shard, buf, last, counts, notes=None, source=None) -> dict:
        keys, uids, images, captions, fields = zip(*buf) if buf else ((), (), (), (), ())
        return {"shard": shard_name(shard), "last": last, "keys": list(keys), "uids": list(uids),
                "fields": {f: [row[f] for row in fields] for f in self.metadata_fields},
                "images": torch.stack([self.transform(i) for i in images]) if self.transform and buf else None,
                "texts": self.tokenize(list(captions)) if self.tokenize and buf else None,
                "counts": counts, "notes": notes, "source": source}


class EmbedModule(L.LightningModule):
    """Wraps an :class:`Encoder` for ``Trainer.predict``; one chunk per predict step."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def predict_step(self, chunk: dict, batch_idx: int) -> dict:
        if chunk["keys"]:
            emb, score = self.encoder(chunk["images"], chunk["texts"])
            chunk["embeddings"] = emb.float().cpu().numpy()
            chunk["clip_score"] = None if score is None else score.float().cpu().numpy()
        else:
            chunk["embeddings"] = np.zeros((0, self.encoder.dim), np.float32)
            chunk["clip_score"] = np.zeros(0, np.float32) if self.encoder.scores else None
        chunk["images"] = chunk["texts"] = None  # free them before the writer holds the chunk
        return chunk


class ShardWriter(BasePredictionWriter):
    """Writes each shard's embeddings when its last chunk arrives; rank 0 writes the manifest.

    A shard that repeats the id of a sample this rank wrote before (in this run or a finished
    one it resumes) is refused when it arrives, naming both shards, and nothing of it is written;
    the ids are kept as 64-bit hashes (:class:`SeenIds`), and a hit is confirmed on the ids.
    """

    def __init__(self, out_dir: str, shards: list[str], dtype: str, info: dict):
        super().__init__(write_interval="batch")
        self.out_dir, self.shards, self.dtype, self.info = Path(out_dir), shards, dtype, info
        self.pending: dict[str, list[dict]] = {}
        self.bar = None
        self.paths = {shard_name(s): s for s in shards}
        self.seen = SeenIds()
        self.written: list[str] = []  # shards whose ids are in seen, in the order they came
        self.lock: contextlib.ExitStack | None = None

    def on_predict_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        # one writer per store: rank 0 holds its lock until the manifest is written, and every
        # rank stops if another process holds it
        self.lock = contextlib.ExitStack()
        busy = None
        if trainer.is_global_zero:
            try:
                self.lock.enter_context(directory_lock(self.out_dir))
            except DirectoryBusy as exc:
                busy = str(exc)
        busy = trainer.strategy.broadcast(busy, src=0)
        if busy:
            raise DirectoryBusy(busy)

        # samples/s of this rank (Lightning's own bar would count chunks), with an ETA: the total
        # from img2dataset's counts or the tar headers of up to 64 shards (estimated beyond)
        enc = self.info.get("encoder", {})  # which tower: a demo embeds the pool twice
        todo = [s for s in self.shards[trainer.global_rank :: trainer.world_size]
                if not is_done(self.out_dir, s)]
        total = count_pool(todo, scan=64)[0] if trainer.is_global_zero else None
        self.bar = tqdm(desc=f"embed {enc.get('model', '')} {enc.get('modality', '')} (rank {trainer.global_rank})",
                        unit="sample", total=total or None, disable=not trainer.is_global_zero)
        # the ids of this rank's shards a previous run finished, so a repeat is found at once
        for shard in self.shards[trainer.global_rank :: trainer.world_size]:
            if is_done(self.out_dir, shard) and (self.out_dir / f"{shard_name(shard)}.parquet").is_file():
                self._remember(shard, _ids(self.out_dir, shard_name(shard)))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        if self.bar is not None:
            self.bar.update(len(prediction["keys"]))
        chunks = self.pending.setdefault(prediction["shard"], [])
        chunks.append(prediction)
        if prediction["last"]:
            self._write_shard(self.pending.pop(prediction["shard"]))

    def _remember(self, shard: str, ids: list[str]) -> None:
        """Check ``ids`` (one shard's) against themselves and the shards remembered before; keep
        their hashes. Raises ValueError naming both shards of a repeated id."""
        hashes = id_hashes(ids)
        twice = repeated_within(ids, hashes)
        if twice is not None:
            raise ValueError(f"sample {twice!r} occurs twice in shard {shard}")
        hit = self.seen.contains(hashes)
        if hit.any():
            repeat = name_repeat(self.out_dir, self.written, {ids[i] for i in np.flatnonzero(hit)})
            if repeat is not None:
                raise ValueError(f"sample {repeat[0]!r} occurs in shard {repeat[1]} and in shard "
                                 f"{shard}")
        self.seen.add(hashes)
        self.written.append(shard)

    def _write_shard(self, chunks: list[dict]) -> None:
        name = chunks[0]["shard"]
        with np.errstate(over="ignore"):  # a row that overflows float16 is left out below
            emb = np.concatenate([c["embeddings"] for c in chunks]).astype(self.dtype)
        columns = {"key": sum((c["keys"] for c in chunks), []), "uid": sum((c["uids"] for c in chunks), [])}
        if chunks[0]["clip_score"] is not None:
            columns["clip_score"] = np.concatenate([c["clip_score"] for c in chunks]).astype(np.float32)
        for field in chunks[0]["fields"]:
            columns[field] = pa.array(sum((c["fields"][field] for c in chunks), []), pa.float32())
        table = pa.table(columns)
        last = chunks[-1]
        counts = {k: int(v) for k, v in (last["counts"] or {}).items()}
        done = {"rows": 0, "counts": counts}
        if last.get("source") is not None:  # the file as it was read: size and mtime
            done["source"] = last["source"]
        done.update(last.get("notes") or {})  # damage, expected, keys of samples out of place
        # a row prune would refuse (no direction, or not finite once stored in this dtype) is
        # left out here, named and counted, so that a finished store is always prunable
        bad = ~np.isfinite(emb).all(axis=1) | ~emb.any(axis=1)
        if bad.any():
            ids = table.column("uid").filter(pa.array(bad)).to_pylist()
            warnings.warn(f"{name}: {len(ids)} samples embedded to all-zero or non-finite vectors "
                          f"in {self.dtype} are left out of the store (first: {ids[0]})",
                          stacklevel=2)
            emb, table = emb[~bad], table.filter(pa.array(~bad))
            counts["degenerate_embedding"] = len(ids)
            done["degenerate"] = ids
        # before anything of this shard is written: one identity in two shards stops the run
        self._remember(self.paths.get(name, name), table.column("uid").to_pylist())
        write_npy(self.out_dir / f"{name}.npy", emb)
        write_parquet(self.out_dir / f"{name}.parquet", table)
        done["rows"] = len(emb)
        write_json(self.out_dir / f"{name}{DONE}", done)

    def on_predict_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
        trainer.strategy.barrier()
        error = None
        if trainer.is_global_zero:
            try:
                write_manifest(self.out_dir, self.shards, self.dtype, self.info)
            except (ValueError, RuntimeError) as exc:
                error = str(exc)
            finally:
                self.lock.close()
        error = trainer.strategy.broadcast(error, src=0)  # every rank fails, none waits forever
        if error:
            raise ValueError(error)

    def on_exception(self, trainer, pl_module, exception):
        if self.lock is not None:
            self.lock.close()


#: what a shard's done file holds besides rows and counts, copied into its manifest entry: how
#: it was damaged and how many samples img2dataset wrote into it, the keys of samples whose
#: members were out of place, the ids of samples left out for a degenerate embedding
_NOTES = ("damage", "expected", "members_not_adjacent", "duplicate_member", "degenerate")


def write_manifest(out_dir: Path, shards: list[str], dtype: str, info: dict) -> None:
    """Check every shard is done and sample ids are unique across shards; write ``manifest.json``.

    The check holds one int64 hash per id (sorted once), and reads the ids again only to name
    the two shards of a repeated hash.
    """
    entries, empty, counts, sources = [], [], Counter(), {}
    metas = []
    for shard in shards:
        name = shard_name(shard)
        done = out_dir / f"{name}{DONE}"
        if not done.is_file():
            raise RuntimeError(f"{shard}: not embedded; rerun to finish it")
        metas.append(json.loads(done.read_text()))
    hashes = np.empty(sum(int(m["rows"]) for m in metas), np.int64)
    at, dim = 0, None
    for shard, meta in zip(shards, metas):
        name = shard_name(shard)
        counts.update(meta["counts"])
        if meta.get("source"):
            sources[name] = meta["source"]
        entry = {"name": name, "rows": int(meta["rows"]), "counts": meta["counts"],
                 **{k: meta[k] for k in _NOTES if meta.get(k)}}
        if meta["rows"] == 0:
            del entry["rows"]
            empty.append(entry)  # no files to list
            continue
        dim = np.load(out_dir / f"{name}.npy", mmap_mode="r").shape[1]
        ids = _ids(out_dir, name)
        if len(ids) != meta["rows"]:
            raise RuntimeError(f"{out_dir / name}.parquet: {len(ids)} rows, its done file says "
                               f"{meta['rows']}; rerun to embed it again")
        hashes[at : at + len(ids)] = id_hashes(ids)
        at += len(ids)
        entries.append(entry)
    if dim is None:
        raise ValueError("no shard had a usable sample: nothing to embed")
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    del hashes
    if len(repeated):
        _name_repeated_id(out_dir, shards, set(repeated.tolist()))
    write_json(out_dir / "manifest.json", {"format": FORMAT, "version": VERSION, "dim": int(dim),
                                           "dtype": dtype, "shards": entries,
                                           "empty_shards": empty, "counts": dict(counts),
                                           "sources": sources, **info})


def _name_repeated_id(out_dir: Path, shards: list[str], repeated: set[int]) -> None:
    """Raise ValueError naming an id that two of ``shards`` hold, among the ids whose hash is
    in ``repeated``; return when none is (the hashes collided)."""
    first: dict[str, str] = {}  # only the ids with a repeated hash: a handful
    for shard in shards:
        name = shard_name(shard)
        if not (out_dir / f"{name}.parquet").is_file():
            continue
        ids = _ids(out_dir, name)
        for i in np.flatnonzero(np.isin(id_hashes(ids), list(repeated))):
            if ids[i] in first:
                where = "twice in shard" if first[ids[i]] == shard else f"in shard {first[ids[i]]} and in shard"
                raise ValueError(f"sample {ids[i]!r} occurs {where} {shard}")
            first[ids[i]] = shard


#: json fields copied into the store's parquet when asked (the CLIP scores LAION and DataComp ship)
SCORE_FIELDS = ("similarity", "clip_l14_similarity_score")


#: counts of samples that were read and used, with a fault in the tar noted
#: (:func:`~dbp_lightning.data.shards.iter_shard`); the other counts are samples not embedded
_NOTED = ("members_not_adjacent", "duplicate_member")


def skip_summary(manifest: dict, most: int = 5) -> str:
    """One line for the end of a run: samples read and embedded, then each skip cause with its
    count and the shards concerned (the first ``most`` of them), samples lost to damaged tars
    (and the shards where how many is unknown), samples used although their members were out of
    place or repeated, and the unreadable shards left out (``skip_bad_shards``)."""
    total = manifest.get("counts", {})
    per_shard = manifest["shards"] + manifest.get("empty_shards", [])
    embedded = sum(s["rows"] for s in manifest["shards"])

    def shards(cause: str) -> list[str]:
        return [s["name"] for s in per_shard if s.get("counts", {}).get(cause)]

    def listed(names: list[str]) -> str:
        more = f" +{len(names) - most} more" if len(names) > most else ""
        return f"{', '.join(names[:most])}{more}"

    skipped, noted = [], []
    unknown = shards("lost_to_truncation_unknown")
    for cause in sorted(c for c in total if c not in ("read", "lost_to_truncation_unknown")):
        part = f"{cause} {total[cause]:,} ({listed(shards(cause))})"
        if cause == "lost_to_truncation" and unknown:
            part = part[:-1] + (f"; samples after the cut unknown in {listed(unknown)}: no "
                                "img2dataset stats beside the tar)")
        (noted if cause in _NOTED else skipped).append(part)
    if unknown and "lost_to_truncation" not in total:
        skipped.append(f"lost_to_truncation unknown (samples after the cut in {listed(unknown)}: "
                       "no img2dataset stats beside the tar)")
    line = f"read {total.get('read', 0):,} samples, embedded {embedded:,}"
    line += f"; skipped: {'; '.join(skipped)}" if skipped else "; nothing skipped"
    if noted:
        line += f"; noted (samples used): {'; '.join(noted)}"
    bad = manifest.get("skipped_shards") or []
    if bad:
        line += (f"; unreadable shards left out: {len(bad):,} "
                 f"({listed([shard_name(b['path']) for b in bad])})")
    return line


def skipped_shards_line(manifest: dict) -> str | None:
    """One line naming every unreadable shard ``skip_bad_shards`` left out, and why; None if none."""
    bad = manifest.get("skipped_shards") or []
    if not bad:
        return None
    return (f"left out {len(bad):,} unreadable shard{'s' if len(bad) > 1 else ''}: "
            + "; ".join(f"{b['path']} ({b['why']})" for b in bad))


def embed_shards(shards: str | list[str], out_dir: str, encoder: EncoderConfig,
                 batch_size: int = 256, num_workers: int = 2, dtype: str = "float16",
                 trainer_kwargs: dict | None = None,
                 metadata_fields: tuple[str, ...] = SCORE_FIELDS,
                 skip_bad_shards: bool = False) -> EmbeddingStore:
    """Embed ``shards`` into an embedding store at ``out_dir`` (resuming a killed run).

    Args:
        shards: brace pattern, glob, directory or list (see :func:`expand_shards`).
        out_dir: the store directory.
        encoder: which model, on which modality.
        batch_size: samples per predict step (a chunk of one shard).
        num_workers: dataloader workers decoding shards in parallel.
        dtype: "float16" (half the disk of float32) or "float32".
        trainer_kwargs: passed to ``lightning.Trainer`` (accelerator, devices, strategy,
            num_nodes, precision); default: one device, bf16 autocast on GPU.
        metadata_fields: numeric fields of each sample's json to keep as float32 columns (null
            where absent), e.g. a CLIP score for the ``clip_score`` stage to read.
        skip_bad_shards: embed the shards that can be read and leave out those that cannot
            (missing, empty, not a tar) instead of refusing the pool; they are listed with why in
            the manifest's ``skipped_shards`` (``source_shards`` lists the shards embedded).
            Every run checks again: a shard fixed since is embedded by a rerun.

    Raises:
        ValueError: a shard that cannot be read (without ``skip_bad_shards``: all are named),
            a sample id in two shards (both named), other settings than the directory's.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype: a store is float16 or float32, got {dtype!r}")
    encoder.validate()  # an encoder with no weights is refused before any shard is looked at
    if skip_bad_shards:
        paths, bad = list_shards(shards)
        if not paths:
            raise ValueError(f"shards: none of {len(bad)} can be read: "
                             + "; ".join(f"{p} ({why})" for p, why in bad))
    else:
        paths, bad = expand_shards(shards), []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"encoder": encoder.identity(), "dtype": dtype,
                "metadata_fields": list(metadata_fields)}
    settings_path = out / "embed.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{out}: holds shards embedded with other settings "
                         f"({settings_path.read_text().strip()}); use another directory")
    write_json(settings_path, settings)
    model = build_encoder(encoder)
    kwargs = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, "enable_progress_bar": False,
              "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(use_distributed_sampler=False, **kwargs)
    info = {"encoder": encoder.identity(), "source_shards": paths,
            "skipped_shards": [{"path": p, "why": why} for p, why in bad],
            "metadata_fields": list(metadata_fields)}
    writer = ShardWriter(str(out), paths, dtype, info)
    trainer.callbacks.append(writer)
    dataset = ShardChunks(paths, str(out), model, batch_size, trainer.global_rank, trainer.world_size,
                          metadata_fields)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        persistent_workers=False)
    with warnings.catch_warnings():
        # chunks carry their own identity; Lightning cannot and need not infer batch indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(EmbedModule(model), loader, return_predictions=False)
    return EmbeddingStore(out)
