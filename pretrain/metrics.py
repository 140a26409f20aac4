"""Metric writers (JSONL + TensorBoard, process 0 only) and the terminal progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time

import jax
import numpy as np
import tqdm


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TB.

    Only process 0 writes; other processes get a writer that drops everything, so callers
    never branch on the process index.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            from tensorboardX import SummaryWriter  # heavy import only where it is used

            self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        # json would write NaN as a bare token that strict parsers reject; null is standard.
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        self._jsonl.write(json.dumps(clean) + '\n')
        self._jsonl.flush()
        for k, v in row.items():
            if k != 'step' and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, int(step))

    def flush(self):
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Throughput:
    """Samples/s and MFU over the steps since the last call (host wall clock), and the share
    of that time the devices sat idle for want of the next batch: near 0 when the input
    pipeline keeps up, large when it sets the pace (raise input.num_workers / num_threads).

    JAX returns from a step's dispatch at once, so the loop's wait for the next batch mostly
    overlaps the step still running; only the part of the wait after that step finished
    leaves the devices idle. The loop reports each dispatch (`dispatched`), a `StepWatcher`
    thread reports when the step's outputs are ready (`finished`), and the wait for step
    k + 1's batch counts from max(start of the wait, end of step k).
    """

    def __init__(self, *, batch_size: int, flops_per_step: float, peak_flops: float):
        self.batch_size, self.flops_per_step, self.peak = batch_size, flops_per_step, peak_flops
        self._t, self._step, self._idle = None, None, 0.0
        self._dispatches = 0
        self._waits: list[tuple[float, float, int]] = []  # (start, end, steps dispatched before)
        self._done: dict[int, float] = {}  # dispatch index -> when its outputs were ready

    @contextlib.contextmanager
    def waiting_for_data(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._waits.append((t, time.perf_counter(), self._dispatches))

    def dispatched(self) -> int:
        """Notes a dispatched step; returns its index for `finished`."""
        self._dispatches += 1
        return self._dispatches - 1

    def finished(self, index: int, t: float) -> None:
        """Step `index`'s outputs were ready at perf_counter time `t` (StepWatcher's thread)."""
        self._done[index] = t

    def _count_idle(self) -> None:
        pending = []
        for start, end, before in self._waits:
            if before == 0:  # nothing dispatched yet: the devices had nothing to run
                self._idle += end - start
            elif before - 1 in self._done:
                self._idle += max(0.0, end - max(start, self._done.pop(before - 1)))
            else:
                pending.append((start, end, before))  # the watcher has not seen it finish yet
        self._waits = pending

    def __call__(self, step: int) -> dict:
        now = time.perf_counter()
        self._count_idle()
        out = {}
        if self._t is not None and step > self._step:
            dt = (now - self._t) / (step - self._step)
            out = {
                'perf/step_time_s': dt,
                'perf/samples_per_s': self.batch_size / dt,
                'perf/mfu': self.flops_per_step / dt / self.peak,
                'perf/data_wait_frac': self._idle / (now - self._t),
            }
        self._t, self._step, self._idle = now, step, 0.0
        return out


class StepWatcher:
    """A daemon thread that waits on each dispatched step's outputs and reports the time they
    were ready to `on_ready(index, perf_counter time)`, so the loop itself never blocks."""

    def __init__(self, on_ready):
        self._on_ready = on_ready
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name='step-watcher', daemon=True)
        self._thread.start()

    def watch(self, index: int, outputs) -> None:
        self._queue.put((index, outputs))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            index, outputs = item
            jax.block_until_ready(outputs)
            self._on_ready(index, time.perf_counter())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


INPUT_BOUND_FRACTION = 0.3


def input_bound_line(step: int, row: dict) -> str | None:
    """A terminal line when the devices sat idle waiting for batches over 30% of a logging
    interval: the input pipeline, not the step, sets the pace (e.g. a small model on a GPU)."""
    waited = row.get('perf/data_wait_frac', 0.0)
    if waited <= INPUT_BOUND_FRACTION:
        return None
    return (
        f'step {step}: the devices waited {waited:.0%} of the time for batches; the input '
        'pipeline sets the pace (raise --config.input.num_workers or num_threads)'
    )


def progress_bar(*, start: int, total: int, enabled: bool):
    return tqdm.tqdm(
        total=total,
        initial=start,
        disable=not enabled,
        unit='step',
        dynamic_ncols=True,
        smoothing=0.1,
    )


# The figure each evaluator is read by: top-1 accuracy, recall@1, mIoU (fractions in the row).
HEADLINE_SUFFIXES = ('top1', '_r1', '/miou')


def eval_line(step: int, row: dict) -> str:
    """One terminal line for an evaluation row, e.g. 'step 400 eval (5.1 s): zeroshot/top1
    36.7 | zeroshot/shape_top1 36.3 | ...'; the full row goes to metrics.jsonl."""
    figures = [
        f'{key[len("eval/"):]} {100 * value:.1f}'
        for key, value in row.items()
        if key.startswith('eval/') and key.endswith(HEADLINE_SUFFIXES) and '/val_' not in key
    ]
    seconds = sum(v for k, v in row.items() if k.startswith('eval/') and k.endswith('/seconds'))
    return f'step {step} eval ({seconds:.1f} s): ' + ' | '.join(figures)

