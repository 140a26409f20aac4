"""Weighted sum of objectives, built from the config.

    config.objectives = ConfigDict({
        'clip': {'weight': 1.0},                                         # kind = name
        'sig_long': {'kind': 'siglip', 'weight': 0.5, 'chunk_size': 1024, 'text_field': 'long_text'},
    })
    objective = build_objective(config.objectives)
    loss, metrics = objective(model, batch, rng=rng, train=True)
    # metrics: loss, loss_clip, loss_sig_long, clip/i2t_acc, sig_long/scale, ...

A new objective is one more row in `OBJECTIVES`: an explicit table, not a
registry filled by import side effects, so what exists is visible here.
"""

from typing import Any, Mapping

import jax

from pretrain.objectives.clip import Clip
from pretrain.objectives.dreamlip import DreamLip
from pretrain.objectives.siglip import Siglip

OBJECTIVES = {
    'clip': Clip,
    'dreamlip': DreamLip,
    'siglip': Siglip,
}


class Composite:
    """total = sum_k weight_k * loss_k over the objectives with non-zero weight."""

    def __init__(self, terms: list[tuple[str, int, float, Any]]):
        # terms: (name, rng index, weight, objective). The rng index is the
        # position in the config, so zeroing one weight leaves the others' rngs alone.
        self.terms = terms
        self.fields = tuple(dict.fromkeys(f for *_, obj in terms for f in obj.fields))

    def __call__(self, model, batch, *, rng=None, train: bool) -> tuple[jax.Array, dict]:
        total, metrics = 0.0, {}
        for name, index, weight, objective in self.terms:
            sub_rng = None if rng is None else jax.random.fold_in(rng, index)
            loss, sub_metrics = objective(model, batch, rng=sub_rng, train=train)
            total = total + weight * loss
            metrics[f'loss_{name}'] = loss
            metrics.update({f'{name}/{k}': v for k, v in sub_metrics.items()})
        metrics['loss'] = total
        return total, metrics


def build_objective(objectives_config: Mapping[str, Any]) -> Composite:
    """objectives_config: name -> {weight, kind (default: name), objective's own fields}.

    Iteration order (sorted names for a ConfigDict) fixes each objective's rng index.
    """
    terms = []
    for index, (name, config) in enumerate(objectives_config.items()):
        kind = config.get('kind', name)
        if kind not in OBJECTIVES:
            raise ValueError(
                f'Objective {name!r} has unknown kind {kind!r}; valid kinds: {sorted(OBJECTIVES)}.'
            )
        if config.get('weight') is None:
            raise ValueError(f'Objective {name!r} needs a `weight`.')
        try:
            weight = float(config['weight'])
        except (TypeError, ValueError):
            raise ValueError(f"Objective {name!r}: weight {config['weight']!r} is not a number.")
        if weight == 0.0:
            continue  # Off: not built, not computed, its fields not loaded.
        terms.append((name, index, weight, OBJECTIVES[kind](config)))
    if not terms:
        raise ValueError(
            f'No objective with a non-zero weight in {list(objectives_config.keys())}.'
        )
    return Composite(terms)
