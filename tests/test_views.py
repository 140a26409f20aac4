"""Extra views: crop boxes map back onto the original pixels, rotations, block masks."""

import io

import numpy as np
import pytest
from PIL import Image

from input_pipeline import loader as loader_lib
from input_pipeline import transforms as T
from input_pipeline import views


def ramp(height, width, step=1.0) -> np.ndarray:
    """R = step * x, G = step * y, B = 128: pixel values encode their own coordinates."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([step * x, step * y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def encode(array, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def check_view(view, coords, flipped, step, tolerance):
    """Each view pixel holds the ramp value of its centre in original coordinates (see views.py)."""
    if flipped:
        view = view[:, ::-1]
    size = view.shape[0]
    y0, x0, y1, x1 = (float(c) for c in coords)
    centre = np.arange(size) + 0.5
    ys = y0 + centre * (y1 - y0) / size - 0.5  # pixel-centre convention
    xs = x0 + centre * (x1 - x0) / size - 0.5
    inner = slice(1, -1)  # the filter clamps at the image border
    got_x = view[inner, inner, 0].astype(float)
    got_y = view[inner, inner, 1].astype(float)
    np.testing.assert_allclose(
        got_x, np.broadcast_to(step * xs[None, inner], got_x.shape), atol=tolerance
    )
    np.testing.assert_allclose(
        got_y, np.broadcast_to(step * ys[inner, None], got_y.shape), atol=tolerance
    )


@pytest.mark.parametrize(
    'make_image,step,tolerance',
    [
        (lambda: ramp(200, 240), 1.0, 1.01),  # array input
        (lambda: encode(ramp(200, 240), 'PNG'), 1.0, 1.01),  # Pillow path
        (lambda: encode(ramp(480, 400, 0.5), 'JPEG', quality=98), 0.5, 2.5),  # scaled decode
    ],
)
def test_two_views_coords_map_back_onto_the_original(make_image, step, tolerance):
    image = make_image()
    t = views.TwoViews(size=24, scale=(0.05, 1.0))
    flips = []
    for i in range(20):
        out = T.apply([t], {'image': image, 'id': i}, rng_key=(0, 0, i))
        assert out['image'] is image and out['id'] == i  # the source field is untouched
        for n in (1, 2):
            view, coords, flip = out[f'view{n}'], out[f'coords{n}'], out[f'flip{n}']
            assert view.shape == (24, 24, 3) and view.dtype == np.uint8
            assert coords.shape == (4,) and coords.dtype == np.float32 and flip.dtype == bool
            assert coords[0] < coords[2] and coords[1] < coords[3]
            check_view(view, coords, bool(flip), step, tolerance)
            flips.append(bool(flip))
    assert 0.2 < np.mean(flips) < 0.8


def test_two_views_decode_once_at_a_scale_both_crops_allow():
    data = encode(ramp(1024, 1024, 0.25), 'JPEG', quality=95)
    # Crops of >= 724 px down to 16 px: both allow 1/8, so the boxes lie on an 8-pixel grid.
    t = views.TwoViews(size=16, scale=(0.5, 1.0))
    for i in range(5):
        out = T.apply([t], {'image': data}, rng_key=(0, 0, i))
        coords = np.concatenate([out['coords1'], out['coords2']])
        np.testing.assert_array_equal(coords % 8, 0)
        for n in (1, 2):
            check_view(out[f'view{n}'], out[f'coords{n}'], bool(out[f'flip{n}']), 0.25, 2.5)


def test_two_views_determinism_and_independence():
    image = ramp(64, 64)
    t = views.TwoViews(size=16, colour_jitter=T.ColourJitter(0.4, 0.4, 0.4))
    a = T.apply([t], {'image': image}, rng_key=(3, 1, 7))
    b = T.apply([t], {'image': image}, rng_key=(3, 1, 7))
    c = T.apply([t], {'image': image}, rng_key=(3, 2, 7))
    for k in ('view1', 'view2', 'coords1', 'coords2', 'flip1', 'flip2'):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a['coords1'], c['coords1'])
    assert not np.array_equal(a['coords1'], a['coords2'])
    # The jitter changed the blue channel (constant 128 in the ramp) somewhere.
    assert (a['view1'][..., 2] != 128).any() or (a['view2'][..., 2] != 128).any()


def test_two_views_bad_bytes():
    with pytest.raises(ValueError, match=r"TwoViews\('image'\).*unknown image format"):
        T.apply([views.TwoViews(size=8)], {'image': b'junk'}, rng_key=(0, 0, 0))


# -- rotations -----------------------------------------------------------------------------------


def test_random_rotation_labels_and_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    labels = []
    for i in range(200):
        out = T.apply([views.RandomRotation()], {'image': image}, rng_key=(0, 0, i))
        k, rot = int(out['rot_label']), out['rot_image']
        assert out['rot_label'].dtype == np.int32 and out['image'] is image
        # k counter-clockwise quarter turns: (i, j) <- (j, W-1-i) applied k times.
        ref = image
        for _ in range(k):
            ref = np.stack([[ref[j, ref.shape[1] - 1 - i] for j in range(5)] for i in range(5)])
        np.testing.assert_array_equal(rot, ref)
        labels.append(k)
    counts = np.bincount(labels, minlength=4)
    assert counts.min() > 30, counts


def test_all_rotations():
    image = ramp(6, 6)
    out = views.AllRotations()({'image': image})
    assert out['rot_image'].shape == (4, 6, 6, 3)
    np.testing.assert_array_equal(out['rot_label'], [0, 1, 2, 3])
    np.testing.assert_array_equal(out['rot_image'][0], image)
    # Quarter turn counter-clockwise: the top row becomes the left column, read upwards.
    np.testing.assert_array_equal(out['rot_image'][1][::-1, 0], image[0])
    np.testing.assert_array_equal(out['rot_image'][2], image[::-1, ::-1])


def test_rotation_needs_a_square_image():
    with pytest.raises(ValueError, match=r'square.*\(4, 6\)'):
        views.AllRotations()({'image': ramp(4, 6)})


# -- block masks ---------------------------------------------------------------------------------


def neighbour_fraction(mask):
    """Mean share of a masked patch's 4-neighbours (inside the grid) that are masked."""
    padded = np.pad(mask, 1).astype(int)
    inside = np.pad(np.ones_like(mask), 1).astype(int)
    neighbours = sum(np.roll(padded, s, a) for s in (1, -1) for a in (0, 1))[1:-1, 1:-1]
    n_inside = sum(np.roll(inside, s, a) for s in (1, -1) for a in (0, 1))[1:-1, 1:-1]
    return (neighbours / n_inside)[mask].mean()


@pytest.mark.parametrize('grid,ratio', [((14, 14), 0.4), ((8, 12), 0.75), ((16, 16), 0.1)])
def test_block_mask_ratio_and_blockiness(grid, ratio):
    t = views.BlockMask(grid=grid, ratio=ratio)
    target = round(ratio * grid[0] * grid[1])
    rng = np.random.default_rng(0)
    block, scattered = [], []
    for i in range(30):
        mask = T.apply([t], {}, rng_key=(0, 0, i))['mask']
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() == target
        block.append(neighbour_fraction(mask))
        random_mask = np.zeros(grid[0] * grid[1], bool)
        random_mask[rng.choice(random_mask.size, target, replace=False)] = True
        scattered.append(neighbour_fraction(random_mask.reshape(grid)))
    # Blocks: a masked patch's neighbours are mostly masked; scattered: about `ratio` of them.
    # Blocks have at most half the unmasked neighbours (edge length) of a scattered mask.
    assert 1 - np.mean(block) < 0.5 * (1 - np.mean(scattered)), (np.mean(block), np.mean(scattered))


def test_block_mask_without_exact_fill_never_overshoots():
    t = views.BlockMask(grid=(14, 14), ratio=0.4, exact=False)
    counts = [t.sample(np.random.default_rng(i)).sum() for i in range(30)]
    assert max(counts) <= t.num_masked and np.mean(counts) > 0.9 * t.num_masked


def test_block_mask_determinism_and_validation():
    t = views.BlockMask(grid=(8, 8), ratio=0.5)
    a = T.apply([t], {}, rng_key=(1, 0, 4))['mask']
    np.testing.assert_array_equal(a, T.apply([t], {}, rng_key=(1, 0, 4))['mask'])
    assert not np.array_equal(a, T.apply([t], {}, rng_key=(1, 1, 4))['mask'])
    assert views.BlockMask(grid=(4, 4), ratio=0.0).sample(np.random.default_rng(0)).sum() == 0
    assert views.BlockMask(grid=(4, 4), ratio=1.0).sample(np.random.default_rng(0)).all()
    with pytest.raises(ValueError, match='ratio'):
        views.BlockMask(grid=(4, 4), ratio=1.5)


# -- inside the loader ---------------------------------------------------------------------------


class RampSource:
    def __init__(self, n=8):
        self.data = [encode(ramp(96 + 8 * i, 128), 'JPEG', quality=95) for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {'image': self.data[i], 'id': i}


def test_views_inside_the_loader():
    fields = ('view1', 'view2', 'coords1', 'coords2', 'flip1', 'flip2', 'mask', 'id')
    steps = [
        views.TwoViews(size=16),
        views.BlockMask(grid=(4, 4), ratio=0.5),
        T.SelectFields(fields),
    ]
    with loader_lib.Loader(RampSource(), steps, global_batch_size=4, seed=1) as loader:
        batch = next(loader)
    assert batch['view1'].shape == (4, 16, 16, 3) and batch['view1'].dtype == np.uint8
    assert batch['coords2'].shape == (4, 4) and batch['coords2'].dtype == np.float32
    assert batch['flip1'].shape == (4,) and batch['flip1'].dtype == bool
    assert batch['mask'].shape == (4, 4, 4) and (batch['mask'].sum((1, 2)) == 8).all()
    for row in range(4):
        check_view(batch['view1'][row], batch['coords1'][row], batch['flip1'][row], 1.0, 2.5)
