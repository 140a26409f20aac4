"""File lists from the patterns users write: brace ranges, globs, directories.

    expand_paths('shards/{00000..00127}.tar')   # 128 paths, zero padding kept
    expand_paths(['a/{x,y}.tar', 'b/*.tar'])    # lists, alternatives, globs

webdataset and img2dataset name shards with brace ranges (`braceexpand`, not a
dependency here: the grammar used in practice is this small).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')


def expand_braces(pattern: str) -> list[str]:
    """`a{1..3}b` -> a1b a2b a3b; `{x,y}` -> x y; nested braces expand inside out."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = numbers.groups()
        # `{00000..00127}`: the width of the written bound is kept (zero padding).
        width = len(lo) if lo.startswith('0') and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(',')
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for item in items for path in expand_braces(head + item + tail)]


def expand_paths(
    patterns: str | Sequence[str], *, suffix: str = '', what: str = 'path'
) -> list[str]:
    """Existing files named by `patterns`, in the order written; raises naming a missing one.

    A pattern is brace-expanded, then globbed if it has glob characters; a directory
    stands for its files ending in `suffix`, sorted.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        for path in expand_braces(os.path.expanduser(str(pattern))):
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise ValueError(f'{what}: no file matches {path!r}')
                paths += found
            elif os.path.isdir(path):
                found = sorted(
                    os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffix)
                )
                if not found:
                    raise ValueError(f'{what}: no *{suffix} file in directory {path!r}')
                paths += found
            elif os.path.exists(path):
                paths.append(path)
            else:
                raise ValueError(f'{what}: no such file {path!r}')
    if not paths:
        raise ValueError(f'{what}: no files given')
    return paths
