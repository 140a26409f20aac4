"""Device mesh, logical-axis rules and batch placement.

One mesh with axes (data, fsdp, tensor). Parameters name logical axes where they are
created; the config's rules table maps them onto mesh axes. Batches are sharded over
(data, fsdp) along their leading axis; `MeshPrefetcher` places them a few steps ahead. Under
jit the mesh does every gather the global losses need, so the same code runs on 1 CPU or a
pod, and results do not depend on it.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
from typing import Any

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


class MeshPrefetcher:
    """Global batches from a loader, placed on the mesh `size` batches ahead on a thread.

        data = MeshPrefetcher(loader, mesh, size=2)
        batch = next(data)            # dict of global jax Arrays, already on the devices
        data.get_state()              # the loader state after the batches handed out so far
        data.close()                  # stops the thread; the loader stays open

    While the step runs, a background thread takes the next batches from the loader and
    assembles them with `global_batch`, so the host-to-device copy overlaps the step
    (flax's prefetch_to_device, big_vision's prefetch_iterator).

    Resume stays exact. The loader's `get_state()` and `skipped` count the batches taken
    from it, which runs up to size + 1 batches ahead of the trainer. So the thread reads
    them right after taking each batch and hands that snapshot out with it: `get_state()`
    and `skipped` here are the loader's as of the last batch `next` returned, a checkpoint
    records exactly the batches the trainer consumed, and the ones prefetched but not
    consumed are rebuilt after a restore. Set the loader's state before building this.

    size 0: no thread; each batch is placed when asked for (the plain loop). An error in
    the loader (e.g. too many bad records) is raised by the `next` that reaches it.
    """

    def __init__(self, loader, mesh, size: int = 2):
        if size < 0:
            raise ValueError(f'device prefetch size must be >= 0, got {size}')
        self._loader = loader
        self._mesh = mesh
        self.size = int(size)
        self._snapshot = (loader.get_state(), loader.skipped)
        self._queue: queue.Queue = queue.Queue(maxsize=max(self.size, 1))
        self._stop = threading.Event()
        self._thread = None
        self._closed = False

    def _take(self) -> tuple[dict, tuple[dict, int]]:
        local = next(self._loader)
        # Read on the thread that took the batch, before it takes another.
        snapshot = (self._loader.get_state(), self._loader.skipped)
        return global_batch(local, self._mesh), snapshot

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._take()
            except BaseException as e:  # StopIteration included: the consumer re-raises it
                item = e
            # A timeout, so close() is seen even while the queue is full.
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> MeshPrefetcher:
        return self

    def __next__(self) -> dict:
        if self._closed:
            # The loader has moved past the dropped batches: going on would skip them.
            raise RuntimeError(
                'MeshPrefetcher is closed; set the loader to its get_state() and build a new one'
            )
        if self.size == 0:
            batch, self._snapshot = self._take()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name='mesh-prefetch', daemon=True)
            self._thread.start()
            # An exit without close() (an exception in the loop) must not leave the thread
            # calling into JAX while the interpreter shuts down.
            atexit.register(self.close)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # every later next() raises it too
            raise item
        batch, self._snapshot = item
        return batch

    def get_state(self) -> dict:
        """The loader's state after the last batch handed out (see the class doc)."""
        return self._snapshot[0]

    @property
    def skipped(self) -> int:
        """The loader's bad-record count as of the last batch handed out."""
        return self._snapshot[1]

    def close(self) -> None:
        """Stops the thread; batches it had prefetched are dropped (the state excludes them)."""
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            atexit.unregister(self.close)
