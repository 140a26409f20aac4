"""A training config with real-data evaluators instead of the shapes ones.

The argument names the training config, so the model matches the checkpoint: the run's
workdir (its config.json: overrides included), or a config in configs/ with its variant.
Pick datasets with --only and give their roots:

python -m pretrain.evaluate --config configs/eval_real.py:DIR --workdir DIR \\
    --only imagenet,coco,ade20k \\
    --config.evals.imagenet.root=/data/imagenet/val \\
    --config.evals.coco.root=/data/coco \\
    --config.evals.ade20k.root=/data/ADEChallengeData2016
python -m pretrain.evaluate --config configs/eval_real.py:clip:b16 --workdir DIR --only coco \\
    --config.evals.coco.root=/data/coco

Evaluators (configs/common.py has the helper behind each; sources in build.py's doc):
  imagenet  zero-shot on an ImageFolder (root/<class>/<image>); ImageNet's folders are
            WordNet ids, so give readable names too: --config.evals.imagenet.classnames=...
  cifar10   zero-shot on a TFDS dataset (`tfds_name`, `split`, `data_dir`; ArrayRecord)
  imagenet_probe  linear probe: train + val from `root` (ImageNet train: set num_train,
            e.g. 100k), test from `test_root`
  cifar10_probe   linear probe on TFDS cifar10 (train: 50k, val drawn from it; test: 10k)
  coco      retrieval on COCO val2017 captions (5k images, 25k captions)
  flickr30k retrieval on Flickr30k's Karpathy 1k test split
  ade20k    dense zero-shot mIoU, 150 classes
  voc       dense zero-shot mIoU, Pascal VOC 2012 val, 20 classes + background
Every evaluator named in --only must have its root set; the build fails in one line on a
missing or empty one. To evaluate on real data during training, write a config that adds
these helpers' sections to `config.evals` (e.g. config.evals.coco =
common.coco_retrieval_eval('/data/coco')).
"""

import json
import os

from ml_collections import ConfigDict

from configs import common

# Documented arguments (tests build each); any training config file and variant works.
VARIANTS = ('clip', 'clip:b16')


def load_training_config(arg: str) -> ConfigDict:
    """A workdir or its config.json; else 'name[:variant]' of configs/, or a path."""
    from pretrain import config_cli

    json_path = os.path.join(arg, 'config.json') if os.path.isdir(arg) else arg
    if json_path.endswith('.json'):
        if not os.path.isfile(json_path):
            raise ValueError(f"no training config '{json_path}'")
        with open(json_path) as f:
            return ConfigDict(json.load(f))
    name, _, variant = arg.partition(':')
    path = name if name.endswith('.py') else os.path.join(os.path.dirname(__file__), f'{name}.py')
    return config_cli.load_config_file(f'{path}:{variant}' if variant else path)


def get_config(arg: str | None = None):
    if not arg:
        raise ValueError(
            'name the training config, e.g. configs/eval_real.py:clip or '
            'configs/eval_real.py:clip:b16'
        )
    config = load_training_config(arg)
    config.evals = dict(
        imagenet=common.folder_zeroshot_eval(),
        cifar10=common.tfds_zeroshot_eval('cifar10'),
        imagenet_probe=common.folder_probe_eval(num_train=100_000),
        cifar10_probe=common.tfds_probe_eval('cifar10'),
        coco=common.coco_retrieval_eval(),
        flickr30k=common.flickr_retrieval_eval(),
        ade20k=common.ade20k_eval(),
        voc=common.voc_eval(),
    )
    return config
