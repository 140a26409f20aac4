"""A weighted mixture of random-access sources, itself random access.

    source = MixtureSource({'laion': laion, 'coco': coco}, weights={'laion': 0.9, 'coco': 0.1})

Index i of the mixture reads a fixed (component, index) pair: grain's
`MapDataset.mix` of the components, each repeated endlessly, so the map is a pure
function of i and the loader's shuffle, resume and elastic restore stay exact.
Every window of the mixture's indices holds the components in proportion to their
weights (grain interleaves them), and the loader shuffles the indices on top.

Length. By default the smallest length in which every component is read whole at
its weight: max over components of len / weight. So with weights 0.5 / 0.5 and
100M + 1M records, an epoch is 200M records and the small component is read 100
times (upsampled), none skipped. A shorter `num_records` reads the same leading
part of a component every epoch; prefer the default.

Records are the components' own, plus `source` (the component's name); each keeps
its own `id`, so ids of different components may coincide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grain


class MixtureSource:
    def __init__(self, components: Mapping, weights: Mapping[str, float], *, num_records: int = 0):
        if not components:
            raise ValueError('mixture: no components')
        if set(weights) != set(components):
            raise ValueError(
                f'mixture: weights name {sorted(weights)}, components are {sorted(components)}'
            )
        bad = {n: w for n, w in weights.items() if not (w >= 0 and math.isfinite(w))}
        if bad or sum(weights.values()) <= 0:
            raise ValueError(
                f'mixture: weights must be >= 0 with a positive sum, got {dict(weights)}'
            )
        # Zero-weight components are dropped: a config can switch one off by its weight.
        self.names = [n for n in components if weights[n] > 0]
        self.components = [components[n] for n in self.names]
        total = sum(weights[n] for n in self.names)
        self.weights = [weights[n] / total for n in self.names]
        if not num_records:
            num_records = max(math.ceil(len(c) / w) for c, w in zip(self.components, self.weights))
        self.num_records = int(num_records)
        parts = [
            grain.MapDataset.source(c).map(_NameSource(n)).repeat()
            for n, c in zip(self.names, self.components)
        ]
        self._mixed = grain.MapDataset.mix(parts, self.weights)

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        parts = ', '.join(f'{n}: {w:.3g}' for n, w in zip(self.names, self.weights))
        return f'MixtureSource({{{parts}}}, records={self.num_records})'

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f'record {index} out of range [0, {self.num_records})')
        return self._mixed[index]


class _NameSource:
    """record -> record with `source` = the component's name."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, record: dict) -> dict:
        return {**record, 'source': self.name}
