"""big_vision SigLIP checkpoints (.npz of the two_towers params) -> ImageTextModel.

Keys are the flax linen param paths joined by '/', under 'params/' in released files:
`img/embedding` (conv, HWIO), `img/pos_embedding` (1, N, d), `img/Transformer/
encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
LayerNorm_1, MlpBlock_0/Dense_{0,1}}`, `img/Transformer/encoder_norm`, `img/MAPHead_0/...`,
`txt/Embed_0/embedding`, `txt/pos_embedding`, `txt/Encoder_0/...`, `txt/head`, `t`, `b`.
Checkpoints trained with `scan=True` stack the blocks as `encoderblock/...` with a leading
depth axis; both forms load. Attention kernels are (d, heads, head_dim) and
(heads, head_dim, d). The model knobs are SigLIP's (see hf_siglip.KNOBS); flax's LayerNorm
eps is 1e-6 and its gelu the tanh form, our defaults.

The layout follows big_vision's models/vit.py, models/proj/image_text/text_transformer.py
and two_towers.py, and the key-by-key mapping of transformers' convert_siglip_to_hf.py.
"""

from __future__ import annotations

import numpy as np

from pretrain.weights import hf_siglip
from pretrain.weights.common import Source, apply, concat_or_none

LAYOUT = 'big_vision'
KNOBS = {**hf_siglip.KNOBS, 'image.activation': 'gelu_tanh', 'text.activation': 'gelu_tanh'}
KNOBS.update({'image.ln_eps': 1e-6, 'text.ln_eps': 1e-6})
KNOBS.update({'image.pixel_mean': None, 'image.pixel_std': None})  # [-1, 1] inputs


def read_config(path: str) -> dict:
    """big_vision .npz files carry no config: everything is read off the arrays."""
    del path
    return {}


def unscan(arrays: dict) -> dict:
    """Splits scanned `.../encoderblock/...` arrays (leading depth axis) into per-block keys."""
    out = {}
    for k, v in arrays.items():
        if '/encoderblock/' in k:
            for i in range(v.shape[0]):
                out[k.replace('/encoderblock/', f'/encoderblock_{i}/')] = v[i]
        else:
            out[k] = v
    return out


def normalise_keys(arrays: dict) -> dict:
    """Drops the 'params/' prefix of released files; accepts bare param trees too."""
    return {k[len('params/') :] if k.startswith('params/') else k: v for k, v in arrays.items()}


def _mha(src: Source, prefix: str, ours_q: str, ours_kv: str | None, ours_out: str, out: dict):
    """flax MultiHeadDotProductAttention -> our fused qkv (or q + kv for MAP) and out."""
    flat = lambda a: a.reshape(a.shape[0], -1)  # (d, h, k) -> (d, h*k): our Dense kernel
    w = [apply(flat, src.get(f'{prefix}/{n}/kernel')) for n in ('query', 'key', 'value')]
    b = [apply(np.ravel, src.get(f'{prefix}/{n}/bias')) for n in ('query', 'key', 'value')]
    if ours_kv is None:
        out[f'{ours_q}.kernel'] = concat_or_none(w, axis=1)
        out[f'{ours_q}.bias'] = concat_or_none(b, axis=0)
    else:
        out[f'{ours_q}.kernel'], out[f'{ours_q}.bias'] = w[0], b[0]
        out[f'{ours_kv}.kernel'] = concat_or_none(w[1:], axis=1)
        out[f'{ours_kv}.bias'] = concat_or_none(b[1:], axis=0)
    wo = src.get(f'{prefix}/out/kernel')
    out[f'{ours_out}.kernel'] = apply(lambda a: a.reshape(-1, a.shape[-1]), wo)
    out[f'{ours_out}.bias'] = src.get(f'{prefix}/out/bias')


def _ln(src, prefix, ours, out):
    out[f'{ours}.scale'] = src.get(f'{prefix}/scale')
    out[f'{ours}.bias'] = src.get(f'{prefix}/bias')


def _dense(src, prefix, ours, out):
    out[f'{ours}.kernel'] = src.get(f'{prefix}/kernel')
    out[f'{ours}.bias'] = src.get(f'{prefix}/bias')


def _encoder(src, prefix, ours, depth, out):
    for i in range(depth):
        b, o = f'{prefix}/encoderblock_{i}', f'{ours}.blocks.{i}'
        _ln(src, f'{b}/LayerNorm_0', f'{o}.ln1', out)
        _mha(
            src, f'{b}/MultiHeadDotProductAttention_0', f'{o}.attn.qkv', None, f'{o}.attn.out', out
        )
        _ln(src, f'{b}/LayerNorm_1', f'{o}.ln2', out)
        _dense(src, f'{b}/MlpBlock_0/Dense_0', f'{o}.mlp.fc1', out)
        _dense(src, f'{b}/MlpBlock_0/Dense_1', f'{o}.mlp.fc2', out)
    _ln(src, f'{prefix}/encoder_norm', ours.rsplit('.', 1)[0] + '.ln', out)


def to_nnx(arrays: dict, model_config) -> dict:
    arrays = unscan(normalise_keys(arrays))
    src = Source(arrays, layout=LAYOUT)
    out = {}
    out['image.embed.kernel'] = apply(
        lambda a: a.reshape(-1, a.shape[-1]), src.get('img/embedding/kernel')
    )  # (p, p, 3, d) HWIO: rows already in our patchify order (i, j, c)
    out['image.embed.bias'] = src.get('img/embedding/bias')
    out['image.pos'] = apply(lambda a: a.reshape(-1, a.shape[-1]), src.get('img/pos_embedding'))
    _encoder(src, 'img/Transformer', 'image.encoder', model_config.image.depth, out)
    m = 'img/MAPHead_0'
    out['image.map.probe'] = src.get(f'{m}/probe')
    _mha(
        src,
        f'{m}/MultiHeadDotProductAttention_0',
        'image.map.q',
        'image.map.kv',
        'image.map.out',
        out,
    )
    _ln(src, f'{m}/LayerNorm_0', 'image.map.ln', out)
    _dense(src, f'{m}/MlpBlock_0/Dense_0', 'image.map.mlp.fc1', out)
    _dense(src, f'{m}/MlpBlock_0/Dense_1', 'image.map.mlp.fc2', out)
    out['text.tok'] = src.get('txt/Embed_0/embedding')
    out['text.pos'] = apply(lambda a: a.reshape(-1, a.shape[-1]), src.get('txt/pos_embedding'))
    _encoder(src, 'txt/Encoder_0', 'text.encoder', model_config.text.depth, out)
    _dense(src, 'txt/head', 'text_proj', out)
    out['logit_scale'] = apply(lambda a: a.reshape(()), src.get('t'))
    out['logit_bias'] = apply(lambda a: a.reshape(()), src.get('b'))
    src.done()
    return out


def heads_in(arrays: dict) -> dict:
    """Head counts read off the attention kernels (d, heads, head_dim): checked, not assumed."""
    arrays = normalise_keys(arrays)
    want = {}
    for tower, prefix in (('image', 'img/Transformer'), ('text', 'txt/Encoder_0')):
        for k, v in arrays.items():
            if k.startswith(prefix) and k.endswith('MultiHeadDotProductAttention_0/query/kernel'):
                want[f'{tower}.heads'] = int(v.shape[-2])
                break
    return want


def architecture(arrays: dict, config: dict) -> dict:
    """The model config (flat keys under config.model), all read off the array shapes."""
    del config
    a = unscan(normalise_keys(arrays))
    patch, _, _, width = a['img/embedding/kernel'].shape
    grid = int(round(a['img/pos_embedding'].shape[1] ** 0.5))
    vocab, text_width = a['txt/Embed_0/embedding'].shape
    blocks = lambda prefix: len(
        {k.split('/')[2] for k in a if k.startswith(prefix + '/encoderblock_')}
    )
    mlp = lambda prefix: a[f'{prefix}/encoderblock_0/MlpBlock_0/Dense_0/kernel'].shape[1]
    return {
        'image.width': width,
        'image.depth': blocks('img/Transformer'),
        'image.mlp_ratio': mlp('img/Transformer') / width,
        'image.patch': patch,
        'image.image_size': patch * grid,
        'text.width': text_width,
        'text.depth': blocks('txt/Encoder_0'),
        'text.mlp_ratio': mlp('txt/Encoder_0') / text_width,
        'text.vocab_size': vocab,
        'text.context_length': a['txt/pos_embedding'].shape[1],
        'embed_dim': a['txt/head/kernel'].shape[1],
        **KNOBS,
        **heads_in(arrays),
    }
