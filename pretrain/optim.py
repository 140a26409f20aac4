"""Optimizer: AdamW with warmup + cosine, masked weight decay, clipping, layer-wise lr decay."""

from __future__ import annotations

import re

import jax
import optax

# Parameters that are not matrices of a linear map get no weight decay: norms, biases,
# embeddings and positions, and the temperature/bias of the contrastive losses.
NO_DECAY_NAMES = ('pos', 'tok', 'cls', 'probe', 'logit_scale', 'logit_bias')


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def decay_mask(params):
    """True where weight decay applies: 2D+ kernels that are not embeddings."""

    def wants_decay(path, leaf):
        names = _names(path)
        return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def layer_index(names: tuple[str, ...], depth: int) -> int:
    """0 for the embedding layers, i+1 for block i, depth+1 for everything after the blocks."""
    if 'blocks' in names:
        return int(names[names.index('blocks') + 1]) + 1
    if any(n in ('embed', 'pos', 'cls', 'tok') for n in names):
        return 0
    return depth + 1


def layer_decay_scales(params, decay: float):
    """Per-parameter lr multipliers decay**(depth + 1 - layer), per tower (BEiT/MAE finetuning).

    Each tower (the first path component) counts its own blocks, so a 12-block image tower
    and a 6-block text tower both have their heads at scale 1.
    """
    depths = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = _names(path)
        if 'blocks' in names:
            depths[names[0]] = max(
                depths.get(names[0], 0), int(names[names.index('blocks') + 1]) + 1
            )

    def scale(path, _):
        names = _names(path)
        depth = depths.get(names[0], 0)
        return decay ** (depth + 1 - layer_index(names, depth))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def schedule(config, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, config.warmup_steps + 1),
        end_value=config.lr * config.end_lr_factor,
    )


def make_optimizer(config, params, total_steps: int) -> optax.GradientTransformation:
    """`config` is the `optim` ConfigDict; `params` fixes the decay mask and layer scales."""
    parts = [
        optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity(),
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask(params)),
    ]
    if config.layer_decay != 1.0:
        parts.append(scale_by_tree(layer_decay_scales(params, config.layer_decay)))
    parts.append(optax.scale_by_learning_rate(schedule(config, total_steps)))
    return optax.chain(*parts)
