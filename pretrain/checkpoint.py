"""Checkpoints on orbax: async, atomic, keep-N plus every K-th; never pickle.

A checkpoint holds the train state (params, optimizer state, any EMA teachers: all of
`nnx.state((model, optimizer))`), the data iterator position and the resolved config.
Restoring takes the target shardings, so a run saved on one mesh restores onto another.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read into the given state; the message is one line."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint's arrays failed (a damaged file); some reads may still be running."""


@contextlib.contextmanager
def _stderr_held_back(linger_on_error: float = 1.0):
    """Holds what is written to fd 2 in a file; gives it back after success, drops it after an
    exception. When one read of a damaged checkpoint fails, orbax closes its event loop and
    every TensorStore read still in flight prints an 'Event loop is closed' traceback from its
    own thread: pages of them around the one line that matters. Those are waited out, unseen."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            time.sleep(linger_on_error)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors='replace'))
                sys.stderr.flush()


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
        """`abstract_state`: ShapeDtypeStructs with the shardings to restore onto.

        CheckpointError when the checkpoint holds another model (check_fits), and
        CheckpointReadError when reading it fails: it names the step, the root cause's first
        line and the earlier checkpoints one could resume from instead.
        """
        self.check_fits(step, abstract_state)
        try:
            with _stderr_held_back():
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
        except Exception as e:  # orbax raises bare Exceptions from TensorStore reads
            raise self._read_error(step, e) from None
        return restored['state'], restored['data']

    def _read_error(self, step: int, error: Exception) -> CheckpointReadError:
        """One line: the step, the root cause's first line, the checkpoints before it."""
        root = error
        while root.__cause__ is not None:  # orbax wraps the TensorStore error that says why
            root = root.__cause__
        first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        earlier = [s for s in self.manager.all_steps() if s < step]
        hint = (
            f'; earlier checkpoints: {", ".join(map(str, earlier))} (move '
            f'{os.path.join(self.directory, str(step))} aside to resume from {earlier[-1]})'
            if earlier
            else ''
        )
        return CheckpointReadError(
            f'checkpoint {step} in {self.directory} cannot be read: {first}{hint}'
        )

    def check_fits(self, step: int, abstract_state) -> None:
        """CheckpointError unless checkpoint `step` holds exactly the arrays of abstract_state.

        Read from the checkpoint's metadata before any array is: a run resumed with other
        model overrides gets the first differing array named, not a failed TensorStore read.
        """
        path = pathlib.Path(self.directory) / str(step) / 'state'
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(path)
        except Exception as e:  # no or unreadable metadata: a damaged checkpoint
            raise self._read_error(step, e) from None
        stored = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(metadata)}
        wanted = {
            '.'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in key_path): leaf.shape
            for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
        }
        problems = [f'{n} is missing there' for n in sorted(set(wanted) - set(stored))]
        problems += [f'{n} is not in this model' for n in sorted(set(stored) - set(wanted))]
        problems += [
            f'{n} is {stored[n]} there, {wanted[n]} here'
            for n in sorted(set(stored) & set(wanted))
            if stored[n] != tuple(wanted[n])
        ]
        if problems:
            more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
            raise CheckpointError(
                f'checkpoint {step} in {self.directory} holds another model than this config: '
                f'{problems[0]}{more}; pass the model overrides the run was started with'
            )

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
    Ctrl-C twice really wants out), after killing this process's child processes: input
    workers ignore stop signals (input_pipeline/loader.py) and would outlive it.
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
            for child in multiprocessing.active_children():
                child.kill()
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
