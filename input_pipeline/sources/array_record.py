"""ArrayRecord shards of serialized record dicts (written by input_pipeline.convert).

    source = ArrayRecordSource('data/train-*.array_record')   # or the folder

ArrayRecord (Google's random-access record format, grain's native one) stores opaque
byte strings; this file fixes what one holds. Not pickle: a shard must not be able to
run code on the reader. Layout of one record:

    b'PTR1'                      magic + layout version
    uint32 little-endian n       length of the header
    n bytes of UTF-8 JSON        {"fields": {name: JSON value}, "bytes": [[name, size], ...]}
    the bytes fields' data, concatenated in the header's order

so encoded images are stored as they are (no base64) and text fields stay readable.

Records: whatever the converter wrote (`image` bytes, caption fields, `key`), plus
`id` (int): the record's global index over the shards.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from input_pipeline.sources import paths as paths_lib

MAGIC = b'PTR1'
# Random access reads one record per seek only with groups of one record (grain's advice).
WRITER_OPTIONS = 'group_size:1'


def _json_value(value):
    if isinstance(value, np.generic):  # numpy scalars from a source: plain Python
        return value.item()
    raise TypeError(f'cannot store a {type(value).__name__} in a record; use bytes, str or numbers')


def encode_record(record: dict) -> bytes:
    """Serializes a dict of bytes / str / numbers / lists (JSON values); see the module doc."""
    fields, blobs = {}, []
    for name, value in record.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            blobs.append((name, bytes(value)))
        else:
            fields[name] = value
    try:
        header = json.dumps(
            {'fields': fields, 'bytes': [[n, len(b)] for n, b in blobs]},
            default=_json_value,
            ensure_ascii=False,
        ).encode('utf-8')
    except TypeError as e:
        raise TypeError(f'record fields {sorted(fields)}: {e}') from e
    return b''.join([MAGIC, struct.pack('<I', len(header)), header, *(b for _, b in blobs)])


def decode_record(data: bytes) -> dict:
    """The dict `encode_record` serialized; ValueError on anything else."""
    if data[:4] != MAGIC:
        raise ValueError(f'not a record of this format (starts {bytes(data[:8])!r})')
    (size,) = struct.unpack_from('<I', data, 4)
    start = 8 + size
    header = json.loads(bytes(data[8:start]).decode('utf-8'))
    record = dict(header['fields'])
    for name, length in header['bytes']:
        record[name] = bytes(data[start : start + length])
        start += length
    if start != len(data):
        raise ValueError(f'record has {len(data)} bytes, its header describes {start}')
    return record


class ArrayRecordSource:
    """Random-access records of ArrayRecord shards; see the module doc.

    Args:
      paths: a shard, glob, brace pattern, folder of .array_record files, or a list.
    """

    def __init__(self, paths):
        # Imported here: only runs that read ArrayRecord load the C++ extension.
        from array_record.python import array_record_data_source

        self.paths = paths_lib.expand_paths(
            paths, suffix='.array_record', what='array_record source'
        )
        self._data = array_record_data_source.ArrayRecordDataSource(self.paths)
        if len(self._data) == 0:
            raise ValueError(f'array_record source: no records in {paths!r}')

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f'ArrayRecordSource({len(self.paths)} shards, records={len(self)})'

    def __getitem__(self, index: int) -> dict:
        record = decode_record(self._data[int(index)])
        record['id'] = int(index)
        return record
