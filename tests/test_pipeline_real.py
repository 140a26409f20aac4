"""Real-data configs through input_pipeline/pipeline.py and the trainer: sources from
`config.input`, decode + crop + flip, bad records, start-up errors, and a short run."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, read_metrics
from fixtures_data import write_jsonl_with_bad_records
from configs import clip_data, common
from input_pipeline import pipeline, transforms
from input_pipeline.tokenizers import ByteTokenizer
from test_sources import (  # noqa: F401  (tfds_dir is a fixture)
    image_array,
    tfds_dir,
    write_jsonl_dataset,
    write_shards,
    write_tar,
    wds_sample,
)

FIELDS = ('image', 'text', 'id')


def config_for(input_section, *, batch_size=8, image_size=16):
    config = clip_data.get_config('jsonl')
    config.input = input_section
    config.input.image_size = image_size
    config.input.context_length = 32
    config.input.num_threads = 2
    config.batch_size = batch_size
    return config


def train_on_jsonl(python, workdir, path, flags=(), **run_kwargs):
    """The user's command: pretrain.main on configs/clip_data.py:jsonl over `path`."""
    return python(
        ['-m', 'pretrain.main', '--config', 'configs/clip_data.py:jsonl', '--workdir', workdir]
        + [f'--config.input.data.path={path}', *TINY, *flags],
        **run_kwargs,
    )


def first_batch(config, fields=FIELDS):
    with pipeline.train_loader(config, fields=fields) as loader:
        return next(loader), loader


def test_jsonl_batches_hold_the_right_images_and_captions(tmp_path):
    path = write_jsonl_dataset(tmp_path, 16, size=(12, 16))
    # Whole-image crops (scale 1, the images' own 4:3 aspect), no flip: each row must be
    # its record's image resized, whatever the loader's order.
    section = common.real_input(
        common.jsonl_data(path),
        image_size=16,
        context_length=32,
        crop_scale=(1.0, 1.0),
        crop_ratio=(4 / 3, 4 / 3),
        flip=False,
    )
    batch, loader = first_batch(config_for(section))
    assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['text'].shape == (8, 32) and loader.skipped == 0
    tok = ByteTokenizer(32)
    for row, i in enumerate(batch['id']):
        assert tok.decode(batch['text'][row]) == f'photo {i}'
        reference = np.asarray(Image.fromarray(image_array(int(i), (12, 16))).resize((16, 16)))
        assert np.abs(batch['image'][row].astype(int) - reference).mean() < 12, i


def test_crop_and_flip_are_random_per_record_and_epoch(tmp_path):
    path = write_jsonl_dataset(tmp_path, 4, size=(40, 40))
    section = common.real_input(
        common.jsonl_data(path), image_size=16, context_length=32, crop_scale=(0.2, 0.5)
    )
    config = config_for(section, batch_size=4)
    with pipeline.train_loader(config, fields=FIELDS) as loader:
        epochs = [next(loader) for _ in range(3)]
    by_id = [dict(zip(b['id'].tolist(), b['image'])) for b in epochs]
    # Each epoch crops each record anew; the same epoch redraws the same (resume is exact).
    assert all(not np.array_equal(by_id[0][i], by_id[1][i]) for i in range(4))
    again, _ = first_batch(config)
    np.testing.assert_array_equal(again['image'], epochs[0]['image'])
    steps = pipeline.record_transforms(config.input, FIELDS)
    assert [type(s).__name__ for s in steps[:2]] == ['DecodeRandomResizedCrop', 'RandomFlip']
    assert steps[0].scale == (0.2, 0.5) and steps[0].size == 16


def test_every_format_from_the_config(tmp_path, tfds_dir):
    root = tmp_path / 'folder'
    jsonl = write_jsonl_dataset(root, 6)
    (root / 'train.tsv').write_text(
        'filepath\ttitle\n' + ''.join(f'images/{i:04d}.jpg\tphoto {i}\n' for i in (0, 1, 2, 3))
    )
    urls = write_shards(tmp_path, num_shards=2, per_shard=3)
    from input_pipeline import convert

    ar = str(tmp_path / 'ar')
    convert.main(['--format', 'jsonl', '--input', jsonl, '--output', ar, '--no-progress'])
    sections = {
        'jsonl': (common.jsonl_data(jsonl), 6, 'photo'),
        'csv': (common.csv_data(str(root / 'train.tsv')), 4, 'photo'),
        'webdataset': (common.webdataset_data(urls), 6, 'caption'),
        'array_record': (common.array_record_data(ar), 6, 'photo'),
        'tfds': (
            common.tfds_data(
                'pretrain_test_captions',
                data_dir=tfds_dir,
                fields={'image': 'image', 'caption': 'captions/text'},
            ),
            6,
            'first',
        ),
    }
    tok = ByteTokenizer(32)
    for kind, (data, n, word) in sections.items():
        config = config_for(common.real_input(data, image_size=16, context_length=32))
        assert config.input.source == kind
        assert len(pipeline.make_source(config.input)) == n, kind
        batch, _ = first_batch(config)
        assert batch['image'].shape == (8, 16, 16, 3), kind
        assert all(tok.decode(t).startswith(word) for t in batch['text']), kind


def test_mixture_from_the_config(tmp_path):
    jsonl = write_jsonl_dataset(tmp_path / 'folder', 10)
    urls = write_shards(tmp_path, num_shards=1, per_shard=30)
    section = common.mixture_input(
        {'curated': common.jsonl_data(jsonl), 'web': common.webdataset_data(urls)},
        weights={'curated': 0.25, 'web': 0.75},
        image_size=16,
        context_length=32,
    )
    config = config_for(section, batch_size=40)
    source = pipeline.make_source(config.input)
    assert len(source) == 40  # web read whole at 3/4: 30 / 0.75
    batch, _ = first_batch(config, fields=('image', 'text'))
    texts = [ByteTokenizer(32).decode(t) for t in batch['text']]
    # One batch = one whole epoch here, so the counts are exact: 10 curated, 30 web.
    assert sum(t.startswith('photo') for t in texts) == 10
    assert sum(t.startswith('caption') for t in texts) == 30
    # A weight is a command-line knob: 0 switches a component off.
    config.input.data.components.curated.weight = 0.0
    assert len(pipeline.make_source(config.input)) == 30


def test_bad_records_counted_and_skipped(tmp_path):
    """Truncated JPEG, missing file, empty caption, tar key without image."""
    path = write_jsonl_with_bad_records(tmp_path, 20, truncated_from=0, kept_bytes=150, empty=3)
    samples = [wds_sample(j) for j in range(7)] + [('000000999', {'txt': b'orphan'})]
    urls = write_tar(tmp_path / 'x.tar', samples)
    section = common.mixture_input(
        {'folder': common.jsonl_data(path), 'wds': common.webdataset_data(urls)},
        weights={'folder': 23, 'wds': 8},
        image_size=16,
        context_length=32,
        max_bad_fraction=0.5,
    )
    config = config_for(section, batch_size=31)  # one epoch: every record read once
    source = pipeline.make_source(config.input)
    assert len(source) == 31
    steps = pipeline.record_transforms(config.input, FIELDS)
    # Reference: the bad indices, read one by one outside the loader.
    bad = set()
    for i in range(31):
        try:
            transforms.apply(steps, source[i], rng_key=(0, 0, i))
        except (ValueError, OSError):
            bad.add(i)
    assert len(bad) == 4
    with pipeline.train_loader(config, fields=FIELDS) as loader:
        next(loader)
        next(loader)
        # Each row's bad record is replaced by the next good index, each read counted.
        expected = 0
        for position in range(62):
            index = loader.source_index(position)
            while index in bad:
                index, expected = (index + 1) % 31, expected + 1
        assert loader.skipped == expected >= 8  # each epoch meets all 4 bad records
        assert loader.seen == 62 + expected
    config.input.max_bad_fraction = 0.01
    with pipeline.train_loader(config, fields=FIELDS) as loader:
        loader.bad_fraction_min_records = 31
        with pytest.raises(RuntimeError, match='exceed max_bad_fraction'):
            next(loader)


@pytest.mark.parametrize(
    'mutate, match',
    [
        (
            lambda c, d: setattr(c.input.data, 'path', str(d / 'nope.jsonl')),
            "input.data: jsonl source: no such file '.*nope.jsonl'",
        ),
        (
            lambda c, d: setattr(c.input.data, 'image_root', str(d)),
            "none of the first 10 records can be read .*wrong path or image root",
        ),
        (
            lambda c, d: setattr(c.input, 'caption_field', 'title'),
            r"text field\(s\) \['title'\] .* text fields: caption, image, image_path, long",
        ),
        (
            lambda c, d: setattr(c.model.text, 'vocab_size', 100),
            "vocab_size 258 > model.text.vocab_size 100",
        ),
        (
            lambda c, d: setattr(c.input, 'source', 'parquet'),
            "unknown input.source 'parquet'; valid: shapes, mixture, jsonl, csv, webdataset",
        ),
    ],
)
def test_config_errors_at_start(tmp_path, mutate, match):
    path = write_jsonl_dataset(tmp_path / 'data', 12)
    config = config_for(
        common.real_input(common.jsonl_data(path), image_size=16, context_length=32)
    )
    mutate(config, tmp_path)
    with pytest.raises(ValueError, match=match):
        pipeline.train_loader(config, fields=FIELDS)


def test_empty_dataset_is_an_error_at_start(tmp_path):
    (tmp_path / 'empty.jsonl').write_text('')
    config = config_for(
        common.real_input(
            common.jsonl_data(str(tmp_path / 'empty.jsonl')), image_size=16, context_length=32
        )
    )
    with pytest.raises(ValueError, match="input.data: jsonl source: no records in '.*empty.jsonl'"):
        pipeline.train_loader(config, fields=FIELDS)


def test_shapes_pipeline_is_unchanged():
    config = clip_data.get_config('jsonl')
    config.input = common.shapes_input(image_size=16, context_length=32)
    steps = pipeline.record_transforms(config.input, FIELDS)
    assert [type(s).__name__ for s in steps] == ['Tokenize', 'SelectFields']


def test_training_on_a_jsonl_folder(python, tmp_path):
    """The user's command on ~64 tiny JPEGs: trains, logs, counts skipped records."""
    path = write_jsonl_dataset(
        tmp_path / 'data',
        64,
        size=(24, 32),
        extra_lines=['{"image": "images/missing.jpg", "caption": "gone"}'],
    )
    workdir = str(tmp_path / 'run')
    proc = train_on_jsonl(
        python,
        workdir,
        path,
        [
            '--config.model.dtype=float32',
            '--config.model.remat=none',
            '--config.input.num_threads=2',
            '--config.total_steps=6',
            '--config.log_every=3',
            '--config.checkpoint.every=6',
        ],
    )
    rows = read_metrics(workdir)
    assert [r['step'] for r in rows] == [3, 6]
    assert all(math.isfinite(r['train/loss']) for r in rows)
    # 6 steps x 16 = 96 reads of 65 records: the missing image is met at least once.
    assert rows[-1]['data/skipped'] >= 1
    assert 'missing.jpg' in proc.stderr
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['6']


def test_tokenizer_from_the_config(tmp_path):
    """input.tokenizer / tokenizer_path reach both caption fields (a HF tokenizer.json)."""
    import tokenizers as hf

    words = ['<pad>', '</s>', '[UNK]', 'photo', 'Photo', 'Number'] + [f'{i}' for i in range(8)]
    tok = hf.Tokenizer(hf.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / 'tokenizer.json'))
    path = write_jsonl_dataset(tmp_path / 'data', 8)
    section = common.real_input(
        common.jsonl_data(path),
        image_size=16,
        context_length=6,
        subcaption_context_length=4,
        num_subcaptions=2,
        tokenizer='hf',
        tokenizer_path=str(tmp_path / 'tokenizer.json'),
    )
    config = config_for(section)
    config.input.context_length = 6
    batch, _ = first_batch(config, fields=('text', 'texts', 'id'))
    for row, i in enumerate(batch['id']):
        # 'photo 3' -> photo, 3, </s>, then padding; a sentence 'Photo 3.' -> Photo, [UNK].
        assert batch['text'][row].tolist() == [3, 6 + i, 1, 0, 0, 0]
        assert batch['texts'][row].shape == (2, 4)
        assert batch['texts'][row][:, 0].tolist() in ([4, 4], [4, 5], [5, 4], [5, 5])
    config.model.text.vocab_size = 10
    with pytest.raises(ValueError, match="tokenizer 'hf' has vocab_size 14 > model.text"):
        pipeline.train_loader(config, fields=('text',))
    config.model.text.vocab_size, config.model.text.pad_id = 14, 5
    with pytest.raises(ValueError, match="'hf' pads with id 0 but model.text.pad_id is 5"):
        pipeline.train_loader(config, fields=('text',))


def test_a_missing_path_stops_the_run_at_start(python, tmp_path):
    proc = train_on_jsonl(python, str(tmp_path / 'run'), f'{tmp_path}/nope.jsonl', check=False)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr  # one line, not a stack
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: input.data: jsonl source: no such file '{tmp_path}/nope.jsonl'"


def test_coco_captions_train_on_a_new_caption_each_epoch(tmp_path):
    write_jsonl_dataset(tmp_path, 4)
    images = [{'id': 10 + i, 'file_name': f'{i:04d}.jpg'} for i in range(4)]
    annotations = [
        {'id': 100 * i + k, 'image_id': 10 + i, 'caption': f'image {i} caption {k}'}
        for i in range(4)
        for k in range(3)
    ]
    (tmp_path / 'captions_train.json').write_text(
        json.dumps({'images': images, 'annotations': annotations})
    )
    data = common.coco_data(str(tmp_path / 'captions_train.json'), str(tmp_path / 'images'))
    config = config_for(common.real_input(data, image_size=16, context_length=32), batch_size=4)
    drawn = {10 + i: set() for i in range(4)}
    with pipeline.train_loader(config, fields=FIELDS) as loader:
        for _ in range(8):  # 8 epochs of the 4 images
            batch = next(loader)
            for image_id, tokens in zip(batch['id'].tolist(), batch['text']):
                drawn[image_id].add(ByteTokenizer(32).decode(tokens))
    for image_id, texts in drawn.items():
        i = image_id - 10
        assert texts <= {f'image {i} caption {k}' for k in range(3)}
        assert len(texts) >= 2  # p(one caption 8 times) = 3 * (1/3)**8 per image
