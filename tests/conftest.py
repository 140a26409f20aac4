import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests and the runs they start compile afresh and write nothing under ~/.cache: the
# entry points' persistent compilation cache (pretrain/compilation_cache.py) is off unless a
# test turns it on.
os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'



def read_metrics(workdir) -> list[dict]:
    """The rows of a run's metrics.jsonl, in the order they were written."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]

@pytest.fixture(autouse=True, scope='session')
def full_precision_matmuls_on_accelerators():
    """The numpy references are float64 and the tolerances f32's. On GPU, jax runs f32 matmuls
    in TF32 by default (~1e-3 relative error: 25 model and objective tests failed on an H200),
    so in-process tests ask for full f32 there. CPU matmuls are f32 already."""
    import jax

    if jax.default_backend() != 'cpu':
        jax.config.update('jax_default_matmul_precision', 'highest')
    yield


def run_python(args, *, env=None, timeout=600, devices=None, check=True):
    """Runs `python args...` from the repo root in a fresh process (own XLA device count)."""
    full_env = dict(os.environ)
    full_env.pop('XLA_FLAGS', None)
    if devices:
        full_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f'exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n'
            f'stderr:\n{proc.stderr[-4000:]}'
        )
    return proc


@pytest.fixture
def python():
    return run_python


# A model small enough that a train step takes milliseconds.
TINY_MODEL = [
    '--config.model.image.depth=1',
    '--config.model.text.depth=1',
    '--config.model.image.width=32',
    '--config.model.text.width=32',
    '--config.model.image.heads=2',
    '--config.model.text.heads=2',
    '--config.model.embed_dim=16',
    '--config.input.image_size=32',
    '--config.model.image.image_size=32',
    '--config.input.context_length=32',
    '--config.model.text.context_length=32',
]
# f32 matmuls, for tests of exact equivalences (meshes, gradient accumulation, packing,
# imported weights): the tiny configs' 'auto' rounds matmul operands to bf16 on CPUs with
# AMX or AVX-512 BF16, which turns float32 rounding differences into bf16 ones (1 vs 2x2x2
# devices: losses still within 6.8e-4 over 8 steps, gradient norms only within 5e-3).
F32_MATMULS = ['--config.model.matmul_precision=default']

# The CLI tests' run: the tiny model, batch 16, no progress bar, no periodic evaluation.
TINY = [
    '--config.batch_size=16',
    *TINY_MODEL,
    '--config.optim.warmup_steps=2',
    '--config.progress=false',
    '--config.eval_every=0',
]
