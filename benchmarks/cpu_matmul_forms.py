"""Dense-layer matmul rates on this CPU: f32 against bf16 operands, and why their form matters.

    python -m benchmarks.cpu_matmul_forms [--out benchmarks/results/cpu_matmul_forms.json]

For each (N, d_in, d_out) of a ViT-Ti layer (N = 8,192 tokens) it times, jitted on this host:
- `f32`: y = x @ w and its gradients by autodiff (what the default CPU run computes);
- `bf16_plain`: the same with x and w cast to bf16 and f32 accumulation, gradients by
  autodiff: XLA writes the gradient dots with a transposed operand, finds no bf16 kernel
  for that form and computes them in f32 after converting back;
- `bf16_layers`: `pretrain.models.layers.matmul` under `jax.default_matmul_precision(
  'bfloat16')`, which gives every dot row-major bf16 operands (what
  `model.matmul_precision='bfloat16'` runs).
Each as the forward alone and as forward + both gradients (6 N d_in d_out FLOPs), the best
of `--repeats`, plus the 2048^3 f32 and bf16 rates. Whether bf16 pays depends on the CPU:
with AMX (Intel Xeon since Sapphire Rapids) YNNPACK's bf16 kernels run at ~5x the f32
rate; run this where you train before choosing `--config.model.matmul_precision`.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step
from benchmarks.results_io import write_json
from pretrain import flops
from pretrain.models import layers

SHAPES = [(8192, 192, 768), (8192, 768, 192), (8192, 192, 576), (8192, 192, 192)]


def bf16_dot(x, w):
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return jnp.dot(x16, w16, preferred_element_type=jnp.float32)


def forms() -> dict:
    """name -> (matmul function, matmul precision to trace it under)."""
    return {
        'f32': (jnp.matmul, 'float32'),
        'bf16_plain': (bf16_dot, 'float32'),
        'bf16_layers': (layers.matmul, 'bfloat16'),
    }


def measure(n: int, d: int, f: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, f)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    out = {}
    for name, (mm, precision) in forms().items():
        with jax.default_matmul_precision(precision):
            fwd = jax.jit(mm)
            train = jax.jit(jax.grad(lambda x, w, mm=mm: jnp.vdot(mm(x, w), dy), argnums=(0, 1)))
            t_fwd = flops.best_time(fwd, x, w, repeats=repeats)
            t_train = flops.best_time(train, x, w, repeats=repeats)
        out[name] = {
            'forward_s': t_fwd,
            'forward_gflops': 2 * n * d * f / t_fwd / 1e9,
            'forward_backward_s': t_train,
            'forward_backward_gflops': 6 * n * d * f / t_train / 1e9,
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='benchmarks/results/cpu_matmul_forms.json')
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args(argv)
    result = {
        'command': 'python -m benchmarks.cpu_matmul_forms ' + ' '.join(argv or []),
        'cpu': train_step.cpu_model() or platform.processor(),
        'cores': os.cpu_count(),
        'cpu_bf16_flags': list(layers.cpu_bf16_flags()),
        'jax': jax.__version__,
        'matmul_2048_gflops': {
            'f32': flops.measured_matmul_flops() / 1e9,
            'bf16': flops.measured_matmul_flops(operand_dtype=jnp.bfloat16) / 1e9,
        },
        'layers': [
            {'n': n, 'd_in': d, 'd_out': f, **measure(n, d, f, args.repeats)}
            for n, d, f in SHAPES
        ],
    }
    write_json(args.out, result)
    rates = result['matmul_2048_gflops']
    print(f"{result['cpu']}: 2048^3 f32 {rates['f32']:.0f}, bf16 {rates['bf16']:.0f} GFLOP/s")
    for row in result['layers']:
        forms_rates = ', '.join(
            f"{k} {row[k]['forward_gflops']:.0f} / {row[k]['forward_backward_gflops']:.0f}"
            for k in forms()
        )
        print(
            f"({row['n']}, {row['d_in']}) x ({row['d_in']}, {row['d_out']}): "
            f'GFLOP/s forward / forward+backward: {forms_rates}'
        )
    print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
