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
# The shapes byte-level BPE shipped with the input pipeline ('shapes_bpe'): 0 pad, 1 eos.
SHAPES_BPE_VOCAB_SIZE = 1024


def vit_config(size: str, *, patch: int, image_size: int, pool: str = 'cls') -> ConfigDict:
    """The image tower. The last six fields exist to run imported layouts exactly (see
    pretrain/weights/); their defaults are this codebase's own ViT."""
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
            # 'learn' (a table, resized to other grids) or 'sincos2d' (fixed 2D sine-cosine,
            # no parameter: MoCo v3, big_vision's plain ViT).
            posemb='learn',
            # 'patch' (one linear map per patch) or 'conv' (3x3 stride-2 convolutions down to
            # the patch grid, then 1x1: pretrain/models/vit.ConvStem; power-of-two patches).
            stem='patch',
            ln_pre=False,  # CLIP: LayerNorm on the tokens before the first block
            patch_bias=True,  # CLIP's patch conv has no bias
            activation='gelu_tanh',  # or 'gelu' (exact: open_clip), 'quick_gelu' (OpenAI CLIP)
            ln_eps=1e-6,  # CLIP: 1e-5
            # Per-channel 0..255 statistics; None scales pixels to [-1, 1] (SigLIP's too).
            # OpenAI CLIP: mean (122.77, 116.75, 104.09), std (68.50, 66.63, 70.32).
            pixel_mean=None,
            pixel_std=None,
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
    """The text tower; pool: eos | argmax (CLIP) | last (SigLIP) | mean."""
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
            mask_padding=True,  # bidirectional towers only; SigLIP attends to its padding
            activation='gelu_tanh',
            ln_eps=1e-6,
        )
    )


def model_config(
    *,
    image: ConfigDict,
    text: ConfigDict,
    embed_dim: int,
    dtype: str = 'float32',
    remat: str = 'none',
    attention: str = 'auto',
    matmul_precision: str = 'default',
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
            # 'auto' | 'xla' | 'cudnn': pretrain.models.layers.Attention says what each runs.
            attention=attention,
            # As jax.default_matmul_precision around the towers: 'bfloat16' rounds f32
            # matmuls' operands to bf16 (f32 accumulation) on CPU
            # (pretrain.models.layers.matmul; 5.3x the f32 matmul rate on CPUs with AMX,
            # 1.8x with AVX-512 BF16); on GPU jax maps it to XLA's DEFAULT precision, TF32
            # for f32 matmuls; 'auto' = 'bfloat16' on CPUs with either
            # (layers.cpu_bf16_flags), else 'default' (f32 on CPU); 'float32'.
            matmul_precision=matmul_precision,
            logit_scale_init=logit_scale_init,
            logit_bias_init=logit_bias_init,
            grouping_logit_scale_init=grouping_logit_scale_init,
            # 'none': SigLIP's pooled image features are the embedding (embed_dim = width).
            image_proj='linear',
            proj_bias=False,  # SigLIP's text head has a bias
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


def views_options(
    *,
    size: int = 0,
    scale: tuple = (0.2, 1.0),
    ratio: tuple = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    colour_jitter: tuple = (0.0, 0.0, 0.0),
    colour_jitter_p: float = 0.8,
    rotations: str = 'random',
    mask_patch_size: int = 16,
    mask_ratio: float = 0.4,
    mask_min_block: int = 4,
    mask_min_aspect: float = 0.3,
) -> ConfigDict:
    """`input.views`: options of the extra views, built only for objectives that ask for them.

    view1/view2 + coords/flip (PixPro): two crops of size (0 = input.image_size), scale of
    the area (PixPro: (0.08, 1)), aspect in ratio, flipped with flip_p, colour-jittered with
    probability colour_jitter_p by (brightness, contrast, saturation) strengths (0s = off).
    rot_image/rot_label (RotNet): rotations 'random' (one per image) or 'all' (four).
    mask (BEiT MIM): mask_ratio of the (image_size / mask_patch_size)^2 patches, in blocks
    of >= mask_min_block patches; mask_patch_size must be the model's patch size.
    """
    return ConfigDict(
        dict(
            size=size,
            scale=tuple(scale),
            ratio=tuple(ratio),
            flip_p=flip_p,
            colour_jitter=tuple(colour_jitter),
            colour_jitter_p=colour_jitter_p,
            rotations=rotations,
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            mask_min_block=mask_min_block,
            mask_min_aspect=mask_min_aspect,
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
    tokenizer: str = 'bytes',
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
            packed_length=0,  # > 0: an image's texts packed in one row (captions.PackTexts)
            context_length=context_length,
            tokenizer=tokenizer,  # 'bytes' or 'shapes_bpe' (no file); see real_input
            tokenizer_path='',
            max_objects=3,
            epoch_size=1_000_000,
            num_threads=2,
            prefetch=2,
            # Rendering is pure Python, which threads do not scale: one worker process per
            # core (at most 32). On 2 cores as fast as 0 (in process); on an H100 host, 0
            # left the GPU waiting: 0.17-0.19 s per DreamLIP step (benchmarks/README.md).
            num_workers=-1,
            device_prefetch=2,  # batches placed on the mesh ahead of the step; 0 = off
            views=views_options(),  # extra views, built only when an objective asks
            max_bad_fraction=0.01,
        )
    )


# Real data. `input.source` names the format and `input.data` holds its options
# (input_pipeline/pipeline.py:make_source builds the source from them). Each *_data helper
# returns one format's options; real_input wraps one into a whole `input` section, and
# mixture_input several, with their weights. Paths are checked when training starts.


def jsonl_data(path: str, *, image_root: str = '', image_field: str = 'image') -> dict:
    """Images in a folder + a JSONL of {"image": "rel/path.jpg", "caption": ..., ...} lines.

    image_root '' = the JSONL's folder. Every field of a line is a record field, so
    caption_field / caption_probs / subcaption_field name JSONL keys.
    """
    return dict(source='jsonl', path=path, image_root=image_root, image_field=image_field)


def csv_data(
    path: str,
    *,
    image_root: str = '',
    image_column: str = 'filepath',
    caption_column: str = 'title',
    separator: str = '\t',
) -> dict:
    """Images in a folder + an open_clip CSV/TSV; the caption column is read as `caption`."""
    return dict(
        source='csv',
        path=path,
        image_root=image_root,
        image_column=image_column,
        caption_column=caption_column,
        separator=separator,
    )


def webdataset_data(urls: str, *, index_dir: str = '') -> dict:
    """img2dataset tar shards, e.g. '/data/cc3m/{00000..00331}.tar'; .txt is `caption`.

    index_dir: where the per-shard random-access indexes are cached ('' = next to them).
    """
    return dict(source='webdataset', urls=urls, index_dir=index_dir)


def array_record_data(paths: str) -> dict:
    """ArrayRecord shards written by `python -m input_pipeline.convert` (a folder or glob)."""
    return dict(source='array_record', paths=paths)


def tfds_data(
    name: str, *, split: str = 'train', data_dir: str = '', fields: dict | None = None
) -> dict:
    """A TFDS dataset prepared as ArrayRecord; fields: record name -> feature path.

    e.g. coco_captions: {'image': 'image', 'caption': 'captions/text'} (the first caption).
    """
    return dict(
        source='tfds',
        name=name,
        split=split,
        data_dir=data_dir,
        fields=dict(fields or {'image': 'image', 'caption': 'caption'}),
    )


def coco_data(annotations: str, images: str, *, split: str = 'train') -> dict:
    """COCO captions JSON (or a Karpathy split JSON of `split`, or a Flickr token file) and
    its image folder; training draws one of an image's captions per epoch as `caption`."""
    return dict(source='coco', annotations=annotations, images=images, split=split)


def real_input(
    data: dict,
    *,
    image_size: int,
    context_length: int,
    caption_field: str = 'caption',
    caption_probs: dict | None = None,
    subcaption_field: str = 'long_caption',
    num_subcaptions: int = 6,
    subcaption_context_length: int = 128,
    subcaption_fill: str = 'replace',
    tokenizer: str = 'bytes',
    tokenizer_path: str = '',
    crop_scale: tuple = (0.9, 1.0),
    crop_ratio: tuple = (3 / 4, 4 / 3),
    flip: bool = True,
    num_threads: int = 8,
    prefetch: int = 4,
    max_bad_fraction: float = 0.01,
) -> ConfigDict:
    """The `input` section for real image-text data (one of the *_data helpers above).

    Training images are decoded and cropped in one step (DecodeRandomResizedCrop to
    image_size: `crop_scale` of the area, aspect in `crop_ratio`; open_clip's CLIP recipe
    uses (0.9, 1.0)), then flipped left-right half the time when `flip` (turn it off when
    captions say "left" / "right"). Caption fields as in shapes_input. tokenizer: 'bytes'
    (no file), 'sentencepiece' (a .model) or 'hf' (a tokenizer.json) at tokenizer_path;
    model.text.vocab_size must hold its vocabulary. num_threads decode in parallel
    (JPEG decoding and resizing release the GIL).
    """
    data = dict(data)
    return ConfigDict(
        dict(
            source=data.pop('source'),
            data=data,
            image_size=image_size,
            caption_field=caption_field,
            caption_probs=dict(caption_probs or {}),
            subcaption_field=subcaption_field,
            num_subcaptions=num_subcaptions,
            subcaption_context_length=subcaption_context_length,
            subcaption_fill=subcaption_fill,
            packed_length=0,  # > 0: an image's texts packed in one row (captions.PackTexts)
            context_length=context_length,
            tokenizer=tokenizer,
            tokenizer_path=tokenizer_path,
            crop_scale=tuple(crop_scale),
            crop_ratio=tuple(crop_ratio),
            flip=flip,
            num_threads=num_threads,
            prefetch=prefetch,
            num_workers=0,  # > 0: batches built in that many processes (-1: one per core)
            device_prefetch=2,  # batches placed on the mesh ahead of the step; 0 = off
            views=views_options(),  # extra views, built only when an objective asks
            max_bad_fraction=max_bad_fraction,
        )
    )


def mixture_input(
    components: dict, *, weights: dict, num_records: int = 0, **input_options
) -> ConfigDict:
    """A weighted mixture of *_data components: {'name': jsonl_data(...), ...}.

    weights {'name': w} (normalised; 0 switches a component off, settable from the
    command line: --config.input.data.components.name.weight=0). num_records 0: one
    epoch reads every component whole at its weight, the smaller ones repeated
    (input_pipeline/sources/mixture.py). Every component needs the caption fields.
    """
    if set(weights) != set(components):
        raise ValueError(f'weights name {sorted(weights)}, components are {sorted(components)}')
    parts = {name: dict(part, weight=float(weights[name])) for name, part in components.items()}
    data = dict(source='mixture', components=parts, num_records=num_records)
    return real_input(data, **input_options)


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
            # Initial weights (a fresh run only; resuming uses the checkpoint): format is one
            # of pretrain.weights.FORMATS (export, hf_clip, hf_siglip, open_clip, big_vision),
            # '' for random init. The model config must match the layout's architecture.
            init=ConfigDict(dict(format='', path='')),
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
            # One object per scene, as in a classification set: in a scene of several the
            # label (the largest object) is one of several right answers, which capped
            # colour accuracy at ~70% for every model (benchmarks/results/...screens.md).
            zeroshot=dict(
                kind='zeroshot',
                **{**shapes, 'max_objects': 1},
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


# ---------------------------------------------------------------------------------------
# Evaluation on real data: one section per dataset, added to `config.evals` next to (or
# instead of) the shapes ones; configs/eval_real.py puts them on any training config.
# Roots left '' must be set (`--config.evals.<name>.root=/data/...`): building the
# evaluators opens every source and fails in one line naming a missing or empty one.
# image_size / context_length None follow config.input (the model's resolution).

# CLIP's 80 ImageNet prompts (Radford et al. 2021; the "Prompt Engineering for ImageNet"
# notebook), averaged per class. Prompts.texts() writes "an" before a vowel ("an origami").
CLIP_IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.',
    'a doodle of a {}.', 'a close-up photo of the {}.', 'a photo of a {}.',
    'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.',
    'a doodle of the {}.', 'a origami {}.', 'a low resolution photo of a {}.',
    'the toy {}.', 'a rendition of the {}.', 'a photo of the clean {}.',
    'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.',
    'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.',
    'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.',
    'a drawing of the {}.', 'a photo of the large {}.', 'a black and white photo of a {}.',
    'the plushie {}.', 'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.',
    'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.',
    'a tattoo of the {}.',
)  # fmt: skip
# The 7 of them the CLIP notebook found to do as well as all 80: 11x fewer text forwards.
CLIP_TEMPLATES_7 = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)
# Pascal VOC's label 0: prompts that describe no object.
VOC_BACKGROUND_PROMPTS = (
    'a photo of the background.',
    'a photo of nothing.',
    'background.',
)


def _real_eval(kind: str, source: str, *, batch_size: int, **fields):
    """num_examples (where there is one): 0 all; N: N records spread over the whole set."""
    return ConfigDict(
        dict(
            kind=kind,
            source=source,
            image_size=None,
            context_length=None,
            batch_size=batch_size,
            num_threads=8,  # image decoding threads per process
            **fields,
        )
    )


def _zeroshot_eval(
    source: str,
    source_fields: dict,
    *,
    classnames: tuple = (),
    templates: tuple = CLIP_IMAGENET_TEMPLATES,
    num_examples: int = 0,
    batch_size: int = 256,
) -> ConfigDict:
    """Zero-shot top-1/top-5: the options every zero-shot source takes, next to the
    source's own `source_fields`."""
    return _real_eval(
        'zeroshot',
        source,
        batch_size=batch_size,
        num_examples=num_examples,
        **source_fields,
        classnames=tuple(classnames),
        templates=tuple(templates),
        top_k=(1, 5),
    )


def folder_zeroshot_eval(root: str = '', **options) -> ConfigDict:
    """Zero-shot top-1/top-5 on an ImageFolder root/<class_name>/<image>; class names are
    the folder names ('_' -> ' ') unless `classnames` lists them in sorted-folder order
    (e.g. readable ImageNet names for WordNet-id folders). `options`: classnames,
    templates, num_examples, batch_size (see _zeroshot_eval)."""
    return _zeroshot_eval('folder', dict(root=root), **options)


def tfds_zeroshot_eval(
    tfds_name: str = '',
    *,
    split: str = 'test',
    data_dir: str = '',
    image_key: str = 'image',
    label_key: str = 'label',
    **options,
) -> ConfigDict:
    """Zero-shot on a TFDS classification dataset prepared as ArrayRecord (`tfds build
    --file_format=array_record cifar10`); class names from its ClassLabel feature.
    `options`: as folder_zeroshot_eval."""
    tfds_fields = dict(
        tfds_name=tfds_name,
        split=split,
        data_dir=data_dir,
        image_key=image_key,
        label_key=label_key,
    )
    return _zeroshot_eval('tfds', tfds_fields, **options)


def _retrieval_eval(
    source: str,
    root: str,
    *,
    split: str,
    annotations: str = '',
    images: str = '',
    num_examples: int = 0,
    batch_size: int = 256,
    chunk_size: int = 1024,
) -> ConfigDict:
    """Image<->text R@1/5/10: the options every retrieval source takes."""
    return _real_eval(
        'retrieval',
        source,
        batch_size=batch_size,
        num_examples=num_examples,
        root=root,
        split=split,
        annotations=annotations,
        images=images,
        ks=(1, 5, 10),
        chunk_size=chunk_size,
    )


def coco_retrieval_eval(root: str = '', *, split: str = 'val2017', **options) -> ConfigDict:
    """Image<->text R@1/5/10 on COCO: root/annotations/captions_<split>.json and
    root/<split>/ (5k images x ~25k captions for val2017), or explicit `annotations` (a
    captions JSON, or Karpathy's dataset_coco.json with split='test') and `images`.
    `options`: annotations, images, num_examples, batch_size, chunk_size (_retrieval_eval)."""
    return _retrieval_eval('coco', root, split=split, **options)


def flickr_retrieval_eval(root: str = '', *, split: str = 'test', **options) -> ConfigDict:
    """Image<->text R@1/5/10 on Flickr30k's Karpathy split: root/dataset_flickr30k.json and
    root/flickr30k-images/ (1k test images x 5 captions), or explicit `annotations` (a
    Karpathy JSON or a Flickr `.token` file) and `images`. `options`: as
    coco_retrieval_eval."""
    return _retrieval_eval('flickr', root, split=split, **options)


def _dense_eval(
    source: str,
    root: str,
    *,
    split: str,
    background: str,
    threshold: float,
    background_prompts: tuple,
    include_background: bool,
    readout: str = 'value',
    templates: tuple = CLIP_IMAGENET_TEMPLATES,
    num_examples: int = 0,
    batch_size: int = 64,
) -> ConfigDict:
    """Dense zero-shot mIoU: the options every segmentation source takes."""
    return _real_eval(
        'dense_zeroshot',
        source,
        batch_size=batch_size,
        num_examples=num_examples,
        root=root,
        split=split,
        classnames=(),  # (): the source's standard names (input_pipeline/sources/segmentation.py)
        readout=readout,
        background=background,
        threshold=threshold,
        background_prompts=background_prompts,
        templates=tuple(templates),
        include_background=include_background,
    )


def ade20k_eval(root: str = '', *, split: str = 'validation', **options) -> ConfigDict:
    """Dense zero-shot mIoU on ADE20K (root = ADEChallengeData2016): 150 classes, label 0
    not scored. ADE20K has no background class, so the background rule is off: a
    threshold of -2 is below any cosine similarity. `options`: readout, templates,
    num_examples, batch_size (see _dense_eval)."""
    return _dense_eval(
        'ade20k',
        root,
        split=split,
        background='threshold',
        threshold=-2.0,
        background_prompts=(),
        include_background=False,
        **options,
    )


def voc_eval(
    root: str = '',
    *,
    split: str = 'val',
    background: str = 'prompt',
    threshold: float = 0.2,
    **options,
) -> ConfigDict:
    """Dense zero-shot mIoU on Pascal VOC 2012 (root = VOCdevkit/VOC2012): 20 classes +
    background (scored, as VOC's 21-class mIoU), 255 not scored. Background by its own
    prompts, or `background='threshold'` below `threshold`. `options`: as ade20k_eval."""
    return _dense_eval(
        'voc',
        root,
        split=split,
        background=background,
        threshold=threshold,
        background_prompts=VOC_BACKGROUND_PROMPTS,
        include_background=True,
        **options,
    )


# Relative to the mean feature variance; chosen on the validation split (linear_probe.py).
PROBE_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _probe_eval(
    source: str,
    source_fields: dict,
    *,
    num_train: int = 0,
    num_val: int = 1000,
    num_test: int = 0,
    feature: str = 'pooled',
    batch_size: int = 256,
) -> ConfigDict:
    """Linear probe (ridge, strength chosen on val): the options every probe source takes.
    num_val drawn with a fixed seed, then num_train of the rest (0: all); num_test spread
    evenly (0: all). Features: `num_train` x width floats."""
    return _real_eval(
        'linear_probe',
        source,
        batch_size=batch_size,
        **source_fields,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        feature=feature,
        lambdas=PROBE_LAMBDAS,
    )


def folder_probe_eval(root: str = '', test_root: str = '', **options) -> ConfigDict:
    """Linear probe on ImageFolders: train + val drawn from `root`, test from `test_root`.
    `options`: num_train, num_val, num_test, feature, batch_size (see _probe_eval)."""
    return _probe_eval('folder', dict(root=root, test_root=test_root), **options)


def tfds_probe_eval(
    tfds_name: str = '',
    *,
    split: str = 'train',
    test_split: str = 'test',
    data_dir: str = '',
    image_key: str = 'image',
    label_key: str = 'label',
    **options,
) -> ConfigDict:
    """Linear probe on a TFDS classification dataset (ArrayRecord): train + val from `split`,
    test from `test_split`. `options`: as folder_probe_eval."""
    tfds_fields = dict(
        tfds_name=tfds_name,
        split=split,
        test_split=test_split,
        data_dir=data_dir,
        image_key=image_key,
        label_key=label_key,
    )
    return _probe_eval('tfds', tfds_fields, **options)
