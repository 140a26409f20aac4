"""Image transforms: decoding against Pillow, crop geometry, augmentations, bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from input_pipeline import loader as loader_lib
from input_pipeline import transforms as T


def encode(array_or_image, fmt, **kw) -> bytes:
    im = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def smooth_image(height=96, width=128, seed=0) -> np.ndarray:
    """Smooth colours (JPEG reproduces them closely), not constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 3)
    chans = [127 + 100 * np.sin(x / 17 + y / 23 + p) for p in phases]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def ramp_image(height, width) -> np.ndarray:
    """R = x, G = y (one value per pixel), B = 128: pixel values encode their position."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)


def expected_ramp(box, out_size):
    """Ramp values the output pixels of `box` (original pixels) resized to out_size should have.

    Output pixel i covers box coordinates [i, i+1) * extent / out_size; its centre
    in the original's pixel-centre convention is y0 + (i + 0.5) * extent / out - 0.5.
    """
    y0, x0, y1, x1 = box
    i = np.arange(out_size) + 0.5
    ys = y0 + i * (y1 - y0) / out_size - 0.5
    xs = x0 + i * (x1 - x0) / out_size - 0.5
    return ys[:, None] + 0 * xs[None, :], xs[None, :] + 0 * ys[:, None]


def check_ramp(view, box, tolerance):
    """The view's R/G channels equal the original ramp at the box's coordinates (interior)."""
    ys, xs = expected_ramp(box, view.shape[0])
    inner = (slice(2, -2), slice(2, -2))  # border pixels clamp at the image edge
    np.testing.assert_allclose(view[..., 0][inner], xs[inner], atol=tolerance)
    np.testing.assert_allclose(view[..., 1][inner], ys[inner], atol=tolerance)


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'mode,fmt,tolerance',
    [
        ('RGB', 'JPEG', 2),
        ('L', 'JPEG', 2),
        ('CMYK', 'JPEG', 2),
        ('RGB', 'PNG', 0),
        ('L', 'PNG', 0),
        ('RGBA', 'PNG', 0),
        ('P', 'PNG', 0),
        ('RGB', 'WEBP', 0),
        ('RGB', 'BMP', 0),
    ],
)
def test_decode_matches_pillow(mode, fmt, tolerance):
    image = Image.fromarray(smooth_image()).convert(mode)
    if mode == 'RGBA':
        alpha = Image.fromarray(
            np.arange(96 * 128, dtype=np.uint32).reshape(96, 128).astype(np.uint8)
        )
        image.putalpha(alpha)
    kw = {'quality': 95} if fmt == 'JPEG' else ({'lossless': True} if fmt == 'WEBP' else {})
    data = encode(image, fmt, **kw)
    out = T.DecodeImage()({'image': data, 'id': 3})
    assert out['id'] == 3
    got, want = out['image'], pillow_rgb(data)
    assert got.dtype == np.uint8 and got.shape == (96, 128, 3) and got.flags.c_contiguous
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= tolerance and diff.mean() <= max(tolerance / 2, 0), (
        diff.max(),
        diff.mean(),
    )


def test_decode_16bit_grey_png_keeps_high_byte():
    grey16 = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)
    data = encode(Image.fromarray(grey16), 'PNG')
    got = T.DecodeImage()({'image': data})['image']
    np.testing.assert_array_equal(got, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))


def test_decode_downscaled_jpeg_scale_and_pixels():
    data = encode(smooth_image(400, 640), 'JPEG', quality=95)
    full = pillow_rgb(data).astype(np.float32)
    # decode_image takes the smallest M/8 scale that keeps min_height.
    for min_h, want_hw, scale in [
        (0, (400, 640), 1.0),
        (200, (200, 320), 0.5),
        (50, (50, 80), 0.125),
    ]:
        image, got_scale = T.decode_image(data, min_height=min_h)
        assert image.shape[:2] == want_hw and got_scale == (scale, scale)
        # The DCT-scaled decode is close to block-averaging the full decode.
        f = int(1 / scale)
        pooled = full.reshape(want_hw[0], f, want_hw[1], f, 3).mean((1, 3))
        assert np.abs(image - pooled).mean() < 2


def test_min_decode_size_picks_the_smallest_sufficient_power_of_two():
    # crop of 100 px, output 20: scale 1/4 (25 px) suffices, 1/8 (12.5 px) does not.
    assert T.min_decode_size((400, 800), (0, 0, 100, 100), 20) == (100, 200)
    assert T.min_decode_size((400, 800), (0, 0, 400, 800), 50) == (50, 100)
    assert T.min_decode_size((400, 800), (0, 0, 100, 100), 224) == (400, 800)  # upscale


@pytest.mark.parametrize(
    'bad,match',
    [
        (b'', 'unknown image format'),
        (b'not an image at all', 'unknown image format'),
        (b'\xff\xd8\xff\xe0' + bytes(100), 'JPEG'),
        ('a string', 'expected encoded image bytes'),
    ],
)
def test_bad_bytes_raise_value_error_naming_the_field(bad, match):
    for transform in [T.DecodeImage(), T.DecodeResizeCenterCrop(8)]:
        with pytest.raises(ValueError, match=match) as e:
            transform({'image': bad})
        assert "('image')" in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ValueError, match=match):
        T.apply([T.DecodeRandomResizedCrop(8)], {'image': bad}, rng_key=(0, 0, 0))


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_truncated_file_raises(fmt):
    data = encode(smooth_image(), fmt)
    for cut in (len(data) // 4, len(data) // 2, len(data) * 9 // 10):
        with pytest.raises(ValueError, match='DecodeImage'):
            T.DecodeImage()({'image': data[:cut]})


def test_missing_field_names_the_record_keys():
    with pytest.raises(KeyError, match="no field 'image'.*'jpg'"):
        T.DecodeImage()({'jpg': b''})


# -- crops -------------------------------------------------------------------------------------


def test_crop_box_statistics_and_bounds():
    rng = np.random.default_rng(0)
    boxes = np.array(
        [T.sample_crop_box(rng, 300, 400, (0.2, 0.6), (0.5, 2.0)) for _ in range(2000)]
    )
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 400).all()
    area = h * w / (300 * 400)
    assert area.min() > 0.19 and area.max() < 0.61  # rounding to whole pixels
    aspect = w / h
    assert aspect.min() > 0.48 and aspect.max() < 2.05
    # Log-uniform aspect: as many crops wider than tall as taller than wide.
    assert 0.4 < (aspect > 1).mean() < 0.6


def test_crop_box_fallback_is_central_and_clamped():
    class NoLuck:  # every try asks for an impossible area, so the fallback runs
        def uniform(self, a, b):
            return b * 100

        def integers(self, a, b):
            raise AssertionError('not reached')

    assert T.sample_crop_box(NoLuck(), 100, 400, (1, 1), (0.75, 4 / 3)) == (0, 133, 100, 266)
    assert T.sample_crop_box(NoLuck(), 100, 120, (1, 1), (0.75, 4 / 3)) == (0, 0, 100, 120)


@pytest.mark.parametrize('fmt,tolerance', [('PNG', 1.01), ('JPEG', 2.5)])
def test_decode_crop_maps_box_onto_the_right_pixels(fmt, tolerance):
    # 256 x 256 ramp: value = coordinate. A 128 px box to 16 px decodes at 1/8.
    data = encode(ramp_image(256, 256), fmt, **({'quality': 98} if fmt == 'JPEG' else {}))
    for box, size in [((40, 64, 168, 192), 16), ((10, 20, 200, 140), 32), ((100, 50, 130, 90), 48)]:
        view, used = T.decode_crop(data, box, size, (256, 256))
        assert view.shape == (size, size, 3)
        np.testing.assert_allclose(used, box, atol=8)  # box rounded to the decoded grid
        check_ramp(view, used, tolerance)


def test_decode_random_resized_crop_determinism_and_geometry():
    data = encode(ramp_image(200, 250), 'PNG')
    t = T.DecodeRandomResizedCrop(32, scale=(0.3, 1.0))
    a = T.apply([t], {'image': data}, rng_key=(0, 0, 5))['image']
    b = T.apply([t], {'image': data}, rng_key=(0, 0, 5))['image']
    c = T.apply([t], {'image': data}, rng_key=(0, 1, 5))['image']
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    # The same key draws the same box as sample_crop_box on the stream's Generator.
    box = T.sample_crop_box(T.record_rng((0, 0, 5), t.rng_stream), 200, 250, (0.3, 1.0))
    check_ramp(a, box, 1.01)


def test_decode_random_resized_crop_accepts_arrays_like_random_resized_crop():
    image = smooth_image(64, 64)
    key = (1, 2, 3)
    from_array = T.apply([T.DecodeRandomResizedCrop(24)], {'image': image}, rng_key=key)
    plain = T.apply([T.RandomResizedCrop(24)], {'image': image}, rng_key=key)
    # Different transforms draw from different streams, so compare each with its own box.
    for out, t in [(from_array, T.DecodeRandomResizedCrop(24)), (plain, T.RandomResizedCrop(24))]:
        box = T.sample_crop_box(T.record_rng(key, t.rng_stream), 64, 64)
        np.testing.assert_array_equal(out['image'], T.crop_resize(image, box, 24))


def test_resize_center_crop_takes_the_central_square():
    data = encode(ramp_image(120, 200), 'PNG')
    out = T.DecodeResizeCenterCrop(40)({'image': data})['image']
    check_ramp(out, (0, 40, 120, 160), 1.01)
    out = T.DecodeResizeCenterCrop(40, crop_fraction=0.5)({'image': data})['image']
    check_ramp(out, (30, 70, 90, 130), 1.01)
    # Same on an already decoded array.
    arr = T.DecodeResizeCenterCrop(40)({'image': ramp_image(120, 200)})['image']
    check_ramp(arr, (0, 40, 120, 160), 1.01)


def test_resize_center_crop_of_a_large_jpeg_decodes_small():
    data = encode(smooth_image(800, 1200), 'JPEG', quality=95)
    out = T.DecodeResizeCenterCrop(96)({'image': data})['image']
    ref = np.asarray(
        Image.open(io.BytesIO(data)).crop((200, 0, 1000, 800)).resize((96, 96), Image.BOX)
    )
    assert out.shape == (96, 96, 3)
    assert np.abs(out.astype(int) - ref).mean() < 2


# -- array transforms ----------------------------------------------------------------------------


def test_resize_shapes_and_values():
    image = ramp_image(64, 48)
    out = T.Resize(32)({'image': image})['image']
    assert out.shape == (32, 32, 3)
    check_ramp(out, (0, 0, 64, 48), 1.01)
    assert T.Resize((20, 30))({'image': image})['image'].shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r"Resize\('image'\).*float32"):
        T.Resize(8)({'image': image.astype(np.float32)})


def test_random_flip():
    image = smooth_image(8, 8)
    flipped = T.RandomFlip(p=1.0)({'image': image}, np.random.default_rng(0))['image']
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    kept = T.RandomFlip(p=0.0)({'image': image}, np.random.default_rng(0))['image']
    np.testing.assert_array_equal(kept, image)
    flips = [
        not np.array_equal(
            T.apply([T.RandomFlip()], {'image': image}, rng_key=(0, 0, i))['image'], image
        )
        for i in range(400)
    ]
    assert 0.4 < np.mean(flips) < 0.6


def test_colour_adjustments_match_pillow_enhance_and_a_float_reference():
    image = smooth_image(32, 32)
    f = image.astype(np.float64)
    grey = f @ [0.299, 0.587, 0.114]
    float_reference = {
        T.adjust_brightness: lambda k: f * k,
        T.adjust_contrast: lambda k: grey.mean() + k * (f - grey.mean()),
        T.adjust_saturation: lambda k: grey[..., None] + k * (f - grey[..., None]),
    }
    pil = Image.fromarray(image)
    for ours, theirs in [
        (T.adjust_brightness, ImageEnhance.Brightness),
        (T.adjust_saturation, ImageEnhance.Color),
        (T.adjust_contrast, ImageEnhance.Contrast),
    ]:
        for factor in (0.6, 1.3, 1.9):
            got = ours(image, factor)
            assert got.dtype == np.uint8 and got.shape == image.shape
            want = np.clip(float_reference[ours](factor), 0, 255)
            assert np.abs(got - want).max() <= 1.01, (ours.__name__, factor)
            # Pillow rounds the grey image and its mean to integers first.
            pillow = np.asarray(theirs(pil).enhance(factor)).astype(np.float64)
            assert np.abs(got - pillow).max() <= 2.5, (ours.__name__, factor)
    assert (T.adjust_brightness(image, 1.9) == 255).any()  # saturates, does not wrap


def test_colour_jitter():
    image = smooth_image(16, 16)
    key = (0, 0, 1)
    out = T.apply([T.ColourJitter()], {'image': image}, rng_key=key)['image']
    again = T.apply([T.ColourJitter()], {'image': image}, rng_key=key)['image']
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, image)
    off = T.ColourJitter(0, 0, 0)({'image': image}, np.random.default_rng(0))['image']
    np.testing.assert_array_equal(off, image)
    never = T.ColourJitter(p=0.0)({'image': image}, np.random.default_rng(0))['image']
    np.testing.assert_array_equal(never, image)
    # Brightness alone: a global gain within [0.6, 1.4].
    bright = T.ColourJitter(0.4, 0, 0)({'image': image}, np.random.default_rng(3))['image']
    gain = bright.astype(float).sum() / image.astype(float).sum()
    assert 0.6 <= gain <= 1.4 and abs(gain - 1) > 1e-3
    with pytest.raises(ValueError, match='brightness'):
        T.ColourJitter(brightness=-1)


def test_random_transforms_need_a_key():
    with pytest.raises(ValueError, match='rng_key'):
        T.apply([T.RandomFlip()], {'image': smooth_image(4, 4)})


def test_invalid_crop_parameters():
    with pytest.raises(ValueError, match='scale'):
        T.DecodeRandomResizedCrop(8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match='ratio'):
        T.RandomResizedCrop(8, ratio=(0, 1))


# -- inside the loader ---------------------------------------------------------------------------


class JpegSource:
    """Encoded JPEGs; index 2 is truncated (a bad record)."""

    def __init__(self, n=12):
        self.data = [
            encode(smooth_image(60 + 4 * i, 80, seed=i), 'JPEG', quality=90) for i in range(n)
        ]
        self.data[2] = self.data[2][:200]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {'image': self.data[i], 'id': i}


def test_transforms_inside_the_loader_skip_bad_images():
    source = JpegSource()
    steps = [T.DecodeRandomResizedCrop(24), T.RandomFlip(), T.ColourJitter(p=0.8)]
    loader = loader_lib.Loader(source, steps, global_batch_size=4, seed=0, num_threads=2)
    with loader:
        batches = [next(loader) for _ in range(3)]
    assert batches[0]['image'].shape == (4, 24, 24, 3) and batches[0]['image'].dtype == np.uint8
    ids = np.concatenate([b['id'] for b in batches])
    assert 2 not in ids and loader.skipped == 1
    # Eager application with the loader's key gives the same pixels.
    first = int(batches[0]['id'][0])
    eager = T.apply(steps, source[first], rng_key=(0, 0, first))
    np.testing.assert_array_equal(batches[0]['image'][0], eager['image'])


def test_jpeg_over_the_pixel_limit_is_refused(monkeypatch):
    data = encode(smooth_image(20, 30), 'JPEG')
    monkeypatch.setattr(T, 'MAX_PIXELS', 500)
    with pytest.raises(ValueError, match=r'20x30 pixels is over the limit of 500'):
        T.DecodeImage()({'image': data})


# -- the benchmark script runs (no timing asserts) -------------------------------------------------


def test_input_pipeline_benchmark_writes_sane_json(tmp_path):
    import json
    import sys

    from conftest import ROOT

    if ROOT not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
        sys.path.insert(0, ROOT)
    from benchmarks import input_pipeline as bench

    out = tmp_path / 'bench.json'
    argv = [
        '--seconds',
        '0.05',
        '--repeats',
        '1',
        '--images',
        '2',
        '--threads',
        '1',
        '--workers=',
        '--gil_images',
        '16',
    ]
    assert bench.main([*argv, '--batch', '4', '--quiet', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r['per_core']) == {
        'pillow_draft',
        'pillow_no_draft',
        'simplejpeg_cv2',
        'simplejpeg_cv2_cv2threads',
        'pillow_draft_2000x1500',
        'simplejpeg_cv2_2000x1500',
        'shapes_64',
    }
    for case in r['per_core'].values():
        assert case['images_per_s_best'] > 0 and case['images_per_cpu_s_best'] > 0
    assert r['loader'][0]['threads'] == 1 and r['loader'][0]['images_per_s_best'] > 0
    assert r['images']['count'] == 2 and 20_000 < r['images']['mean_bytes'] < 200_000
    assert r['machine']['nproc'] >= 1 and isinstance(r['contended'], bool)
    import cv2

    assert cv2.getNumThreads() == 1  # the benchmark restores the product's setting
