"""Device meshes for the update step, and multi-process start-up.

Multi-process (multi-host) runs use JAX's own multi-controller runtime: every process runs the same
program (:func:`initialize` first), each drives its local devices, and the update step's arrays are
global ``jax.Array`` s over every process's devices. Each process generates the rollouts of its slice
of the prompt batch on its own engine (:class:`~jackpot_jax.data.batching.PromptBatcher`), turns them
into its rows of the global batch (:func:`global_rows`), and gets a process-local copy of the new
actor weights back for its engine (:func:`local_copy`). Only small per-row values (rewards, lengths)
are gathered on the hosts (:func:`allgather`).

The update step (:class:`jackpot_jax.train.step.Updater`) runs on one mesh with the axes
``("data", "fsdp", "tensor")`` of :mod:`jackpot_jax.models.sharding`: the parameters and optimizer
states of both models are sharded by the logical-axis rules (FSDP over ``"fsdp"``, heads, MLP
width and vocabulary over ``"tensor"``), the batch's sequences over ``("data", "fsdp")``.
``config.mesh`` gives the axis sizes; one of them may be -1, the devices left over. Two placements
(``config.placement``, :func:`meshes_from_config`): colocated, policy, actor and their optimizer
states share every device of the mesh (the rollout engine keeps its own placement; the trainer
pushes the actor's weights into it device to device); disaggregated, the actor, its optimizer state
and the rollout engine on ``config.actor_mesh``'s devices and the policy on ``config.mesh``'s, none
shared (:class:`jackpot_jax.train.disaggregated.DisaggregatedUpdater`).
"""
from __future__ import annotations

import ipaddress
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jackpot_jax.config import ConfigError
from jackpot_jax.models.sharding import MESH_AXES, make_mesh

logger = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Start JAX's multi-process runtime (:func:`jax.distributed.initialize`) before anything
    touches a device; returns whether it did.

    With ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and ``process_id``
    given: an explicit start, e.g. N processes on 127.0.0.1 (``launch/local.sh``). With ``auto``
    and none given: JAX detects the cluster (TPU pod slices, SLURM, Open MPI, Kubernetes). With
    neither: a single-process run, nothing to do. Collectives between CPU devices of different
    processes use gloo (JAX's CPU default has none); accelerators keep their own (ICI, NCCL).
    Process 0's coordinator listens where :func:`bind_address` says: on a loopback address given,
    that address only.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        missing = [name for name, value in zip(("coordinator_address", "num_processes", "process_id"), explicit)
                   if value is None]
        if missing:
            raise ConfigError(f"a multi-process start needs coordinator_address, num_processes and process_id; "
                              f"missing: {', '.join(missing)} (or give none of them, with auto for a cluster).")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"num_processes={num_processes}, process_id={process_id} is not allowed: it needs "
                              f"num_processes >= 1 and 0 <= process_id < num_processes.")
    elif not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               coordinator_bind_address=bind_address(coordinator_address))
    logger.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
    return True


def bind_address(coordinator_address: str | None) -> str | None:
    """Where process 0's coordinator listens: ``coordinator_address`` itself when its host is a
    loopback address (``127.0.0.1:PORT``, ``[::1]:PORT``, ``localhost:PORT``), so a local run is
    never reachable from other machines (JAX's default binds every interface, ``[::]:PORT``, and the
    coordinator has no authentication); None (JAX's default) for other hosts, which other machines
    must reach, and without an address (a detected cluster)."""
    if coordinator_address is None:
        return None
    host, _, port = coordinator_address.rpartition(":")
    host = host.strip("[]")
    if not host or not port:
        raise ConfigError(f"coordinator_address={coordinator_address!r} is not allowed: it must be HOST:PORT, e.g. "
                          "127.0.0.1:12345.")
    if host == "localhost":
        return coordinator_address
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return None
    return coordinator_address if loopback else None


def global_rows(tree, sharding):
    """This process's rows (host arrays) as its part of global arrays split along the leading axis
    by ``sharding``; the global arrays hold the processes' rows in process order. With one process,
    the arrays as they are (the jitted step places them)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_copy(tree, mesh):
    """A copy of ``tree`` (arrays on ``mesh``) on this process's devices: a device copy with one
    process; with several, gathered on every device of the mesh (replicated), then this process's
    first device's replica, e.g. the new actor weights for the process's rollout engine."""
    if jax.process_count() == 1:
        return jax.tree.map(jnp.copy, tree)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    gathered = jax.jit(lambda t: t, out_shardings=replicated)(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), gathered)


def from_local(tree, shardings):
    """``tree`` (arrays on this process's devices, the same values on every process, e.g. a
    :func:`local_copy`) placed into ``shardings`` over every process's devices: each process fills
    its own devices' shards, device to device."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    leaves, treedef = jax.tree.flatten(tree)  # the shardings' tree may hold them where tree has Param boxes
    return treedef.unflatten([jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
                              for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)])


def allgather(x) -> np.ndarray:
    """Every process's ``x`` (host arrays of one shape), concatenated along the first axis in
    process order; ``x`` itself with one process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def mesh_shape(sizes, num_devices: int) -> dict:
    """``{"data": d, "fsdp": f, "tensor": t}`` from ``sizes`` (each positive, or -1 for one axis:
    the devices the others leave), checked to need at most ``num_devices`` devices."""
    shape = {axis: sizes[axis] for axis in MESH_AXES}
    free = [axis for axis, size in shape.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in shape.values()):
        raise ConfigError(f"config.mesh={shape} is not allowed: each axis is a positive size, and at most one "
                          f"is -1 (the devices left over).")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh={shape}: the {num_devices} devices do not divide by the other axes' "
                              f"product {fixed}; choose sizes whose product divides {num_devices}.")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) > num_devices:
        raise ConfigError(f"config.mesh={shape} needs {math.prod(shape.values())} devices and there are "
                          f"{num_devices}; make data x fsdp x tensor at most {num_devices}, or set one axis to -1.")
    return shape


def meshes_from_config(config, devices=None):
    """``(policy mesh, actor mesh)`` of the run's ``config.placement``: colocated, ``config.mesh``
    twice; disaggregated, ``config.actor_mesh`` on the last of ``devices`` (default: every device)
    and ``config.mesh`` on those before them (its -1 axis takes all of those)."""
    devices = jax.devices() if devices is None else list(devices)
    if config.placement == "colocated":
        mesh = mesh_from_config(config.mesh, devices)
        return mesh, mesh
    if jax.process_count() > 1:
        raise ConfigError(f"config.placement='disaggregated' is not allowed with {jax.process_count()} processes: "
                          "it runs in one process for now; use placement='colocated' for multi-process runs.")
    sizes = {axis: config.actor_mesh[axis] for axis in MESH_AXES}
    count = math.prod(sizes.values())
    if count >= len(devices):
        raise ConfigError(f"config.actor_mesh={sizes} is not allowed: it takes {count} of the {len(devices)} devices "
                          f"and the disaggregated placement needs some left for the policy's config.mesh.")
    return mesh_from_config(config.mesh, devices[:-count]), make_mesh(**sizes, devices=devices[-count:])


def mesh_from_config(sizes, devices=None):
    """The update step's mesh for ``config.mesh``: ``data x fsdp x tensor`` of ``devices`` (default:
    every device of every process), the first ones when the mesh needs fewer."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return make_mesh(**shape, devices=devices[:math.prod(shape.values())])
