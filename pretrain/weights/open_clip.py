"""open_clip ViT CLIP state dicts (safetensors) -> ImageTextModel.

`open_clip_model.safetensors` (as the hub ships it; `.bin`/`.pt` pickles are refused), with
`open_clip_config.json` beside it when present. Keys follow OpenAI's CLIP: `visual.conv1`,
`visual.class_embedding`, `visual.positional_embedding` (with a CLS row, folded into `cls`
as for HF CLIP), `*.transformer.resblocks.{i}.attn.in_proj_*` (fused q|k|v, as ours),
`visual.proj` / `text_projection` stored (in, out), i.e. already our kernel layout.
open_clip uses exact GELU unless the model is a '-quickgelu' one; LayerNorm eps 1e-5.
"""

from __future__ import annotations

import json
import os

from pretrain.weights.common import Source, apply, conv_to_patch_kernel, linear_t

LAYOUT = 'open_clip'
KNOBS = {
    'image.posemb': 'learn',
    'image.stem': 'patch',
    'image.ln_pre': True,
    'image.patch_bias': False,
    'image.pool': 'cls',
    'image.ln_eps': 1e-5,
    'text.causal': True,
    'text.pool': 'argmax',
    'text.ln_eps': 1e-5,
    'image_proj': 'linear',
    'proj_bias': False,
}
IGNORE = ('attn_mask',)


def read_config(path: str) -> dict:
    here = path if os.path.isdir(path) else os.path.dirname(path)
    name = os.path.join(here, 'open_clip_config.json')
    if not os.path.isfile(name):
        return {}
    with open(name) as f:
        return json.load(f)


def knobs(oc_config: dict) -> dict:
    """The fixed CLIP knobs, plus activation / heads / pixel statistics from the config file."""
    want = dict(KNOBS)
    model_cfg = oc_config.get('model_cfg')
    if model_cfg is not None:
        act = 'quick_gelu' if model_cfg.get('quick_gelu', False) else 'gelu'
        want['image.activation'] = want['text.activation'] = act
        vision, text = model_cfg.get('vision_cfg', {}), model_cfg.get('text_cfg', {})
        if 'width' in vision:
            want['image.heads'] = vision['width'] // vision.get('head_width', 64)
        want['text.heads'] = text.get('heads', 8)  # open_clip's CLIPTextCfg default
    pre = oc_config.get('preprocess_cfg', {})
    if 'mean' in pre:
        want['image.pixel_mean'] = tuple(round(255 * m, 6) for m in pre['mean'])
        want['image.pixel_std'] = tuple(round(255 * s, 6) for s in pre['std'])
    return want


def _blocks(src: Source, prefix: str, ours: str, depth: int, out: dict):
    for i in range(depth):
        b, o = f'{prefix}.resblocks.{i}', f'{ours}.blocks.{i}'
        for on, bn in (('ln1', 'ln_1'), ('ln2', 'ln_2')):
            out[f'{o}.{on}.scale'] = src.get(f'{b}.{bn}.weight')
            out[f'{o}.{on}.bias'] = src.get(f'{b}.{bn}.bias')
        # in_proj_weight (3d, d) is [Wq; Wk; Wv]: transposed it is our fused qkv kernel.
        out[f'{o}.attn.qkv.kernel'] = apply(linear_t, src.get(f'{b}.attn.in_proj_weight'))
        out[f'{o}.attn.qkv.bias'] = src.get(f'{b}.attn.in_proj_bias')
        for on, bn in (
            ('attn.out', 'attn.out_proj'),
            ('mlp.fc1', 'mlp.c_fc'),
            ('mlp.fc2', 'mlp.c_proj'),
        ):
            out[f'{o}.{on}.kernel'] = apply(linear_t, src.get(f'{b}.{bn}.weight'))
            out[f'{o}.{on}.bias'] = src.get(f'{b}.{bn}.bias')


def to_nnx(arrays: dict, model_config) -> dict:
    src = Source(arrays, layout=LAYOUT, ignore=IGNORE)
    out = {}
    out['image.embed.kernel'] = apply(conv_to_patch_kernel, src.get('visual.conv1.weight'))
    pos, cls = src.get('visual.positional_embedding'), src.get('visual.class_embedding')
    if pos is not None and cls is not None:
        out['image.cls'] = (cls + pos[0]).reshape(1, 1, -1)
        out['image.pos'] = pos[1:]
    for on, bn in (('ln_pre', 'ln_pre'), ('ln', 'ln_post')):
        out[f'image.{on}.scale'] = src.get(f'visual.{bn}.weight')
        out[f'image.{on}.bias'] = src.get(f'visual.{bn}.bias')
    _blocks(src, 'visual.transformer', 'image.encoder', model_config.image.depth, out)
    out['image_proj.kernel'] = src.get('visual.proj')
    out['text.tok'] = src.get('token_embedding.weight')
    out['text.pos'] = src.get('positional_embedding')
    _blocks(src, 'transformer', 'text.encoder', model_config.text.depth, out)
    out['text.ln.scale'] = src.get('ln_final.weight')
    out['text.ln.bias'] = src.get('ln_final.bias')
    out['text_proj.kernel'] = src.get('text_projection')
    out['logit_scale'] = apply(lambda a: a.reshape(()), src.get('logit_scale'))
    if 'logit_bias' in src:  # open_clip models trained with the SigLIP loss
        out['logit_bias'] = src.get('logit_bias').reshape(())
    src.done()
    return out


def _depth(arrays: dict, prefix: str) -> int:
    return len({k.split('.')[len(prefix.split('.'))] for k in arrays if k.startswith(prefix + '.')})


def architecture(arrays: dict, oc_config: dict) -> dict:
    """The model config (flat keys under config.model): sizes read off the arrays, heads and
    activation from open_clip_config.json (they are not in the shapes)."""
    width, _, patch, _ = arrays['visual.conv1.weight'].shape
    grid = int(round((arrays['visual.positional_embedding'].shape[0] - 1) ** 0.5))
    vocab, text_width = arrays['token_embedding.weight'].shape
    return {
        'image.width': width,
        'image.depth': _depth(arrays, 'visual.transformer.resblocks'),
        'image.mlp_ratio': arrays['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0]
        / width,
        'image.patch': patch,
        'image.image_size': patch * grid,
        'text.width': text_width,
        'text.depth': _depth(arrays, 'transformer.resblocks'),
        'text.mlp_ratio': arrays['transformer.resblocks.0.mlp.c_fc.weight'].shape[0] / text_width,
        'text.vocab_size': vocab,
        'text.context_length': arrays['positional_embedding'].shape[0],
        'embed_dim': arrays['text_projection'].shape[1],
        **knobs(oc_config),
    }
