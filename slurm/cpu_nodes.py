"""fairseq's Slurm rendezvous for CPU jobs of one task per node (``--cpu``, gloo).

fairseq 0.12.3's ``distributed.utils._infer_slurm_init`` (read for this patch) takes the rendezvous host from
``scontrol show hostnames $SLURM_STEP_NODELIST`` and the rank from ``SLURM_*``. When a node runs one task
(``SLURM_NTASKS_PER_NODE == 1``) it assumes that task will spawn one process per GPU, and sets

    rank = SLURM_NODEID * torch.cuda.device_count(),   world size = SLURM_NNODES * torch.cuda.device_count()

which on a CPU node (0 devices) gives world size 0 on every node: ``TCPStore world size cannot be 0``.

:func:`install` wraps it: when no CUDA device is visible and fairseq computed world size 0 for one task per
node, that task is the rank (``rank = SLURM_PROCID``, world size ``SLURM_NNODES``) and must not spawn
(``distributed_no_spawn``), exactly what fairseq does for several tasks per node. Jobs with GPUs, or several
tasks per node, are left as fairseq sets them. ``slurm/train.py`` installs it before fairseq starts.
"""

import inspect
import logging
import os

import torch
from fairseq.distributed import utils as distributed_utils

logger = logging.getLogger("slurm.cpu_nodes")
_ORIGINAL = distributed_utils._infer_slurm_init


def _infer_slurm_init(cfg, num_pipelines_per_node):
    found = _ORIGINAL(cfg, num_pipelines_per_node)
    if found and torch.cuda.device_count() == 0 and cfg.distributed_world_size == 0:
        cfg.distributed_rank = int(os.environ["SLURM_PROCID"])
        cfg.distributed_world_size = int(os.environ["SLURM_NNODES"])
        cfg.distributed_no_spawn = True
        cfg.device_id = 0
        logger.info(f"CPU job, one task per node: rank {cfg.distributed_rank} of {cfg.distributed_world_size}")
    return found


def install() -> None:
    """Patch fairseq's Slurm init (idempotent); raises if fairseq's function is not the one read for it."""
    if distributed_utils._infer_slurm_init is _infer_slurm_init:
        return
    source = inspect.getsource(_ORIGINAL)
    expected = ("cfg.distributed_world_size = nnodes * gpus_per_node", "gpus_per_node = torch.cuda.device_count()")
    if not all(line in source for line in expected):
        raise RuntimeError("fairseq's _infer_slurm_init changed; check slurm/cpu_nodes.py against it")
    distributed_utils._infer_slurm_init = _infer_slurm_init
