"""`python -m input_pipeline.convert`: round trips into ArrayRecord, skipped records,
resizing, and resuming after a crash."""

import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import convert
from input_pipeline.sources import array_record, folder, webdataset
from fixtures_data import write_jsonl_with_bad_records
from test_sources import decoded, encode, image_array, wds_sample, write_jsonl_dataset, write_tar


def run(*argv):
    return convert.main([*argv, '--no-progress'])


def test_help(python):
    proc = python(['-m', 'input_pipeline.convert', '--help'])
    for flag in ('--format', '--max-image-size', '--records-per-shard', '--num-workers'):
        assert flag in proc.stdout


def test_jsonl_round_trip_skips_bad_records(tmp_path, capsys):
    path = write_jsonl_with_bad_records(tmp_path, 10, truncated_from=2, kept_bytes=200, empty=1)
    out = str(tmp_path / 'ar')
    totals = run('--format', 'jsonl', '--input', path, '--output', out, '--records-per-shard', '4')
    assert totals == {'written': 10, 'skipped': 3, 'shards': 4, 'shards_already_done': 0}
    printed = capsys.readouterr().out
    assert 'written 10 records, skipped 3, in 4 shards (0 already done)' in printed
    assert 'missing.jpg' in printed and 'empty or missing caption' in printed
    assert sorted(f for f in os.listdir(out) if f.endswith('.array_record')) == [
        f'data-{k:05d}-of-00004.array_record' for k in range(4)
    ]
    # Read back: every good input record, in order, byte for byte.
    source, original = array_record.ArrayRecordSource(out), folder.JsonlSource(path)
    assert len(source) == 10
    for i in range(10):
        record, expected = source[i], original[i]
        assert record == {**expected, 'id': i}


def test_csv_and_webdataset_round_trips(tmp_path):
    write_jsonl_dataset(tmp_path, 3)
    (tmp_path / 'train.csv').write_text(
        'filepath,title\nimages/0000.jpg,photo 0\nimages/0001.jpg,photo 1\n'
    )
    out = str(tmp_path / 'csv_ar')
    run(
        '--format',
        'csv',
        '--input',
        str(tmp_path / 'train.csv'),
        '--csv-separator',
        ',',
        '--output',
        out,
    )
    records = array_record.ArrayRecordSource(out)
    assert [r['caption'] for r in (records[0], records[1])] == ['photo 0', 'photo 1']
    with open(tmp_path / 'images/0001.jpg', 'rb') as f:
        assert records[1]['image'] == f.read()

    samples = [wds_sample(i) for i in range(5)] + [('000000099', {'txt': b'orphan'})]
    shards = [
        write_tar(tmp_path / 'a.tar', samples[:3]),
        write_tar(tmp_path / 'b.tar', samples[3:]),
    ]
    out = str(tmp_path / 'wds_ar')
    totals = run('--format', 'webdataset', '--input', str(tmp_path / '{a,b}.tar'), '--output', out)
    assert (totals['written'], totals['skipped']) == (5, 1)
    records, original = array_record.ArrayRecordSource(out), webdataset.WebDatasetSource(shards)
    for i in range(5):
        assert records[i] == original[i]  # same fields: image, caption, json's, key, id
        assert records[i]['key'] == samples[i][0]


def test_resize_on_the_way(tmp_path):
    path = write_jsonl_dataset(tmp_path, 2, size=(60, 90))
    out = str(tmp_path / 'ar')
    run('--format', 'jsonl', '--input', path, '--output', out, '--max-image-size', '30')
    source, original = array_record.ArrayRecordSource(out), folder.JsonlSource(path)
    for i in range(2):
        image = decoded(source[i]['image'])
        assert image.shape == (30, 45, 3)  # short side 60 -> 30, aspect kept
        assert source[i]['image'][:2] == b'\xff\xd8'  # re-encoded as JPEG (record 1 was PNG)
        reference = np.asarray(
            Image.fromarray(decoded(original[i]['image'])).resize((45, 30), Image.BICUBIC)
        )
        assert np.abs(image.astype(int) - reference).mean() < 6
    # Already small enough: stored as they were, not re-encoded.
    small = str(tmp_path / 'ar_small')
    run('--format', 'jsonl', '--input', path, '--output', small, '--max-image-size', '60')
    assert array_record.ArrayRecordSource(small)[1]['image'] == original[1]['image']


def test_resume_skips_finished_shards(tmp_path, capsys):
    path = write_jsonl_dataset(tmp_path, 9)
    out = tmp_path / 'ar'
    args = ('--format', 'jsonl', '--input', path, '--output', str(out), '--records-per-shard', '3')
    run(*args)
    first = array_record.ArrayRecordSource(str(out))
    expected = [first[i] for i in range(9)]
    # A crash while writing shard 1: its temporary file is there, the shard is not.
    shard1 = out / 'data-00001-of-00003.array_record'
    os.replace(shard1, str(shard1) + '.tmp')
    stamps = {k: os.stat(out / f'data-0000{k}-of-00003.array_record').st_mtime_ns for k in (0, 2)}
    capsys.readouterr()
    totals = run(*args)
    assert totals == {'written': 9, 'skipped': 0, 'shards': 3, 'shards_already_done': 2}
    assert 'in 3 shards (2 already done)' in capsys.readouterr().out
    for k in (0, 2):  # finished shards were not rewritten
        assert os.stat(out / f'data-0000{k}-of-00003.array_record').st_mtime_ns == stamps[k]
    assert not os.path.exists(str(shard1) + '.tmp')
    again = array_record.ArrayRecordSource(str(out))
    assert [again[i] for i in range(9)] == expected
    # Other settings into the same folder would mix two layouts: refused.
    with pytest.raises(SystemExit, match='records_per_shard'):
        run(*args[:-1], '4')


def test_parallel_workers_write_the_same_shards(tmp_path):
    path = write_jsonl_dataset(tmp_path, 8)
    outs = []
    for workers in ('1', '2'):
        out = str(tmp_path / f'ar{workers}')
        run(
            '--format',
            'jsonl',
            '--input',
            path,
            '--output',
            out,
            '--records-per-shard',
            '3',
            '--num-workers',
            workers,
        )
        outs.append(array_record.ArrayRecordSource(out))
    assert [outs[0][i] for i in range(8)] == [outs[1][i] for i in range(8)]


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: jsonl source: no such file '.*nope.jsonl'"):
        run(
            '--format',
            'jsonl',
            '--input',
            str(tmp_path / 'nope.jsonl'),
            '--output',
            str(tmp_path / 'o'),
        )
    write_tar(tmp_path / 'x.tar', [('0', {'jpg': encode(image_array(0))})])
    with pytest.raises(SystemExit, match='no such file'):
        run(
            '--format',
            'webdataset',
            '--input',
            str(tmp_path / '{x,y}.tar'),
            '--output',
            str(tmp_path / 'o'),
        )
