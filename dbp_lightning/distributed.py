"""The process group of a distributed ``prune``, from the launcher's environment.

``dbp-lightning prune`` started as several processes (``torchrun --nproc_per_node``, or
``srun`` under SLURM) finds its rank, world size and rendezvous address through Lightning's
cluster environments and joins one gloo group. Every rank runs the same stages on its share of
the work (see :mod:`dbp_lightning.pruning.collective`); rank 0 writes the run directory.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from .pruning.collective import Local, TorchCollective

#: how long a rank waits at a collective. Rank 0 trains k-means while the others wait, and the
#: ranks' SemDeDup shares differ, so this is generous; a crashed rank is cleaned up by the
#: launcher (torchrun stops the group; srun --kill-on-bad-exit=1), not by this timeout.
TIMEOUT = timedelta(hours=2)

log = logging.getLogger(__name__)

#: variables whose presence means a launcher may have started several processes.
_LAUNCHER_VARS = ("WORLD_SIZE", "SLURM_NTASKS")


def collective_from_environment() -> Local | TorchCollective:
    """This process's collective: :class:`Local` unless a launcher started several processes.

    Detects torchrun (TorchElastic) and SLURM (``srun``; a job named ``bash`` or
    ``interactive`` is not SLURM-launched, as in Lightning) with Lightning's cluster
    environments, and initialises a gloo process group at the address they give (MASTER_ADDR /
    MASTER_PORT, or SLURM's first node and a port derived from the job id).
    """
    if not any(name in os.environ for name in _LAUNCHER_VARS):
        return Local()  # one process: never import torch
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = next((cls() for cls in (TorchElasticEnvironment, SLURMEnvironment) if cls.detect()), None)
    if env is None or env.world_size() == 1:
        return Local()
    import torch.distributed as dist

    if dist.is_initialized():  # joined by the caller
        return gloo_beside(env.local_rank())
    address = f"tcp://{env.main_address}:{env.main_port}"
    # a launcher that started fewer processes than it announced leaves this waiting: say so
    log.debug("rank %d of %d: joining the group at %s", env.global_rank(), env.world_size(), address)
    dist.init_process_group("gloo", init_method=address, rank=env.global_rank(),
                            world_size=env.world_size(), timeout=TIMEOUT)
    return TorchCollective(owns_group=True, local_rank=env.local_rank())


def gloo_beside(local_rank: int) -> TorchCollective:
    """A gloo group over every rank of the initialised default group, whatever its backend
    (NCCL for training): pruning moves host arrays. Every rank must call this."""
    import torch.distributed as dist

    return TorchCollective(dist.new_group(backend="gloo", timeout=TIMEOUT), owns_group=True,
                           local_rank=local_rank)
