"""This codebase's own export: the model's parameters as safetensors + its config as JSON.

    DST/model.safetensors   flat dotted NNX paths -> arrays ('image.encoder.blocks.0...')
    DST/config.json         {"format": "pretrain.export", "version": 1, "model": {...}, ...}

No optimizer state, no pickle: anything that reads safetensors can use it, and
`load_exported` rebuilds the ImageTextModel that finetuning and evaluation use.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from pretrain.weights.common import WeightsError, assign, model_params, read_arrays

FORMAT = 'pretrain.export'
VERSION = 1
WEIGHTS, CONFIG = 'model.safetensors', 'config.json'


def to_host(x) -> np.ndarray:
    """A parameter as a float32 numpy array. Arrays spanning other processes must be
    replicated (pretrain.export restores so): any local copy is then the whole array."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError('cannot read a parameter sharded over other processes')
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x), np.float32)


def flat_params(model) -> dict[str, np.ndarray]:
    """{dotted path: float32 numpy array} of every parameter, on the host."""
    return {k: to_host(v[...]) for k, v in model_params(model).items()}


def save_exported(out_dir: str, arrays: dict, model_config: ConfigDict, **meta) -> str:
    """Writes DST/model.safetensors and DST/config.json; `meta` (step, source) goes in the JSON."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(
        # np.array keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
        {k: np.array(v, order='C') for k, v in arrays.items()},
        os.path.join(out_dir, WEIGHTS),
        metadata={'format': FORMAT},
    )
    os.chmod(os.path.join(out_dir, WEIGHTS), 0o644)  # safetensors: 0600
    config = {
        'format': FORMAT,
        'version': VERSION,
        'model': json.loads(model_config.to_json_best_effort()),
        **meta,
    }
    with open(os.path.join(out_dir, CONFIG), 'w') as f:
        json.dump(config, f, indent=2)
    return out_dir


def read_exported_config(path: str) -> ConfigDict:
    """The model config of an export directory."""
    name = os.path.join(path, CONFIG)
    if not os.path.isfile(name):
        raise WeightsError(f"'{path}' is not an exported model: no {CONFIG} in it")
    with open(name) as f:
        config = json.load(f)
    if config.get('format') != FORMAT:
        raise WeightsError(f"'{name}' is not a {FORMAT} config (format: {config.get('format')})")
    return ConfigDict(config['model'])


def build_model(model_config: ConfigDict, *, seed: int = 0):
    """An ImageTextModel of `model_config` with fresh parameters, unsharded, on the host."""
    from pretrain.models.towers import ImageTextModel

    with nnx.use_eager_sharding(False):
        return ImageTextModel(model_config, rngs=nnx.Rngs(seed))


def load_exported(path: str):
    """(model_config, ImageTextModel) of an export directory written by pretrain.export."""
    model_config = read_exported_config(path)
    # Built abstract (shapes only, no random init to compute) and filled from the file,
    # which must then hold every parameter. Traced under an empty mesh: the caller's mesh
    # (evaluate's) does not know the logical axis names the parameters carry.
    import jax

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model = nnx.eval_shape(lambda: build_model(model_config))
    arrays = read_arrays(os.path.join(path, WEIGHTS))
    assign(model, arrays, layout=f"export '{path}'", optional=())
    return model_config, model
