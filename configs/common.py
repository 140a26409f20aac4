"""Pieces every experiment config shares: model sizes, optimizer, mesh, logging.

Configs are Python (big_vision style): each experiment file has `get_config(arg)` that
builds a ConfigDict from these helpers; the CLI locks it so a misspelt override fails.
"""

from __future__ import annotations

from ml_collections import ConfigDict

# name: (width, depth, heads). MLP ratio 4 throughout (ViT paper, Table 1; 'mu' is the
# CPU-sized tower of DESIGN.md that learns shapes in minutes on 2 cores).
VIT_SIZES = {
        'mu': (128, 4, 4),
        'Ti': (192, 12, 3),
        'S': (384, 12, 6),
        'B': (768, 12, 12),
        'L': (1024, 24, 16),
}
# CLIP's text towers: narrower than the image tower from B up (CLIP paper, Table 19/20).
TEXT_SIZES = {
        'mu': (128, 2, 4),
        'Ti': (192, 12, 3),
        'S': (384, 12, 6),
        'B': (512, 12, 8),
        'L': (768, 12, 12),
}

# Logical parameter axes -> mesh axes: the one table of sharding rules. Parameters are
# split over fsdp on their model width and over tensor on the wide (mlp/heads/vocab) side;
# 'norm' (LayerNorm vectors) stays replicated. Batch rows go over (data, fsdp).
SHARDING_RULES = (
        ('embed', 'fsdp'),
        ('mlp', 'tensor'),
        ('heads', 'tensor'),
        ('vocab', 'tensor'),
        ('norm', None),
)

# Byte-level tokenizer: 0 pad, 1 eos, 2..257 the bytes (input_pipeline/tokenizers.py).
BYTE_VOCAB_SIZE = 258


def vit_config(size: str, *, patch: int, image_size: int, pool: str = 'cls') -> ConfigDict:
    width, depth, heads = VIT_SIZES[size]
    return ConfigDict(dict(width=width, depth=depth, heads=heads, mlp_ratio=4.0, patch=patch,
                                                  image_size=image_size, pool=pool))


def text_config(size: str, *, context_length: int, vocab_size: int = BYTE_VOCAB_SIZE,
                                causal: bool = True, pool: str = 'eos') -> ConfigDict:
    width, depth, heads = TEXT_SIZES[size]
    return ConfigDict(dict(width=width, depth=depth, heads=heads, mlp_ratio=4.0,
                                                  vocab_size=vocab_size, context_length=context_length,
                                                  causal=causal, pool=pool, pad_id=0))


def model_config(*, image: ConfigDict, text: ConfigDict, embed_dim: int,
                                  dtype: str = 'float32', remat: str = 'none', logit_scale_init: float = 1 / 0.07,
                                  logit_bias_init: float = 0.0) -> ConfigDict:
    return ConfigDict(dict(image=image, text=text, embed_dim=embed_dim, dtype=dtype,
                                                  remat=remat, logit_scale_init=logit_scale_init,
                                                  logit_bias_init=logit_bias_init))


def optim_config(*, lr: float, warmup_steps: int, weight_decay: float = 0.1,
                                  b2: float = 0.98) -> ConfigDict:
    return ConfigDict(dict(
            lr=lr, warmup_steps=warmup_steps, end_lr_factor=0.0, weight_decay=weight_decay,
            b1=0.9, b2=b2, eps=1e-8, clip_norm=1.0,
            layer_decay=1.0,  # < 1 scales lr by decay**(depth - layer): finetuning uses it.
    ))


def shapes_input(*, image_size: int, context_length: int, caption_field: str = 'caption',
                                  ) -> ConfigDict:
    return ConfigDict(dict(
            source='shapes', image_size=image_size, caption_field=caption_field,
            context_length=context_length, max_objects=3, epoch_size=1_000_000,
            num_threads=2, prefetch=2, max_bad_fraction=0.01,
    ))


def base_config(*, total_steps: int, batch_size: int) -> ConfigDict:
    """Everything but the model, objectives, optimizer and input."""
    return ConfigDict(dict(
            seed=0,
            total_steps=total_steps,
            batch_size=batch_size,          # global, over all hosts and devices
            grad_accum=1,                   # micro-batches per step (lax.scan); see optim.py
            mesh=ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=SHARDING_RULES)),
            log_every=10,
            checkpoint=ConfigDict(dict(every=100, keep=3, keep_every=0, async_save=True)),
            profile=ConfigDict(dict(start_step=-1, num_steps=5)),  # -1: no trace
            progress=True,
    ))
