"""JAX's persistent compilation cache, on by default for the entry points (`set_default`).

A rerun of a command (a resume after preemption, `pretrain.evaluate` on a run) then loads
the executables it compiled before. On a 2-core CPU the quick start's step compiles in 7-8 s
and loads in 0.6 s, and 20 of its steps with an evaluation rerun in 27 s instead of 38-41 s;
on GPU CLIP ViT-B/16 compiles in 27-53 s. JAX caches compilations that took over a second
(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS), keys them by the program, compile options, XLA
flags, device kind and jax/XLA versions, writes from process 0 only, and recompiles where an
entry cannot be read. MaxText keeps one by default too. The folder grows by one entry per
new program, up to `MAX_BYTES`: past that JAX deletes the least recently used entries. It
can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import os
import platform


_FALSE = ('n', 'no', 'f', 'false', 'off', '0')

# The default folder's bound (JAX_COMPILATION_CACHE_MAX_SIZE): JAX's own default is none.
# The quick start leaves 4 entries, 1.3 MB. JAX's eviction records each entry's last use in
# a `-atime` file beside it, under a file lock (filelock).
MAX_BYTES = 4 << 30


def host_cpu_tag() -> str:
    """A short hash of this host's CPU model and feature flags (Linux /proc/cpuinfo)."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = {line for line in f if line.startswith(('model name', 'flags'))}
    except OSError:
        lines = {platform.machine(), platform.processor()}
    return hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()[:12]


def default_dir() -> str:
    """~/.cache/pretrain/jax/<host_cpu_tag()>, or under $XDG_CACHE_HOME where that is set.

    One folder per CPU type: JAX keys a CPU executable by the platform name 'cpu' alone, and
    one compiled where AMX or AVX-512 exist must not load on a CPU without them (a home
    folder shared by several machine types).
    """
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'pretrain', 'jax', host_cpu_tag())


def set_default():
    """Points JAX_COMPILATION_CACHE_DIR at `default_dir()` (before jax is imported), unless
    it names a folder already or JAX_ENABLE_COMPILATION_CACHE=false turns the cache off, and
    bounds it to MAX_BYTES unless JAX_COMPILATION_CACHE_MAX_SIZE is set. Where the default
    folder cannot be made (a read-only home), runs go without the cache.
    """
    # JAX's own false values for the variable (jax._src.config.bool_env; importing jax here
    # would come before the allocator's re-exec).
    off = os.environ.get('JAX_ENABLE_COMPILATION_CACHE', '').lower() in _FALSE
    if off or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
        return
    folder = default_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return
    os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
    os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(MAX_BYTES))
