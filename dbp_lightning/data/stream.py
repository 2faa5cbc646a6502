"""Shuffling stages of the training stream, as open_clip's ``get_wds_dataset`` shuffles: shard
order and a sample buffer, or shards drawn with replacement (``--dataset-resampled``).

Every random choice is seeded by (seed, epoch, rank, worker), so a run is reproducible, epochs
differ, and a fit resumed at epoch e streams what an uninterrupted one streams at e. The epoch
lives in an :class:`Epoch` that the train loader sets before each pass; dataloader workers,
started anew each pass, carry its value.

The stages are webdataset pipeline stages (a function of the upstream iterator), picklable for
workers.
"""

from __future__ import annotations

import random

import numpy as np


class Epoch:
    """The epoch the next pass streams (set by the train loader before it starts a pass)."""

    def __init__(self, value: int = 0):
        self.value = value


def _worker() -> int:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return info.id if info is not None else 0


def rng_for(seed: int, epoch: int, rank: int, worker: int, stream: int) -> random.Random:
    """A generator for one (seed, epoch, rank, worker); ``stream`` tells its uses apart (shard
    order, sample buffer, resampling)."""
    state = np.random.SeedSequence([seed, epoch, rank, worker, stream]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class ShuffledShards:
    """Stage: this worker's shards in an order drawn for (seed, epoch, rank, worker).

    Which shards a worker reads stays fixed (each rank's step count is computed from it); their
    order, and through the sample buffer which shards meet in a batch, changes every epoch.
    """

    def __init__(self, seed: int, epoch: Epoch, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src):
        items = list(src)
        rng_for(self.seed, self.epoch.value, self.rank, _worker(), 0).shuffle(items)
        yield from items


class SampleShuffle:
    """Stage: a shuffle buffer of ``bufsize`` samples, started once ``initial`` are in
    (open_clip: 5,000 and 1,000); every sample comes out exactly once. Put it before decoding,
    as open_clip does: it holds raw samples (~50 KB each), not image tensors."""

    def __init__(self, bufsize: int, initial: int, seed: int, epoch: Epoch, rank: int):
        if bufsize < 1 or not 0 < initial <= bufsize:
            raise ValueError(f"shuffle_buffer must be >= 1 and 0 < shuffle_initial <= "
                             f"shuffle_buffer, got {bufsize} and {initial}")
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src):
        rng = rng_for(self.seed, self.epoch.value, self.rank, _worker(), 1)
        buf: list = []

        def pick():
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            return buf.pop()

        it = iter(src)
        for sample in it:
            buf.append(sample)
            if len(buf) < self.bufsize:  # fill two for one until full, as webdataset's shuffle
                more = next(it, None)  # samples are dicts, never None
                if more is not None:
                    buf.append(more)
            if len(buf) >= self.initial:
                yield pick()
        while buf:
            yield pick()


class ResampledShards:
    """Stage with no upstream: shards drawn with replacement, for ever, for (seed, epoch, rank,
    worker) (open_clip's ``ResampledShards2``); the loader's ``with_epoch`` ends the pass."""

    def __init__(self, shards: list[str], seed: int, epoch: Epoch, rank: int):
        if not shards:
            raise ValueError("resampled: no shards to draw from")
        self.shards, self.seed, self.epoch, self.rank = list(shards), seed, epoch, rank

    def __call__(self, src=None):
        rng = rng_for(self.seed, self.epoch.value, self.rank, _worker(), 2)
        while True:
            yield {"url": rng.choice(self.shards)}
