"""How the pruning stages split work across processes, and the collectives that reassemble it.

Distribution splits the work and never changes it. Each rank computes some row blocks (input
validation, k-means assignment) or some whole clusters (SemDeDup's pairwise search, the fine
cells of a two-level partition) exactly as one process would compute them. Every rank
initialises the outputs it does not own to the identity of ``max`` (-inf, -1), and an
element-wise max over ranks reassembles them. Nothing is summed or averaged across ranks, and
every value a rank computes is exact (:mod:`.exact`), so the selection is bit-identical for any
number of processes and threads. Small serial work, such as
training k-means on a sample, runs on rank 0 and is broadcast. O(N) bookkeeping (sorts, quotas,
selection) is repeated on every rank, which avoids a second gather.

:class:`Local` is the single-process default. :class:`TorchCollective` runs over an initialised
``torch.distributed`` process group (gloo: the arrays live in host memory). It is created by
:func:`dbp_lightning.distributed.collective_from_environment` under torchrun or SLURM, and by
``DBPDataModule.setup`` over the Trainer's ranks.
"""

from __future__ import annotations

import heapq

import numpy as np

#: elements per all_reduce call: bounds the transport's buffers for 10^9-row arrays.
CHUNK = 1 << 24


class Local:
    """One process: every collective is the identity."""

    rank = 0
    local_rank = 0
    world_size = 1

    def broadcast(self, array: np.ndarray | None) -> np.ndarray:
        return array

    def reduce_max(self, array: np.ndarray) -> np.ndarray:
        return array

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchCollective:
    """Collectives over a ``torch.distributed`` process group.

    Args:
        group: a process group (default: the default group). Its backend must handle CPU tensors
            (gloo); NumPy arrays are shared with torch, never copied to a device.
        owns_group: :meth:`close` destroys the process group (it was made for this collective):
            the default group when ``group`` is None.
        local_rank: this process's rank on its node: the GPU its faiss work runs on.

    ``rank`` is the rank in ``group``; "rank 0" everywhere here means the group's first member.
    """

    def __init__(self, group=None, owns_group: bool = False, local_rank: int = 0):
        import torch.distributed as dist

        self._dist, self.group, self._owns = dist, group, owns_group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_rank = int(local_rank)

    def broadcast(self, array: np.ndarray | None) -> np.ndarray:
        """Rank 0's ``array`` on every rank (other ranks pass None); any shape and dtype."""
        import torch

        meta = [None if array is None else (array.shape, array.dtype.str)]
        self._dist.broadcast_object_list(meta, group=self.group, group_src=0)
        shape, dtype = meta[0]
        out = np.ascontiguousarray(array) if self.rank == 0 else np.empty(shape, np.dtype(dtype))
        flat = out.reshape(-1)
        for start in range(0, flat.size, CHUNK):
            self._dist.broadcast(torch.from_numpy(flat[start : start + CHUNK]), group=self.group,
                                 group_src=0)
        return out

    def reduce_max(self, array: np.ndarray) -> np.ndarray:
        """Element-wise max over ranks, in place; ``array`` must be C-contiguous."""
        import torch

        if not array.flags.c_contiguous:
            raise ValueError("reduce_max reduces in place and needs a C-contiguous array")
        flat = array.reshape(-1)
        for start in range(0, flat.size, CHUNK):
            self._dist.all_reduce(torch.from_numpy(flat[start : start + CHUNK]),
                                  op=self._dist.ReduceOp.MAX, group=self.group)
        return array

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def close(self) -> None:
        """Destroy the process group if this collective created it."""
        if self._owns and self._dist.is_initialized():
            self._dist.destroy_process_group(self.group)


def owners(costs: np.ndarray, world_size: int) -> np.ndarray:
    """Deal items to ranks, most expensive first, each to the least-loaded rank.

    Args:
        costs: float or int (m,) estimated cost of each item (a cluster of M rows: M**2 pairs).
        world_size: ranks.

    Returns:
        int64 (m,) rank owning each item. Greedy longest-processing-time: the makespan is at most
        4/3 of the optimum. Deterministic: ties go to the lower item index and the lower rank.
    """
    costs = np.asarray(costs, dtype=np.float64)
    owner = np.zeros(len(costs), np.int64)
    if world_size == 1:
        return owner
    loads = [(0.0, r) for r in range(world_size)]
    for item in np.argsort(-costs, kind="stable"):
        load, r = heapq.heappop(loads)
        owner[item] = r
        heapq.heappush(loads, (load + float(costs[item]), r))
    return owner


def block_range(n: int, block: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank``'s share of n rows, cut on multiples of ``block``.

    Cutting on block boundaries makes every rank see exactly the blocks one process would, so
    block-wise results (BLAS included) are identical.
    """
    n_blocks = -(-n // block)
    lo, hi = n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size
    return min(lo * block, n), min(hi * block, n)
