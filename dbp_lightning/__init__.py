"""Density-Based Pruning of web-scale image-text datasets (arXiv 2401.04578).

The public names load on first use, so ``import dbp_lightning`` (and the ``prune`` command)
does not pay for torch and Lightning::

    from dbp_lightning import DBPDataModule, CLIPModule, ZeroShotCallback, PruneConfig, prune
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# Pruning alternates, block after block, between NumPy's OpenBLAS (similarity blocks) and
# faiss's OpenMP (k-means searches): two thread pools on the same cores. By default each pool's
# idle threads spin for a while after every call and steal the cores the other pool is working
# on (the dedup partition ran 1.7x slower on 2 cores). Idle threads that sleep at once cost
# nothing measurable. Only defaults, and read when the libraries load: a user's own settings,
# or a NumPy imported before this package, win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

#: public name -> the module that defines it
_PUBLIC = {
    "DBPDataModule": "dbp_lightning.datamodule",
    "CLIPModule": "dbp_lightning.clip_module",
    "ZeroShotCallback": "dbp_lightning.evaluation.callback",
    "PruneConfig": "dbp_lightning.config",
    "EncoderConfig": "dbp_lightning.config",
    "prune": "dbp_lightning.pruning.pipeline",
    "PruneResult": "dbp_lightning.pruning.pipeline",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dbp_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
