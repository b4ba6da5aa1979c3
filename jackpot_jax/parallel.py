"""Device meshes for the update step, and multi-process start-up.

The update step (:class:`jackpot_jax.train.step.Updater`) runs on one mesh with the axes
``("data", "fsdp", "tensor")`` of :mod:`jackpot_jax.models.sharding`: the parameters and optimizer
states of both models are sharded by the logical-axis rules (FSDP over ``"fsdp"``, heads, MLP
width and vocabulary over ``"tensor"``), the batch's sequences over ``("data", "fsdp")``.
``config.mesh`` gives the axis sizes; one of them may be -1, the devices left over. This is the
colocated placement: policy, actor and their optimizer states share every device of the mesh.
(The rollout engine keeps its own placement; the trainer pushes the actor's weights into it
device to device.)
"""
from __future__ import annotations

import math

import jax

from jackpot_jax.config import ConfigError
from jackpot_jax.models.sharding import MESH_AXES, make_mesh


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


def mesh_from_config(sizes, devices=None):
    """The update step's mesh for ``config.mesh``: ``data x fsdp x tensor`` of ``devices`` (default:
    every device of every process), the first ones when the mesh needs fewer."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return make_mesh(**shape, devices=devices[:math.prod(shape.values())])
