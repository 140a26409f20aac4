"""A TFDS dataset prepared in ArrayRecord format, read with `tfds.data_source`.

    source = TfdsSource('coco_captions', split='train', data_dir='/data/tfds',
                        fields={'image': 'image', 'caption': 'captions/text'})

`tfds.data_source` reads ArrayRecord shards by random access with no TensorFlow
(checked by the tests: `tensorflow` is not importable in the dev venv). The dataset
must already be prepared with `file_format='array_record'` (`tfds build
--file_format=array_record`, or a builder's `download_and_prepare`); TFRecord-only
datasets have no random access. Preparing needs no TensorFlow either when a builder
yields images already encoded (bytes or a file path); encoding numpy images needs it.

Images. TFDS stores images encoded (PNG/JPEG) and decodes them on read; the image
field is read with `tfds.decode.SkipDecoding()` instead, so records carry the encoded
bytes like every other source and go through the same decode + crop transform (one
decode, at the size the crop needs, instead of a full-size one here).

`fields` maps record names to feature paths, `/` between levels (`captions/text`). A
path ending at a list (COCO's five captions) gives its first element, or the one an
integer last component names (`captions/text/2`). Text comes back as str, numpy
scalars (class labels) as int. An unknown path is an error at start, listing the
dataset's feature paths.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FIELDS = {'image': 'image', 'caption': 'caption'}


def _feature_paths(features, prefix: str = '') -> list[str]:
    """Every path of a FeaturesDict, nested dicts and sequences of dicts included."""
    import tensorflow_datasets as tfds

    out = []
    if isinstance(features, tfds.features.Sequence):
        features = features.feature
    if isinstance(features, tfds.features.FeaturesDict):
        for name in features.keys():
            path = f'{prefix}{name}'
            out.append(path)
            out += _feature_paths(features[name], path + '/')
    return out


def _split_path(path: str) -> list[str]:
    parts = path.split('/')
    return parts[:-1] if parts[-1].isdigit() else parts


def _lookup(example, path: str):
    parts = path.split('/')
    position = int(parts.pop()) if parts[-1].isdigit() else None
    value = example
    for part in parts:
        value = value[part]
    if isinstance(value, (list, tuple, np.ndarray)) and not (
        isinstance(value, np.ndarray) and value.ndim == 0
    ):
        if len(value) <= (position or 0):
            raise ValueError(f'field {path!r} has {len(value)} element(s)')
        value = value[position or 0]
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class TfdsSource:
    """Random-access records of a prepared TFDS dataset; see the module doc.

    Args:
      name: the TFDS name, optionally with config and version (`coco_captions/2017:1.0.0`).
      split: a TFDS split expression (`train`, `train[:90%]`).
      data_dir: the TFDS data dir; '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      fields: record name -> feature path; must include 'image'.
    """

    def __init__(self, name: str, *, split: str = 'train', data_dir: str = '', fields=None):
        import tensorflow_datasets as tfds

        fields = dict(fields or DEFAULT_FIELDS)
        if 'image' not in fields:
            raise ValueError(f'tfds source: fields {fields} must map an `image` field')
        self.name, self.split, self.fields = name, split, fields
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except Exception as e:  # tfds raises several types, with multi-line messages
            raise ValueError(
                f'tfds source: no dataset {name!r} in data_dir {data_dir!r}: '
                f'{str(e).splitlines()[0]}'
            ) from None
        features = builder.info.features
        known = _feature_paths(features)
        for record_name, path in fields.items():
            if '/'.join(_split_path(path)) not in known:
                raise ValueError(
                    f'tfds source {name!r}: unknown feature path {path!r} for field '
                    f'{record_name!r}; the dataset has: {", ".join(known)}'
                )
        image_parts = _split_path(fields['image'])
        image_feature = features
        for part in image_parts:
            image_feature = image_feature[part]
        if not isinstance(image_feature, tfds.features.Image):
            raise ValueError(
                f'tfds source {name!r}: field image -> {fields["image"]!r} is a '
                f'{type(image_feature).__name__}, not an Image feature'
            )
        # {'image': SkipDecoding()} or nested for `a/b`: the encoded bytes come back.
        decoders = tfds.decode.SkipDecoding()
        for part in reversed(image_parts):
            decoders = {part: decoders}
        try:
            # download=False: no network at run time; an unprepared dataset is an error here.
            self._data = tfds.data_source(
                name, split=split, data_dir=data_dir or None, decoders=decoders, download=False
            )
        except Exception as e:
            raise ValueError(
                f'tfds source: cannot open {name!r} split {split!r} (data_dir {data_dir!r}; '
                f'prepared with file_format=array_record?): {str(e).splitlines()[0]}'
            ) from None
        if len(self._data) == 0:
            raise ValueError(f'tfds source: no records in {name!r} split {split!r}')

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f'TfdsSource({self.name!r}, split={self.split!r}, records={len(self)})'

    def __getitem__(self, index: int) -> dict:
        example = self._data[int(index)]
        record = {}
        for record_name, path in self.fields.items():
            value = _lookup(example, path)
            if isinstance(value, bytes) and record_name != 'image':
                value = value.decode('utf-8')  # TFDS Text is UTF-8 bytes
            record[record_name] = value
        record['id'] = int(index)
        return record
