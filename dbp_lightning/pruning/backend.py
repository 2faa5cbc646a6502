"""Where the matmul-bound estimates run: faiss (CPU or faiss-gpu) or PyTorch (CUDA, or CPU).

The pruning core needs two fast estimates, and nothing else from a library: each row's two most
similar centroids (k-means assignment) and, inside a SemDeDup cell, each member's two most
similar earlier members. :mod:`.exact` turns either estimate into the exact answer (it decides
every row whose best two are within the float32 error bound of each other again, exactly), so
the selection is the same bytes whichever backend estimated it. That is what makes a PyTorch
path safe on a machine with a CUDA build of torch and no faiss-gpu (its wheel, with the CUDA 12
runtime and cuBLAS beside it, is the part users most often fail to install).

The matmuls run in float32 with TF32 off: TF32 rounds the inputs to 10 mantissa bits, outside
the bound the exact layer relies on (a product summed in any order), and would send many rows to
the slow exact path. Blocks are sized from the free device memory, never an N x k matrix.

On CPU the faiss backend's estimates are NumPy's BLAS: a matmul and a top two
(:class:`BlasTop2`) rather than faiss-cpu's flat search, which is about 3x slower here.

Choice (``backend`` of ``prune``): ``faiss`` (CPU, or faiss-gpu by ``gpu``), ``torch`` (CUDA when
present and ``gpu`` allows, else CPU), ``auto``: faiss-gpu where installed with a GPU, else
torch on CUDA where there is one, else faiss on CPU (torch on CPU if faiss is missing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .threads import on_all_cores, spans, workers

BACKENDS = ("auto", "faiss", "torch")


@dataclass(frozen=True)
class Backend:
    """A resolved choice: ``kind`` "faiss" or "torch", ``device`` "cpu", "cuda" or "cuda:N"."""

    kind: str
    device: str

    def describe(self) -> str:
        return f"{self.kind} on {self.device}"


@functools.lru_cache(maxsize=None)
def _faiss_gpus() -> int | None:
    """GPUs faiss sees; None when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@functools.lru_cache(maxsize=None)
def _torch_cuda() -> bool:
    """Whether torch sees a CUDA (or ROCm) device; without a GPU device file, False without
    importing torch (1.2 s here: ``prune`` on a CPU must not pay it)."""
    import glob
    import os

    import sys

    # NVIDIA, ROCm, WSL2: without any of these device files no torch build sees a GPU
    if "torch" not in sys.modules and not (glob.glob("/dev/nvidia[0-9]*")
                                           or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(backend: str = "auto", gpu: str | bool = "auto", local_rank: int = 0) -> Backend:
    """The backend ``backend`` ("auto", "faiss", "torch") and ``gpu`` ("auto", True, False)
    name on this machine; ``local_rank`` picks a process's GPU among several.

    Raises:
        ValueError: an unknown name, a backend not installed, or ``gpu=True`` with no GPU.
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if gpu not in ("auto", True, False):
        raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
    faiss_gpus, cuda = _faiss_gpus(), _torch_cuda()
    if backend == "faiss" or (backend == "auto" and faiss_gpus and gpu is not False):
        if faiss_gpus is None:
            raise ValueError("backend=faiss: faiss is not installed; install dbp-lightning[cpu] "
                             "or [gpu], or use backend=torch")
        if gpu is True and not faiss_gpus:
            raise ValueError("gpu=true but faiss sees no GPU: install dbp-lightning[gpu] on a CUDA "
                             "machine, use backend=torch (a CUDA build of torch), or gpu=auto")
        on_gpu = bool(faiss_gpus) and gpu is not False
        return Backend("faiss", f"cuda:{local_rank % faiss_gpus}" if on_gpu else "cpu")
    if backend == "torch" or (cuda and gpu is not False) or faiss_gpus is None:
        if gpu is True and not cuda:
            raise ValueError("gpu=true but torch sees no CUDA device")
        if cuda and gpu is not False:
            import torch

            return Backend("torch", f"cuda:{local_rank % torch.cuda.device_count()}")
        return Backend("torch", "cpu")
    if gpu is True:
        raise ValueError("gpu=true but neither faiss nor torch sees a GPU here; use gpu=auto")
    return Backend("faiss", "cpu")


def _device_rows(device: str, row_bytes: int, share: float = 0.25, cap: int = 1 << 16) -> int:
    """Rows of ``row_bytes`` each that fit in ``share`` of the device's free memory (CUDA), at
    most ``cap``; on CPU, as many as make 64 MiB (faiss's CPU search works in such blocks)."""
    if not device.startswith("cuda"):
        return int(max(1, min(cap, (64 << 20) // max(row_bytes, 1))))
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(max(1, min(cap, share * free // max(row_bytes, 1))))


class BlasTop2:
    """faiss ``IndexFlatIP``'s ``search(block, 2)`` as a NumPy (BLAS) float32 matmul and the
    two largest per row: the CPU estimate of the faiss backend. faiss-cpu's flat search took
    2.7-3.6x as long on the pipeline's shapes here (``benchmarks/bench_top2.py``), and the
    estimate's kernel does not matter to the result (:mod:`.exact`). Rows go in sub-blocks,
    spread over the cores (:mod:`.threads`), whose (rows x k) similarities take at most 64 MiB
    together."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        k, d = self.centroids.shape
        self.rows = _device_rows("cpu", 4 * (k + d) + 16)

    def search(self, block: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
        if n != 2 or len(self.centroids) < 2:
            raise ValueError(f"BlasTop2 finds the top 2 of at least 2 centroids, asked for {n} "
                             f"of {len(self.centroids)}")
        sims_out = np.empty((len(block), 2), np.float32)
        ids_out = np.empty((len(block), 2), np.int64)

        def top2(span):
            s, e = span
            sims = np.ascontiguousarray(block[s:e], np.float32) @ self.centroids.T
            at = np.arange(len(sims))
            for j in range(2):  # largest, then largest of the rest (ties are decided exactly later)
                best = sims.argmax(axis=1)
                sims_out[s + at, j], ids_out[s + at, j] = sims[at, best], best
                sims[at, best] = -np.inf

        threads = workers()  # each its sub-blocks (the top two run on one core), in 64 MiB
        with on_all_cores(threads) as pmap:
            for _ in pmap(top2, spans(len(block), threads, max(1, self.rows // threads))):
                pass
        return sims_out, ids_out


class TorchTop2:
    """faiss ``IndexFlatIP``'s ``search(block, 2)`` on float32 torch matmuls: the two largest
    dot products of each row with the centroids, on ``device``. Centroids stay on the device;
    rows go in sub-blocks sized so that the (rows x k) similarities fit in its free memory."""

    def __init__(self, centroids: np.ndarray, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(self.device)
        k, d = self.centroids.shape
        self.rows = _device_rows(device, 4 * (k + d) + 16)

    def search(self, block: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        sims_out = np.empty((len(block), n), np.float32)
        ids_out = np.empty((len(block), n), np.int64)
        with _no_tf32(torch), torch.inference_mode():
            for s in range(0, len(block), self.rows):
                x = torch.from_numpy(np.ascontiguousarray(block[s : s + self.rows], np.float32))
                sims = x.to(self.device, non_blocking=True) @ self.centroids.T
                top = torch.topk(sims, n, dim=1)  # largest first; ties are decided exactly later
                sims_out[s : s + len(x)] = top.values.cpu().numpy()
                ids_out[s : s + len(x)] = top.indices.cpu().numpy()
        return sims_out, ids_out


def torch_earlier_top2(xc: np.ndarray, block_size: int, device: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup's estimates inside one cell, on ``device``: for each member of ``xc`` (float32
    (M, d), in rank order; an array, or a RowRange read block by block) the best and second-best float32 dot product with an earlier member,
    and the position of the best (-inf, -inf, -1 for the first member). Block by block, the
    running top two kept on the device: at most ``block_size``**2 similarities at once."""
    import torch

    dev = torch.device(device)
    with _no_tf32(torch), torch.inference_mode():
        if isinstance(xc, np.ndarray):
            held = torch.from_numpy(np.ascontiguousarray(xc, np.float32)).to(dev)
            rows_of = lambda a, b: held[a:b]  # noqa: E731
        else:  # a cell too large to hold (a RowRange of sorted rows): block by block
            rows_of = lambda a, b: torch.from_numpy(xc[a:b]).to(dev)  # noqa: E731
        m = len(xc)
        best = torch.full((m,), -float("inf"), device=dev)
        second = torch.full((m,), -float("inf"), device=dev)
        arg = torch.full((m,), -1, dtype=torch.int64, device=dev)
        for js in range(0, m, block_size):
            xj = rows_of(js, js + block_size)
            n_j = len(xj)
            for is_ in range(0, js + n_j, block_size):
                sims = xj @ (xj if is_ == js else rows_of(is_, is_ + block_size)).T
                if is_ == js:  # only members ranked strictly before count
                    sims.masked_fill_(torch.ones_like(sims, dtype=torch.bool).triu(), -float("inf"))
                top = torch.topk(sims, min(2, sims.shape[1]), dim=1)
                rows = slice(js, js + n_j)
                values = torch.cat([best[rows, None], second[rows, None], top.values], dim=1)
                ids = torch.cat([arg[rows, None], torch.full_like(arg[rows, None], -1),
                                 top.indices + is_], dim=1)
                merged = torch.topk(values, 2, dim=1)
                best[rows], second[rows] = merged.values[:, 0], merged.values[:, 1]
                arg[rows] = ids.gather(1, merged.indices[:, :1])[:, 0]
        arg = torch.where(best > -float("inf"), arg, torch.full_like(arg, -1))
        return best.cpu().numpy(), second.cpu().numpy(), arg.cpu().numpy()


class _no_tf32:
    """float32 matmuls in float32 (no TF32 or bf16 passes) for the duration; the caller's
    setting (``torch.set_float32_matmul_precision``, which Lightning users set) restored after."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.saved = self.torch.get_float32_matmul_precision()
        self.torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        self.torch.set_float32_matmul_precision(self.saved)
