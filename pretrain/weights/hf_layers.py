"""Hugging Face transformer-layer naming and tower config keys, shared by CLIPModel and SiglipModel.

HF: `{prefix}.layers.{i}.self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/fc2`, torch
Linear weights (out, in). Ours: one fused `attn.qkv` Dense whose output is laid out
(3, heads, head_dim), so the fused kernel is [Wq.T | Wk.T | Wv.T].
"""

from __future__ import annotations

import numpy as np

from pretrain.weights.common import Source, apply, concat_or_none, linear_t


def layer_norm(src: Source, hf: str, ours: str, out: dict):
    out[f'{ours}.scale'] = src.get(f'{hf}.weight')
    out[f'{ours}.bias'] = src.get(f'{hf}.bias')


def linear(src: Source, hf: str, ours: str, out: dict, *, bias=True):
    out[f'{ours}.kernel'] = apply(linear_t, src.get(f'{hf}.weight'))
    if bias:
        out[f'{ours}.bias'] = src.get(f'{hf}.bias')


def encoder_to_nnx(src: Source, hf: str, ours: str, depth: int, out: dict):
    for i in range(depth):
        h, o = f'{hf}.layers.{i}', f'{ours}.blocks.{i}'
        layer_norm(src, f'{h}.layer_norm1', f'{o}.ln1', out)
        layer_norm(src, f'{h}.layer_norm2', f'{o}.ln2', out)
        w = [apply(linear_t, src.get(f'{h}.self_attn.{n}_proj.weight')) for n in 'qkv']
        b = [src.get(f'{h}.self_attn.{n}_proj.bias') for n in 'qkv']
        out[f'{o}.attn.qkv.kernel'] = concat_or_none(w, axis=1)
        out[f'{o}.attn.qkv.bias'] = concat_or_none(b, axis=0)
        linear(src, f'{h}.self_attn.out_proj', f'{o}.attn.out', out)
        linear(src, f'{h}.mlp.fc1', f'{o}.mlp.fc1', out)
        linear(src, f'{h}.mlp.fc2', f'{o}.mlp.fc2', out)


def encoder_from_nnx(p: dict, hf: str, ours: str, depth: int, out: dict):
    """The inverse of `encoder_to_nnx` over our flat params `p`."""
    for i in range(depth):
        h, o = f'{hf}.layers.{i}', f'{ours}.blocks.{i}'
        for hn, on in (('layer_norm1', 'ln1'), ('layer_norm2', 'ln2')):
            out[f'{h}.{hn}.weight'] = p[f'{o}.{on}.scale']
            out[f'{h}.{hn}.bias'] = p[f'{o}.{on}.bias']
        for j, w in enumerate(np.split(p[f'{o}.attn.qkv.kernel'], 3, axis=1)):
            out[f'{h}.self_attn.{"qkv"[j]}_proj.weight'] = linear_t(w)
        for j, b in enumerate(np.split(p[f'{o}.attn.qkv.bias'], 3)):
            out[f'{h}.self_attn.{"qkv"[j]}_proj.bias'] = b
        for hn, on in (
            ('self_attn.out_proj', 'attn.out'),
            ('mlp.fc1', 'mlp.fc1'),
            ('mlp.fc2', 'mlp.fc2'),
        ):
            out[f'{h}.{hn}.weight'] = linear_t(p[f'{o}.{on}.kernel'])
            out[f'{h}.{hn}.bias'] = p[f'{o}.{on}.bias']


def text_to_nnx(src: Source, hf: str, depth: int, out: dict):
    """HF's text tower (token + position embeddings, encoder, final LN), as CLIP and SigLIP
    name it under `hf`, into ours."""
    out['text.tok'] = src.get(f'{hf}.embeddings.token_embedding.weight')
    out['text.pos'] = src.get(f'{hf}.embeddings.position_embedding.weight')
    encoder_to_nnx(src, f'{hf}.encoder', 'text.encoder', depth, out)
    layer_norm(src, f'{hf}.final_layer_norm', 'text.ln', out)


def text_from_nnx(p: dict, hf: str, depth: int, out: dict):
    """The inverse of `text_to_nnx` over our flat params `p`."""
    out[f'{hf}.embeddings.token_embedding.weight'] = p['text.tok']
    out[f'{hf}.embeddings.position_embedding.weight'] = p['text.pos']
    encoder_from_nnx(p, f'{hf}.encoder', 'text.encoder', depth, out)
    out[f'{hf}.final_layer_norm.weight'] = p['text.ln.scale']
    out[f'{hf}.final_layer_norm.bias'] = p['text.ln.bias']


HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh'}
OUR_ACTIVATIONS_IN_HF = {ours: hf for hf, ours in HF_ACTIVATIONS.items()}


def _tower_config(tower) -> dict:
    """config.json keys of a tower that CLIP and SigLIP name alike."""
    return {
        'hidden_size': tower.width,
        'intermediate_size': int(tower.width * tower.mlp_ratio),
        'num_hidden_layers': tower.depth,
        'num_attention_heads': tower.heads,
    }


def vision_config(img) -> dict:
    """config.json's vision_config of our image tower config (CLIP's and SigLIP's alike)."""
    return {
        **_tower_config(img),
        'image_size': img.image_size,
        'patch_size': img.patch,
        'num_channels': 3,
        'hidden_act': OUR_ACTIVATIONS_IN_HF[img.get('activation', 'gelu_tanh')],
        'layer_norm_eps': float(img.get('ln_eps', 1e-6)),
    }


def text_config(txt) -> dict:
    """config.json's text_config keys of our text tower config that CLIP and SigLIP share."""
    return {
        'vocab_size': txt.vocab_size,
        **_tower_config(txt),
        'max_position_embeddings': txt.context_length,
        'hidden_act': OUR_ACTIVATIONS_IN_HF[txt.get('activation', 'gelu_tanh')],
        'layer_norm_eps': float(txt.get('ln_eps', 1e-6)),
    }


def tower_knobs(hf_tower: dict, ours: str, layout: str) -> dict:
    """Model-config values an HF tower config (config.json's vision/text_config) implies."""
    from pretrain.weights.common import WeightsError

    act = hf_tower.get('hidden_act')
    if act is not None and act not in HF_ACTIVATIONS:
        raise WeightsError(
            f"{layout}: activation '{act}' is not supported; valid: {', '.join(HF_ACTIVATIONS)}"
        )
    want = {}
    if act is not None:
        want[f'{ours}.activation'] = HF_ACTIVATIONS[act]
    if 'layer_norm_eps' in hf_tower:
        want[f'{ours}.ln_eps'] = float(hf_tower['layer_norm_eps'])
    if 'num_attention_heads' in hf_tower:
        want[f'{ours}.heads'] = int(hf_tower['num_attention_heads'])
    return want


def tower_sizes(hf_tower: dict, ours: str) -> dict:
    width = hf_tower['hidden_size']
    return {
        f'{ours}.width': width,
        f'{ours}.depth': hf_tower['num_hidden_layers'],
        f'{ours}.heads': hf_tower['num_attention_heads'],
        f'{ours}.mlp_ratio': hf_tower['intermediate_size'] / width,
    }


def towers_architecture(hf_config: dict) -> dict:
    """Model-config sizes of both towers (flat keys under config.model), CLIP's and SigLIP's
    alike; the caller adds embed_dim and its knobs."""
    vision, text = hf_config.get('vision_config', {}), hf_config.get('text_config', {})
    return {
        **tower_sizes(vision, 'image'),
        'image.patch': vision['patch_size'],
        'image.image_size': vision['image_size'],
        **tower_sizes(text, 'text'),
        'text.vocab_size': text['vocab_size'],
        'text.context_length': text['max_position_embeddings'],
    }
