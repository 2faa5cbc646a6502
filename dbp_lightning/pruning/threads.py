"""Independent pieces of CPU work (SemDeDup's cells, k-means' row blocks) on every core.

NumPy's BLAS threads the matrix products and nothing else: a SemDeDup cell's top-two updates,
gathers and exact checks, and a k-means block's top two, run on one core while the others
wait. Independent pieces are therefore handed to one Python thread per core, each calling a
one-thread BLAS: NumPy releases the GIL inside its loops, so the cores share the
single-threaded work as well as the products (``benchmarks/bench_semdedup.py``). Every value
the pruning keeps is exact (:mod:`.exact`), so the result is the same bytes whatever the
number of workers.

The workers are as many as the cores this process may use (:func:`workers`: fewer when
``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` say so; set one to 1 for one core).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T, R = TypeVar("T"), TypeVar("R")

_PREFIX = "dbp-cpu"


_found = (-1, None)  # (modules imported, the controller of the libraries then loaded)


def _controller():
    """threadpoolctl's view of the loaded BLAS and OpenMP libraries, found again only after an
    import (how another library, such as torch's or faiss's own BLAS, comes in): finding them
    takes ~0.4 ms, and the pruning limits them thousands of times a stage."""
    global _found
    from threadpoolctl import ThreadpoolController

    if _found[0] != len(sys.modules):
        _found = (len(sys.modules), ThreadpoolController())
    return _found[1]


@functools.lru_cache(maxsize=1)
def workers() -> int:
    """Threads the pruning splits its CPU work over (read once): the cores this process may
    run on (``os.sched_getaffinity``), at most ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS``
    when set (how a job limits its BLAS; set one to 1 for one core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            cores = min(cores or 1, int(value))
    return max(1, cores or 1)


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool of ``workers`` threads, kept for the process (idle threads sleep)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=_PREFIX)


@contextlib.contextmanager
def on_all_cores(workers: int | None = None):
    """A ``map(fn, items)`` that runs ``fn`` on :func:`workers` threads (``workers`` to choose),
    each with a one-thread BLAS, yielding results in the order of ``items``.

    Use as ``with on_all_cores() as pmap: for r in pmap(fn, items): ...``; the BLAS thread
    count is restored when the block ends. With one worker, or inside a worker already (a
    nested call waits for nothing), ``pmap`` is the built-in ``map``.
    """
    workers = globals()["workers"]() if workers is None else workers
    if workers <= 1 or threading.current_thread().name.startswith(_PREFIX):
        yield map
        return
    with _controller().limit(limits=1, user_api="blas"):
        pool = _pool(workers)

        def pmap(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
            return pool.map(fn, items)

        yield pmap


def spans(n: int, pieces: int, most: int | None = None) -> list[tuple[int, int]]:
    """``0:n`` cut into ``pieces`` near-equal spans (or more, of at most ``most`` each)."""
    pieces = max(1, pieces, -(-n // most) if most else 1)
    cuts = np.linspace(0, n, pieces + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
