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
    return ConfigDict(
        dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=4.0,
            patch=patch,
            image_size=image_size,
            pool=pool,
        )
    )


def text_config(
    size: str,
    *,
    context_length: int,
    vocab_size: int = BYTE_VOCAB_SIZE,
    causal: bool = True,
    pool: str = 'eos',
) -> ConfigDict:
    width, depth, heads = TEXT_SIZES[size]
    return ConfigDict(
        dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=4.0,
            vocab_size=vocab_size,
            context_length=context_length,
            causal=causal,
            pool=pool,
            pad_id=0,
        )
    )


def model_config(
    *,
    image: ConfigDict,
    text: ConfigDict,
    embed_dim: int,
    dtype: str = 'float32',
    remat: str = 'none',
    logit_scale_init: float = 1 / 0.07,
    logit_bias_init: float = 0.0,
    grouping_logit_scale_init: float = 1 / 0.07,
) -> ConfigDict:
    return ConfigDict(
        dict(
            image=image,
            text=text,
            embed_dim=embed_dim,
            dtype=dtype,
            remat=remat,
            logit_scale_init=logit_scale_init,
            logit_bias_init=logit_bias_init,
            grouping_logit_scale_init=grouping_logit_scale_init,
        )
    )


def optim_config(
    *, lr: float, warmup_steps: int, weight_decay: float = 0.1, b2: float = 0.98
) -> ConfigDict:
    return ConfigDict(
        dict(
            lr=lr,
            warmup_steps=warmup_steps,
            end_lr_factor=0.0,
            weight_decay=weight_decay,
            b1=0.9,
            b2=b2,
            eps=1e-8,
            clip_norm=1.0,
            layer_decay=1.0,  # < 1 scales lr by decay**(depth - layer): finetuning uses it.
        )
    )


def shapes_input(
    *,
    image_size: int,
    context_length: int,
    caption_field: str = 'caption',
    caption_probs: dict | None = None,
    subcaption_field: str = 'long_caption',
    num_subcaptions: int = 6,
    subcaption_context_length: int = 128,
    subcaption_fill: str = 'replace',
) -> ConfigDict:
    """The `input` section for the shapes source (input_pipeline/pipeline.py reads it).

    caption_field: the record field tokenized into `text` (B, context_length).
    caption_probs: {field: probability} to draw the `text` caption per example per epoch
        (quality captions, e.g. {'alt_text': 0.2, 'caption': 0.8}); empty: caption_field.
        Overrides can change a listed field's probability, not add a field: list them all.
    subcaption_*: DreamLIP's `texts` (B, num_subcaptions, subcaption_context_length) and
        `texts_valid` (B, num_subcaptions), built only when an objective asks for them:
        sentences of subcaption_field, K = num_subcaptions per example per epoch, without
        replacement when there are >= K, else 'replace' (with replacement, all valid) or
        'pad' (padding rows marked invalid). 128 tokens truncate 0.06% of shapes sentences
        (longest 132 bytes; 112 would truncate 0.9%, 96 3.5%); the text tower's
        context_length must be >= it. Shapes long captions have 2-4 sentences
        (max_objects=3), so K=6 always repeats or pads there.
    """
    return ConfigDict(
        dict(
            source='shapes',
            image_size=image_size,
            caption_field=caption_field,
            caption_probs=dict(caption_probs or {}),
            subcaption_field=subcaption_field,
            num_subcaptions=num_subcaptions,
            subcaption_context_length=subcaption_context_length,
            subcaption_fill=subcaption_fill,
            context_length=context_length,
            max_objects=3,
            epoch_size=1_000_000,
            num_threads=2,
            prefetch=2,
            max_bad_fraction=0.01,
        )
    )


def base_config(*, total_steps: int, batch_size: int) -> ConfigDict:
    """Everything but the model, objectives, optimizer and input."""
    return ConfigDict(
        dict(
            seed=0,
            total_steps=total_steps,
            batch_size=batch_size,  # global, over all hosts and devices
            grad_accum=1,  # micro-batches per step (lax.scan); see optim.py
            mesh=ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=SHARDING_RULES)),
            log_every=10,
            checkpoint=ConfigDict(dict(every=100, keep=3, keep_every=0, async_save=True)),
            profile=ConfigDict(dict(start_step=-1, num_steps=5)),  # -1: no trace
            progress=True,
        )
    )


# Prompts in the words of the shapes captions ("a red circle", "a small red ring").
SHAPES_TEMPLATES = ('a {}.', 'a photo of a {}.', 'a large {}.', 'a small {}.')
# Shapes long captions call the rest of the image a background / backdrop / texture.
SHAPES_BACKGROUND_PROMPTS = (
    'a textured background.',
    'the background.',
    'a plain grey background.',
    'an empty grey backdrop.',
)


def evals_config(
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    num_examples: int = 512,
    probe_sizes: tuple = (2048, 512, 1024),
    dense_examples: int = 256,
    batch_size: int = 256,
) -> ConfigDict:
    """Evaluator name -> section (pretrain/evaluators/build.py), all on held-out shapes.

    image_size / context_length / max_objects left at None follow config.input at build
    time, so `--config.input.image_size=32` evaluates at 32 too. batch_size is global
    (sharded over the mesh's batch axes). probe_sizes: (train, val, test) for the probe.
    """
    shapes = dict(
        source='shapes',
        seed=0,
        start=0,
        image_size=image_size,
        context_length=context_length,
        max_objects=None,
        batch_size=batch_size,
    )
    num_train, num_val, num_test = probe_sizes
    return ConfigDict(
        dict(
            zeroshot=dict(
                kind='zeroshot',
                **shapes,
                num_examples=num_examples,
                tasks=('class', 'shape', 'colour'),
                templates=SHAPES_TEMPLATES,
                top_k=(1, 5),
                root='',
            ),  # root: an ImageFolder when source='folder'
            retrieval=dict(
                kind='retrieval',
                **shapes,
                num_examples=num_examples,
                caption_fields=('caption',),
                ks=(1, 5, 10),
                chunk_size=1024,
            ),
            linear_probe=dict(
                kind='linear_probe',
                **shapes,
                num_train=num_train,
                num_val=num_val,
                num_test=num_test,
                feature='pooled',
                label='label',
                # relative to the mean feature variance; chosen on val
                lambdas=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
            ),
            dense_zeroshot=dict(
                kind='dense_zeroshot',
                **shapes,
                num_examples=dense_examples,
                readout='value',
                background='prompt',
                threshold=0.2,
                background_prompts=SHAPES_BACKGROUND_PROMPTS,
                templates=SHAPES_TEMPLATES,
                include_background=True,
            ),
        )
    )
