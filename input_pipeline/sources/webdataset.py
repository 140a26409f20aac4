"""webdataset tar shards (as img2dataset writes them), read by random access.

    source = WebDatasetSource('shards/{00000..00127}.tar')

A shard holds samples as consecutive members sharing a key: `000010042.jpg`,
`000010042.txt`, `000010042.json`. The key is the member path up to the first dot
of its file name, the rest is the extension (webdataset's own rule).

Random access. On first use each shard gets an index: per key, the byte offset and
size of its image, txt and json members. A record is then two or three plain
`seek` + `read`s, so the loader can shuffle globally and resume exactly, which
streaming webdataset readers (shard-level shuffles) cannot. The index is an .npz
next to the shard (`00000.tar.index.npz`) or in `index_dir`; it records the tar's
size and mtime and is rebuilt when they change. Building reads only the tar headers
(no image data); shards are indexed on a thread pool, once, then opening is quick.
Uncompressed tars only: a .tar.gz has no byte offsets to seek to.

Records: `image` (encoded bytes of the first image member), `caption` (the .txt,
UTF-8), the fields of the .json (img2dataset: url, width, height, ...), `key` (str),
and `id` (int, the record's global index). A key with no image member (img2dataset
writes .txt/.json for failed downloads in some modes) raises when read, so the
loader counts it as a bad record.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import json
import logging
import os
import tarfile
import tempfile

import numpy as np

from input_pipeline.sources import paths as paths_lib

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
# Member kinds held in the index, as (offset, size) columns; -1 where a key lacks one.
_COLUMNS = ('image', 'txt', 'json')
_INDEX_VERSION = 1


def split_key(member_name: str) -> tuple[str, str]:
    """'dir/000042.seg.png' -> ('dir/000042', 'seg.png'): webdataset's key rule."""
    directory, _, name = member_name.rpartition('/')
    stem, dot, extension = name.partition('.')
    key = f'{directory}/{stem}' if directory else stem
    return key, extension.lower() if dot else ''


def build_index(tar_path: str) -> dict[str, np.ndarray]:
    """Per key (in order of first appearance): offsets and sizes of its members."""
    keys: dict[str, int] = {}
    rows: list[dict[str, tuple[int, int]]] = []
    try:
        with tarfile.open(tar_path, 'r:') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_key(member.name)
                if extension in IMAGE_EXTENSIONS:
                    column = 'image'
                elif extension in ('txt', 'json'):
                    column = extension
                else:
                    continue
                if key not in keys:
                    keys[key] = len(rows)
                    rows.append({})
                # The first image member wins (a sample may carry e.g. jpg and png).
                rows[keys[key]].setdefault(column, (member.offset_data, member.size))
    except tarfile.ReadError as e:
        raise ValueError(
            f'webdataset shard {tar_path!r} is not an uncompressed tar ({e}); compressed '
            'shards cannot be read by offset: decompress them or convert them with '
            'python -m input_pipeline.convert'
        ) from e
    index = {'keys': np.asarray(list(keys), dtype=str)}
    for column in _COLUMNS:
        index[column] = np.asarray([row.get(column, (-1, -1)) for row in rows], np.int64).reshape(
            -1, 2
        )
    return index


def _stat(tar_path: str) -> np.ndarray:
    st = os.stat(tar_path)
    return np.asarray([_INDEX_VERSION, st.st_size, st.st_mtime_ns], np.int64)


def _index_path(tar_path: str, index_dir: str) -> str:
    if not index_dir:
        return tar_path + '.index.npz'
    # Shards of different folders may share a name: the folder's hash keeps them apart.
    digest = hashlib.sha1(os.path.abspath(tar_path).encode()).hexdigest()[:12]
    return os.path.join(index_dir, f'{os.path.basename(tar_path)}.{digest}.index.npz')


def load_index(tar_path: str, index_dir: str = '') -> dict[str, np.ndarray]:
    """The shard's cached index, rebuilt (and cached) when missing or stale."""
    cached = _index_path(tar_path, index_dir)
    stat = _stat(tar_path)
    if os.path.exists(cached):
        try:
            with np.load(cached, allow_pickle=False) as f:
                if np.array_equal(f['stat'], stat):
                    return {k: f[k] for k in ('keys', *_COLUMNS)}
        except (OSError, ValueError, KeyError) as e:  # a torn or foreign file: rebuild it
            log.warning('rebuilding unreadable index %s (%s)', cached, e)
    index = build_index(tar_path)
    try:
        os.makedirs(os.path.dirname(cached) or '.', exist_ok=True)
        # Written under a unique name and renamed: hosts indexing the same shard at the
        # same time each write a whole file, and a reader never sees half of one.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached) or '.', suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, stat=stat, **index)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only data folder: work from memory, say where to cache
        log.warning('cannot cache the index of %s (%s); set index_dir', tar_path, e)
    return index


class WebDatasetSource:
    """Random-access records of webdataset tar shards; see the module doc.

    Args:
      urls: a shard path, brace pattern (`shards/{00000..00127}.tar`), glob, folder of
        .tar files, or a list of these. Local files only.
      index_dir: where the shard indexes are cached; '' = next to each shard.
      num_threads: threads that build missing indexes at start.
    """

    def __init__(self, urls, *, index_dir: str = '', num_threads: int = 8):
        self.paths = paths_lib.expand_paths(urls, suffix='.tar', what='webdataset source')
        self.index_dir = index_dir
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            self._indexes = list(pool.map(lambda p: load_index(p, index_dir), self.paths))
        sizes = [len(index['keys']) for index in self._indexes]
        self._ends = np.cumsum(sizes).tolist()
        if not self._ends or self._ends[-1] == 0:
            raise ValueError(
                f'webdataset source: no samples in {len(self.paths)} shard(s) {urls!r}'
            )

    def __len__(self) -> int:
        return self._ends[-1]

    def __repr__(self) -> str:
        return f'WebDatasetSource({len(self.paths)} shards, records={len(self)})'

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row in the shard) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f'record {index} out of range [0, {len(self)})')
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(int(index))
        path, shard_index = self.paths[shard], self._indexes[shard]
        key = str(shard_index['keys'][row])
        spans = {c: shard_index[c][row] for c in _COLUMNS if shard_index[c][row][0] >= 0}
        if 'image' not in spans:
            raise ValueError(
                f'webdataset {path}: key {key!r} has no image member '
                f'(has: {", ".join(spans) or "nothing"})'
            )
        data = {}
        with open(path, 'rb') as f:
            for column, (offset, size) in spans.items():
                f.seek(int(offset))
                data[column] = f.read(int(size))
        record = json.loads(data['json']) if 'json' in data else {}
        if not isinstance(record, dict):
            raise ValueError(f'webdataset {path}: key {key!r}: the .json is not an object')
        if 'txt' in data:
            try:
                record['caption'] = data['txt'].decode('utf-8')
            except UnicodeDecodeError as e:
                raise ValueError(f'webdataset {path}: key {key!r}: .txt is not UTF-8') from e
        record.update(image=data['image'], key=key, id=int(index))
        return record
