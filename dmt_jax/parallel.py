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

from dmt_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")


def preemption_service_running() -> bool:
    """jax.distributed's preemption service is on: it owns SIGTERM, through a handler installed in C++
    that Python's signal module does not see (signal.signal reports SIG_DFL as the handler it replaces,
    so code that "restores" it leaves SIGTERM fatal): leave SIGTERM alone while it runs."""
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def initialize_distributed(cfg) -> str:
    """Joins this process to a multi-process run (jax.distributed.initialize); returns how, or ''.

    Must run before any JAX computation. Explicit (any launcher): cfg.coordinator_address with
    cfg.num_processes and cfg.process_id; every process then uses all of its local devices.
    Automatic (cfg.auto): on a Cloud TPU VM, and under SLURM or Open MPI with more than one task,
    JAX reads the cluster's layout itself; under SLURM and Open MPI it gives each task one GPU, the
    one its local rank names (launch one task per GPU). A lone process initializes nothing.
    """
    if jax.distributed.is_initialized():
        return "already initialized"
    if cfg.coordinator_address:
        if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
            raise UserError(
                f"distributed.coordinator_address={cfg.coordinator_address!r} also needs "
                f"distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes "
                f"(got {cfg.num_processes} and {cfg.process_id})"
            )
        # 'deactivate': the given layout wins over whatever cluster variables the environment holds.
        jax.distributed.initialize(
            cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            cluster_detection_method="deactivate",
        )
        how = "explicit"
    elif cfg.auto and (how := detect_cluster()):
        jax.distributed.initialize()
    else:
        return ""
    logging.info("process %d of %d (%s)", jax.process_index(), jax.process_count(), how)
    return how


def detect_cluster(environ=None) -> str:
    """The multi-process launcher this process runs under ('cloud_tpu', 'slurm', 'ompi'), or ''."""
    env = os.environ if environ is None else environ
    # One process per TPU VM host; JAX reads the slice's layout from the metadata server.
    if environ is None and _on_cloud_tpu_vm():
        return "cloud_tpu"
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    # One SLURM task is a single-process run: initializing would restrict it to one GPU.
    if all(v in env for v in slurm_vars) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    return ""


def _on_cloud_tpu_vm() -> bool:
    try:  # set by `import jax` when libtpu and TPU chips are present; private, hence the guard
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    # Topology-aware device order on TPU (rings along the axes); nothing relies on the order:
    # evaluation labels travel with their images (evaluate.collect).
    auto = (jax.sharding.AxisType.Auto,) * len(BATCH_AXES)
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto, devices=devices)


def mesh_shape(data: int, fsdp: int, n: int) -> tuple[int, int]:
    """(data, fsdp) for n devices, -1 taking the remaining ones; UserError when they do not use n."""
    if data == -1 and fsdp == -1:
        raise UserError(
            "--config.mesh.data and mesh.fsdp are both -1: at most one takes the remaining devices"
        )
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise UserError(
            f"--config.mesh.data={data} x mesh.fsdp={fsdp} does not use the {n} devices: their product "
            f"must be {n} (-1 takes the remaining devices)"
        )
    return data, fsdp


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
        k: jax.make_array_from_process_local_data(
            sharding, v, (v.shape[0] * jax.process_count(),) + v.shape[1:]
        )
        for k, v in local.items()
    }


def place_from_host(tree, shardings):
    """Host (numpy) arrays -> global arrays with these shardings, each device given only its shard.

    Unlike `jax.device_put` of host arrays, no process checks that the others hold equal values (an
    all-gather of every array onto every host) and no device holds a full copy on the way.
    """

    def one(x, sharding):
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract (a benchmark lowering without weights)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """A pytree of (possibly cross-process sharded) arrays -> numpy, the whole value on every process.

    Every process must call it (it is a collective when an array spans processes): `jax.device_get`
    on one process fails for an array whose shards live on other processes (fsdp across hosts).
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise UserError(
            f"batch_size {global_batch_size} is not divisible by the {jax.process_count()} processes"
        )
    per_device = global_batch_size % jax.device_count()
    if per_device:
        raise UserError(
            f"batch_size {global_batch_size} is not divisible by the {jax.device_count()} devices: "
            f"use a multiple of {jax.device_count()}"
        )
    return global_batch_size // jax.process_count()


def ordered_batch_sum(mesh: Mesh):
    """`batch_sum(x, rows_sum=lambda a: a.sum(0))`: a sum over the rows of x (axis 0, sharded over the
    batch axes) that gives the same bits on every device and on any process layout of a mesh of this
    shape. Each device applies rows_sum to its own rows (e.g. a.T @ a, a sum of outer products), then
    the partial sums meet in a fixed butterfly (round r adds the partner i xor 2^r; a + b = b + a
    exactly, so both partners hold the same value) through exact ppermutes. A plain cross-device sum adds
    in whatever order the collective library picks (in-process, gloo, NCCL), and PHI-S's eigenvectors turn
    those last-bit differences into visible ones. A batch-shard count that is not a power of 2 falls back
    to psum (the collective's order)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def local(x, rows_sum):
        total = rows_sum(x)
        if n & (n - 1):
            return jax.lax.psum(total, BATCH_AXES)
        step = 1
        while step < n:
            total = total + jax.lax.ppermute(total, BATCH_AXES, [(i, i ^ step) for i in range(n)])
            step *= 2
        return total

    def batch_sum(x, rows_sum=lambda a: a.sum(0)):
        if n == 1:
            return rows_sum(x)
        one = lambda shard: local(shard, rows_sum)
        return jax.shard_map(one, mesh=mesh, in_specs=P(BATCH_AXES), out_specs=P(), check_vma=False)(x)

    return batch_sum
