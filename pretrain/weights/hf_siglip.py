"""Hugging Face `SiglipModel` safetensors <-> ImageTextModel.

SigLIP differs from CLIP in ways the model config must say (KNOBS): no CLS (MAP pooling),
patch conv with bias, no LN before the blocks, a bidirectional text tower that attends to
its padding and pools the last position, a text head with bias and no image projection.
HF's MAP head is a torch nn.MultiheadAttention: in_proj (q | k | v) and out_proj.
"""

from __future__ import annotations

import numpy as np

from pretrain.weights import hf_clip, hf_layers
from pretrain.weights.common import (
    Source,
    apply,
    conv_to_patch_kernel,
    linear_t,
    patch_kernel_to_conv,
)

LAYOUT = 'hf_siglip'
KNOBS = {
    'image.posemb': 'learn',
    'image.stem': 'patch',
    'image.ln_pre': False,
    'image.patch_bias': True,
    'image.pool': 'map',
    'text.causal': False,
    'text.mask_padding': False,
    'text.pool': 'last',
    'image_proj': 'none',
    'proj_bias': True,
}
IGNORE = ('position_ids',)
read_config = hf_clip.read_config


def knobs(hf_config: dict) -> dict:
    want = dict(KNOBS)
    want.update(hf_layers.tower_knobs(hf_config.get('vision_config', {}), 'image', LAYOUT))
    want.update(hf_layers.tower_knobs(hf_config.get('text_config', {}), 'text', LAYOUT))
    want.update(hf_clip.pixel_knobs(hf_config))
    return want


def to_nnx(arrays: dict, model_config) -> dict:
    src = Source(arrays, layout=LAYOUT, ignore=IGNORE)
    img, txt = model_config.image, model_config.text
    out = {}
    v, t, h = 'vision_model', 'text_model', 'vision_model.head'
    out['image.embed.kernel'] = apply(
        conv_to_patch_kernel, src.get(f'{v}.embeddings.patch_embedding.weight')
    )
    out['image.embed.bias'] = src.get(f'{v}.embeddings.patch_embedding.bias')
    out['image.pos'] = src.get(f'{v}.embeddings.position_embedding.weight')
    hf_layers.encoder_to_nnx(src, f'{v}.encoder', 'image.encoder', img.depth, out)
    hf_layers.layer_norm(src, f'{v}.post_layernorm', 'image.ln', out)
    out['image.map.probe'] = src.get(f'{h}.probe')
    w_in, b_in = src.get(f'{h}.attention.in_proj_weight'), src.get(f'{h}.attention.in_proj_bias')
    if w_in is not None and b_in is not None:
        d = w_in.shape[1]
        out['image.map.q.kernel'] = linear_t(w_in[:d])
        out['image.map.q.bias'] = b_in[:d]
        out['image.map.kv.kernel'] = linear_t(w_in[d:])
        out['image.map.kv.bias'] = b_in[d:]
    hf_layers.linear(src, f'{h}.attention.out_proj', 'image.map.out', out)
    hf_layers.layer_norm(src, f'{h}.layernorm', 'image.map.ln', out)
    hf_layers.linear(src, f'{h}.mlp.fc1', 'image.map.mlp.fc1', out)
    hf_layers.linear(src, f'{h}.mlp.fc2', 'image.map.mlp.fc2', out)
    hf_layers.text_to_nnx(src, t, txt.depth, out)
    hf_layers.linear(src, f'{t}.head', 'text_proj', out)
    out['logit_scale'] = apply(lambda a: a.reshape(()), src.get('logit_scale'))
    out['logit_bias'] = apply(lambda a: a.reshape(()), src.get('logit_bias'))
    src.done()
    return out


def from_nnx(p: dict, model_config) -> tuple[dict, dict]:
    """(HF state dict, HF config.json dict) of our flat params `p`; knobs must be SigLIP's."""
    img, txt = model_config.image, model_config.text
    out = {}
    v, t, h = 'vision_model', 'text_model', 'vision_model.head'
    out[f'{v}.embeddings.patch_embedding.weight'] = patch_kernel_to_conv(
        p['image.embed.kernel'], img.patch
    )
    out[f'{v}.embeddings.patch_embedding.bias'] = p['image.embed.bias']
    out[f'{v}.embeddings.position_embedding.weight'] = p['image.pos']
    hf_layers.encoder_from_nnx(p, f'{v}.encoder', 'image.encoder', img.depth, out)
    out[f'{v}.post_layernorm.weight'] = p['image.ln.scale']
    out[f'{v}.post_layernorm.bias'] = p['image.ln.bias']
    out[f'{h}.probe'] = p['image.map.probe']
    out[f'{h}.attention.in_proj_weight'] = linear_t(
        np.concatenate([p['image.map.q.kernel'], p['image.map.kv.kernel']], axis=1)
    )
    out[f'{h}.attention.in_proj_bias'] = np.concatenate(
        [p['image.map.q.bias'], p['image.map.kv.bias']]
    )
    for hn, on in (('attention.out_proj', 'out'), ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')):
        out[f'{h}.{hn}.weight'] = linear_t(p[f'image.map.{on}.kernel'])
        out[f'{h}.{hn}.bias'] = p[f'image.map.{on}.bias']
    out[f'{h}.layernorm.weight'] = p['image.map.ln.scale']
    out[f'{h}.layernorm.bias'] = p['image.map.ln.bias']
    hf_layers.text_from_nnx(p, t, txt.depth, out)
    out[f'{t}.head.weight'] = linear_t(p['text_proj.kernel'])
    out[f'{t}.head.bias'] = p['text_proj.bias']
    out['logit_scale'] = np.asarray(p['logit_scale'], np.float32).reshape(1)
    out['logit_bias'] = np.asarray(p['logit_bias'], np.float32).reshape(1)
    config = {
        'architectures': ['SiglipModel'],
        'model_type': 'siglip',
        'vision_config': hf_layers.vision_config(img),
        'text_config': {
            **hf_layers.text_config(txt),
            'projection_size': int(model_config.embed_dim),
        },
    }
    return out, config


def architecture(arrays: dict, hf_config: dict) -> dict:
    """The model config (flat keys under config.model) of these weights: sizes + knobs."""
    del arrays
    text = hf_config.get('text_config', {})
    return {
        **hf_layers.towers_architecture(hf_config),
        'embed_dim': text.get('projection_size', text['hidden_size']),
        **knobs(hf_config),
    }
