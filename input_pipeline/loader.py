"""The resumable, elastic data loader the trainer iterates.

    loader = make_loader(source, transforms, global_batch_size=256, seed=0,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())
    for batch in loader: ...            # this process's rows, dict of numpy
    state = loader.get_state()          # JSON-able; checkpoint it with the model
    loader.set_state(state)             # continue exactly there

Order. The example order is a fixed function of (seed, epoch): global position
g lies in epoch e = g // N (N = len(source)) and reads source index
perm_e(g mod N), where perm_e is grain's random-access index shuffle seeded per
epoch (`grain.MapDataset.range(N).shuffle(...)`), so each epoch is a new
permutation and positions run on across epochs without a boundary. Global batch
n covers positions [n*B, (n+1)*B); process p of P reads rows
[p*B/P, (p+1)*B/P) of it.

Elastic resume. Because of that, the whole iterator state is the index of the
next global batch (plus what defines the order, checked on restore). Any
process count can continue from it: nothing is repeated or skipped when 2
hosts' checkpoint is restored on 1 or 4. The state counts batches *yielded*;
batches that were prefetched but not consumed are rebuilt after a restore.

Prefetch. Batches are built (read + transforms + collate) on a grain thread
pool, `prefetch` batches ahead, so the next batch is ready while the step runs.
A batch is one pool task. Threads overlap the data work with the XLA step
(which releases the GIL), and JPEG decoding and resizing (simplejpeg, OpenCV)
release the GIL too: of the ~1.0 ms a 500x375 JPEG takes to decode + crop to
224 + flip on one core, ~42 us is Python holding the GIL (a 16 px JPEG through
the same transforms), so threads alone scale to ~1/(0.04 + 0.96/n) of one core
on n cores (Amdahl; ~10x on 16). Past that, or for transforms in pure Python,
`num_workers` > 0 builds the batches in that many worker processes instead
(grain's mp_prefetch: worker w builds batches w, w + n, ..., each on its own
`num_threads` threads, and they are read back in order). The batch stream, the
state, resume and the bad-record counts are the same either way: a batch is a
fixed function of its index, and the counting happens here, on consumption.
Workers are spawned (never forked: JAX's threads do not survive a fork), so
the source and transforms must pickle; each worker holds its own copy of the
source, and hands every batch's arrays back in shared memory (/dev/shm: 4.8 MB a
batch at 32 x 224^2, `prefetch` batches per worker in flight; containers need a
/dev/shm larger than Docker's 64 MB default, see launch/gke_jobset.yaml).
Measured on the shared 2-core development machine (load average ~8 from other
work, so only relative and noisy; batches of 32, 500x375 JPEGs -> 224, median
of 4 interleaved rounds; batches were then pickled through a pipe): 1 thread 338
images/s, 2 threads 346, 1 worker process 218, 2 workers 254. With no idle core
there, processes only add the copy, so 0 (threads only) is the default for JPEG
data; `-1` means one worker per core, at most 32 (the default for the shapes
renderer, which is pure Python).

Randomness. Random transforms (transforms.RandomTransform: sub-caption
sampling, caption choice) get a Generator seeded from (seed, epoch, source
index) of the record actually read, so they are part of the same fixed function
of (seed, position): resume and elastic restore redraw exactly the same
samples, and each epoch draws new ones.

Bad records. A record whose source read or transforms raise (undecodable
image, empty caption) is replaced by the next source index (deterministic, so
resume stays exact), logged with its index, and counted in `loader.skipped`
(the `data/skipped` metric; `loader.seen` counts every record read). Once
skipped exceeds `max_bad_fraction` of the records seen, the loader raises
RuntimeError: a broken dataset or transform must stop the run, not silently
train on replacements. The fraction is taken over at least
`bad_fraction_min_records` records, so one bad record early in a run is not
judged as "100% bad". Counters are per process and start at zero in each run.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from input_pipeline import transforms as transforms_lib

log = logging.getLogger(__name__)

# The stream is endless (epochs roll over); grain needs a length.
_HORIZON_BATCHES = 2**62
# A slot whose record and this many following ones are all bad is not a few
# bad records but a broken source or transform: stop at once.
_MAX_CONSECUTIVE_BAD = 100


def batch_collate(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks equal-keyed record dicts into a dict of arrays with a batch axis."""
    if not records:
        raise ValueError("cannot collate an empty list of records")
    keys = records[0].keys()
    for r in records:
        if r.keys() != keys:
            raise ValueError(f"records disagree on keys: {sorted(keys)} vs {sorted(r.keys())}")
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


class _Batch(NamedTuple):
    # A NamedTuple, not a dataclass: grain's worker processes hand a batch's arrays over in
    # shared memory only where they are leaves of a structure it can traverse. A dataclass
    # is one opaque leaf, pickled whole through the result pipe (1.6 MB per shapes batch),
    # and a worker that had one such put pending when the loader closed could not exit: its
    # queue's feeder thread blocked on the full pipe, and close() waited out grain's 25 s
    # join timeout per worker.
    arrays: dict[str, np.ndarray]
    bad: list[tuple[int, str]]  # (source index, error) of the replaced records
    seen: int  # records read, good and bad


# Sources up to this size keep each epoch's permutation as an array (see _epoch_order).
_CACHED_ORDER_MAX_RECORDS = 65_536


def _shuffle_seed(seed: int) -> int:
    # grain seeds epoch e with (seed + e), so loader seeds 0 and 1 would share
    # all but one epoch's permutation; hashing the seed keeps runs independent.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


class Loader:
    """Iterator over this process's slices of the global batches. See module doc."""

    def __init__(
        self,
        source,
        transforms: Sequence[transforms_lib.Transform],
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        num_threads: int = 2,
        prefetch: int = 2,
        num_workers: int = 0,
        max_bad_fraction: float = 0.01,
        bad_fraction_min_records: int = 1000,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by "
                f"process_count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if len(source) == 0:
            raise ValueError(f"empty source: {source!r}")
        self.source = source
        self.transforms = tuple(transforms)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.num_workers = _worker_count(num_workers)
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_fraction_min_records = int(bad_fraction_min_records)
        self.num_records = len(source)
        order = grain.MapDataset.range(self.num_records)
        self._order = order.shuffle(seed=_shuffle_seed(self.seed)) if self.shuffle else order
        self._order_cache: dict[int, np.ndarray] = {}
        self.skipped = 0
        self.seen = 0
        self._next_batch = 0
        self._iterator = None

    # -- the order -----------------------------------------------------------

    def positions(self, batch: int) -> range:
        """Global positions of this process's rows of global batch `batch`."""
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def source_index(self, position: int) -> int:
        """Source index read at a global position (epoch = position // N)."""
        if self.num_records <= _CACHED_ORDER_MAX_RECORDS:
            epoch, offset = divmod(position, self.num_records)
            return int(self._epoch_order(epoch)[offset])
        # The shuffled range returns perm_e(g mod N) + e * N.
        return int(self._order[position]) % self.num_records

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """perm_e as an array, computed once per epoch (small sources only).

        grain's index shuffle costs ~1.3 ms a lookup at 16 records (~5 us from 100k up),
        which dominated batch building on small datasets; a whole epoch of lookups is
        ~22 ms up to 1k records. The same numbers as `_order`, so the order is unchanged.
        """
        order = self._order_cache.get(epoch)
        if order is None:
            start = epoch * self.num_records
            order = np.array(
                [self._order[start + i] for i in range(self.num_records)], dtype=np.int64
            )
            order %= self.num_records
            self._order_cache[epoch] = order
            # Keep the two newest (a batch may straddle an epoch boundary). list(dict) is
            # one C call under the GIL; a racing thread's pop of the same key is harmless.
            for old in list(self._order_cache)[:-2]:
                self._order_cache.pop(old, None)
        return order

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first example."""
        return self._next_batch * self.global_batch_size // self.num_records

    # -- building batches (runs on the prefetch threads) ---------------------

    def _read(self, index: int, epoch: int) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        """The transformed record at `index`, or at the next good index."""
        bad = []
        for _ in range(_MAX_CONSECUTIVE_BAD + 1):
            try:
                record = self.source[index]
                # The key of the index actually read: a replacement draws as that record.
                rng_key = (self.seed, epoch, index)
                return transforms_lib.apply(self.transforms, record, rng_key=rng_key), bad
            except Exception as e:  # any failure of one record is a bad record
                bad.append((index, f"{type(e).__name__}: {e}"))
                last_error = e
                index = (index + 1) % self.num_records
        raise RuntimeError(
            f"{len(bad)} consecutive bad records from index {bad[0][0]}; last error: "
            f"{bad[-1][1]}. The source or a transform is broken."
        ) from last_error

    def _build_batch(self, batch: int) -> _Batch:
        records, bad = [], []
        for position in self.positions(batch):
            record, record_bad = self._read(
                self.source_index(position), position // self.num_records
            )
            records.append(record)
            bad.extend(record_bad)
        return _Batch(batch_collate(records), bad, len(records) + len(bad))

    def _start(self, first_batch: int) -> Iterator[_Batch]:
        batches = grain.MapDataset.range(first_batch, first_batch + _HORIZON_BATCHES)
        batches = batches.map(self._build_batch)
        # A batch is one pool task, so only as many threads work as batches may be in
        # flight: the buffer is at least num_threads (grain warns otherwise).
        options = grain.ReadOptions(
            num_threads=self.num_threads,
            prefetch_buffer_size=max(self.prefetch, self.num_threads),
        )
        batches = batches.to_iter_dataset(options)
        if self.num_workers:
            _allow_grain_workers()
            batches = batches.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=self.prefetch
                ),
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
        return iter(batches)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get a copy of this loader to build batches with; the running
        # iterator (threads, queues, the workers themselves) stays here.
        return {**vars(self), "_iterator": None}

    # -- iteration (runs on the trainer's thread) ----------------------------

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start(self._next_batch)
        batch = next(self._iterator)
        self._count_bad(batch)
        self._next_batch += 1
        if self.num_workers:
            # Out of the workers' shared memory into this process's own: a batch placed on
            # the mesh ahead of the step may still be alive at exit, and its shared memory
            # segment would be reported as leaked then. The segment is freed right here.
            return {k: np.array(v) for k, v in batch.arrays.items()}
        return batch.arrays

    def _count_bad(self, batch: _Batch) -> None:
        # Counted here, when the batch is consumed, not when it is prefetched,
        # so the counters match the batches the trainer actually saw.
        for index, error in batch.bad:
            log.warning("bad record at source index %d skipped (%s)", index, error)
        self.skipped += len(batch.bad)
        self.seen += batch.seen
        allowed = self.max_bad_fraction * max(self.seen, self.bad_fraction_min_records)
        if self.skipped > allowed:
            last = (
                f" (last: source index {batch.bad[-1][0]}, {batch.bad[-1][1]})" if batch.bad else ""
            )
            raise RuntimeError(
                f"{self.skipped} bad records of {self.seen} read exceed max_bad_fraction="
                f"{self.max_bad_fraction}{last}"
            )

    # -- state ----------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream; process-count independent."""
        return {
            "next_batch": self._next_batch,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": self.num_records,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at `state["next_batch"]`; the order it was taken in must match."""
        mine = self.get_state()
        mismatched = {
            k: (state.get(k), mine[k])
            for k in mine
            if k != "next_batch" and state.get(k) != mine[k]
        }
        if mismatched:
            raise ValueError(
                "loader state was saved with a different example order; (saved, now): "
                f"{mismatched}. Changing these would repeat or skip examples."
            )
        self.close()
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        """Stops the prefetch threads; iterating again restarts them."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MAX_AUTO_WORKERS = 32  # what -1 starts at most: each worker imports the data stack


def _worker_count(num_workers: int) -> int:
    """num_workers, with -1 meaning one per CPU core this process may run on (at most 32)."""
    if num_workers == -1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(cores, MAX_AUTO_WORKERS)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 or -1 (one per CPU core), got {num_workers}")
    return int(num_workers)


def _leave_stop_signals_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """In an input worker: ignore SIGINT and SIGTERM, which the trainer turns into a save
    and then a `close()` of its workers (pretrain.checkpoint.StopSignal).

    Ctrl-C in a terminal signals the whole process group, and a scheduler may signal every
    process of a job (SLURM's scancel). A worker that died of it printed a KeyboardInterrupt
    traceback, and its shared-memory batches were reported as leaked at exit. grain's
    `close()` still stops a worker that does not stop in time, with SIGKILL.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _allow_grain_workers() -> None:
    # grain's worker processes read absl flags, which raise until parsed; this codebase
    # parses its own command line (argparse), so grain's flags keep their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(source, transforms: Sequence[transforms_lib.Transform], **options) -> Loader:
    """A `Loader` over `source` (len + getitem) with `transforms` per record.

    Yields dicts of numpy arrays with `global_batch_size // process_count` rows: this
    process's slice of each global batch. `options` are `Loader`'s keyword arguments.
    """
    return Loader(source, transforms, **options)
