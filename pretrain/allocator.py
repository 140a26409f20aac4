"""The malloc a run uses: the entry points re-execute themselves once with a fast one.

XLA's CPU runtime is hard on glibc's malloc in two ways (benchmarks/README.md, "Allocator"):
- the step's temporaries are one large buffer (1.9 GB for the ViT-Ti CLIP step), allocated
  from a worker thread and freed at the end of the step. glibc serves that thread from a
  per-thread arena, which cannot hold more than 64 MB, so the buffer is mmap'ed and unmapped
  every step and its pages are faulted in and zeroed afresh: ~540k 4 KB faults, 30-45% of a
  CPU step with glibc's defaults;
- many small and mid-sized allocations per op (Eigen's packing buffers, the runtime's own),
  from every worker thread: with glibc tuned against the first problem (one arena), the
  DreamLIP tiny step spent ~10% of its cycles in malloc and ~8% in the kernel.

PRETRAIN_MALLOC picks what to do (Linux only; a process started with LD_PRELOAD is left as it
is, so `LD_PRELOAD=libjemalloc.so` works as before):
- 'auto' (default): 'mimalloc' where the `cmeel-mimalloc` package is installed (a dependency on
  Linux) and no jax accelerator plugin is (CUDA, ROCm, TPU), else 'glibc'. On GPU/TPU hosts
  the host allocator matters less, and the GPU figures so far were measured with 'glibc':
  mimalloc is chosen there only when asked for, until it has been measured there too;
- 'mimalloc': LD_PRELOAD mimalloc with MIMALLOC_PURGE_DELAY=-1 (freed memory is kept for
  reuse, not returned to the OS: 0 page faults per step). 2 quiet cores, against 'glibc':
  DreamLIP tiny step 0.38 -> 0.30 s, its training loop 0.54 -> 0.36 s/step; ViT-Ti CLIP step
  0.77 / 0.76 -> 0.75 / 0.73 s, with no slow steps (mean = median);
- 'glibc': GLIBC_TUNABLES below, no extra package: arena_max=1 puts every thread on the main
  heap, where the freed temp buffer is kept and reused; 4 GB mmap/trim thresholds keep large
  blocks in that heap; hugetlb=1 backs it with transparent huge pages. Its cost: the heap may
  once grow by another temp buffer (one slow step), and the small allocations above are slow;
- 'system': the process as started.
Both settings only take effect at process start, hence the re-execution.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

GLIBC_TUNABLES = (
    'glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:'
    'glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1'
)
MIMALLOC_ENV = {'MIMALLOC_PURGE_DELAY': '-1'}
CHOICES = ('auto', 'mimalloc', 'glibc', 'system')
REEXEC_MARK = 'PRETRAIN_MALLOC_SET'


def mimalloc_library() -> str | None:
    """Path of the mimalloc shared library that the cmeel-mimalloc wheel installs, if any."""
    try:
        files = importlib.metadata.files('cmeel-mimalloc') or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == 'libmimalloc.so':
            path = str(f.locate())
            return path if os.path.exists(path) else None
    return None


# Distributions whose presence means a jax accelerator backend (jax[cuda12], jax[rocm], jax[tpu]).
_ACCELERATOR_PACKAGES = ('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm', 'libtpu')


def accelerator_plugin_installed() -> bool:
    names = (d.metadata['Name'] or '' for d in importlib.metadata.distributions())
    return any(n.lower().startswith(_ACCELERATOR_PACKAGES) for n in names)


def choice() -> str:
    value = os.environ.get('PRETRAIN_MALLOC', 'auto')
    if value not in CHOICES:
        raise SystemExit(f"error: PRETRAIN_MALLOC='{value}'; valid: {', '.join(CHOICES)}")
    return value


def malloc_env(environ: dict) -> dict:
    """The environment to re-execute with; `environ` itself when nothing is to change."""
    wanted = choice()
    if (
        wanted == 'system'
        or environ.get(REEXEC_MARK)
        or not sys.platform.startswith('linux')
        or 'LD_PRELOAD' in environ
    ):
        return environ
    env = dict(environ, **{REEXEC_MARK: '1'})
    if wanted == 'auto':
        use_mimalloc = not accelerator_plugin_installed()
    else:
        use_mimalloc = wanted == 'mimalloc'
    library = mimalloc_library() if use_mimalloc else None
    if wanted == 'mimalloc' and library is None:
        raise SystemExit(
            'error: PRETRAIN_MALLOC=mimalloc but the cmeel-mimalloc package is not installed '
            "(pip install cmeel-mimalloc), or use PRETRAIN_MALLOC=glibc"
        )
    if library:
        env['LD_PRELOAD'] = library
        for key, value in MIMALLOC_ENV.items():
            env.setdefault(key, value)
    else:
        existing = env.get('GLIBC_TUNABLES')
        env['GLIBC_TUNABLES'] = f'{existing}:{GLIBC_TUNABLES}' if existing else GLIBC_TUNABLES
    return env


def ensure_fast_malloc():
    """Re-executes this process once with the allocator PRETRAIN_MALLOC picks."""
    current = dict(os.environ)
    env = malloc_env(current)
    if env is not current:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
