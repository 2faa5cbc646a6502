"""``dbp-lightning embed``: WebDataset shards -> an embedding store, through ``Trainer.predict``.

The same code runs on one CPU, one GPU, or DDP over GPUs and nodes (launched by torchrun,
SLURM or Lightning's own launcher; not ``ddp_spawn``): each rank takes every
world-size-th shard, each dataloader worker every num_workers-th of those, and a worker yields a
shard as chunks of decoded, preprocessed samples. :class:`ShardWriter` collects a shard's chunks
and writes ``<shard>.npy`` + ``<shard>.parquet`` and last ``<shard>.done.json``, each atomically;
a shard with a done file is never embedded again, so a killed run resumes where it stopped.
When every rank has finished, rank 0 checks keys across shards and writes ``manifest.json``.
"""

from __future__ import annotations

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
from .data.shards import (caption_fault, decode_caption, decode_image, expand_shards, iter_shard,
                          sample_id, shard_name)
from .encoders import Encoder, EncoderConfig, build_encoder
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
    return (out_dir / f"{shard_name(shard)}{DONE}").is_file()


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
                yield from self._chunks(shard)

    def _chunks(self, shard: str) -> Iterator[dict]:
        counts: Counter = Counter()
        buf: list[tuple] = []
        for sample in iter_shard(shard, counts):
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
        yield self._chunk(shard, buf, last=True, counts=dict(counts))

    def _chunk(self, shard, buf, last, counts) -> dict:
        keys, uids, images, captions, fields = zip(*buf) if buf else ((), (), (), (), ())
        return {"shard": shard_name(shard), "last": last, "keys": list(keys), "uids": list(uids),
                "fields": {f: [row[f] for row in fields] for f in self.metadata_fields},
                "images": torch.stack([self.transform(i) for i in images]) if self.transform and buf else None,
                "texts": self.tokenize(list(captions)) if self.tokenize and buf else None,
                "counts": counts}


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
    """Writes each shard's embeddings when its last chunk arrives; rank 0 writes the manifest."""

    def __init__(self, out_dir: str, shards: list[str], dtype: str, info: dict):
        super().__init__(write_interval="batch")
        self.out_dir, self.shards, self.dtype, self.info = Path(out_dir), shards, dtype, info
        self.pending: dict[str, list[dict]] = {}
        self.bar = None

    def on_predict_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        # samples/s of this rank (Lightning's own bar would count chunks)
        enc = self.info.get("encoder", {})  # which tower: a demo embeds the pool twice
        self.bar = tqdm(desc=f"embed {enc.get('model', '')} {enc.get('modality', '')} (rank {trainer.global_rank})",
                        unit="sample",
                        disable=not trainer.is_global_zero)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        if self.bar is not None:
            self.bar.update(len(prediction["keys"]))
        chunks = self.pending.setdefault(prediction["shard"], [])
        chunks.append(prediction)
        if prediction["last"]:
            self._write_shard(self.pending.pop(prediction["shard"]))

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
        counts = {k: int(v) for k, v in (chunks[-1]["counts"] or {}).items()}
        done = {"rows": 0, "counts": counts}
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
        error = trainer.strategy.broadcast(error, src=0)  # every rank fails, none waits forever
        if error:
            raise ValueError(error)


def write_manifest(out_dir: Path, shards: list[str], dtype: str, info: dict) -> None:
    """Check every shard is done and keys are unique across shards; write ``manifest.json``."""
    entries, empty, seen, counts = [], [], {}, Counter()
    dim = None
    for shard in shards:
        name = shard_name(shard)
        done = out_dir / f"{name}{DONE}"
        if not done.is_file():
            raise RuntimeError(f"{shard}: not embedded; rerun to finish it")
        meta = json.loads(done.read_text())
        counts.update(meta["counts"])
        left_out = {"degenerate": meta["degenerate"]} if meta.get("degenerate") else {}
        if meta["rows"] == 0:
            empty.append({"name": name, "counts": meta["counts"], **left_out})  # no files to list
            continue
        arr = np.load(out_dir / f"{name}.npy", mmap_mode="r")
        dim = arr.shape[1]
        for key in pq.read_table(out_dir / f"{name}.parquet", columns=["uid"]).column("uid").to_pylist():
            if key in seen:
                raise ValueError(f"sample {key!r} occurs in shard {seen[key]} and in shard {shard}")
            seen[key] = shard
        entries.append({"name": name, "rows": int(meta["rows"]), "counts": meta["counts"],
                        **left_out})
    if dim is None:
        raise ValueError("no shard had a usable sample: nothing to embed")
    write_json(out_dir / "manifest.json", {"format": FORMAT, "version": VERSION, "dim": int(dim),
                                           "dtype": dtype, "shards": entries,
                                           "empty_shards": empty, "counts": dict(counts),
                                           **info})


#: json fields copied into the store's parquet when asked (the CLIP scores LAION and DataComp ship)
SCORE_FIELDS = ("similarity", "clip_l14_similarity_score")


def skip_summary(manifest: dict, most: int = 5) -> str:
    """One line for the end of a run: samples read and embedded, then each skip cause with its
    count and the shards concerned (the first ``most`` of them)."""
    total = manifest.get("counts", {})
    per_shard = manifest["shards"] + manifest.get("empty_shards", [])
    embedded = sum(s["rows"] for s in manifest["shards"])
    parts = []
    for cause in sorted(c for c in total if c != "read"):
        names = [s["name"] for s in per_shard if s.get("counts", {}).get(cause)]
        more = f" +{len(names) - most} more" if len(names) > most else ""
        parts.append(f"{cause} {total[cause]:,} ({', '.join(names[:most])}{more})")
    skipped = f"; skipped: {'; '.join(parts)}" if parts else "; nothing skipped"
    return f"read {total.get('read', 0):,} samples, embedded {embedded:,}{skipped}"


def embed_shards(shards: str | list[str], out_dir: str, encoder: EncoderConfig,
                 batch_size: int = 256, num_workers: int = 2, dtype: str = "float16",
                 trainer_kwargs: dict | None = None,
                 metadata_fields: tuple[str, ...] = SCORE_FIELDS) -> EmbeddingStore:
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
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype: a store is float16 or float32, got {dtype!r}")
    encoder.validate()  # an encoder with no weights is refused before any shard is looked at
    paths = expand_shards(shards)
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
    info = {"encoder": encoder.identity(), "source_shards": paths, "metadata_fields": list(metadata_fields)}
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
