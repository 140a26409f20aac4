"""Device mesh, logical-axis rules and batch placement.

One mesh with axes (data, fsdp, tensor). Parameters name logical axes where they are
created; the config's rules table maps them onto mesh axes. Batches are sharded over
(data, fsdp) along their leading axis. Under jit the mesh does every gather the global
losses need, so the same code runs on 1 CPU or a pod, and results do not depend on it.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Axis sizes from the config; one axis may be -1, meaning all remaining devices."""
    sizes = [int(mesh_config[a]) for a in AXES]
    if any(s != -1 and s < 1 for s in sizes):
        raise ValueError(
            f'mesh: each axis size must be -1 or a positive integer, got '
            f'{dict(zip(AXES, sizes))}'
        )
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f'mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices')
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f'mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, '
            f'{num_devices} are present'
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: with jax's default Explicit axes the ViT patchify reshape fails (DESIGN.md).
    return jax.make_mesh(
        shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices
    )


def _fit(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """Drops mesh axes that do not divide a dimension: that dimension is replicated instead.

    A 258-token vocabulary on a 4-way tensor axis, say, stays whole rather than failing.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def state_shardings(abstract_state, mesh, rules):
    """NamedShardings for a (possibly abstract) nnx.State from its logical annotations."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
        specs,
        abstract_state,
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows -> global jax Arrays sharded over (data, fsdp).

    Each process holds a contiguous block of the global batch (the loader's contract), which
    is what make_array_from_process_local_data assembles.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
