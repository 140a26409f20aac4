"""Small on-disk datasets that several test files write (tmp_path fixtures, no network)."""

import os

from test_sources import write_jsonl_dataset


def write_jsonl_with_bad_records(root, n: int, *, truncated_from: int, kept_bytes: int, empty: int):
    """A JSONL dataset of `n` good records (test_sources.write_jsonl_dataset) followed by 3 bad
    ones: a JPEG cut to the first `kept_bytes` bytes of image `truncated_from`, a missing
    file, and image `empty` with an empty caption. Returns the JSONL path."""
    path = write_jsonl_dataset(
        root,
        n,
        extra_lines=[
            '{"image": "images/truncated.jpg", "caption": "cut short"}',
            '{"image": "images/missing.jpg", "caption": "gone"}',
            f'{{"image": "images/{empty:04d}.jpg", "caption": ""}}',
        ],
    )
    with open(os.path.join(root, f'images/{truncated_from:04d}.jpg'), 'rb') as f:
        jpeg = f.read()
    with open(os.path.join(root, 'images/truncated.jpg'), 'wb') as f:
        f.write(jpeg[:kept_bytes])
    return path
