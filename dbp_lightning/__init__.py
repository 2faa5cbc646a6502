"""Density-Based Pruning of web-scale image-text datasets (arXiv 2401.04578).

The public names load on first use, so ``import dbp_lightning`` (and the ``prune`` command)
does not pay for torch and Lightning::

    from dbp_lightning import DBPDataModule, CLIPModule, ZeroShotCallback, PruneConfig, prune
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

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
