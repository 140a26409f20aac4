"""Record transforms: small typed callables, `record -> record`.

A config lists them as objects (MaxText's grain pipeline, not big_vision's pp
strings), so a mistake fails at construction with a Python trace to the config.
Each works eagerly on one record and inside the loader unchanged.

Images stay uint8 in the batch: a uint8 batch is 4x smaller to build, copy and
transfer to the devices than float32, and the model normalises on device
(`(x / 255 - mean) / std` fuses into the patch embedding). So there is no
`Normalize` transform here, and every image transform takes and returns uint8
(H, W, 3) RGB.

Decoding. Real-data sources hand over the encoded file bytes (JPEG, PNG, ...);
the `Decode*` transforms turn them into arrays. JPEGs go through libjpeg-turbo
(simplejpeg) with decode-time downscaling: a JPEG's DCT can be decoded directly
at 1/8, 1/4 or 1/2 of its size, which saves the inverse DCT, the colour conversion
and resize work, but not the entropy decoding. `DecodeRandomResizedCrop` first
draws the crop box from the header's size, then decodes at the smallest such
scale at which the crop still spans at least `size` pixels, then crops and
resizes with OpenCV. On a 3 MP photo-like JPEG of 850 KB the decode took 9.7 ms
at full size, 7.9 at 1/2, 6.6 at 1/8 (entropy decoding is the rest). For a
~500x375 image and a 224-pixel crop the full scale is nearly always needed (half
scale needs a crop of >= 448 pixels each way); the gain over Pillow there comes
from libjpeg-turbo's API and OpenCV's resize (benchmarks/input_pipeline.py).

Other formats (PNG, GIF, WebP, ... and JPEGs libjpeg-turbo refuses) go through
Pillow. Grey, palette, RGBA (alpha dropped, as Pillow's `convert('RGB')` does)
and CMYK images become RGB. EXIF orientation is not applied, as in Pillow,
torchvision and tf.image decoding. Undecodable or truncated data raises
ValueError naming the problem, which marks the record as bad (see below).

OpenCV threads. By default every cv2 call may split its work over a pool of one
thread per core. The loader already runs several records at once (N threads, or
N worker processes), so each of them fanning out to all cores would oversubscribe
the machine (N x cores threads; with worker processes, a pool per process), and at
224 px one resize is ~60 us of work, too little to gain from splitting: the
benchmark measured the same images per CPU-second with cv2's pool on and off. So
this module sets `cv2.setNumThreads(1)` when imported (process-wide; the input
pipeline is cv2's only user here) and leaves parallelism to the loader. Both the
libjpeg-turbo decode and the cv2 calls release the GIL, so loader threads overlap
them (benchmarks/input_pipeline.py measures how much of a record's time still holds
the GIL).

Flips. `RandomFlip` exists for image-only objectives (PixPro views, RotNet,
MIM). Do not use it with the shapes captions: they name positions ("top left",
"to the left of"), which a flip would falsify.

A transform that raises (e.g. `Tokenize` on an empty caption, a decode of
truncated bytes) marks the record as bad; the loader counts, logs and replaces
it (see loader.py).

Randomness. A transform that draws random numbers (sub-caption sampling, caption
choice, crops) subclasses `RandomTransform` and is called as `t(record, rng)`,
like grain's `RandomMapTransform`. `apply` gives it a fresh numpy Generator
seeded from `rng_key` = (loader seed, epoch, source index), which the loader
passes, and the transform's own stream name. So a record's random draws depend
on nothing else: not the process count, the prefetch thread, the batch
position, nor which other random transforms the pipeline holds (sub-caption
samples stay the same whether or not the caption is also chosen at random).
Resume and elastic restore reproduce them exactly, and every epoch redraws.
We pass the key rather than stash `_epoch` in the record so that sources and
deterministic transforms never see loader internals.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import io
import math
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# See "OpenCV threads" in the module doc.
cv2.setNumThreads(1)

Record = dict[str, Any]
Box = tuple[float, float, float, float]  # (y0, x0, y1, x1), y1/x1 exclusive, in pixels


class Transform(Protocol):
    def __call__(self, record: Record) -> Record: ...


class TextTokenizer(Protocol):
    context_length: int
    pad_id: int
    eos_id: int

    def tokenize(self, text: str | bytes) -> np.ndarray: ...


class RandomTransform(abc.ABC):
    """A transform that draws random numbers: `t(record, rng) -> record`.

    Use only `rng` (never global numpy / python randomness), so the draws are a
    function of `apply`'s `rng_key`; see the module doc.
    """

    @abc.abstractmethod
    def __call__(self, record: Record, rng: np.random.Generator) -> Record: ...

    @property
    def rng_stream(self) -> str:
        """Names this transform's random stream; the class and output key by default."""
        return f"{type(self).__name__}/{getattr(self, 'out_key', getattr(self, 'key', ''))}"


# Keeps transform streams apart from any other use of the same (seed, epoch, index).
_RNG_SALT = 0x7E3A_C0DE


def record_rng(rng_key: Sequence[int], stream: str) -> np.random.Generator:
    """The Generator of one random transform on one record (key: seed, epoch, index)."""
    entropy = [_RNG_SALT, zlib.crc32(stream.encode("utf-8"))]
    entropy += [int(k) % 2**63 for k in rng_key]  # SeedSequence wants non-negative ints
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ---------------------------------------------------------------------------------------------
# Decoding: encoded bytes -> uint8 (H, W, 3) RGB.

_JPEG_MAGIC = b"\xff\xd8\xff"
# Pillow refuses images over twice its MAX_IMAGE_PIXELS (~179 M pixels) as decompression
# bombs; JPEGs, which libjpeg-turbo decodes without Pillow, get the same limit.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return data.tobytes()  # e.g. an encoded image stored as a uint8 vector
    raise ValueError(f"expected encoded image bytes, got {type(data).__name__}")


def _describe(data: bytes) -> str:
    return f"{len(data)} bytes starting {data[:8]!r}"


def _pillow_open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"unknown image format ({_describe(data)})") from None
    except Exception as e:  # DecompressionBombError, ...
        raise ValueError(f"not a readable image ({_describe(data)}): {e}") from None


def _pillow_to_rgb(im: Image.Image, data: bytes) -> np.ndarray:
    try:
        if im.mode.startswith("I;16"):
            # 16-bit grey: keep the high byte (Pillow's convert('RGB') would clip at 255).
            grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # convert() loads the pixels
        return np.asarray(rgb, dtype=np.uint8).copy()
    except Exception as e:  # truncated file, corrupt stream, ...
        raise ValueError(f"cannot decode {im.format or 'image'} ({_describe(data)}): {e}") from None


def image_size(data: Any) -> tuple[int, int]:
    """(height, width) of an encoded image, read from its header only."""
    data = _as_bytes(data)
    if data.startswith(_JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(height), int(width)
        except ValueError as e:
            try:  # a JPEG libjpeg-turbo refuses: let Pillow try
                width, height = _pillow_open(data).size
            except ValueError:
                raise ValueError(f"cannot decode JPEG ({_describe(data)}): {e}") from None
            return int(height), int(width)
    width, height = _pillow_open(data).size
    return int(height), int(width)


def jpeg_scale(original: tuple[int, int], decoded: tuple[int, int]) -> tuple[float, float]:
    """decoded / original size per axis, exact for libjpeg's M/8 scaling.

    libjpeg decodes at M/8 of the size, rounding the pixel count up, so the ratio of
    the sizes is slightly off M/8; M/8 is what maps a decoded pixel onto the original.
    """
    if decoded == original:
        return 1.0, 1.0
    for m in range(1, 8):
        if all(math.ceil(o * m / 8) == d for o, d in zip(original, decoded)):
            return m / 8, m / 8
    return decoded[0] / original[0], decoded[1] / original[1]


def decode_image(
    data: Any, *, min_height: int = 0, min_width: int = 0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Decodes to uint8 (h, w, 3) RGB, downscaled while at least min_height x min_width.

    Returns the image and its (y, x) scale relative to the original size
    (decoded = original * scale, <= 1). Only JPEGs are downscaled at decode
    time (by libjpeg's M/8 steps); other formats come back at full size.
    Raises ValueError on undecodable or truncated data.
    """
    data = _as_bytes(data)
    if data.startswith(_JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            height, width, jpeg_error = None, None, e
        if height is not None:
            if height * width > MAX_PIXELS:  # Pillow's decompression-bomb limit
                raise ValueError(
                    f"JPEG of {height}x{width} pixels is over the limit of {MAX_PIXELS} pixels"
                )
            try:
                # strict: libjpeg's "premature end of file" and similar warnings raise,
                # so a truncated file is not silently padded with grey.
                image = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=min_height, min_width=min_width, strict=True
                )
                return image, jpeg_scale((height, width), image.shape[:2])
            except ValueError as e:
                jpeg_error = e
        # Pillow reads a few JPEGs libjpeg-turbo's TurboJPEG API refuses; truncated
        # files fail there too (Pillow does not load truncated images by default).
        try:
            im = _pillow_open(data)
            original = im.size[::-1]
            if min_height or min_width:
                im.draft("RGB", (max(min_width, 1), max(min_height, 1)))
            image = _pillow_to_rgb(im, data)
        except ValueError:
            raise ValueError(f"cannot decode JPEG ({_describe(data)}): {jpeg_error}") from None
        return image, jpeg_scale(original, image.shape[:2])
    image = _pillow_to_rgb(_pillow_open(data), data)
    return image, (1.0, 1.0)


def as_image(value: Any, what: str) -> np.ndarray:
    """Checks that `value` is a uint8 (H, W, 3) array (a decoded image)."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3):
        got = (
            f"{value.dtype} {value.shape}"
            if isinstance(value, np.ndarray)
            else type(value).__name__
        )
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) image array, got {got}")
    if value.shape[2] != 3 or 0 in value.shape:
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) image array, got {value.shape}")
    return value


def get_field(record: Record, key: str, transform: str) -> Any:
    try:
        return record[key]
    except KeyError:
        raise KeyError(f"{transform}: no field {key!r}; record has {sorted(record)}") from None


# ---------------------------------------------------------------------------------------------
# Geometry shared by the crop transforms and views.py.


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop (y0, x0, y1, x1) in integer pixels of a height x width image.

    torchvision's RandomResizedCrop.get_params: area ~ U(scale) x image area,
    aspect (w/h) log-uniform in `ratio`, up to 10 tries; else the central crop
    with the aspect clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0, x0, y0 + h, x0 + w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, min(height, int(round(width / min(ratio))))
    elif aspect > max(ratio):
        w, h = min(width, int(round(height * max(ratio)))), height
    else:
        w, h = width, height
    y0, x0 = (height - h) // 2, (width - w) // 2
    return y0, x0, y0 + h, x0 + w


def min_decode_size(
    image_hw: tuple[int, int], box: Box, size: int | tuple[int, int]
) -> tuple[int, int]:
    """(min_height, min_width) to decode a JPEG at so that `box` still spans >= `size` pixels.

    Only the power-of-two scales 1/8, 1/4, 1/2 and 1 are used: libjpeg-turbo's
    other M/8 scales (3/8, 5/8, 6/8, 7/8) decode a 500x375 JPEG slower than at
    full size (measured: 7/8 ~1.0 ms, 8/8 ~0.6-0.9 ms, 4/8 ~0.5-0.7 ms, 1/8 ~0.43 ms).
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    height, width = image_hw
    y0, x0, y1, x1 = box
    needed = max(out_h / max(y1 - y0, 1e-6), out_w / max(x1 - x0, 1e-6))
    m = next((m for m in (1, 2, 4) if m / 8 >= needed), 8)
    return math.ceil(height * m / 8), math.ceil(width * m / 8)


def scale_box(box: Box, scale: tuple[float, float], image_hw: tuple[int, int]) -> tuple[int, ...]:
    """An original-image box in the pixels of an image decoded at `scale` (rounded, >= 1 px)."""
    sy, sx = scale
    height, width = image_hw
    y0 = min(max(int(round(box[0] * sy)), 0), height - 1)
    x0 = min(max(int(round(box[1] * sx)), 0), width - 1)
    y1 = min(max(int(round(box[2] * sy)), y0 + 1), height)
    x1 = min(max(int(round(box[3] * sx)), x0 + 1), width)
    return y0, x0, y1, x1


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 image resized to `size` (int: square; or (height, width)).

    Bilinear, except area averaging when shrinking by more than 2x on both sides.
    Bilinear shrinking by up to 2x aliases a little (as big_vision's
    inception crop through tf.image.resize does) but costs ~80 us at 224 px
    where OpenCV's area filter at a non-integer factor costs ~440 us; decoding
    JPEGs at a power-of-two scale keeps the factor below 2 for most crops.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    height, width = image.shape[:2]
    if (height, width) == (out_h, out_w):
        return np.ascontiguousarray(image)
    shrink_2x = out_h * 2 < height and out_w * 2 < width
    interpolation = cv2.INTER_AREA if shrink_2x else cv2.INTER_LINEAR
    # cv2 reads a strided crop view directly; copying the crop first cost ~30% more.
    return cv2.resize(image, (out_w, out_h), interpolation=interpolation).reshape(out_h, out_w, 3)


def hflip(image: np.ndarray) -> np.ndarray:
    """The image mirrored left-right, as a new contiguous array.

    cv2.flip takes ~4 us at 224 px; numpy's copy of `image[:, ::-1]` (a reversed axis of
    3-byte pixels, also what np.stack does with such a view at collate) takes ~150 us.
    """
    return cv2.flip(image, 1).reshape(image.shape)


def crop_resize(
    image: np.ndarray, box: tuple[int, int, int, int], size: int | tuple[int, int]
) -> np.ndarray:
    """The integer box (y0, x0, y1, x1) of `image`, resized to `size`."""
    y0, x0, y1, x1 = box
    return resize(image[y0:y1, x0:x1], size)


def decode_crop(data: Any, box: Box, size: int | tuple[int, int], image_hw: tuple[int, int]):
    """Decodes just large enough for `box` (original pixels), crops and resizes it.

    Returns the (size, size, 3) crop and the box actually taken, in original-image
    pixels (floats: the decoded pixel grid maps onto the original at `scale`).
    """
    min_h, min_w = min_decode_size(image_hw, box, size)
    image, scale = decode_image(data, min_height=min_h, min_width=min_w)
    taken = scale_box(box, scale, image.shape[:2])
    used = (taken[0] / scale[0], taken[1] / scale[1], taken[2] / scale[0], taken[3] / scale[1])
    return crop_resize(image, taken, size), used


def crop_to_size(value: Any, box_of, size: int, what: str) -> np.ndarray:
    """An image (uint8 array or encoded bytes) -> the box `box_of(height, width)`
    (original pixels) resized to `size`; encoded images are decoded only as large as
    the box needs. `what` names the transform in errors."""
    if isinstance(value, np.ndarray) and value.ndim == 3:
        image = as_image(value, what)
        box = scale_box(box_of(*image.shape[:2]), (1.0, 1.0), image.shape[:2])
        return crop_resize(image, box, size)
    try:
        image_hw = image_size(value)
        crop, _ = decode_crop(value, box_of(*image_hw), size, image_hw)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return crop


def check_crop_params(size, scale, ratio) -> None:
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")


# ---------------------------------------------------------------------------------------------
# Image transforms.


@dataclasses.dataclass(frozen=True)
class DecodeImage:
    """record[key]: encoded bytes -> uint8 (H, W, 3) RGB at full size.

    An array already there (e.g. from the shapes source) is checked and kept.
    """

    key: str = "image"

    def __call__(self, record: Record) -> Record:
        value = get_field(record, self.key, "DecodeImage")
        if isinstance(value, np.ndarray) and value.ndim == 3:
            return {**record, self.key: as_image(value, f"DecodeImage({self.key!r})")}
        try:
            image, _ = decode_image(value)
        except ValueError as e:
            raise ValueError(f"DecodeImage({self.key!r}): {e}") from None
        return {**record, self.key: image}


@dataclasses.dataclass(frozen=True)
class DecodeRandomResizedCrop(RandomTransform):
    """record[key]: encoded bytes -> a random resized crop, uint8 (size, size, 3).

    The crop (Inception / torchvision RandomResizedCrop: `scale` of the area,
    aspect `ratio`) is drawn from the header's size; the JPEG is decoded only as
    large as the crop needs (see the module doc), then cropped and resized.
    Accepts an already decoded uint8 array too (then it is `RandomResizedCrop`).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    key: str = "image"

    def __post_init__(self):
        check_crop_params(self.size, self.scale, self.ratio)

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        what = f"DecodeRandomResizedCrop({self.key!r})"
        value = get_field(record, self.key, what)
        # sample_crop_box gives integer boxes inside the image: scale_box keeps them as they are.
        box_of = functools.partial(sample_crop_box, rng, scale=self.scale, ratio=self.ratio)
        return {**record, self.key: crop_to_size(value, box_of, self.size, what)}


@dataclasses.dataclass(frozen=True)
class DecodeResizeCenterCrop:
    """Eval: record[key] -> resize the short side to `size`, centre crop, uint8 (size, size, 3).

    `crop_fraction` < 1 takes the central `crop_fraction` of the short side
    instead (timm's crop_pct, e.g. 0.875: resize to size / 0.875, then crop).
    Decodes at the smallest JPEG scale that keeps the crop >= `size`.
    """

    size: int
    crop_fraction: float = 1.0
    key: str = "image"

    def __post_init__(self):
        if int(self.size) < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    def box(self, height: int, width: int) -> Box:
        """The central square (original pixels) that becomes the output."""
        side = min(height, width) * self.crop_fraction
        y0, x0 = (height - side) / 2, (width - side) / 2
        return y0, x0, y0 + side, x0 + side

    def __call__(self, record: Record) -> Record:
        what = f"DecodeResizeCenterCrop({self.key!r})"
        value = get_field(record, self.key, what)
        return {**record, self.key: crop_to_size(value, self.box, self.size, what)}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(RandomTransform):
    """record[key]: uint8 image -> Inception-style random resized crop (size, size, 3)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    key: str = "image"

    def __post_init__(self):
        check_crop_params(self.size, self.scale, self.ratio)

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        what = f"RandomResizedCrop({self.key!r})"
        image = as_image(get_field(record, self.key, what), what)
        box = sample_crop_box(rng, *image.shape[:2], self.scale, self.ratio)
        return {**record, self.key: crop_resize(image, box, self.size)}


@dataclasses.dataclass(frozen=True)
class Resize:
    """record[key]: uint8 image resized to `size` (int: square; or (height, width))."""

    size: int | tuple[int, int]
    key: str = "image"

    def __call__(self, record: Record) -> Record:
        what = f"Resize({self.key!r})"
        image = as_image(get_field(record, self.key, what), what)
        return {**record, self.key: resize(image, self.size)}


@dataclasses.dataclass(frozen=True)
class RandomFlip(RandomTransform):
    """record[key]: uint8 image flipped left-right with probability `p`.

    Not for the shapes captions, which name positions (see the module doc).
    """

    p: float = 0.5
    key: str = "image"

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        what = f"RandomFlip({self.key!r})"
        image = as_image(get_field(record, self.key, what), what)
        if rng.random() < self.p:
            image = hflip(image)
        return {**record, self.key: image}


# The colour adjustments blend the uint8 image with black, its mean grey or its grey
# version, as Pillow's ImageEnhance and torchvision do, through OpenCV's saturating uint8
# arithmetic: ~10-30 us each at 224 px, where the same in float32 numpy with np.clip took
# 400-800 us. Each step rounds to uint8 (so does Pillow).


def _grey(image: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), as Pillow's convert('L') and
    # torchvision's rgb_to_grayscale.
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 image x factor, clipped to [0, 255]."""
    return cv2.addWeighted(image, factor, image, 0.0, 0.0)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level: mean + factor x (image - mean), clipped."""
    mean = float(_grey(image).mean())
    return cv2.addWeighted(image, factor, image, 0.0, (1.0 - factor) * mean)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image: grey + factor x (image - grey), clipped."""
    grey = cv2.cvtColor(_grey(image), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, grey, 1.0 - factor, 0.0)


@dataclasses.dataclass(frozen=True)
class ColourJitter(RandomTransform):
    """record[key]: with probability `p`, random brightness, contrast and saturation.

    Each factor is drawn from U(max(0, 1 - s), 1 + s) for strength s (0: off),
    and the three are applied in a random order, clipping to [0, 255] after
    each, as torchvision's ColorJitter does. uint8 in and out (OpenCV's saturating
    arithmetic, see above). No hue jitter: it needs an HSV round trip, and no
    objective here asks for it yet.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    p: float = 1.0
    key: str = "image"

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ColourJitter.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"ColourJitter.p must be in [0, 1], got {self.p}")

    def jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The jittered uint8 image (draws from `rng`; used by views.py too)."""
        if rng.random() >= self.p:
            return image
        ops = [
            (adjust_brightness, self.brightness),
            (adjust_contrast, self.contrast),
            (adjust_saturation, self.saturation),
        ]
        factors = [rng.uniform(max(0.0, 1 - s), 1 + s) for _, s in ops]
        for i in rng.permutation(len(ops)):
            if ops[i][1] > 0:
                image = ops[i][0](image, factors[i])
        return image

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        what = f"ColourJitter({self.key!r})"
        image = as_image(get_field(record, self.key, what), what)
        return {**record, self.key: self.jitter(image, rng)}


# ---------------------------------------------------------------------------------------------
# Text and record structure.


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """record[out_key] = (L,) int32 token ids of the text in record[field]."""

    field: str
    tokenizer: TextTokenizer
    out_key: str = "text"

    def __call__(self, record: Record) -> Record:
        try:
            text = record[self.field]
        except KeyError:
            raise KeyError(
                f"Tokenize: no field {self.field!r}; record has {sorted(record)}"
            ) from None
        try:
            ids = self.tokenizer.tokenize(text)
        except ValueError as e:
            raise ValueError(f"Tokenize({self.field!r}): {e}") from e
        return {**record, self.out_key: ids}


@dataclasses.dataclass(frozen=True)
class SelectFields:
    """Keep only `keys`: the batch carries exactly what the objectives need."""

    keys: Sequence[str]

    def __call__(self, record: Record) -> Record:
        missing = [k for k in self.keys if k not in record]
        if missing:
            raise KeyError(f"SelectFields: missing {missing}; record has {sorted(record)}")
        return {k: record[k] for k in self.keys}


def apply(
    transforms: Sequence[Transform | RandomTransform],
    record: Record,
    *,
    rng_key: Sequence[int] | None = None,
) -> Record:
    """Applies `transforms` in order.

    `rng_key` (the loader passes (seed, epoch, source index)) seeds every
    `RandomTransform`; it is required when there is one, so randomness is never
    silently fixed.
    """
    for transform in transforms:
        if isinstance(transform, RandomTransform):
            if rng_key is None:
                raise ValueError(
                    f"{transform!r} draws random numbers: pass "
                    "apply(..., rng_key=(seed, epoch, index))"
                )
            record = transform(record, record_rng(rng_key, transform.rng_stream))
        else:
            record = transform(record)
    return record
