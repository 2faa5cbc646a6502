"""Ranks as threads over an in-memory collective, for fast tests of work split across ranks."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ThreadCollective:
    """The collective contract (broadcast from rank 0, in-place max, barrier) between threads."""

    local_rank = 0

    def __init__(self, rank, world_size, shared):
        self.rank, self.world_size, self.shared = rank, world_size, shared

    def _exchange(self, value):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait()
        seen = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return seen

    def broadcast(self, array):
        return np.array(self._exchange(array)[0], copy=True)

    def reduce_max(self, array):
        array[...] = np.maximum.reduce(self._exchange(array.copy()))
        return array

    def barrier(self):
        self._exchange(None)


def run_ranks(world_size, fn):
    """fn(comm) on ``world_size`` threads; the results, by rank."""
    shared = {"slots": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=120)}
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(fn, ThreadCollective(r, world_size, shared)) for r in range(world_size)]
        return [f.result() for f in futures]
