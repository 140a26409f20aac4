"""Checkpoints on orbax: async, atomic, keep-N plus every K-th; never pickle.

A checkpoint holds the train state (params, optimizer state, any EMA teachers: all of
`nnx.state((model, optimizer))`), the data iterator position and the resolved config.
Restoring takes the target shardings, so a run saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


class Checkpointer:

    def __init__(self, workdir: str, config):
        if config.keep < 1:  # orbax would delete every checkpoint it writes
            raise ValueError(f'checkpoint.keep must be >= 1, got {config.keep}')
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            keep_period=config.keep_every or None,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=('state', 'data', 'config')
        )
        self.every = config.every

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config_json: dict, *, force=False) -> bool:
        return self.manager.save(
            step,
            force=force,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_json),
            ),
        )

    def restore(self, step: int, abstract_state):
        """`abstract_state`: ShapeDtypeStructs with the shardings to restore onto."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored['state'], restored['data']

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can save and exit cleanly.

    A second signal while stopping falls back to the default handler (e.g. a user pressing
    Ctrl-C twice really wants out).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """Whether any process got a stop signal, agreed on by all processes at the same step.

    Each process receives its own signals (a preempted host, a launcher forwarding Ctrl-C to
    some). If one stopped alone, the others would wait for it in the next step's collectives;
    so every step each process votes its signal number (0: none) into a max-reduce over the
    mesh, and the loop acts on the previous step's vote, which every process reads at the same
    step. The vote is one int per device, dispatched after the train step, and read when that
    step is finished anyway (the loop reads each step's loss one step late): no extra wait.
    With a single process the local signal is the answer and nothing is reduced.
    """

    def __init__(self, stop: StopSignal, mesh):
        self.stop = stop
        self._pending = None
        self._agreed: int | None = None
        self._mesh = mesh
        if jax.process_count() > 1:
            self._votes = NamedSharding(mesh, P(mesh.axis_names))
            self._max = jax.jit(lambda v: v.max(), out_shardings=NamedSharding(mesh, P()))
            self._local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def poll(self) -> int | None:
        """Votes for this step; returns the signal all processes agree on (None: go on)."""
        if jax.process_count() == 1:
            return self.stop.received
        if self._agreed:  # once agreed, stays agreed (the loop stops at that step)
            return self._agreed
        vote = jax.make_array_from_process_local_data(
            self._votes,
            np.full(self._local, self.stop.received or 0, np.int32),
            (self._mesh.size,),
        )
        previous, self._pending = self._pending, self._max(vote)
        if previous is not None:
            self._agreed = int(previous) or None
        return self._agreed
