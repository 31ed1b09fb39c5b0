"""Mesh, partition rules, global batches and multi-host start-up: all sharding decisions live here.

One mesh with axes (data, fsdp). The batch is split over both axes (every device sees its own
examples); parameters and optimizer state are replicated, except that under fsdp > 1 each tensor of
at least `fsdp_min_size` elements is split along its largest axis that the fsdp size divides.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(cfg) -> None:
    """jax.distributed.initialize(): automatic on TPU pods and SLURM, explicit from config elsewhere."""
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes if cfg.num_processes > 0 else None,
            process_id=cfg.process_id if cfg.process_id >= 0 else None,
        )
    elif cfg.auto and _cluster_detected():
        jax.distributed.initialize()  # JAX reads TPU metadata / SLURM variables itself
    if jax.process_count() > 1:
        logging.info("process %d of %d", jax.process_index(), jax.process_count())


def _cluster_detected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm or tpu_pod or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices: set --config.mesh.data")
    device_grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(device_grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape, fsdp_size: int, min_size: int, skip_leading: int = 0) -> P:
    """The partition rule: shard the largest axis divisible by fsdp_size, if the tensor is large."""
    if fsdp_size <= 1 or int(np.prod(shape)) < min_size:
        return P()
    axes = sorted(range(skip_leading, len(shape)), key=lambda a: -shape[a])
    for a in axes:
        if shape[a] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[a] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_size: int, skip_leading: int = 0):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state)."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(shape, fsdp, min_size, skip_leading) if shape else P())

    return jax.tree.map(one, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * jax.process_count(),) + v.shape[1:])
        for k, v in local.items()
    }


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the {jax.process_count()} processes"
        )
    per_device = global_batch_size % jax.device_count()
    if per_device:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the {jax.device_count()} devices: "
            f"use a multiple of {jax.device_count()}"
        )
    return global_batch_size // jax.process_count()
