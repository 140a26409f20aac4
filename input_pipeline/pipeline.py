"""Config -> the training loader: source, transforms and the fields objectives ask for.

Knows the `input` section of a config and the batch field names, nothing about models.

Caption fields of the batch (built only when an objective asks for them):
  text         (B, context_length) int32: the caption. `input.caption_field`, or,
               when `input.caption_probs` ({field: probability}) is not empty, one of
               those fields drawn per example per epoch (quality captions).
  texts        (B, num_subcaptions, subcaption_context_length) int32: sentences of
               `input.subcaption_field` sampled per example per epoch (DreamLIP).
  texts_valid  (B, num_subcaptions) bool: False for padding rows (a caption with no
               sentence, or fewer than K with `subcaption_fill='pad'`).
"""

from __future__ import annotations

from input_pipeline import captions
from input_pipeline import loader as loader_lib
from input_pipeline import tokenizers, transforms
from input_pipeline.sources import shapes

# Batch fields this pipeline can build, beyond the caption fields below.
RECORD_FIELDS = ('image', 'label', 'shape_label', 'seg', 'instance', 'boxes', 'depth', 'id')
CAPTION_FIELDS = ('text', 'texts', 'texts_valid')

# `input` keys added after configs were first written; configs without them (e.g. a
# config.json of an older run) get the behaviour they had.
_DEFAULTS = dict(
    caption_probs={},
    subcaption_field='long_caption',
    num_subcaptions=6,
    subcaption_context_length=128,
    subcaption_fill='replace',
)


def _get(input_config, key):
    return input_config.get(key, _DEFAULTS[key])


def make_source(input_config, *, split: str = 'train', seed: int = 0):
    if input_config.source != 'shapes':
        raise ValueError(f"unknown input.source '{input_config.source}'; valid: shapes")
    return shapes.ShapesSource(
        split=split,
        seed=seed,
        image_size=input_config.image_size,
        max_objects=input_config.max_objects,
        num_records=input_config.epoch_size if split == 'train' else None,
    )


def make_tokenizer(input_config):
    return tokenizers.ByteTokenizer(input_config.context_length)


def caption_probs(input_config) -> dict[str, float]:
    """{field: probability} of the `text` caption; {caption_field: 1} when none are set.

    `input.caption_probs` is a dict (a ConfigDict once in the config): the command line
    can change the probability of a listed field (`--config.input.caption_probs.alt_text=0`)
    but not add a field, so a config lists every field it may want, zeros included.
    """
    probs = dict(_get(input_config, 'caption_probs').items())
    if not probs:
        return {input_config.caption_field: 1.0}
    return captions.check_probabilities(probs, 'input.caption_probs')


def caption_source_fields(input_config, fields) -> list[str]:
    """The record fields the caption transforms for `fields` read."""
    needed = []
    if 'text' in fields:
        needed += list(caption_probs(input_config))
    if {'texts', 'texts_valid'} & set(fields):
        needed.append(_get(input_config, 'subcaption_field'))
    return list(dict.fromkeys(needed))


def record_transforms(input_config, fields) -> list:
    """Builds `text` / `texts` / `texts_valid` as asked, then keeps only `fields`."""
    unknown = sorted(set(fields) - set(RECORD_FIELDS) - set(CAPTION_FIELDS))
    if unknown:
        raise ValueError(
            f'objectives ask for batch fields {unknown} that input '
            f"'{input_config.source}' cannot build; it builds: "
            f"{', '.join(RECORD_FIELDS + CAPTION_FIELDS)}"
        )
    steps = []
    if 'text' in fields:
        probs = caption_probs(input_config)
        if len(probs) == 1:  # one field: no random draw, exactly the plain pipeline
            field = next(iter(probs))
        else:
            choice = captions.ChooseCaption(probs)
            steps.append(choice)
            field = choice.out_key
        steps.append(transforms.Tokenize(field, make_tokenizer(input_config), out_key='text'))
    if {'texts', 'texts_valid'} & set(fields):
        steps.append(
            captions.SampleSubcaptions(
                tokenizer=tokenizers.ByteTokenizer(_get(input_config, 'subcaption_context_length')),
                k=_get(input_config, 'num_subcaptions'),
                field=_get(input_config, 'subcaption_field'),
                fill=_get(input_config, 'subcaption_fill'),
                out_key='texts',
                valid_key='texts_valid',
            )
        )
    steps.append(transforms.SelectFields(tuple(fields)))
    return steps


def check_record_fields(source, names, *, source_name: str) -> None:
    """One-line error at start for a configured field the source's records lack."""
    if not names:
        return
    record = source[0]
    missing = [n for n in names if n not in record]
    if missing:
        text_like = sorted(k for k, v in record.items() if isinstance(v, (str, bytes)))
        raise ValueError(
            f"input names caption field(s) {missing} that '{source_name}' records "
            f"do not have; their text fields: {', '.join(text_like)}"
        )


def train_loader(config, *, fields, process_index: int = 0, process_count: int = 1):
    inp = config.input
    source = make_source(inp, split='train', seed=config.seed)
    steps = record_transforms(inp, fields)  # validates fields and probabilities first
    check_record_fields(source, caption_source_fields(inp, fields), source_name=inp.source)
    return loader_lib.make_loader(
        source,
        steps,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=inp.num_threads,
        prefetch=inp.prefetch,
        max_bad_fraction=inp.max_bad_fraction,
    )
