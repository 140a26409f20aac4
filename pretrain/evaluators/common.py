"""What every evaluator shares: a jitted predict function run over host arrays, eval records,
and the text prompts dataclass.

Placement (the simplest correct option under any mesh): every process holds the whole eval
set on the host (it is rendered or read once, deterministically). Each batch is cut from it
with `jax.make_array_from_callback`, so every device gets exactly its rows of a batch sharded
over the mesh's batch axes (data, fsdp), whatever the process layout; the outputs are
constrained to be replicated, so every process reads the full result back. The eval batch
size is rounded up to a multiple of the batch-shard count and the last batch is padded (the
padded rows are dropped on the host), so one shape compiles once per evaluator, not per run.
With no mesh active (a bare model in a notebook) batches go to the default device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline.sources import shapes
from pretrain import sharding


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Class names x templates ('a photo of a {}.'); `texts()` is class-major.

    "a" before a vowel becomes "an" after filling in ("an orange ring"), as captions write it.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def texts(self) -> list[str]:
        return [
            re.sub(r'\b([Aa]) (?=[aeiou])', r'\1n ', t.format(c))
            for c in self.classnames
            for t in self.templates
        ]


class Predictor:
    """`fn(model, *consts, *rows) -> pytree of arrays`, jitted and run over host arrays in batches.

    `consts` go to every device whole (e.g. class text embeddings); `rows` are cut into
    batches along their first axis. See the module docstring for placement.
    """

    def __init__(self, fn: Callable, *, batch_size: int):
        self.fn, self.batch_size = fn, int(batch_size)
        self._jitted: dict = {}  # mesh -> jitted function; the graphdef is a static argument

    def _compiled(self, mesh):
        if mesh not in self._jitted:

            def apply(graphdef, state, consts, rows):
                return self.fn(nnx.merge(graphdef, state), *consts, *rows)

            kwargs = {} if mesh.empty else {'out_shardings': sharding.replicated(mesh)}
            self._jitted[mesh] = jax.jit(apply, static_argnums=0, **kwargs)
        return self._jitted[mesh]

    def batches(self, model, rows: Sequence[np.ndarray], consts: Sequence = ()) -> Iterator:
        """Yields the host (numpy) outputs batch by batch, padding rows removed."""
        mesh = jax.sharding.get_mesh()
        jitted = self._compiled(mesh)
        shards = 1 if mesh.empty else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
        size = -(-self.batch_size // shards) * shards
        graphdef, state = nnx.split(model)
        consts = tuple(_place(np.asarray(c), mesh, P()) for c in consts)
        total = len(rows[0])
        pending = None
        for start in range(0, total, size):
            valid = min(size, total - start)
            batch = tuple(
                _place(
                    _pad(np.asarray(r[start : start + size]), size), mesh, P(sharding.BATCH_AXES)
                )
                for r in rows
            )
            out = jitted(graphdef, state, consts, batch), valid
            # Fetch the previous batch only after dispatching this one: host and device overlap.
            if pending is not None:
                yield _fetch(*pending)
            pending = out
        if pending is not None:
            yield _fetch(*pending)

    def __call__(self, model, rows: Sequence[np.ndarray], consts: Sequence = ()):
        """All outputs, concatenated over batches."""
        outs = list(self.batches(model, rows, consts))
        if not outs:
            raise ValueError('Predictor called with no rows')
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _place(x: np.ndarray, mesh, spec: P):
    if mesh.empty:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def _fetch(out, valid: int):
    return jax.tree.map(lambda a: np.asarray(a)[:valid], jax.device_get(out))


def trim_padding(tokens_nl: np.ndarray, *, pad_id: int = 0, multiple: int = 16) -> np.ndarray:
    """Drops the padding columns no text reaches (kept to a multiple of 16 columns).

    Exact for the text tower: its pooling ignores padding and positions are sliced to the
    length given, and prompts of ~30 bytes in a 96-token context run ~3x faster.
    """
    used = int((tokens_nl != pad_id).sum(-1).max(initial=1))
    return tokens_nl[:, : min(tokens_nl.shape[1], -(-used // multiple) * multiple)]


def shapes_records(section, *, start: int, num: int, fields: Sequence[str]) -> dict:
    """Records [start, start + num) of the shapes eval split as stacked arrays (str fields:
    lists). The eval split is its own seed stream, so none of these scenes was trained on.
    """
    if section.source != 'shapes':
        raise ValueError(f"unknown eval source '{section.source}'; valid here: shapes")
    if num < 1:
        raise ValueError(f'need at least one eval example, got {num}')
    source = shapes.ShapesSource(
        split='eval',
        seed=section.seed,
        image_size=section.image_size,
        max_objects=section.max_objects,
        num_records=start + num,
    )
    records = [source[i] for i in range(start, start + num)]
    stackable = lambda f: isinstance(records[0][f], (np.ndarray, np.generic))
    return {
        f: np.stack([r[f] for r in records]) if stackable(f) else [r[f] for r in records]
        for f in fields
    }
