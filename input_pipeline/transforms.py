"""Record transforms: small typed callables, `record -> record`.

A config lists them as objects (MaxText's grain pipeline, not big_vision's pp
strings), so a mistake fails at construction with a Python trace to the config.
Each works eagerly on one record and inside the loader unchanged.

Images stay uint8 in the batch: a uint8 batch is 4x smaller to build, copy and
transfer to the devices than float32, and the model normalises on device
(`(x / 255 - mean) / std` fuses into the patch embedding). So there is no
`Normalize` transform here. There is no random flip either: shapes captions
name positions ("top left", "to the left of"), which a flip would falsify.

A transform that raises (e.g. `Tokenize` on an empty caption) marks the record
as bad; the loader counts, logs and replaces it (see loader.py).

Randomness. A transform that draws random numbers (sub-caption sampling, caption
choice, crops) subclasses `RandomTransform` and is called as `t(record, rng)`,
like grain's `RandomMapTransform`. `apply` gives it a fresh numpy Generator
seeded from `rng_key` = (loader seed, epoch, source index), which the loader
passes, and the transform's own stream name. So a record's random draws depend
on nothing else: not the process count, the prefetch thread, the batch
position, nor which other random transforms the pipeline holds (sub-caption
samples stay the same whether or not the caption is also chosen at random).
Resume and elastic restore reproduce them exactly, and every epoch redraws.
We pass the key rather than stash `_epoch` in the record so that sources and
deterministic transforms never see loader internals.
"""

from __future__ import annotations

import abc
import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

Record = dict[str, Any]


class Transform(Protocol):
    def __call__(self, record: Record) -> Record: ...


class TextTokenizer(Protocol):
    context_length: int
    pad_id: int
    eos_id: int

    def tokenize(self, text: str | bytes) -> np.ndarray: ...


class RandomTransform(abc.ABC):
    """A transform that draws random numbers: `t(record, rng) -> record`.

    Use only `rng` (never global numpy / python randomness), so the draws are a
    function of `apply`'s `rng_key`; see the module doc.
    """

    @abc.abstractmethod
    def __call__(self, record: Record, rng: np.random.Generator) -> Record: ...

    @property
    def rng_stream(self) -> str:
        """Names this transform's random stream; the class and output key by default."""
        return f"{type(self).__name__}/{getattr(self, 'out_key', '')}"


# Keeps transform streams apart from any other use of the same (seed, epoch, index).
_RNG_SALT = 0x7E3A_C0DE


def record_rng(rng_key: Sequence[int], stream: str) -> np.random.Generator:
    """The Generator of one random transform on one record (key: seed, epoch, index)."""
    entropy = [_RNG_SALT, zlib.crc32(stream.encode("utf-8"))]
    entropy += [int(k) % 2**63 for k in rng_key]  # SeedSequence wants non-negative ints
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """record[out_key] = (L,) int32 token ids of the text in record[field]."""

    field: str
    tokenizer: TextTokenizer
    out_key: str = "text"

    def __call__(self, record: Record) -> Record:
        try:
            text = record[self.field]
        except KeyError:
            raise KeyError(
                f"Tokenize: no field {self.field!r}; record has {sorted(record)}"
            ) from None
        try:
            ids = self.tokenizer.tokenize(text)
        except ValueError as e:
            raise ValueError(f"Tokenize({self.field!r}): {e}") from e
        return {**record, self.out_key: ids}


@dataclasses.dataclass(frozen=True)
class SelectFields:
    """Keep only `keys`: the batch carries exactly what the objectives need."""

    keys: Sequence[str]

    def __call__(self, record: Record) -> Record:
        missing = [k for k in self.keys if k not in record]
        if missing:
            raise KeyError(f"SelectFields: missing {missing}; record has {sorted(record)}")
        return {k: record[k] for k in self.keys}


def apply(
    transforms: Sequence[Transform | RandomTransform],
    record: Record,
    *,
    rng_key: Sequence[int] | None = None,
) -> Record:
    """Applies `transforms` in order.

    `rng_key` (the loader passes (seed, epoch, source index)) seeds every
    `RandomTransform`; it is required when there is one, so randomness is never
    silently fixed.
    """
    for transform in transforms:
        if isinstance(transform, RandomTransform):
            if rng_key is None:
                raise ValueError(
                    f"{transform!r} draws random numbers: pass "
                    "apply(..., rng_key=(seed, epoch, index))"
                )
            record = transform(record, record_rng(rng_key, transform.rng_stream))
        else:
            record = transform(record)
    return record
