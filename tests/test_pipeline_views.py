"""View fields (two views + coords, rotations, MIM masks) through pipeline.train_loader, over
shapes and over a JSONL folder, checked against crops / rotations made here with PIL/numpy."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import clip, clip_data, common
from input_pipeline import pipeline
from test_sources import write_jsonl_dataset

B = 8
TWO_VIEWS = ('view1', 'view2', 'coords1', 'coords2', 'flip1', 'flip2')
ALL_FIELDS = ('image', 'text', 'id') + TWO_VIEWS + ('rot_image', 'rot_label', 'mask')


def shapes_config(**views):
    config = clip.get_config('tiny')
    config.batch_size = B
    config.input.image_size = 32
    config.input.context_length = 32
    config.model.image.patch = 8
    config.input.views = common.views_options(mask_patch_size=8, **views)
    return config


def jsonl_config(path, **views):
    config = clip_data.get_config('jsonl')
    config.batch_size = B
    config.input = common.real_input(
        common.jsonl_data(path), image_size=32, context_length=32, num_threads=2
    )
    config.model.image.patch = 8
    config.input.views = common.views_options(mask_patch_size=8, **views)
    return config


def first_batch(config, fields=ALL_FIELDS):
    with pipeline.train_loader(config, fields=fields) as loader:
        return next(loader)


def view_reference(original: np.ndarray, coords, flip: bool, size: int) -> np.ndarray:
    """The box of `original` at coords (y0, x0, y1, x1), resized to size, flipped."""
    y0, x0, y1, x1 = (float(c) for c in coords)
    crop = Image.fromarray(original).resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
    out = np.asarray(crop)
    return out[:, ::-1] if flip else out


def check_layout(batch, *, view_size, image_hw, grid, num_masked):
    h, w = image_hw
    for n in (1, 2):
        view, coords, flip = batch[f'view{n}'], batch[f'coords{n}'], batch[f'flip{n}']
        assert view.shape == (B, view_size, view_size, 3) and view.dtype == np.uint8
        assert coords.shape == (B, 4) and coords.dtype == np.float32
        assert flip.shape == (B,) and flip.dtype == bool
        y0, x0, y1, x1 = coords.T
        assert np.all((0 <= y0) & (y0 < y1) & (y1 <= h)), coords
        assert np.all((0 <= x0) & (x0 < x1) & (x1 <= w)), coords
    assert batch['rot_image'].shape == batch['image'].shape
    assert batch['rot_image'].dtype == np.uint8
    assert batch['rot_label'].shape == (B,) and batch['rot_label'].dtype == np.int32
    for image, rotated, k in zip(batch['image'], batch['rot_image'], batch['rot_label']):
        np.testing.assert_array_equal(rotated, np.rot90(image, int(k)))
    assert batch['mask'].shape == (B, *grid) and batch['mask'].dtype == bool
    np.testing.assert_array_equal(batch['mask'].sum(axis=(1, 2)), num_masked)


def test_shapes_batches_hold_two_views_rotations_and_masks():
    config = shapes_config(size=16, scale=(0.3, 1.0))
    batch = first_batch(config)
    check_layout(batch, view_size=16, image_hw=(32, 32), grid=(4, 4), num_masked=6)  # 0.4 x 16
    assert set(batch) == set(ALL_FIELDS)
    source = pipeline.make_source(config.input, split='train', seed=config.seed)
    for row, i in enumerate(batch['id']):
        original = source[int(i)]['image']
        np.testing.assert_array_equal(batch['image'][row], original)  # shapes: no crop
        for n in (1, 2):
            want = view_reference(
                original, batch[f'coords{n}'][row], batch[f'flip{n}'][row], 16
            ).astype(int)
            assert np.abs(batch[f'view{n}'][row].astype(int) - want).mean() < 12, (i, n)
    # Random per example: the two views, the flips and the labels are not all alike.
    assert not np.array_equal(batch['coords1'], batch['coords2'])
    assert len(set(batch['rot_label'].tolist())) > 1


def test_jsonl_views_are_cut_from_the_original_image(tmp_path):
    path = write_jsonl_dataset(tmp_path, 16, size=(30, 40))
    config = jsonl_config(path, size=16, scale=(0.3, 1.0))
    batch = first_batch(config)
    # Training image = the 32 px crop; the views' boxes are in the 30 x 40 originals.
    assert batch['image'].shape == (B, 32, 32, 3)
    check_layout(batch, view_size=16, image_hw=(30, 40), grid=(4, 4), num_masked=6)
    for row, i in enumerate(batch['id']):
        name = f'{int(i):04d}.' + ('png' if int(i) % 5 == 4 else 'jpg')
        original = np.asarray(Image.open(os.path.join(tmp_path, 'images', name)).convert('RGB'))
        for n in (1, 2):
            want = view_reference(
                original, batch[f'coords{n}'][row], batch[f'flip{n}'][row], 16
            ).astype(int)
            assert np.abs(batch[f'view{n}'][row].astype(int) - want).mean() < 12, (i, n)


def test_only_views_asked_for_are_built_and_the_encoded_image_is_not_kept(tmp_path):
    path = write_jsonl_dataset(tmp_path, 8, size=(30, 40))
    config = jsonl_config(path)
    batch = first_batch(config, fields=('view1', 'view2', 'coords1', 'coords2'))
    assert sorted(batch) == ['coords1', 'coords2', 'view1', 'view2']
    assert batch['view1'].shape == (B, 32, 32, 3)  # views.size 0: input.image_size
    steps = pipeline.record_transforms(config.input, ('image', 'text'))
    assert 'TwoViews' not in [type(s).__name__ for s in steps]
    steps = pipeline.record_transforms(config.input, ('view1', 'image', 'mask'))
    names = [type(s).__name__ for s in steps]
    assert (
        names.index('TwoViews') < names.index('DecodeRandomResizedCrop') < names.index('BlockMask')
    )


def test_all_rotations_and_exact_resume_of_views():
    config = shapes_config(rotations='all')
    fields = ('image', 'rot_image', 'rot_label', 'view1', 'coords1')
    with pipeline.train_loader(config, fields=fields) as loader:
        batches = [next(loader) for _ in range(3)]
        state = loader.get_state()
        after = next(loader)
    assert batches[0]['rot_image'].shape == (B, 4, 32, 32, 3)
    np.testing.assert_array_equal(batches[0]['rot_label'], np.tile(np.arange(4), (B, 1)))
    for k in range(4):
        np.testing.assert_array_equal(
            batches[0]['rot_image'][:, k], np.rot90(batches[0]['image'], k, axes=(1, 2))
        )
    with pipeline.train_loader(config, fields=fields) as loader:
        loader.set_state(state)
        again = next(loader)
    for k in fields:  # the random views redraw exactly on resume
        np.testing.assert_array_equal(again[k], after[k], err_msg=k)


def test_view_config_errors_are_one_line():
    config = shapes_config(rotations='sideways')
    with pytest.raises(
        pipeline.InputError, match="rotations 'sideways' is not one of: random, all"
    ):
        pipeline.train_loader(config, fields=('rot_image',))
    config = shapes_config()
    config.input.views.mask_patch_size = 16
    with pytest.raises(
        pipeline.InputError,
        match='mask_patch_size 16 != model.image.patch 8; set '
        '--config.input.views.mask_patch_size=8',
    ):
        pipeline.train_loader(config, fields=('image', 'mask'))
    config.input.views.mask_patch_size = 5
    with pytest.raises(pipeline.InputError, match='mask_patch_size 5 does not divide'):
        pipeline.train_loader(config, fields=('mask',))
    with pytest.raises(pipeline.InputError, match=r"\['view3'\].*pipeline builds: .*view1"):
        pipeline.train_loader(config, fields=('view3',))
