"""`model.remat='auto'`: the train step without rematerialisation where it fits, else remat.

Remat recomputes activations in the backward pass instead of storing them: it buys memory
with compute. Where the stored activations fit there is nothing to buy. CLIP ViT-B/16 at
batch 512 on one H100 (session 22, benchmarks/README.md): 'none' 0.179 s/step with 39 GB
of XLA temporaries, 'nothing_saveable' 0.208 s with 5.3 GB; 'dots_saveable' 0.227 s with
23 GB, slower than 'nothing_saveable', so it is no candidate here. Whether 'none' fits
depends on the per-device batch, the mesh and the chip, which a config file cannot know.

'auto' therefore decides at the first step, with that step's real arguments: it compiles
the step without remat and keeps it when XLA's memory analysis of the compiled program
(its temporaries, plus outputs that do not reuse a donated input) fits `FRACTION` of the
device memory still free, the smallest over all processes; otherwise it compiles the step
with `FALLBACK`. The chosen executable is the one jit then runs (jit reuses the AOT
compilation: no third compile). Where the backend reports no memory limit (CPU), 'none'
without a trial compile: on CPU remat only costs time (DESIGN.md).

Models are built with 'auto' as with 'none' (layers.remat_policy): remat changes no
parameter, and the forward-only evaluators never rematerialise.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)

CANDIDATES = ('none',)  # tried in order, fastest first
FALLBACK = 'nothing_saveable'  # the least memory; taken when no candidate fits
# Headroom under the free memory for what the analysis does not see: allocator
# fragmentation, the evaluators' buffers, the next batches being placed.
FRACTION = 0.9


def free_device_bytes() -> int | None:
    """The smallest free memory of any device of the run (bytes_limit - bytes_in_use), or
    None where the backend does not report it (CPU). Every process must call this: with
    several processes the figure is agreed through an all-gather, so all choose the same."""
    free = None
    for device in jax.local_devices():
        stats = device.memory_stats()
        if not stats or 'bytes_limit' not in stats:
            return None
        left = int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
        free = left if free is None else min(free, left)
    if free is None:
        return None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
    return free


def step_bytes(compiled) -> int | None:
    """Device bytes a compiled step allocates beyond its (already resident) arguments."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def choose(build_step: Callable[[str], Callable], args, free_bytes: int | None):
    """(remat name, jitted step, report) for the step `build_step(remat)` on `args`.

    `build_step(name)` returns the jitted train step with `model.remat=name`;
    `free_bytes` is the device memory free for it (None: unknown, take 'none').
    The report says what was compiled and what it needed, for the log.
    """
    if free_bytes is None:
        return 'none', build_step('none'), "'none' (the backend reports no memory limit)"
    budget = int(FRACTION * free_bytes)
    tried = []
    for name in CANDIDATES + (FALLBACK,):
        step = build_step(name)
        t0 = time.perf_counter()
        needed = step_bytes(step.lower(*args).compile())
        tried.append(f"'{name}' needs {_gb(needed)}" + f' ({time.perf_counter() - t0:.0f} s)')
        if name == FALLBACK or (needed is not None and needed <= budget):
            report = f"'{name}': " + ', '.join(tried) + f' of {_gb(budget)} usable per device'
            if needed is not None and needed > budget:
                report += '; it may not fit (lower batch_size, or raise grad_accum or mesh.fsdp)'
            return name, step, report


def _gb(n: int | None) -> str:
    return 'unknown' if n is None else f'{n / 2**30:.1f} GiB'


class AutoRematStep:
    """A train step that picks its remat policy (`choose`) at its first call.

    `say` gets the one-line report (the training loop writes it above its progress bar).
    """

    def __init__(self, build_step: Callable[[str], Callable], *, say=log.info, free_bytes=None):
        self.build_step = build_step
        self.say = say
        self.free_bytes = free_bytes or free_device_bytes
        self.step = None
        self.remat = self.report = None

    def resolve(self, *args):
        """Picks the policy for these arguments (once); returns the chosen jitted step."""
        if self.step is None:
            self.remat, self.step, self.report = choose(self.build_step, args, self.free_bytes())
            self.say(f'model.remat=auto: {self.report}')
        return self.step

    def __call__(self, *args):
        return self.resolve(*args)(*args)

    def lower(self, *args):
        return self.resolve(*args).lower(*args)
