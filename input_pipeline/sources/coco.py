"""Images with several captions each: COCO captions JSON, Karpathy split JSON, Flickr token file.

COCO (`annotations/captions_val2017.json` next to the `val2017/` image folder):

    {"images": [{"id": 139, "file_name": "000000000139.jpg", ...}, ...],
     "annotations": [{"id": 1, "image_id": 139, "caption": "A woman ..."}, ...]}

Karpathy splits (`dataset_coco.json`, `dataset_flickr30k.json`: the 5k / 1k test sets
retrieval papers report on):

    {"images": [{"filename": "1000092795.jpg", "filepath": "val2014" (COCO only),
                 "split": "test", "imgid": 0, "sentences": [{"raw": "Two young ..."}, ...]}]}

Flickr8k / Flickr30k token files (`results_20130124.token`, `Flickr8k.token.txt`):

    1000092795.jpg#0<TAB>Two young guys with shaggy hair ...

Records: `image` the file's encoded bytes, `captions` every caption of the image (file
order), `caption` the first of them, `id` the image id (COCO / Karpathy) or file name,
`image_path`. Training that should see another caption every epoch adds `SampleCaption`
(below), which overwrites `caption` with one of `captions` drawn per example per epoch;
evaluation (retrieval) uses all of `captions`.

Images without any caption are left out (COCO's caption files hold none, but a filtered
file might). Captions are stripped of surrounding whitespace (COCO has trailing spaces and
newlines).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np

from input_pipeline import transforms


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    path: str  # relative to the image folder
    captions: tuple[str, ...]
    id: int | str


def read_coco(annotations: str) -> list[CaptionedImage]:
    data = _load_json(annotations)
    if not isinstance(data, dict) or 'images' not in data or 'annotations' not in data:
        raise ValueError(
            f"'{annotations}' is not a COCO captions file (needs 'images' and 'annotations')"
        )
    captions = collections.defaultdict(list)
    for ann in data['annotations']:
        if 'caption' not in ann:
            raise ValueError(f"'{annotations}': annotation {ann.get('id')} has no 'caption'")
        captions[ann['image_id']].append(ann['caption'].strip())
    return [
        CaptionedImage(image['file_name'], tuple(captions[image['id']]), image['id'])
        for image in data['images']
        if captions[image['id']]
    ]


def read_karpathy(annotations: str, split: str) -> list[CaptionedImage]:
    data = _load_json(annotations)
    if not isinstance(data, dict) or 'images' not in data:
        raise ValueError(f"'{annotations}' is not a Karpathy split file (needs 'images')")
    splits = sorted({image.get('split', '') for image in data['images']})
    items = [
        CaptionedImage(
            os.path.join(image.get('filepath', ''), image['filename']),
            tuple(s['raw'].strip() for s in image['sentences']),
            image.get('cocoid', image.get('imgid', image['filename'])),
        )
        for image in data['images']
        if image.get('split') == split and image['sentences']
    ]
    if not items:
        raise ValueError(f"'{annotations}' has no images in split '{split}'; splits: {splits}")
    return items


def read_flickr_tokens(annotations: str) -> list[CaptionedImage]:
    """`name.jpg#k<TAB>caption` lines, grouped by image in first-seen order."""
    captions: dict[str, list[str]] = {}
    with open(annotations, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, caption = line.rstrip('\n').partition('\t')
            if not sep:
                raise ValueError(
                    f"'{annotations}' line {number}: expected 'image.jpg#k<TAB>caption'"
                )
            captions.setdefault(key.split('#')[0], []).append(caption.strip())
    return [CaptionedImage(name, tuple(caps), name) for name, caps in captions.items()]


def read_captions(annotations: str, *, split: str = 'test') -> list[CaptionedImage]:
    """Any of the three layouts, told apart by content (split: Karpathy files only)."""
    if not os.path.isfile(annotations):
        raise ValueError(f"captions file: no such file '{annotations}'")
    if not annotations.endswith('.json'):
        return read_flickr_tokens(annotations)
    data = _load_json(annotations)
    first = (data.get('images') or [{}])[0] if isinstance(data, dict) else {}
    return read_karpathy(annotations, split) if 'sentences' in first else read_coco(annotations)


def _load_json(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"captions file: no such file '{path}'")
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None


class CaptionedImages:
    """Random-access records of images with several captions; see the module doc.

    `annotations`: a COCO captions JSON, a Karpathy split JSON (of `split`) or a Flickr
    token file; `images`: the folder their image paths are relative to.
    """

    def __init__(self, annotations: str, images: str, *, split: str = 'test'):
        if not os.path.isdir(images):
            raise ValueError(f"image folder: no such directory '{images}'")
        self.items = read_captions(annotations, split=split)
        if not self.items:
            raise ValueError(f"'{annotations}' has no captioned images")
        self.images = images

    def __len__(self) -> int:
        return len(self.items)

    def captions(self, index: int) -> tuple[str, ...]:
        """The captions of record `index` without reading its image."""
        return self.items[index].captions

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        with open(os.path.join(self.images, item.path), 'rb') as f:
            image = f.read()
        return {
            'image': image,
            'captions': list(item.captions),
            'caption': item.captions[0],
            'id': item.id,
            'image_path': item.path,
        }


def coco_paths(root: str, split: str = 'val2017') -> tuple[str, str]:
    """(captions JSON, image folder) of the standard COCO download unpacked in `root`."""
    return os.path.join(root, 'annotations', f'captions_{split}.json'), os.path.join(root, split)


@dataclasses.dataclass(frozen=True)
class SampleCaption(transforms.RandomTransform):
    """record[out_key] = one of record[field] (a list of captions), drawn per example per
    epoch: COCO's 5 captions become 5 views of the image over training."""

    field: str = 'captions'
    out_key: str = 'caption'

    def __call__(self, record, rng: np.random.Generator):
        captions = record[self.field]
        if not captions:
            raise ValueError(f'SampleCaption: record {record.get("id")} has no {self.field}')
        return {**record, self.out_key: captions[int(rng.integers(len(captions)))]}
