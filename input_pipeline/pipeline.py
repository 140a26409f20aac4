"""Config -> the training loader: source, transforms and the fields objectives ask for.

Knows the `input` section of a config and the batch field names, nothing about models.

Sources. `input.source` names the format: 'shapes' (the embedded default, options at
the top of `input`) or a real-data format whose options are `input.data`
(configs/common.py: jsonl_data, csv_data, webdataset_data, array_record_data,
tfds_data, coco_data, and mixture_input for several with weights). Real sources give encoded
image bytes; for training they are decoded straight into a random resized crop at
`input.image_size` (`input.crop_scale`, `input.crop_ratio`) and flipped when
`input.flip`. Shapes images are already arrays at their size and go through as they are.
A missing path, an empty dataset, an unreadable start of the data or a caption field
the records lack is a ValueError here, at start, naming it.

Caption fields of the batch (built only when an objective asks for them):
  text         (B, context_length) int32: the caption. `input.caption_field`, or,
               when `input.caption_probs` ({field: probability}) is not empty, one of
               those fields drawn per example per epoch (quality captions).
  texts        (B, num_subcaptions, subcaption_context_length) int32: sentences of
               `input.subcaption_field` sampled per example per epoch (DreamLIP).
  texts_valid  (B, num_subcaptions) bool: False for padding rows (a caption with no
               sentence, or fewer than K with `subcaption_fill='pad'`).

View fields (input_pipeline/views.py; built only when an objective asks for them, with the
options of `input.views`, configs/common.py:views_options):
  view1, view2      (B, S, S, 3) uint8: two random resized crops of the original image
                    (S = views.size, 0: input.image_size), each flipped with views.flip_p;
  coords1, coords2  (B, 4) float32: (y0, x0, y1, x1) of each view in original pixels;
  flip1, flip2      (B,) bool: whether that view was flipped (PixPro, pixel contrast).
  rot_image         (B, H, W, 3) uint8 `image` turned rot_label x 90 degrees, rot_label (B,)
                    int32 (views.rotations='random'); 'all': (B, 4, H, W, 3) and (B, 4).
  mask              (B, H/p, W/p) bool block-wise patch mask (BEiT) of views.mask_ratio,
                    p = views.mask_patch_size (must be the model's patch size).
The two views are cut from the record's image as read (encoded bytes for real data), so
they see the whole original image, not the training crop; rotations and the mask go with
the training `image` (image_size, after decode + crop).
"""

from __future__ import annotations

from input_pipeline import captions
from input_pipeline import loader as loader_lib
from input_pipeline import tokenizers, transforms, views
from input_pipeline.sources import array_record, coco, folder, mixture, shapes, tfds, webdataset

# Batch fields this pipeline can build, beyond the caption fields below.
RECORD_FIELDS = ('image', 'label', 'shape_label', 'seg', 'instance', 'boxes', 'depth', 'id')
CAPTION_FIELDS = ('text', 'texts', 'texts_valid', *captions.PACKED_FIELDS)
TWO_VIEW_FIELDS = ('view1', 'view2', 'coords1', 'coords2', 'flip1', 'flip2')
ROTATION_FIELDS = ('rot_image', 'rot_label')
VIEW_FIELDS = TWO_VIEW_FIELDS + ROTATION_FIELDS + ('mask',)
BUILT_FIELDS = RECORD_FIELDS + CAPTION_FIELDS + VIEW_FIELDS

# `input` keys added after configs were first written; configs without them (e.g. a
# config.json of an older run) get the behaviour they had.
_DEFAULTS = dict(
    caption_probs={},
    subcaption_field='long_caption',
    num_subcaptions=6,
    subcaption_context_length=128,
    subcaption_fill='replace',
    packed_length=0,
    tokenizer='bytes',
    tokenizer_path='',
)

# input.source -> the source class of input.data's options (keyword arguments).
DATA_SOURCES = {
    'jsonl': folder.JsonlSource,
    'csv': folder.CsvSource,
    'webdataset': webdataset.WebDatasetSource,
    'array_record': array_record.ArrayRecordSource,
    'tfds': tfds.TfdsSource,
    'coco': coco.CaptionedImages,  # COCO captions JSON, Karpathy splits, Flickr tokens
}
# A record that cannot be read at start is tried on the next ones, up to this many: a
# few bad records are normal, a run of them means a wrong path or image root.
_START_RECORDS = 10


class InputError(ValueError):
    """A config or data problem found at start (path, field, tokenizer): one line to print."""


def _get(input_config, key):
    return input_config.get(key, _DEFAULTS[key])


def make_source(input_config, *, split: str = 'train', seed: int = 0):
    """The configured source (real sources read what `input.data` names; split is shapes')."""
    kind = input_config.source
    if kind == 'shapes':
        return shapes.ShapesSource(
            split=split,
            seed=seed,
            image_size=input_config.image_size,
            max_objects=input_config.max_objects,
            num_records=input_config.epoch_size if split == 'train' else None,
        )
    return make_data_source(kind, _plain(input_config.data), where='input.data')


def _plain(section) -> dict:
    return section.to_dict() if hasattr(section, 'to_dict') else dict(section)


def unknown_source(kind: str) -> ValueError:
    return ValueError(
        f"unknown input.source '{kind}'; valid: shapes, mixture, {', '.join(DATA_SOURCES)}"
    )


def make_data_source(kind: str, options: dict, *, where: str):
    """A real-data source of format `kind` built from its options (see configs/common.py)."""
    if kind == 'mixture':
        components, weights = {}, {}
        for name, part in options['components'].items():
            part = dict(part)
            weights[name] = part.pop('weight')
            components[name] = make_data_source(
                part.pop('source'), part, where=f'{where}.components.{name}'
            )
        return mixture.MixtureSource(components, weights, num_records=options['num_records'])
    if kind not in DATA_SOURCES:
        raise unknown_source(kind)
    try:
        return DATA_SOURCES[kind](**options)
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None


def make_tokenizer(input_config, context_length: int | None = None):
    """`input.tokenizer` at `context_length` (default `input.context_length`) tokens."""
    return tokenizers.make_tokenizer(
        _get(input_config, 'tokenizer'),
        context_length or input_config.context_length,
        _get(input_config, 'tokenizer_path'),
    )


def image_transforms(input_config) -> list:
    """Training image transforms: decode + random resized crop (+ flip) for real data."""
    if input_config.source == 'shapes':
        return []  # rendered at image_size, and a flip would falsify "left of" captions
    steps = [
        transforms.DecodeRandomResizedCrop(
            input_config.image_size,
            scale=tuple(input_config.crop_scale),
            ratio=tuple(input_config.crop_ratio),
        )
    ]
    if input_config.flip:
        steps.append(transforms.RandomFlip())
    return steps


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


def extra_text_fields(fields) -> list[str]:
    """Asked-for fields the pipeline does not build: record text fields, tokenized as `text`
    is, under their own name (an objective's `text_field='alt_text'`)."""
    return [f for f in fields if f not in BUILT_FIELDS]


def caption_source_fields(input_config, fields) -> list[str]:
    """The record fields the caption transforms for `fields` read."""
    needed = extra_text_fields(fields)
    if 'text' in fields:
        needed += list(caption_probs(input_config))
    if {'texts', 'texts_valid'} & set(fields):
        needed.append(_get(input_config, 'subcaption_field'))
    return list(dict.fromkeys(needed))


def _views_options(input_config):
    options = input_config.get('views')
    if options is None:
        raise ValueError(
            'objectives ask for view fields but the config has no input.views; '
            'add views=common.views_options() to its input section'
        )
    return options


def view_transforms(input_config, fields) -> tuple[list, list]:
    """(steps before the image decode, steps after it) that build the view fields asked for."""
    fields = set(fields)
    before, after = [], []
    if not fields & set(VIEW_FIELDS):
        return before, after
    options = _views_options(input_config)
    if fields & set(TWO_VIEW_FIELDS):
        jitter = tuple(options.colour_jitter)  # (brightness, contrast, saturation)
        before.append(
            views.TwoViews(
                size=options.size or input_config.image_size,
                scale=tuple(options.scale),
                ratio=tuple(options.ratio),
                flip_p=options.flip_p,
                colour_jitter=(
                    transforms.ColourJitter(*jitter, p=options.colour_jitter_p)
                    if any(jitter)
                    else None
                ),
            )
        )
    if fields & set(ROTATION_FIELDS):
        rotations = {'random': views.RandomRotation, 'all': views.AllRotations}
        if options.rotations not in rotations:
            raise ValueError(
                f"input.views.rotations '{options.rotations}' is not one of: random, all"
            )
        after.append(rotations[options.rotations]())
    if 'mask' in fields:
        patch, size = options.mask_patch_size, input_config.image_size
        if patch < 1 or size % patch:
            raise ValueError(
                f'input.views.mask_patch_size {patch} does not divide input.image_size {size}'
            )
        after.append(
            views.BlockMask(
                grid=(size // patch, size // patch),
                ratio=options.mask_ratio,
                min_block=options.mask_min_block,
                min_aspect=options.mask_min_aspect,
            )
        )
    return before, after


def record_transforms(input_config, fields) -> list:
    """Builds the view and caption fields as asked, then keeps only `fields`."""
    # TwoViews reads record['image'] as read (encoded bytes for real data), so it runs
    # before the decode + crop replaces it; rotations and the mask follow the crop.
    before, after = view_transforms(input_config, fields)
    steps = list(before)
    if {'image', 'rot_image'} & set(fields):
        steps += image_transforms(input_config)
    steps += after
    extra_texts = extra_text_fields(fields)
    # One tokenizer (a file to load for sentencepiece / hf) for every text of `text`'s length.
    tokenizer = make_tokenizer(input_config) if 'text' in fields or extra_texts else None
    if 'text' in fields and input_config.source == 'coco':
        # Five captions an image: `caption` is redrawn among them every epoch.
        steps.append(coco.SampleCaption())
    if 'text' in fields:
        probs = caption_probs(input_config)
        if len(probs) == 1:  # one field: no random draw, exactly the plain pipeline
            field = next(iter(probs))
        else:
            choice = captions.ChooseCaption(probs)
            steps.append(choice)
            field = choice.out_key
        steps.append(transforms.Tokenize(field, tokenizer, out_key='text'))
    if {'texts', 'texts_valid'} & set(fields):
        steps.append(
            captions.SampleSubcaptions(
                tokenizer=make_tokenizer(
                    input_config, _get(input_config, 'subcaption_context_length')
                ),
                k=_get(input_config, 'num_subcaptions'),
                field=_get(input_config, 'subcaption_field'),
                fill=_get(input_config, 'subcaption_fill'),
                out_key='texts',
                valid_key='texts_valid',
            )
        )
    if set(captions.PACKED_FIELDS) & set(fields):
        length = _get(input_config, 'packed_length')
        if not {'text', 'texts', 'texts_valid'} <= set(fields) or length < 1:
            raise ValueError(
                'packed texts need the text, texts and texts_valid fields and '
                f'input.packed_length >= 1 (got {length})'
            )
        steps.append(captions.PackTexts(length, pad_id=tokenizer.pad_id))
    for field in extra_texts:  # e.g. a second CLIP term on 'alt_text'
        steps.append(transforms.Tokenize(field, tokenizer, out_key=field))
    steps.append(transforms.SelectFields(tuple(fields)))
    return steps


def first_record(source, *, source_name: str) -> dict:
    """The first readable record; ValueError at start when none of the first few reads."""
    errors = []
    for index in range(min(len(source), _START_RECORDS)):
        try:
            return source[index]
        except Exception as e:  # reported below, with the others
            errors.append(f'record {index}: {type(e).__name__}: {e}')
    raise ValueError(
        f"input '{source_name}': none of the first {len(errors)} records can be read "
        f"(wrong path or image root?); {errors[0]}"
    )


def check_record_fields(source, names, *, source_name: str) -> None:
    """One-line error at start for a configured field the source's records lack."""
    # A mixture's components are checked one by one: each must have the fields.
    parts = (
        zip(source.names, source.components)
        if isinstance(source, mixture.MixtureSource)
        else [(source_name, source)]
    )
    for part_name, part in parts:
        record = first_record(part, source_name=part_name)
        text_like = sorted(k for k, v in record.items() if isinstance(v, (str, bytes)))
        missing = [n for n in names if n not in text_like]
        if missing:
            raise ValueError(
                f"the input's captions or objectives name text field(s) {missing} that "
                f"'{part_name}' records do not have; their text fields: {', '.join(text_like)}; "
                f"and the pipeline builds: {', '.join(BUILT_FIELDS)}"
            )


def check_vocab_size(config, tokenizer) -> None:
    """The text tower's embedding must hold every id the tokenizer gives, and the tower must
    know which id is padding (it masks padding and finds the EOS position by it)."""
    model = config.get('model')
    text = model.get('text') if model else None
    if text is None:
        return
    name = _get(config.input, 'tokenizer')
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"input.tokenizer '{name}' has vocab_size "
            f"{tokenizer.vocab_size} > model.text.vocab_size {text.vocab_size}; set "
            f"--config.model.text.vocab_size={tokenizer.vocab_size}"
        )
    if text.get('pad_id', 0) != tokenizer.pad_id:
        raise ValueError(
            f"input.tokenizer '{name}' pads with id {tokenizer.pad_id} but "
            f"model.text.pad_id is {text.get('pad_id', 0)}; set "
            f"--config.model.text.pad_id={tokenizer.pad_id}"
        )


def check_context_length(config, fields) -> None:
    """Token rows longer than the text tower's position table would fail inside the step."""
    model = config.get('model')
    text = model.get('text') if model else None
    if text is None:
        return
    lengths = {}
    if 'text' in fields or extra_text_fields(fields):
        lengths['input.context_length'] = config.input.context_length
    if 'texts' in fields:
        lengths['input.subcaption_context_length'] = _get(config.input, 'subcaption_context_length')
    packed = _get(config.input, 'packed_length')
    if set(captions.PACKED_FIELDS) & set(fields) and packed < config.input.context_length:
        raise ValueError(  # else a long caption would not fit its packed row
            f'input.packed_length {packed} < input.context_length '
            f'{config.input.context_length}: every caption must fit'
        )
    for key, length in lengths.items():
        if length > text.context_length:
            raise ValueError(
                f'{key} {length} > model.text.context_length {text.context_length}; set '
                f'--config.model.text.context_length={length}'
            )


def check_mask_patch_size(config, fields) -> None:
    """The MIM mask has one cell per patch of the image tower."""
    model = config.get('model')
    image = model.get('image') if model else None
    if 'mask' in fields and image is not None:
        mine = config.input.views.mask_patch_size
        if mine != image.patch:
            raise ValueError(
                f'input.views.mask_patch_size {mine} != model.image.patch {image.patch}; set '
                f'--config.input.views.mask_patch_size={image.patch}'
            )


def train_loader(config, *, fields, process_index: int = 0, process_count: int = 1):
    """This process's loader of the configured data; InputError names a bad path or field."""
    inp = config.input
    try:
        if inp.source not in ('shapes', 'mixture', *DATA_SOURCES):  # before its options are read
            raise unknown_source(inp.source)
        steps = record_transforms(inp, fields)  # validates fields and probabilities first
        check_vocab_size(config, make_tokenizer(inp))
        check_context_length(config, fields)
        check_mask_patch_size(config, fields)
        source = make_source(inp, split='train', seed=config.seed)
        check_record_fields(source, caption_source_fields(inp, fields), source_name=inp.source)
    except ValueError as e:
        raise InputError(str(e)) from e
    return loader_lib.make_loader(
        source,
        steps,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=inp.num_threads,
        prefetch=inp.prefetch,
        num_workers=inp.get('num_workers', 0),
        max_bad_fraction=inp.max_bad_fraction,
    )
