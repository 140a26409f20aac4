"""An objective's options from its config section: defaults filled in, unknown keys refused."""

from __future__ import annotations

from typing import Any, Mapping


def read_options(kind: str, config: Mapping[str, Any] | None, defaults: dict) -> dict:
    """`defaults` updated from `config`. A key that is neither an option nor compose's
    `weight` / `kind` is a misspelling: the error names it and the valid ones."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults) - {'weight', 'kind'})
    if unknown:
        raise ValueError(
            f'unknown {kind} option(s) {unknown}; valid: {", ".join(sorted(defaults))} '
            '(and weight, kind)'
        )
    return {key: config.get(key, default) for key, default in defaults.items()}
