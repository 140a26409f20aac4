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
import orbax.checkpoint as ocp


class Checkpointer:

    def __init__(self, workdir: str, config):
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
