"""Real-data sources on small real-format fixtures written here: JPEG/PNG files, JSONL,
CSV, webdataset tars, ArrayRecord shards, a TFDS dataset, and their mixtures."""

import collections
import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from input_pipeline import loader as loader_lib
from input_pipeline import transforms
from input_pipeline.sources import array_record, folder, mixture, paths, webdataset
from input_pipeline.tokenizers import ByteTokenizer

# -- fixtures (also used by test_convert.py and test_pipeline_real.py) -------------


def image_array(i: int, size=(12, 16)) -> np.ndarray:
    """A distinct small image per i: a colour from i plus a gradient."""
    h, w = size
    rng = np.random.default_rng(i)
    base = rng.integers(0, 200, 3)
    grad = np.add.outer(np.arange(h), np.arange(w))[..., None] % 50
    return (base + grad).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = 'JPEG') -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def write_jsonl_dataset(root, n: int, *, size=(12, 16), extra_lines=()) -> str:
    """root/images/NNNN.jpg|png + root/captions.jsonl; returns the JSONL path."""
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    lines = []
    for i in range(n):
        fmt = 'PNG' if i % 5 == 4 else 'JPEG'  # PNGs among the JPEGs, as in real folders
        rel = f'images/{i:04d}.{fmt.lower().replace("jpeg", "jpg")}'
        with open(os.path.join(root, rel), 'wb') as f:
            f.write(encode(image_array(i, size), fmt))
        lines.append(
            json.dumps(
                {'image': rel, 'caption': f'photo {i}', 'long_caption': f'Photo {i}. Number {i}.'}
            )
        )
    path = os.path.join(root, 'captions.jsonl')
    with open(path, 'w') as f:
        f.write('\n'.join(lines + list(extra_lines)) + '\n')
    return path


def write_tar(path, samples) -> str:
    """samples: [(key, {extension: bytes})], written as webdataset members in order."""
    with tarfile.open(path, 'w') as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f'{key}.{extension}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def wds_sample(i: int) -> tuple[str, dict]:
    meta = {'key': f'{i:09d}', 'url': f'http://x/{i}.jpg', 'width': 16, 'height': 12}
    return f'{i:09d}', {
        'jpg': encode(image_array(i)),
        'txt': f'caption {i}'.encode(),
        'json': json.dumps(meta).encode(),
    }


def write_shards(root, num_shards: int, per_shard: int) -> str:
    """root/{00000..}.tar of img2dataset-style samples; returns the brace pattern."""
    for s in range(num_shards):
        write_tar(
            os.path.join(root, f'{s:05d}.tar'),
            [wds_sample(s * per_shard + j) for j in range(per_shard)],
        )
    return os.path.join(str(root), f'{{00000..{num_shards - 1:05d}}}.tar')


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


# -- paths --------------------------------------------------------------------------


def test_brace_expansion():
    assert paths.expand_braces('s/{00008..00011}.tar') == [
        's/00008.tar',
        's/00009.tar',
        's/00010.tar',
        's/00011.tar',
    ]
    assert paths.expand_braces('{a,b}-{1..2}') == ['a-1', 'a-2', 'b-1', 'b-2']
    assert paths.expand_braces('plain.tar') == ['plain.tar']


def test_expand_paths_names_the_missing_file(tmp_path):
    for name in ('a.tar', 'b.tar'):
        (tmp_path / name).write_bytes(b'')
    assert paths.expand_paths(str(tmp_path)) == [str(tmp_path / 'a.tar'), str(tmp_path / 'b.tar')]
    assert paths.expand_paths(str(tmp_path / '*.tar'))[1].endswith('b.tar')
    with pytest.raises(ValueError, match='c.tar'):
        paths.expand_paths(str(tmp_path / '{a,c}.tar'))


# -- folder + JSONL / CSV -----------------------------------------------------------


def test_jsonl_source_reads_images_and_captions(tmp_path):
    path = write_jsonl_dataset(tmp_path, 10, extra_lines=['', '   '])  # blank lines ignored
    source = folder.JsonlSource(path)
    assert len(source) == 10
    for i in (0, 4, 9):
        record = source[i]
        with open(tmp_path / record['image_path'], 'rb') as f:
            assert record['image'] == f.read()
        assert record['caption'] == f'photo {i}' and record['long_caption'].startswith('Photo')
        assert record['id'] == i
    # JPEG is lossy: the decoded image is close to what was written; PNG is exact.
    assert np.abs(decoded(source[0]['image']).astype(int) - image_array(0)).mean() < 4
    np.testing.assert_array_equal(decoded(source[4]['image']), image_array(4))


def test_jsonl_source_image_root_and_bad_lines(tmp_path):
    path = write_jsonl_dataset(
        tmp_path,
        3,
        extra_lines=['{"image": "images/missing.jpg", "caption": "gone"}', '{"image": '],
    )
    moved = tmp_path / 'elsewhere'
    os.rename(tmp_path / 'images', moved)
    os.makedirs(moved / 'images')
    for f in os.listdir(moved):
        if f != 'images':
            os.rename(moved / f, moved / 'images' / f)
    source = folder.JsonlSource(path, image_root=str(moved))
    assert len(source) == 5
    assert source[1]['caption'] == 'photo 1'
    with pytest.raises(FileNotFoundError, match='missing.jpg'):
        source[3]
    with pytest.raises(ValueError):  # malformed JSON: a bad record, not a crash at start
        source[4]


def test_jsonl_source_errors_at_start(tmp_path):
    with pytest.raises(ValueError, match='no such file .*nope.jsonl'):
        folder.JsonlSource(str(tmp_path / 'nope.jsonl'))
    path = write_jsonl_dataset(tmp_path, 2)
    with pytest.raises(ValueError, match='image_root: no such directory .*imgs'):
        folder.JsonlSource(path, image_root=str(tmp_path / 'imgs'))
    with pytest.raises(ValueError, match="no image field 'path'; its fields: caption, image"):
        folder.JsonlSource(path, image_field='path')
    (tmp_path / 'empty.jsonl').write_text('\n\n')
    with pytest.raises(ValueError, match='no records'):
        folder.JsonlSource(str(tmp_path / 'empty.jsonl'))


def test_csv_source_open_clip_layout(tmp_path):
    write_jsonl_dataset(tmp_path, 3)
    # A quoted caption may hold the separator and a newline.
    (tmp_path / 'train.csv').write_text(
        'filepath\ttitle\tlicense\n'
        'images/0000.jpg\tphoto 0\tcc-by\n'
        'images/0001.jpg\t"tab\there, and\na newline"\tcc0\n'
    )
    source = folder.CsvSource(str(tmp_path / 'train.csv'))
    assert len(source) == 2
    assert source[1]['caption'] == 'tab\there, and\na newline'
    assert source[1]['license'] == 'cc0' and source[1]['image_path'] == 'images/0001.jpg'
    with open(tmp_path / 'images/0001.jpg', 'rb') as f:
        assert source[1]['image'] == f.read()
    # Separator and column names are configurable.
    (tmp_path / 'c.csv').write_text('path,text\nimages/0002.jpg,photo 2\n')
    source = folder.CsvSource(
        str(tmp_path / 'c.csv'), image_column='path', caption_column='text', separator=','
    )
    assert source[0]['caption'] == 'photo 2' and 'text' not in source[0]
    # With the default tab separator that file has one column: the error says so.
    with pytest.raises(ValueError, match=r"no image_column 'path'; columns: path,text \(separator"):
        folder.CsvSource(str(tmp_path / 'c.csv'), image_column='path')
    with pytest.raises(ValueError, match=r"no caption_column 'title'; columns: path, text$"):
        folder.CsvSource(str(tmp_path / 'c.csv'), image_column='path', separator=',')


# -- webdataset -----------------------------------------------------------------------


def test_webdataset_source_reads_every_sample(tmp_path):
    pattern = write_shards(tmp_path, num_shards=3, per_shard=4)
    source = webdataset.WebDatasetSource(pattern)
    assert len(source) == 12 and len(source.paths) == 3
    for i in range(12):
        record = source[i]
        key, members = wds_sample(i)
        assert record['image'] == members['jpg']
        assert record['caption'] == f'caption {i}'
        assert record['url'] == f'http://x/{i}.jpg' and record['width'] == 16
        assert record['key'] == key and record['id'] == i
    with pytest.raises(IndexError):
        source[12]


def test_webdataset_index_is_cached_and_invalidated(tmp_path, monkeypatch):
    write_shards(tmp_path, num_shards=1, per_shard=3)
    shard = str(tmp_path / '00000.tar')
    assert len(webdataset.WebDatasetSource(shard)) == 3
    assert os.path.exists(shard + '.index.npz')
    # A second open reads the cache: it does not walk the tar again.
    real_build = webdataset.build_index
    calls = []
    monkeypatch.setattr(webdataset, 'build_index', lambda p: calls.append(p) or real_build(p))
    assert len(webdataset.WebDatasetSource(shard)) == 3 and calls == []
    # Rewriting the shard changes its size and mtime: the index is rebuilt.
    write_tar(shard, [wds_sample(j) for j in range(5)])
    os.utime(shard, ns=(1, 1))
    source = webdataset.WebDatasetSource(shard)
    assert len(source) == 5 and calls == [shard]
    assert source[4]['caption'] == 'caption 4'
    # index_dir keeps indexes out of a (possibly read-only) data folder.
    index_dir = tmp_path / 'indexes'
    webdataset.WebDatasetSource(shard, index_dir=str(index_dir))
    assert [f.endswith('.index.npz') for f in os.listdir(index_dir)] == [True]


def test_webdataset_key_without_image_is_a_bad_record(tmp_path):
    samples = [
        wds_sample(0),
        ('000000001', {'txt': b'no image here', 'json': b'{}'}),
        ('sub/000000002', {'png': encode(image_array(2), 'PNG'), 'txt': b'png in a folder'}),
        ('000000003', {'jpg': encode(image_array(3)), 'txt': b'\xff\xfe not utf-8'}),
    ]
    source = webdataset.WebDatasetSource(write_tar(tmp_path / 'x.tar', samples))
    assert len(source) == 4
    with pytest.raises(
        ValueError, match="key '000000001' has no image member \\(has: txt, json\\)"
    ):
        source[1]
    np.testing.assert_array_equal(decoded(source[2]['image']), image_array(2))
    assert source[2]['key'] == 'sub/000000002'
    with pytest.raises(ValueError, match='not UTF-8'):
        source[3]


def test_webdataset_errors_at_start(tmp_path):
    write_tar(tmp_path / '00000.tar', [wds_sample(0)])
    with pytest.raises(ValueError, match="no such file '.*/00001.tar'"):
        webdataset.WebDatasetSource(str(tmp_path / '{00000..00001}.tar'))
    with tarfile.open(tmp_path / 'z.tar.gz', 'w:gz') as tar:
        info = tarfile.TarInfo('0.txt')
        info.size = 1
        tar.addfile(info, io.BytesIO(b'x'))
    with pytest.raises(ValueError, match='not an uncompressed tar'):
        webdataset.WebDatasetSource(str(tmp_path / 'z.tar.gz'))
    write_tar(tmp_path / 'empty.tar', [])
    with pytest.raises(ValueError, match='no samples'):
        webdataset.WebDatasetSource(str(tmp_path / 'empty.tar'))


# -- ArrayRecord ------------------------------------------------------------------------


def test_record_layout_round_trip():
    record = {
        'image': bytes(range(256)) * 3,
        'empty': b'',
        'caption': 'un café, 東京 \n "quoted"',
        'width': 640,
        'score': 0.25,
        'tags': ['a', 'b'],
        'missing': None,
        'label': np.int64(7),
    }
    back = array_record.decode_record(array_record.encode_record(record))
    assert back == {**record, 'label': 7} and isinstance(back['label'], int)
    with pytest.raises(TypeError, match='cannot store a ndarray'):
        array_record.encode_record({'x': np.zeros(3)})
    with pytest.raises(ValueError, match='not a record'):
        array_record.decode_record(b'\x80\x04pickle')
    data = array_record.encode_record(record)
    with pytest.raises(ValueError, match='header describes'):
        array_record.decode_record(data[:-1])


def write_array_records(path, records):
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), array_record.WRITER_OPTIONS)
    for record in records:
        writer.write(array_record.encode_record(record))
    writer.close()


def test_array_record_source_over_shards(tmp_path):
    records = [{'image': encode(image_array(i)), 'caption': f'c{i}'} for i in range(7)]
    write_array_records(tmp_path / 'd-00000-of-00002.array_record', records[:4])
    write_array_records(tmp_path / 'd-00001-of-00002.array_record', records[4:])
    (tmp_path / 'd-00002.array_record.tmp').write_bytes(b'half written')  # not a shard
    source = array_record.ArrayRecordSource(str(tmp_path))
    assert len(source) == 7
    for i in range(7):
        assert source[i] == {**records[i], 'id': i}
    assert len(array_record.ArrayRecordSource(str(tmp_path / 'd-*-of-00002.array_record'))) == 7
    with pytest.raises(ValueError, match='no such file'):
        array_record.ArrayRecordSource(str(tmp_path / 'x.array_record'))


# -- TFDS ---------------------------------------------------------------------------------


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
    """A tiny image-text dataset written by a TFDS builder in ArrayRecord format.

    No TensorFlow is installed: images are handed to TFDS already encoded (PNG);
    encoding a numpy image would need TensorFlow (tf.image.encode_png).
    """
    import tensorflow_datasets as tfds

    # Not registered: TfdsSource must find the prepared files in data_dir by name alone,
    # as it does for a dataset built on another machine.
    class PretrainTestCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Image(shape=(None, None, 3)),
                        'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
                        'label': tfds.features.ClassLabel(num_classes=3),
                        'index': np.int32,
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples(6), 'test': self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                captions = [f'first {i}', f'second {i}']
                yield i, {
                    'image': encode(image_array(i), 'PNG'),
                    'captions': {'text': captions},
                    'label': i % 3,
                    'index': i,
                }

    data_dir = tmp_path_factory.mktemp('tfds')
    PretrainTestCaptions(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
    return str(data_dir)


def test_tfds_source_maps_fields_without_tensorflow(tfds_dir):
    from input_pipeline.sources import tfds as tfds_source

    assert importlib.util.find_spec('tensorflow') is None  # so nothing below used it
    source = tfds_source.TfdsSource(
        'pretrain_test_captions',
        data_dir=tfds_dir,
        fields={
            'image': 'image',
            'caption': 'captions/text',
            'alt': 'captions/text/1',
            'label': 'label',
            'index': 'index',
        },
    )
    assert len(source) == 6
    seen = set()
    for i in range(6):
        record = source[i]
        n = record['index']  # TFDS shuffles at write time: find the example by its field
        seen.add(n)
        assert isinstance(record['image'], bytes)  # encoded, like every source
        np.testing.assert_array_equal(decoded(record['image']), image_array(n))
        assert record['caption'] == f'first {n}' and record['alt'] == f'second {n}'
        assert record['label'] == n % 3 and isinstance(record['label'], int)
        assert record['id'] == i
    assert seen == set(range(6))
    assert (
        len(
            tfds_source.TfdsSource(
                'pretrain_test_captions', split='test', data_dir=tfds_dir, fields={'image': 'image'}
            )
        )
        == 2
    )


def test_tfds_source_errors_at_start(tfds_dir, tmp_path):
    from input_pipeline.sources import tfds as tfds_source

    with pytest.raises(
        ValueError, match="unknown feature path 'caption' for field 'caption'.*" "captions/text"
    ):
        tfds_source.TfdsSource('pretrain_test_captions', data_dir=tfds_dir)
    with pytest.raises(ValueError, match="'label' is a ClassLabel, not an Image"):
        tfds_source.TfdsSource(
            'pretrain_test_captions', data_dir=tfds_dir, fields={'image': 'label'}
        )
    with pytest.raises(ValueError, match='no_such_dataset'):
        tfds_source.TfdsSource('no_such_dataset', data_dir=str(tmp_path))


# -- mixtures --------------------------------------------------------------------------


class ListSource:
    def __init__(self, name, n):
        self.records = [{'name': name, 'id': i} for i in range(n)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_mixture_proportions_and_coverage():
    parts = {
        'big': ListSource('big', 900),
        'small': ListSource('small', 50),
        'off': ListSource('off', 10),
    }
    weights = {'big': 0.6, 'small': 0.4, 'off': 0.0}
    source = mixture.MixtureSource(parts, weights)
    # The default length reads the big component whole at its weight: 900 / 0.6.
    assert len(source) == 1500
    records = [source[i] for i in range(len(source))]
    counts = collections.Counter(r['source'] for r in records)
    assert counts == {'big': 900, 'small': 600}  # 'off' (weight 0) never read
    # Every component is read whole; the small one 12 times, each record equally often.
    assert {r['id'] for r in records if r['source'] == 'big'} == set(range(900))
    small = collections.Counter(r['id'] for r in records if r['source'] == 'small')
    assert set(small.values()) == {12} and len(small) == 50
    # Proportions hold in every window, not only over the whole epoch.
    for start in range(0, 1500, 100):
        window = collections.Counter(r['source'] for r in records[start : start + 100])
        assert abs(window['small'] - 40) <= 1, (start, window)
    # Deterministic: a second instance maps every index the same way.
    again = mixture.MixtureSource(parts, weights)
    assert [again[i] for i in range(0, 1500, 7)] == records[::7]


def test_mixture_config_errors():
    parts = {'a': ListSource('a', 3), 'b': ListSource('b', 3)}
    with pytest.raises(ValueError, match=r"weights name \['a'\], components are \['a', 'b'\]"):
        mixture.MixtureSource(parts, {'a': 1.0})
    with pytest.raises(ValueError, match='positive sum'):
        mixture.MixtureSource(parts, {'a': 0.0, 'b': 0.0})
    with pytest.raises(IndexError):
        mixture.MixtureSource(parts, {'a': 1.0, 'b': 1.0})[6]


# -- through the real Loader --------------------------------------------------------------


def test_bad_records_are_counted_and_replaced_by_the_loader(tmp_path):
    """Missing image file, empty caption, tar key without image: skipped, counted."""
    root = tmp_path / 'folder'
    path = write_jsonl_dataset(
        root,
        12,
        extra_lines=[
            '{"image": "images/missing.jpg", "caption": "gone"}',
            '{"image": "images/0001.jpg", "caption": "  "}',
        ],
    )
    samples = [wds_sample(100 + j) for j in range(6)] + [('000000999', {'txt': b'orphan'})]
    parts = {
        'jsonl': folder.JsonlSource(path),
        'wds': webdataset.WebDatasetSource(write_tar(tmp_path / 'x.tar', samples)),
    }
    source = mixture.MixtureSource(parts, {'jsonl': 2 / 3, 'wds': 1 / 3})
    steps = [
        transforms.Tokenize('caption', ByteTokenizer(16)),
        transforms.SelectFields(('text', 'id', 'source')),
    ]
    n = len(source)  # 21: 14 JSONL lines at 2/3 and 7 tar keys at 1/3
    assert n == 21
    loader = loader_lib.make_loader(
        source, steps, global_batch_size=n, seed=0, shuffle=False, max_bad_fraction=0.5
    )
    with loader:
        batch = next(loader)
    # Reference: which mixture indices are bad, read one by one outside the loader.
    bad = set()
    for i in range(n):
        try:
            transforms.apply(steps, source[i])
        except (ValueError, OSError):
            bad.add(i)
    assert len(bad) == 3  # the missing file, the empty caption, the orphan tar key
    # Each bad record is replaced by the next good index; a run of bad records counts
    # every one it passes, once per row that reaches it.
    expected_ids, expected_skipped = [], 0
    for i in range(n):
        j = i
        while j in bad:
            j, expected_skipped = (j + 1) % n, expected_skipped + 1
        expected_ids.append((source[j]['source'], source[j]['id']))
    assert loader.skipped == expected_skipped and loader.seen == n + expected_skipped
    assert list(zip(batch['source'], batch['id'].tolist())) == expected_ids
    assert batch['text'].shape == (n, 16)
    # With a tight max_bad_fraction the same data stops the run with a clear error.
    strict = loader_lib.make_loader(
        source,
        steps,
        global_batch_size=n,
        seed=0,
        shuffle=False,
        max_bad_fraction=0.01,
        bad_fraction_min_records=10,
    )
    with strict, pytest.raises(RuntimeError, match='bad records of .* exceed max_bad_fraction'):
        next(strict)
