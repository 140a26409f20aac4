"""Semantic segmentation layouts (image + label PNG + class-name list): ADE20K and Pascal VOC.

ADE20K (SceneParsing `ADEChallengeData2016/`):

    images/validation/ADE_val_00000001.jpg   annotations/validation/ADE_val_00000001.png
    label PNG (greyscale): 0 = "other" (not scored), 1..150 = ADE20K_CLASSES[label - 1]

Pascal VOC 2012 (`VOCdevkit/VOC2012/`):

    ImageSets/Segmentation/val.txt   JPEGImages/<id>.jpg   SegmentationClass/<id>.png
    label PNG (palette; its indices are the labels): 0 = background, 1..20 = VOC_CLASSES[label - 1],
    255 = object borders and difficult regions (not scored)

Records: `image` the encoded image bytes, `seg` (H, W) uint8 in the one convention the
dense evaluator scores, whatever the layout: 0 background, 1 + c for class c, IGNORE (255)
for pixels no metric counts. ADE20K has no background class, so its label 0 becomes IGNORE
and no `seg` pixel is 0 (the source's `has_background` is False); `id` the file stem.

Geometry for evaluation (`center_crop_pair`): the image and its labels are cut to the same
central square of the ORIGINAL image and resized to size x size, the image as the input
pipeline resizes (transforms.crop_resize), the labels by exact nearest-neighbour (never
blending two class ids), so every label stays on the pixel it annotates. This is "resize
the short side, centre crop" done crop-first, in one geometry for both. Scoring is at that
crop, not at the label's native resolution: the borders of non-square images are not
scored, so figures are close to but not the same as papers that slide a window over the
full image (MaskCLIP).
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
from PIL import Image

from input_pipeline import transforms

IGNORE = 255

# The 150 SceneParsing classes, label 1..150 (mmsegmentation's ADE20KDataset order).
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror',
    'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
    'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table',
    'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine',
    'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel',
    'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike',
    'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot',
    'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen',
    'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)  # fmt: skip

# The 20 VOC object classes, label 1..20, spelt as words ('diningtable' -> 'dining table')
# so prompts read as English; label 0 is the background.
VOC_CLASSES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'dining table', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa',
    'train', 'tv monitor',
)  # fmt: skip


def read_label_png(data: bytes | str) -> np.ndarray:
    """(H, W) uint8 label ids of a greyscale or palette PNG (a palette PNG's indices)."""
    image = Image.open(data if isinstance(data, str) else io.BytesIO(data))
    if image.mode not in ('L', 'P'):
        raise ValueError(
            f'label PNG has mode {image.mode}; expected greyscale (L) or palette (P) ids'
        )
    return np.asarray(image, np.uint8)


class _Pairs:
    """Random access over (image path, label path) pairs; the layouts below fill them."""

    has_background: bool
    classnames: tuple[str, ...]

    def __init__(self, pairs: list[tuple[str, str]], where: str):
        if not pairs:
            raise ValueError(f'{where}: no image / label pairs')
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def labels(self, index: int) -> np.ndarray:
        """`seg` of record `index`, without reading its image."""
        return self._convert(read_label_png(self.pairs[index][1]))

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def __getitem__(self, index: int) -> dict:
        image_path, _ = self.pairs[index]
        with open(image_path, 'rb') as f:
            image = f.read()
        return {
            'image': image,
            'seg': self.labels(index),
            'id': os.path.splitext(os.path.basename(image_path))[0],
        }


class ADE20K(_Pairs):
    """root/images/<split>/*.jpg with root/annotations/<split>/*.png of the same stem."""

    has_background = False
    classnames = ADE20K_CLASSES

    def __init__(self, root: str, split: str = 'validation'):
        images, labels = (os.path.join(root, d, split) for d in ('images', 'annotations'))
        for folder in (images, labels):
            if not os.path.isdir(folder):
                raise ValueError(f"ADE20K: no such directory '{folder}' (root '{root}')")
        pairs = []
        for fname in sorted(os.listdir(images)):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in ('.jpg', '.jpeg', '.png'):
                continue
            label = os.path.join(labels, stem + '.png')
            if not os.path.isfile(label):
                raise ValueError(f"ADE20K: image '{fname}' has no label file '{label}'")
            pairs.append((os.path.join(images, fname), label))
        super().__init__(pairs, f"ADE20K '{images}'")

    def _convert(self, raw):
        # 0 is "other": not one of the 150 classes and not scored.
        return np.where(raw == 0, IGNORE, raw).astype(np.uint8)


class PascalVOC(_Pairs):
    """The ids of root/ImageSets/Segmentation/<split>.txt: JPEGImages/<id>.jpg with
    SegmentationClass/<id>.png (labels already in the evaluator's convention)."""

    has_background = True
    classnames = VOC_CLASSES

    def __init__(self, root: str, split: str = 'val'):
        listing = os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')
        if not os.path.isfile(listing):
            raise ValueError(f"Pascal VOC: no such file '{listing}' (root '{root}')")
        with open(listing) as f:
            ids = [line.strip() for line in f if line.strip()]
        pairs = []
        for stem in ids:
            image = os.path.join(root, 'JPEGImages', stem + '.jpg')
            label = os.path.join(root, 'SegmentationClass', stem + '.png')
            for path in (image, label):
                if not os.path.isfile(path):
                    raise ValueError(
                        f"Pascal VOC: '{listing}' lists '{stem}' but '{path}' is missing"
                    )
            pairs.append((image, label))
        super().__init__(pairs, f"Pascal VOC '{listing}'")


# ---------------------------------------------------------------------------------------
# Evaluation geometry: one central square, image and labels alike.


def center_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest central square."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def center_crop_image(image: np.ndarray, size: int) -> np.ndarray:
    top, left, side = center_square(*image.shape[:2])
    return transforms.crop_resize(image, (top, left, top + side, left + side), size)


def center_crop_labels(seg: np.ndarray, size: int) -> np.ndarray:
    top, left, side = center_square(*seg.shape[:2])
    crop = np.ascontiguousarray(seg[top : top + side, left : left + side])
    # NEAREST_EXACT samples pixel centres (plain INTER_NEAREST is shifted by half a pixel).
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def center_crop_pair(record: dict, size: int) -> dict:
    """`image` (bytes) and `seg` -> uint8 (size, size, 3) and (size, size), same geometry."""
    # Decoded at full size (not DecodeResizeCenterCrop's decode-time JPEG downscaling, whose
    # crop box moves by up to a decoded pixel, 8 original ones): labels must stay aligned.
    image = transforms.DecodeImage()(record)['image']
    seg = record['seg']
    if image.shape[:2] != seg.shape[:2]:
        raise ValueError(
            f"record {record.get('id')}: image is {image.shape[:2]} but its labels are "
            f'{seg.shape[:2]}'
        )
    return {**record, 'image': center_crop_image(image, size), 'seg': center_crop_labels(seg, size)}
