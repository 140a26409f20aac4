"""Config -> the training loader: source, transforms and the fields objectives ask for.

Knows the `input` section of a config and the batch field names, nothing about models.
"""

from __future__ import annotations

from input_pipeline import loader as loader_lib
from input_pipeline import tokenizers, transforms
from input_pipeline.sources import shapes

# Batch fields this pipeline can build, beyond `text` (the tokenized caption field).
RECORD_FIELDS = ('image', 'label', 'shape_label', 'seg', 'instance', 'boxes', 'depth', 'id')


def make_source(input_config, *, split: str = 'train', seed: int = 0):
    if input_config.source != 'shapes':
        raise ValueError(f"unknown input.source '{input_config.source}'; valid: shapes")
    return shapes.ShapesSource(
            split=split, seed=seed, image_size=input_config.image_size,
            max_objects=input_config.max_objects,
            num_records=input_config.epoch_size if split == 'train' else None)


def make_tokenizer(input_config):
    return tokenizers.ByteTokenizer(input_config.context_length)


def record_transforms(input_config, fields) -> list:
    """Tokenizes the configured caption field into `text`, then keeps only `fields`."""
    unknown = sorted(set(fields) - set(RECORD_FIELDS) - {'text'})
    if unknown:
        raise ValueError(f'objectives ask for batch fields {unknown} that input '
                                          f"'{input_config.source}' cannot build; it builds: "
                                          f"{', '.join(RECORD_FIELDS + ('text',))}")
    steps = []
    if 'text' in fields:
        steps.append(transforms.Tokenize(input_config.caption_field, make_tokenizer(input_config),
                                                                          out_key='text'))
    steps.append(transforms.SelectFields(tuple(fields)))
    return steps


def train_loader(config, *, fields, process_index: int = 0, process_count: int = 1):
    inp = config.input
    return loader_lib.make_loader(
            make_source(inp, split='train', seed=config.seed),
            record_transforms(inp, fields),
            global_batch_size=config.batch_size, seed=config.seed,
            process_index=process_index, process_count=process_count,
            num_threads=inp.num_threads, prefetch=inp.prefetch,
            max_bad_fraction=inp.max_bad_fraction)
