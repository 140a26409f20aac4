"""What every weight layout shares: reading files, key bookkeeping, loading into a model.

A layout module turns a flat {name: array} dict of its own keys into a flat dict keyed by
the model's dotted NNX parameter paths ('image.encoder.blocks.0.attn.qkv.kernel', ...).
It reads keys through a `Source`, which remembers which keys were asked for and missing,
so that one error lists every missing and every unused key. `assign` then checks the
converted dict against the model (missing parameters, unknown names, shapes) and only
writes when everything fits: nothing loads half or silently wrong.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

# Parameters no public layout has. They keep their initial value when a layout lacks them:
# DreamLIP's grouping temperature is this codebase's own, CLIP has no SigLIP bias.
OPTIONAL = ('grouping_logit_scale', 'logit_bias')


class WeightsError(ValueError):
    """Weights that do not fit the model or layout; the message lists the offending keys."""


def _listing(keys, limit=20) -> str:
    keys = sorted(keys)
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """{name: float array} from a .safetensors or .npz file (never pickle)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file '{path}' does not exist")
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith('.npz'):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    raise WeightsError(
        f"weights file '{path}' is neither .safetensors nor .npz (pickle is refused)"
    )


def find_file(path: str, names: tuple[str, ...]) -> str:
    """`path` itself if it is a file, else the first of `names` inside the directory."""
    if os.path.isdir(path):
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise WeightsError(f"no {' or '.join(names)} in directory '{path}'")
    return path


class Source:
    """A layout's arrays, read by name; `done()` raises on any missing or unused key."""

    def __init__(self, arrays: dict[str, np.ndarray], *, layout: str, ignore=()):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.layout = layout
        self.used: set[str] = set(k for k in self.arrays if any(k.endswith(i) for i in ignore))
        self.missing: list[str] = []

    def __contains__(self, key):
        return key in self.arrays

    def get(self, key: str) -> np.ndarray | None:
        if key not in self.arrays:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.arrays[key].astype(np.float32)

    def done(self):
        unused = set(self.arrays) - self.used
        problems = []
        if self.missing:
            problems.append(f'missing keys: {_listing(self.missing)}')
        if unused:
            problems.append(f'unknown keys: {_listing(unused)}')
        if problems:
            raise WeightsError(
                f'{self.layout} weights do not fit this model config: ' + '; '.join(problems)
            )


def apply(fn, x):
    """fn(x), or None when x is None (a missing key already recorded by Source)."""
    return None if x is None else fn(x)


# Conversions between torch's and our parameter layouts.
def linear_t(w_oi):
    """torch Linear weight (out, in) -> our Dense kernel (in, out)."""
    return np.ascontiguousarray(w_oi.T)


def conv_to_patch_kernel(w_ocij):
    """torch patch conv (width, 3, p, p) -> (p*p*3, width) in our patchify order (i, j, c)."""
    o = w_ocij.shape[0]
    return np.ascontiguousarray(w_ocij.transpose(2, 3, 1, 0).reshape(-1, o))


def patch_kernel_to_conv(kernel, patch: int):
    d = kernel.shape[1]
    return np.ascontiguousarray(kernel.reshape(patch, patch, 3, d).transpose(3, 2, 0, 1))


def concat_or_none(parts, axis):
    return None if any(p is None for p in parts) else np.concatenate(parts, axis=axis)


def model_params(model) -> dict[str, nnx.Param]:
    """{dotted path: Param} of a model (image_proj absent when it is the identity)."""
    return {
        '.'.join(str(p) for p in path): v
        for path, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param)
    }


def check_fits(
    shapes: dict[str, tuple], flat: dict[str, np.ndarray], *, layout: str, optional=OPTIONAL
):
    """Raises listing every parameter (path -> shape) missing from `flat` (but `optional`),
    every unknown name and every shape mismatch."""
    missing = [k for k in shapes if k not in flat and k not in optional]
    unknown = [k for k in flat if k not in shapes]
    bad = [
        f'{k} {tuple(flat[k].shape)} vs model {tuple(shapes[k])}'
        for k in flat
        if k in shapes and tuple(flat[k].shape) != tuple(shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f'model parameters missing from the weights: {_listing(missing)}')
    if unknown:
        problems.append(f'weights the model does not have: {_listing(unknown)}')
    if bad:
        problems.append(f'shape mismatches: {_listing(bad, 10)}')
    if problems:
        raise WeightsError(f'{layout} weights do not fit the model: ' + '; '.join(problems))


def assign(model, flat: dict[str, np.ndarray], *, layout: str, optional=OPTIONAL):
    """Writes `flat` into `model`'s parameters in place, after checking that all of it fits."""
    params = model_params(model)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    check_fits(shapes, flat, layout=layout, optional=optional)
    for k, v in flat.items():
        # set_value, not `p[...] = v`: that is an eager scatter, compiled once per shape.
        params[k].set_value(jnp.asarray(v, dtype=params[k].dtype))
    return model


def check_knobs(model_config, want: dict, *, layout: str):
    """Raises when the model config differs from what the layout needs, with the overrides."""
    wrong = []
    for key, value in want.items():
        node = model_config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        have = node.get(leaf, None)
        if isinstance(value, float) and isinstance(have, (int, float)):
            same = abs(have - value) <= 1e-12 * max(1.0, abs(value))
        elif isinstance(value, (tuple, list)) and have is not None:
            same = tuple(have) == tuple(value)
        else:
            same = have == value
        if not same:
            wrong.append(f'--config.model.{key}={value!r}'.replace("'", '') + f' (is {have!r})')
    if wrong:
        raise WeightsError(
            f'the model config does not match the {layout} architecture; set: ' + ' '.join(wrong)
        )
