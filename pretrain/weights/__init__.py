"""Weights in and out of ImageTextModel: our export, and public layouts.

    model_config, model = load_exported(DST)          # python -m pretrain.export wrote DST
    import_weights(model, model_config, 'hf_clip', '/path/to/clip-vit-base-patch16')
    overrides('hf_clip', path)   # the --config.model.* overrides of that architecture
    arrays, hf_config = export_hf(model, model_config, 'hf_siglip')   # back to HF names

Formats (config.init.format, with config.init.path):
    export      this codebase's export directory (pretrain/export.py)
    hf_clip     Hugging Face CLIPModel: directory with model.safetensors (+ config.json)
    hf_siglip   Hugging Face SiglipModel, likewise
    open_clip   open_clip ViT CLIP: open_clip_model.safetensors (+ open_clip_config.json)
    big_vision  big_vision SigLIP two-towers .npz

Each import first checks that the model config has the layout's architecture knobs (and the
activation / eps / heads / pixel statistics its config files state), then that every key
is used and every parameter is filled with the right shape; any mismatch is one error that
lists all of them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pretrain.weights import big_vision, exported, hf_clip, hf_siglip, open_clip
from pretrain.weights.common import (
    WeightsError,
    assign,
    check_fits,
    check_knobs,
    find_file,
    read_arrays,
)
from pretrain.weights.exported import flat_params, load_exported, save_exported

LAYOUTS = {
    'hf_clip': hf_clip,
    'hf_siglip': hf_siglip,
    'open_clip': open_clip,
    'big_vision': big_vision,
}
FORMATS = ('export', *LAYOUTS)
FUNCTION_KNOBS = (
    *(f'image.{k}' for k in ('heads', 'ln_pre', 'activation', 'ln_eps', 'pixel_mean', 'pixel_std')),
    'image.posemb',
    *(f'text.{k}' for k in ('heads', 'causal', 'pool', 'pad_id', 'mask_padding', 'activation')),
    'text.ln_eps',
)
# Where a layout's weights lie inside a directory.
FILES = {
    'hf_clip': ('model.safetensors',),
    'hf_siglip': ('model.safetensors',),
    'open_clip': ('open_clip_model.safetensors', 'model.safetensors'),
    'big_vision': (),
}

__all__ = [
    'FORMATS',
    'architecture',
    'overrides',
    'WeightsError',
    'convert',
    'export_hf',
    'import_weights',
    'load_exported',
    'maybe_load_init',
    'save_exported',
]


def convert(fmt: str, path: str, model_config) -> dict[str, np.ndarray]:
    """{our dotted param path: array} from weights of format `fmt` at `path`, checked against
    `model_config`'s architecture knobs (not yet against parameter shapes: see check_fits)."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown weights format '{fmt}'; valid: {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise WeightsError(f"{fmt} weights '{path}' do not exist")
    if fmt == 'export':
        # Shapes are checked later; these are the knobs that change the function without
        # changing a shape (dtype and remat may differ: they change no parameter).
        theirs = exported.read_exported_config(path)
        want = {}
        for key in FUNCTION_KNOBS:
            tower, leaf = key.split('.')
            if leaf in theirs[tower]:
                value = theirs[tower][leaf]
                want[key] = tuple(value) if isinstance(value, list) else value
        check_knobs(model_config, want, layout=f"export '{path}'")
        return read_arrays(os.path.join(path, exported.WEIGHTS))
    layout = LAYOUTS[fmt]
    arrays = read_arrays(find_file(path, FILES[fmt]))
    if fmt == 'big_vision':
        check_knobs(model_config, {**layout.KNOBS, **big_vision.heads_in(arrays)}, layout=fmt)
    else:
        check_knobs(model_config, layout.knobs(layout.read_config(path)), layout=fmt)
    return layout.to_nnx(arrays, model_config)


def architecture(fmt: str, path: str) -> dict:
    """{flat config.model key: value} of the model that weights at `path` need: sizes (from
    the files' config or array shapes) and the layout's knobs."""
    if fmt not in LAYOUTS:
        raise WeightsError(f"unknown weights layout '{fmt}'; valid: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[fmt]
    arrays = read_arrays(find_file(path, FILES[fmt]))
    try:
        return layout.architecture(arrays, layout.read_config(path))
    except KeyError as e:
        raise WeightsError(f'{fmt} weights at {path} lack {e}; cannot tell the architecture')


def overrides(fmt: str, path: str) -> list[str]:
    """The `--config.model.*` overrides that build the model of these weights."""
    out = []
    for key, value in architecture(fmt, path).items():
        if isinstance(value, float) and value.is_integer() and not key.endswith('eps'):
            value = value if 'ratio' in key else int(value)
        text = 'None' if value is None else str(tuple(value) if isinstance(value, list) else value)
        out.append(f'--config.model.{key}={text.replace(" ", "")}')
    return out


def import_weights(model, model_config, fmt: str, path: str):
    """Loads weights of format `fmt` into `model` in place; raises listing any misfit."""
    return assign(model, convert(fmt, path, model_config), layout=fmt)


def export_hf(model, model_config, fmt: str = 'hf_clip') -> tuple[dict, dict]:
    """(state dict with HF names, HF config.json dict) of an ImageTextModel of that layout."""
    if fmt not in ('hf_clip', 'hf_siglip'):
        raise WeightsError(f"cannot export to '{fmt}'; valid: hf_clip, hf_siglip")
    layout = LAYOUTS[fmt]
    want = dict(layout.KNOBS)
    if fmt == 'hf_clip':
        want['text.pool'] = 'argmax'  # HF CLIP's legacy pooling; the EOS id is unknown here
    del want['image.posemb']  # a fixed sincos2d table is written as the learned one
    check_knobs(model_config, want, layout=fmt)
    params = flat_params(model)
    if model.image.pos is None:
        params['image.pos'] = np.asarray(model.image.positions(model.image.grid))
    return layout.from_nnx(params, model_config)


def save_hf(out_dir: str, model, model_config, fmt: str = 'hf_clip') -> str:
    """Writes an HF-loadable directory: model.safetensors, config.json, preprocessor_config."""
    from safetensors.numpy import save_file

    arrays, config = export_hf(model, model_config, fmt)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        # np.array keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
        {k: np.array(v, np.float32, order='C') for k, v in arrays.items()},
        os.path.join(out_dir, 'model.safetensors'),
        metadata={'format': 'pt'},
    )
    os.chmod(os.path.join(out_dir, 'model.safetensors'), 0o644)  # safetensors: 0600
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    img = model_config.image
    mean = img.get('pixel_mean', None) or (127.5,) * 3
    std = img.get('pixel_std', None) or (127.5,) * 3
    with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as f:
        json.dump(
            {
                'image_mean': [m / 255 for m in mean],
                'image_std': [s / 255 for s in std],
                'size': {'height': img.image_size, 'width': img.image_size},
            },
            f,
            indent=2,
        )
    return out_dir


def maybe_load_init(config, state, shardings):
    """The train state with `config.init`'s weights in its model part (state[0]), if any.

    Called on a freshly initialised state (not on resume): parameters the weights hold are
    replaced, each placed with its sharding; optimizer state stays at its init.
    """
    import jax
    from flax import nnx

    init = config.get('init', None)
    if init is None or not init.get('format', ''):
        return state
    flat = convert(init.format, init.path, config.model)
    model_state, model_shardings = state[0], shardings[0]
    dotted = lambda path: '.'.join(str(p) for p in path)
    variables = {dotted(p): v for p, v in nnx.to_flat_state(model_state)}
    check_fits({k: tuple(v.shape) for k, v in variables.items()}, flat, layout=init.format)
    placed = {}
    for path, sh in nnx.to_flat_state(model_shardings):
        key = dotted(path)
        if key not in flat:
            continue
        value = np.asarray(flat[key], variables[key].dtype)
        sharding = sh.get_value()
        node = placed
        for p in path[:-1]:
            node = node.setdefault(p, {})
        # Every process holds the whole file and serves the shards its devices own.
        node[path[-1]] = jax.make_array_from_callback(
            value.shape, sharding, lambda i, v=value: v[i]
        )
    nnx.replace_by_pure_dict(model_state, placed)
    return state
