"""Convert folder+JSONL, folder+CSV or webdataset tars into ArrayRecord shards.

    python -m input_pipeline.convert --format jsonl --input data/captions.jsonl \\
        --output data/arrayrecord --max-image-size 512 --num-workers 8
    python -m input_pipeline.convert --format webdataset \\
        --input 'shards/{00000..00127}.tar' --output data/arrayrecord

then train with `input.source='array_record'`, `input.data.paths='data/arrayrecord'`.

Each record keeps its encoded image (re-encoded as JPEG only when --max-image-size
shrinks it) and every other field of the input (caption fields, `image_path` /
`key` for provenance); see input_pipeline/sources/array_record.py for the layout.

A record is skipped, and counted, when it cannot be read (missing image file, tar key
without image, malformed line), its image does not decode (truncated file), or its
caption field is missing or empty. Undecodable images are found by decoding each one
(--no-verify skips that when the data is known to be clean).

Resumable: shard k of n holds input records [k*R, (k+1)*R) and is written to a
temporary file, its counts to `<shard>.json`, then renamed into place; a rerun skips
the shards already there. `convert.json` in the output folder records the settings,
and a rerun with other settings stops instead of mixing two layouts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import multiprocessing
import os
import sys

from PIL import Image

from input_pipeline.sources import array_record, folder, webdataset

# Reasons of skipped records kept per shard, for the final report.
_MAX_REASONS = 5


def make_input_source(args):
    """The random-access source the command line names."""
    if args.format == 'jsonl':
        return folder.JsonlSource(
            args.input, image_root=args.image_root, image_field=args.image_field
        )
    if args.format == 'csv':
        return folder.CsvSource(
            args.input,
            image_root=args.image_root,
            image_column=args.csv_image_column,
            caption_column=args.csv_caption_column,
            separator=args.csv_separator,
        )
    return webdataset.WebDatasetSource(args.input, index_dir=args.index_dir)


def shrink_image(data: bytes, *, max_size: int, quality: int, verify: bool) -> bytes:
    """The image's bytes, re-encoded as JPEG with the short side <= max_size if larger.

    max_size 0 keeps every image as it is. Raises on an undecodable image when
    decoding it (verify, or a resize).
    """
    if not verify and not max_size:
        return data
    with Image.open(io.BytesIO(data)) as image:
        if max_size and min(image.size) > max_size:
            scale = max_size / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            # draft: JPEG decodes at a power-of-two reduction >= size, much faster.
            image.draft('RGB', size)
            out = io.BytesIO()
            image.convert('RGB').resize(size, Image.BICUBIC).save(out, 'JPEG', quality=quality)
            return out.getvalue()
        image.load()  # a full decode: truncated files raise here, not in training
    return data


def convert_record(record: dict, args) -> dict:
    """The record to store, or raises ValueError naming why it is skipped."""
    caption = record.get(args.caption_field)
    if args.caption_field and (not isinstance(caption, str) or not caption.strip()):
        raise ValueError(f'empty or missing caption field {args.caption_field!r}')
    out = {k: v for k, v in record.items() if k != 'id'}  # the reader numbers records anew
    out['image'] = shrink_image(
        record['image'], max_size=args.max_image_size, quality=args.jpeg_quality, verify=args.verify
    )
    return out


def shard_name(args, shard: int, num_shards: int) -> str:
    return os.path.join(args.output, f'{args.name}-{shard:05d}-of-{num_shards:05d}.array_record')


def write_shard(source, args, shard: int, num_shards: int, progress=None) -> dict:
    """Writes one shard (temporary file, counts, rename); returns its counts."""
    from array_record.python import array_record_module

    path = shard_name(args, shard, num_shards)
    start = shard * args.records_per_shard
    stop = min(len(source), start + args.records_per_shard)
    counts = {'written': 0, 'skipped': 0, 'reasons': []}
    writer = array_record_module.ArrayRecordWriter(path + '.tmp', array_record.WRITER_OPTIONS)
    for index in range(start, stop):
        try:
            record = convert_record(source[index], args)
        except Exception as e:  # any unreadable input record is skipped and counted
            counts['skipped'] += 1
            if len(counts['reasons']) < _MAX_REASONS:
                counts['reasons'].append(f'record {index}: {type(e).__name__}: {e}')
        else:
            writer.write(array_record.encode_record(record))
            counts['written'] += 1
        if progress is not None:
            progress.update(1)
    writer.close()
    # Counts first, the shard last: a shard that exists is whole and has its counts.
    with open(path + '.json', 'w') as f:
        json.dump(counts, f)
    os.replace(path + '.tmp', path)
    return counts


# One source per worker process, built once by the pool's initializer (building it
# per shard would re-read the JSONL or the tar indexes every time).
_worker_source = None


def _init_worker(args) -> None:
    global _worker_source
    _worker_source = make_input_source(args)


def _write_shard_in_worker(args, shard: int, num_shards: int) -> dict:
    return write_shard(_worker_source, args, shard, num_shards)


def _check_settings(args, num_records: int) -> None:
    settings = {
        k: getattr(args, k)
        for k in (
            'format',
            'input',
            'records_per_shard',
            'max_image_size',
            'jpeg_quality',
            'caption_field',
            'name',
        )
    }
    settings['num_records'] = num_records
    path = os.path.join(args.output, 'convert.json')
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != settings:
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise SystemExit(
                f'error: {args.output} holds a conversion with other settings (was, now): '
                f'{changed}; use another --output'
            )
    else:
        with open(path, 'w') as f:
            json.dump(settings, f, indent=2)


def convert(args) -> dict:
    """Converts as `args` say; returns the totals (also printed)."""
    from tqdm import tqdm

    try:
        source = make_input_source(args)
    except ValueError as e:  # a bad path, column or shard: one line, not a traceback
        raise SystemExit(f'error: {e}') from None
    os.makedirs(args.output, exist_ok=True)
    _check_settings(args, len(source))
    num_shards = math.ceil(len(source) / args.records_per_shard)
    todo, done = [], []
    for shard in range(num_shards):
        path = shard_name(args, shard, num_shards)
        if os.path.exists(path) and os.path.exists(path + '.json'):
            with open(path + '.json') as f:
                done.append(json.load(f))
        else:
            todo.append(shard)
    remaining = sum(
        min(len(source), (s + 1) * args.records_per_shard) - s * args.records_per_shard
        for s in todo
    )
    results = list(done)
    with tqdm(total=remaining, unit='rec', disable=not args.progress, file=sys.stdout) as bar:
        if args.num_workers <= 1:
            for shard in todo:
                results.append(write_shard(source, args, shard, num_shards, bar))
        else:
            # Spawned, not forked: a fork of a process that runs threads (a TFDS reader, or
            # JAX when called from Python) can deadlock in the child.
            with concurrent.futures.ProcessPoolExecutor(
                args.num_workers,
                mp_context=multiprocessing.get_context('spawn'),
                initializer=_init_worker,
                initargs=(args,),
            ) as pool:
                futures = {
                    pool.submit(_write_shard_in_worker, args, shard, num_shards): shard
                    for shard in todo
                }
                for future in concurrent.futures.as_completed(futures):
                    counts = future.result()
                    results.append(counts)
                    bar.update(counts['written'] + counts['skipped'])
    totals = {
        'written': sum(r['written'] for r in results),
        'skipped': sum(r['skipped'] for r in results),
        'shards': num_shards,
        'shards_already_done': len(done),
    }
    print(
        f"written {totals['written']} records, skipped {totals['skipped']}, in {num_shards} "
        f"shards ({len(done)} already done) -> {args.output}"
    )
    reasons = [reason for r in results for reason in r['reasons']]
    for reason in reasons[:10]:
        print(f'  skipped {reason}')
    return totals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m input_pipeline.convert',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('--format', required=True, choices=('jsonl', 'csv', 'webdataset'))
    p.add_argument(
        '--input', required=True, help='JSONL / CSV file, or tar shards (brace patterns, globs)'
    )
    p.add_argument('--output', required=True, help='folder of the ArrayRecord shards')
    p.add_argument('--name', default='data', help='shard file name prefix (data)')
    p.add_argument('--image-root', default='', help="images folder (default: the JSONL/CSV's)")
    p.add_argument('--image-field', default='image', help='JSONL field of the image path (image)')
    p.add_argument('--csv-image-column', default='filepath', help='(filepath)')
    p.add_argument('--csv-caption-column', default='title', help='stored as `caption` (title)')
    p.add_argument('--csv-separator', default='\t', help='(a tab)')
    p.add_argument('--index-dir', default='', help='webdataset index cache (next to the shards)')
    p.add_argument(
        '--caption-field',
        default='caption',
        help="records with this field missing or empty are skipped; '' keeps all (caption)",
    )
    p.add_argument('--records-per-shard', type=int, default=10_000, help='(10000)')
    p.add_argument(
        '--max-image-size',
        type=int,
        default=0,
        help='re-encode as JPEG the images whose short side is larger, at this short side '
        '(0: keep every image as it is)',
    )
    p.add_argument('--jpeg-quality', type=int, default=95, help='of re-encoded images (95)')
    p.add_argument(
        '--no-verify',
        dest='verify',
        action='store_false',
        help='do not decode every image to find broken ones',
    )
    p.add_argument('--num-workers', type=int, default=1, help='processes, a shard each (1)')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.records_per_shard < 1:
        raise SystemExit(f'error: --records-per-shard must be >= 1, got {args.records_per_shard}')
    return convert(args)


if __name__ == '__main__':
    main()
