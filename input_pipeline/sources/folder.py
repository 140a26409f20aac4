"""A folder of image files with their captions in a JSONL or CSV file.

JSONL, one object per line (blank lines ignored), image path relative to `image_root`:

    {"image": "train/0001.jpg", "caption": "a dog", "long_caption": "A brown dog. It runs."}

CSV as open_clip reads it (`--csv-img-key filepath --csv-caption-key title`, tab
separated by default):

    filepath<TAB>title
    train/0001.jpg<TAB>a dog

Records (the contract every real-data source keeps): `image` the file's encoded bytes,
`image_path` the path as written, every other field of the line as is (the CSV caption
column renamed `caption`), and `id` the record's index. A line that cannot be read
(missing image file, malformed JSON) raises when read; the loader counts and skips it.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np


def _check_root(image_root: str, default: str) -> str:
    root = image_root or default
    if not os.path.isdir(root):
        raise ValueError(f'image_root: no such directory {root!r}')
    return root


def _read_image(root: str, relative: str) -> bytes:
    if not isinstance(relative, str) or not relative:
        raise ValueError(f'image path must be a non-empty string, got {relative!r}')
    with open(os.path.join(root, relative), 'rb') as f:
        return f.read()


class JsonlSource:
    """Random-access records of a JSONL caption file; see the module doc.

    Only the line offsets are held in memory (16 bytes a record); a line is parsed
    when read, so a 100M-line file opens in the time of one pass over it.
    """

    def __init__(self, path: str, *, image_root: str = '', image_field: str = 'image'):
        if not os.path.isfile(path):
            raise ValueError(f'jsonl source: no such file {path!r}')
        self.path = path
        self.image_root = _check_root(image_root, os.path.dirname(os.path.abspath(path)))
        self.image_field = image_field
        starts, lengths, position = [], [], 0
        with open(path, 'rb') as f:
            for line in f:
                if line.strip():
                    starts.append(position)
                    lengths.append(len(line))
                position += len(line)
        if not starts:
            raise ValueError(f'jsonl source: no records in {path!r}')
        self._starts = np.asarray(starts, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        first = self._line(0)
        if image_field not in first:
            raise ValueError(
                f'jsonl source {path!r}: line 1 has no image field {image_field!r}; '
                f'its fields: {", ".join(sorted(first))}'
            )

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f'JsonlSource({self.path!r}, image_root={self.image_root!r}, records={len(self)})'

    def _line(self, index: int) -> dict:
        with open(self.path, 'rb') as f:
            f.seek(int(self._starts[index]))
            line = f.read(int(self._lengths[index]))
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise ValueError(f'line of record {index} is not a JSON object: {line[:80]!r}')
        return fields

    def __getitem__(self, index: int) -> dict:
        fields = self._line(index)
        try:
            relative = fields[self.image_field]
        except KeyError:
            raise KeyError(f'record {index} has no image field {self.image_field!r}') from None
        record = {k: v for k, v in fields.items() if k != self.image_field}
        record.update(image=_read_image(self.image_root, relative), image_path=relative, id=index)
        return record


class CsvSource:
    """Random-access records of a CSV/TSV caption file; see the module doc.

    The whole table is read at start (quoted fields may span lines, so lines cannot be
    indexed by offset); open_clip does the same with pandas.
    """

    def __init__(
        self,
        path: str,
        *,
        image_root: str = '',
        image_column: str = 'filepath',
        caption_column: str = 'title',
        separator: str = '\t',
    ):
        if not os.path.isfile(path):
            raise ValueError(f'csv source: no such file {path!r}')
        self.path = path
        self.image_root = _check_root(image_root, os.path.dirname(os.path.abspath(path)))
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.reader(f, delimiter=separator)
            header = next(reader, None)
            if header is None:
                raise ValueError(f'csv source: {path!r} is empty')
            rows = [row for row in reader if row]
        for option, column in (('image_column', image_column), ('caption_column', caption_column)):
            if column not in header:
                hint = f' (separator {separator!r}: is it right?)' if len(header) == 1 else ''
                raise ValueError(
                    f'csv source {path!r}: no {option} {column!r}; columns: '
                    f'{", ".join(header)}{hint}'
                )
        if not rows:
            raise ValueError(f'csv source: no records in {path!r}')
        # The caption column is renamed `caption`, the field configs name by default.
        self._names = ['caption' if c == caption_column else c for c in header]
        self._image_column = header.index(image_column)
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f'CsvSource({self.path!r}, image_root={self.image_root!r}, records={len(self)})'

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]
        if len(row) != len(self._names):
            raise ValueError(
                f'csv row {index + 2} has {len(row)} fields, the header {len(self._names)}'
            )
        relative = row[self._image_column]
        record = {n: v for i, (n, v) in enumerate(zip(self._names, row)) if i != self._image_column}
        record.update(image=_read_image(self.image_root, relative), image_path=relative, id=index)
        return record
