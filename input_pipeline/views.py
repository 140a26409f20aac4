"""Extra image views and masks that some objectives need, built only when asked for.

Each is a typed transform (transforms.py conventions: uint8 images, randomness
only from the rng `apply` passes) that adds named fields to the record:

    TwoViews         view1, view2 (size, size, 3) uint8; coords1, coords2 (4,) float32;
                     flip1, flip2 bool                       (PixPro / pixel-level contrast)
    RandomRotation   rot_image (H, W, 3) uint8 rotated by rot_label x 90 degrees; rot_label int32
    AllRotations     rot_image (4, H, W, 3); rot_label (4,) int32 = 0, 1, 2, 3      (RotNet)
    BlockMask        mask (gh, gw) bool, True = masked patch           (BEiT-style MIM)

Coordinates. `coordsN` = (y0, x0, y1, x1) is the box of the original image
(before any decode-time downscaling) that viewN shows, in original pixels, y1 and
x1 exclusive: view pixel (i, j) of a size-S view covers original rows
y0 + [i, i+1) * (y1 - y0) / S and columns x0 + [j, j+1) * (x1 - x0) / S, the
columns counted from x1 backwards (x1 - [j, j+1) * ...) when `flipN` is True.
The box is the one actually cropped (rounded to the decoded pixel grid), so
the mapping is exact up to the resize filter. PixPro matches feature-map
cells of the two views by their distance in these coordinates.

Rotations are counter-clockwise (`np.rot90`), label k = k x 90 degrees; the
image must be square so every rotation has the batch's shape.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from input_pipeline import transforms as T
from input_pipeline.transforms import Record


@dataclasses.dataclass(frozen=True, kw_only=True)
class TwoViews(T.RandomTransform):
    """Two random resized crops of record[key] with their boxes in original pixels.

    Accepts encoded bytes (decoded once, at the smallest power-of-two JPEG scale
    that both crops allow; see transforms.py) or a uint8 array. Each view is then
    flipped with probability `flip_p` and colour-jittered by `colour_jitter`
    (None: off), independently. record[key] is left as it was.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    colour_jitter: T.ColourJitter | None = None
    key: str = "image"
    prefix: str = "view"  # fields view1, view2
    coords_prefix: str = "coords"  # fields coords1, coords2
    flip_prefix: str = "flip"  # fields flip1, flip2

    def __post_init__(self):
        T.check_crop_params(self.size, self.scale, self.ratio)

    @property
    def rng_stream(self) -> str:
        return f"TwoViews/{self.key}/{self.prefix}"

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        what = f"TwoViews({self.key!r})"
        value = T.get_field(record, self.key, what)
        if isinstance(value, np.ndarray) and value.ndim == 3:
            image = T.as_image(value, what)
            image_hw, scale = image.shape[:2], (1.0, 1.0)
            boxes = [_box(rng, image_hw, self.scale, self.ratio) for _ in range(2)]
        else:
            try:
                image_hw = T.image_size(value)
                boxes = [_box(rng, image_hw, self.scale, self.ratio) for _ in range(2)]
                sizes = [T.min_decode_size(image_hw, box, self.size) for box in boxes]
                min_h, min_w = np.max(sizes, axis=0)
                image, scale = T.decode_image(value, min_height=int(min_h), min_width=int(min_w))
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
        out = dict(record)
        for n, box in enumerate(boxes, start=1):
            taken = T.scale_box(box, scale, image.shape[:2])
            view = T.crop_resize(image, taken, self.size)
            flip = bool(rng.random() < self.flip_p)
            if flip:
                view = T.hflip(view)
            if self.colour_jitter is not None:
                view = self.colour_jitter.jitter(view, rng)
            coords = np.array(
                [
                    taken[0] / scale[0],
                    taken[1] / scale[1],
                    taken[2] / scale[0],
                    taken[3] / scale[1],
                ],
                np.float32,
            )
            out[f"{self.prefix}{n}"] = view
            out[f"{self.coords_prefix}{n}"] = coords
            out[f"{self.flip_prefix}{n}"] = np.bool_(flip)
        return out


def _box(rng, image_hw, scale, ratio):
    return T.sample_crop_box(rng, image_hw[0], image_hw[1], scale, ratio)


# Counter-clockwise quarter turns. cv2.rotate writes a contiguous array in ~5-10 us at
# 224 px; copying numpy's rot90 view (transposed 3-byte pixels) is ~20x slower.
_CV2_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def rot90(image: np.ndarray, k: int) -> np.ndarray:
    """`image` turned k x 90 degrees counter-clockwise (np.rot90's direction)."""
    if k % 4 == 0:
        return image
    return cv2.rotate(image, _CV2_ROTATIONS[k % 4])  # (H, W, 3) images only


def _square_image(record: Record, key: str, what: str) -> np.ndarray:
    image = T.as_image(T.get_field(record, key, what), what)
    if image.shape[0] != image.shape[1]:
        raise ValueError(
            f"{what}: rotations need a square image (else the batch shapes differ), "
            f"got {image.shape[:2]}; crop or resize it first"
        )
    return image


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomRotation(T.RandomTransform):
    """record[out_key] = record[key] rotated by k x 90 degrees, k ~ U{0..3}; label_key = k."""

    key: str = "image"
    out_key: str = "rot_image"
    label_key: str = "rot_label"

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        image = _square_image(record, self.key, f"RandomRotation({self.key!r})")
        k = int(rng.integers(4))
        return {**record, self.out_key: rot90(image, k), self.label_key: np.int32(k)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllRotations:
    """record[out_key] = the 4 rotations of record[key] (4, H, W, 3); label_key = [0, 1, 2, 3].

    RotNet trains on all four rotations of each image in the same batch (its
    paper found this better than one random rotation per image).
    """

    key: str = "image"
    out_key: str = "rot_image"
    label_key: str = "rot_label"

    def __call__(self, record: Record) -> Record:
        image = _square_image(record, self.key, f"AllRotations({self.key!r})")
        rotated = np.stack([rot90(image, k) for k in range(4)])
        return {**record, self.out_key: rotated, self.label_key: np.arange(4, dtype=np.int32)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockMask(T.RandomTransform):
    """record[out_key] = a (gh, gw) bool mask of `ratio` of the patches, in blocks (BEiT).

    BEiT's MaskingGenerator: repeatedly draw a rectangle of area
    U(min_block, remaining) patches and aspect log-uniform in
    (min_aspect, 1 / min_aspect), placed uniformly; keep it if it adds at least
    one new patch without passing the target (10 tries per block). BEiT stops
    when no block fits and may end a few patches short; with `exact` (default)
    the shortfall is filled with random single patches, so every example masks
    exactly round(ratio * gh * gw) patches and the masked tokens can be
    gathered with a static shape under jit.
    """

    grid: tuple[int, int]
    ratio: float = 0.4
    min_block: int = 4
    max_block: int | None = None
    min_aspect: float = 0.3
    exact: bool = True
    out_key: str = "mask"

    def __post_init__(self):
        gh, gw = self.grid
        if gh < 1 or gw < 1:
            raise ValueError(f"BlockMask.grid must be positive, got {self.grid}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"BlockMask.ratio must be in [0, 1], got {self.ratio}")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"BlockMask.min_aspect must be in (0, 1], got {self.min_aspect}")

    @property
    def num_masked(self) -> int:
        return int(round(self.ratio * self.grid[0] * self.grid[1]))

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        gh, gw = self.grid
        target = self.num_masked
        max_block = target if self.max_block is None else min(self.max_block, target)
        log_aspect = (np.log(self.min_aspect), -np.log(self.min_aspect))
        mask = np.zeros((gh, gw), bool)
        count = 0
        while count < target:
            added = self._add_block(mask, rng, min(target - count, max_block), log_aspect)
            if added == 0:
                break
            count += added
        if self.exact and count < target:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, target - count, replace=False)] = True
        return mask

    def _add_block(self, mask, rng, max_patches, log_aspect) -> int:
        gh, gw = mask.shape
        for _ in range(10):
            area = rng.uniform(self.min_block, max(max_patches, self.min_block))
            aspect = np.exp(rng.uniform(*log_aspect))
            h = int(round(np.sqrt(area * aspect)))
            w = int(round(np.sqrt(area / aspect)))
            if 0 < h < gh and 0 < w < gw:
                top = int(rng.integers(0, gh - h + 1))
                left = int(rng.integers(0, gw - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        return {**record, self.out_key: self.sample(rng)}
