"""CLIP on your own image-text data: a folder + JSONL / CSV, webdataset shards, ArrayRecord,
TFDS, COCO captions, or a weighted mixture of them. The variant names the format; point
it at the data with --config.input.data.* (configs/common.py documents each format).

python -m pretrain.main --config configs/clip_data.py:jsonl --workdir /tmp/run \\
    --config.input.data.path=/data/captions.jsonl --config.input.data.image_root=/data/images
python -m pretrain.main --config configs/clip_data.py:csv --workdir /tmp/run \\
    --config.input.data.path=/data/train.tsv          # open_clip's filepath / title columns
python -m pretrain.main --config configs/clip_data.py:webdataset --workdir /tmp/run \\
    --config.input.data.urls='/data/cc3m/{00000..00331}.tar'
python -m pretrain.main --config configs/clip_data.py:array_record --workdir /tmp/run \\
    --config.input.data.paths=/data/cc3m_ar           # written by python -m input_pipeline.convert
python -m pretrain.main --config configs/clip_data.py:tfds --workdir /tmp/run \\
    --config.input.data.data_dir=/data/tfds
python -m pretrain.main --config configs/clip_data.py:coco --workdir /tmp/run \\
    --config.input.data.annotations=/data/coco/annotations/captions_train2017.json \\
    --config.input.data.images=/data/coco/train2017
python -m pretrain.main --config configs/clip_data.py:mixture --workdir /tmp/run \\
    --config.input.data.components.web.urls='/data/cc12m/{00000..01242}.tar' \\
    --config.input.data.components.curated.path=/data/curated.jsonl

The model is CLIP ViT-B/16 at 224 (configs/clip.py:b16) with a CC3M-sized schedule:
20k steps x 1024 = 20M samples, ~7 epochs of CC3M. Evaluators are off (the shapes ones
measure nothing on real data).
"""

from ml_collections import ConfigDict

from configs import clip, common

VARIANTS = ('jsonl', 'csv', 'webdataset', 'array_record', 'tfds', 'coco', 'mixture')


def data_section(variant: str) -> ConfigDict:
    """The `input` section of a variant; the paths are placeholders to override."""
    sizes = dict(image_size=224, context_length=77)
    if variant == 'jsonl':
        return common.real_input(common.jsonl_data('/data/captions.jsonl'), **sizes)
    if variant == 'csv':
        return common.real_input(common.csv_data('/data/train.tsv'), **sizes)
    if variant == 'webdataset':
        return common.real_input(common.webdataset_data('/data/{00000..00009}.tar'), **sizes)
    if variant == 'array_record':
        return common.real_input(common.array_record_data('/data/array_record'), **sizes)
    if variant == 'tfds':
        # The first of COCO's five captions per image; another: 'captions/text/2'.
        data = common.tfds_data(
            'coco_captions', fields={'image': 'image', 'caption': 'captions/text'}
        )
        return common.real_input(data, **sizes)
    if variant == 'coco':
        data = common.coco_data(
            '/data/coco/annotations/captions_train2017.json', '/data/coco/train2017'
        )
        return common.real_input(data, **sizes)
    # 90% web alt-text, 10% a curated set: weights are per example, not per dataset.
    return common.mixture_input(
        {
            'web': common.webdataset_data('/data/web/{00000..00009}.tar'),
            'curated': common.jsonl_data('/data/curated.jsonl'),
        },
        weights={'web': 0.9, 'curated': 0.1},
        **sizes,
    )


def get_config(arg: str | None = None):
    variant = arg or 'jsonl'
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    config = common.base_config(total_steps=20_000, batch_size=1024)
    config.model = clip.get_config('b16').model  # the model of the real-scale CLIP run
    config.optim = common.optim_config(lr=5e-4, warmup_steps=1_000, weight_decay=0.2)
    config.input = data_section(variant)
    config.checkpoint.every = 1_000
    config.log_every = 50
    config.eval_every = 0
    config.evals = ConfigDict()
    config.objectives = {'clip': {'weight': 1.0}}
    return config
