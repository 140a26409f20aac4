"""Hugging Face `CLIPModel` safetensors <-> ImageTextModel.

A directory as `save_pretrained` writes it (model.safetensors + config.json, optionally
preprocessor_config.json), or a bare .safetensors file. HF CLIP adds the position of the
class token to it; our ViT keeps no position for CLS, so import folds pos[0] into `cls`
(the same sum torch computes) and export writes pos[0] = 0.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pretrain.weights import hf_layers
from pretrain.weights.common import (
    Source,
    apply,
    conv_to_patch_kernel,
    linear_t,
    patch_kernel_to_conv,
)

LAYOUT = 'hf_clip'
# What makes our model a CLIP: LN before the blocks, no patch bias, CLS pooling, a causal
# text tower, bias-free projections. Activation / eps / heads come from config.json.
KNOBS = {
    'image.posemb': 'learn',
    'image.stem': 'patch',
    'image.ln_pre': True,
    'image.patch_bias': False,
    'image.pool': 'cls',
    'text.causal': True,
    'image_proj': 'linear',
    'proj_bias': False,
}
# Buffers some checkpoints carry; they hold no weights.
IGNORE = ('position_ids',)


def read_config(path: str) -> dict:
    """config.json (+ preprocessor_config.json) next to the weights, {} when absent."""
    here = path if os.path.isdir(path) else os.path.dirname(path)
    config = {}
    if os.path.isfile(os.path.join(here, 'config.json')):
        with open(os.path.join(here, 'config.json')) as f:
            config = json.load(f)
    if os.path.isfile(os.path.join(here, 'preprocessor_config.json')):
        with open(os.path.join(here, 'preprocessor_config.json')) as f:
            config['_preprocessor'] = json.load(f)
    return config


def pixel_knobs(hf_config: dict) -> dict:
    """pixel_mean/std in 0..255 from the processor's image_mean/std; None means [-1, 1]."""
    pre = hf_config.get('_preprocessor')
    if not pre or 'image_mean' not in pre:
        return {}
    mean = tuple(round(255 * m, 6) for m in pre['image_mean'])
    std = tuple(round(255 * s, 6) for s in pre['image_std'])
    if mean == (127.5,) * 3 and std == (127.5,) * 3:
        return {'image.pixel_mean': None, 'image.pixel_std': None}
    return {'image.pixel_mean': mean, 'image.pixel_std': std}


def knobs(hf_config: dict) -> dict:
    want = dict(KNOBS)
    # Checkpoints with eos_token_id 2 (all OpenAI ports) pool at the largest id; newer
    # ones at the first EOS, which is our last non-pad token when pad differs from EOS.
    text = hf_config.get('text_config', {})
    want['text.pool'] = 'argmax' if text.get('eos_token_id', 2) == 2 else 'eos'
    want.update(hf_layers.tower_knobs(hf_config.get('vision_config', {}), 'image', LAYOUT))
    want.update(hf_layers.tower_knobs(text, 'text', LAYOUT))
    want.update(pixel_knobs(hf_config))
    return want


def to_nnx(arrays: dict, model_config) -> dict:
    src = Source(arrays, layout=LAYOUT, ignore=IGNORE)
    img, txt = model_config.image, model_config.text
    out = {}
    v, t = 'vision_model', 'text_model'
    out['image.embed.kernel'] = apply(
        conv_to_patch_kernel, src.get(f'{v}.embeddings.patch_embedding.weight')
    )
    pos = src.get(f'{v}.embeddings.position_embedding.weight')
    cls = src.get(f'{v}.embeddings.class_embedding')
    if pos is not None and cls is not None:
        out['image.cls'] = (cls + pos[0]).reshape(1, 1, -1)
        out['image.pos'] = pos[1:]
    hf_layers.layer_norm(src, f'{v}.pre_layrnorm', 'image.ln_pre', out)
    hf_layers.encoder_to_nnx(src, f'{v}.encoder', 'image.encoder', img.depth, out)
    hf_layers.layer_norm(src, f'{v}.post_layernorm', 'image.ln', out)
    hf_layers.text_to_nnx(src, t, txt.depth, out)
    out['image_proj.kernel'] = apply(linear_t, src.get('visual_projection.weight'))
    out['text_proj.kernel'] = apply(linear_t, src.get('text_projection.weight'))
    out['logit_scale'] = apply(lambda a: a.reshape(()), src.get('logit_scale'))
    src.done()
    return out


def from_nnx(p: dict, model_config) -> tuple[dict, dict]:
    """(HF state dict, HF config.json dict) of our flat params `p`; knobs must be CLIP's."""
    img, txt = model_config.image, model_config.text
    out = {}
    v, t = 'vision_model', 'text_model'
    out[f'{v}.embeddings.patch_embedding.weight'] = patch_kernel_to_conv(
        p['image.embed.kernel'], img.patch
    )
    out[f'{v}.embeddings.class_embedding'] = p['image.cls'].reshape(-1)
    out[f'{v}.embeddings.position_embedding.weight'] = np.concatenate(
        [np.zeros_like(p['image.pos'][:1]), p['image.pos']]
    )
    for hn, on in (('pre_layrnorm', 'ln_pre'), ('post_layernorm', 'ln')):
        out[f'{v}.{hn}.weight'] = p[f'image.{on}.scale']
        out[f'{v}.{hn}.bias'] = p[f'image.{on}.bias']
    hf_layers.encoder_from_nnx(p, f'{v}.encoder', 'image.encoder', img.depth, out)
    hf_layers.text_from_nnx(p, t, txt.depth, out)
    out['visual_projection.weight'] = linear_t(p['image_proj.kernel'])
    out['text_projection.weight'] = linear_t(p['text_proj.kernel'])
    out['logit_scale'] = np.asarray(p['logit_scale'], np.float32).reshape(())
    config = {
        'architectures': ['CLIPModel'],
        'model_type': 'clip',
        'projection_dim': int(model_config.embed_dim),
        'vision_config': hf_layers.vision_config(img),
        'text_config': {
            **hf_layers.text_config(txt),
            # 2 makes HF pool at the largest token id, our 'argmax'.
            'eos_token_id': 2,
            'pad_token_id': int(txt.pad_id),
        },
    }
    return out, config


def architecture(arrays: dict, hf_config: dict) -> dict:
    """The model config (flat keys under config.model) of these weights: sizes + knobs."""
    del arrays
    return {
        **hf_layers.towers_architecture(hf_config),
        'embed_dim': hf_config['projection_dim'],
        **knobs(hf_config),
    }
