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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

Record = dict[str, Any]


class Transform(Protocol):
    def __call__(self, record: Record) -> Record: ...


class TextTokenizer(Protocol):
    def tokenize(self, text: str | bytes) -> np.ndarray: ...


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
            raise KeyError(f"Tokenize: no field {self.field!r}; record has {sorted(record)}") from None
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


def apply(transforms: Sequence[Transform], record: Record) -> Record:
    """Applies `transforms` in order."""
    for transform in transforms:
        record = transform(record)
    return record
