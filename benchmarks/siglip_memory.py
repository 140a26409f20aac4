"""Memory of SigLIP loss + gradient: full (B, B) logits vs the chunked scan.

    python -m benchmarks.siglip_memory [--out benchmarks/results/siglip_memory.json]

For each global batch B it compiles `value_and_grad` of `siglip_loss` and of
`siglip_loss_chunked` on (B, E) f32 embeddings and reads XLA's buffer assignment
(`compiled.memory_analysis()`): `temp_size_in_bytes` is the peak scratch the
loss and its backward pass need beyond their inputs and outputs. Compiling does
not allocate, so B = 16k (3 GiB of full-loss temporaries) costs nothing to
measure; batches up to --time_max_batch are also run and timed.

Expectation: full grows as B^2 (a few (B, B) f32 buffers: logits and their
cotangents), chunked as B (a few (B, chunk) blocks plus the (B, E) gradients).
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results_io
from pretrain.objectives.siglip import siglip_loss, siglip_loss_chunked

MIB = 2**20


def loss_and_grad(loss_fn, **kwargs):
    def f(zimg, ztxt, scale, bias):
        return loss_fn(zimg=zimg, ztxt=ztxt, scale=scale, bias=bias, **kwargs)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


def measure(fn, batch: int, embed: int, run: bool) -> dict:
    emb = jax.ShapeDtypeStruct((batch, embed), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    t0 = time.perf_counter()
    compiled = fn.lower(emb, emb, scalar, scalar).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {
        'temp_bytes': mem.temp_size_in_bytes,
        'argument_bytes': mem.argument_size_in_bytes,
        'output_bytes': mem.output_size_in_bytes,
        'alias_bytes': mem.alias_size_in_bytes,
        'generated_code_bytes': mem.generated_code_size_in_bytes,
        'compile_s': round(compile_s, 3),
    }
    if run:
        rng = np.random.default_rng(0)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        zimg = unit(rng.normal(size=(batch, embed))).astype(np.float32)
        ztxt = unit(zimg + rng.normal(size=(batch, embed))).astype(np.float32)
        args = (zimg, ztxt, np.float32(10.0), np.float32(-10.0))
        jax.block_until_ready(compiled(*args))  # Warm-up: first touch of the buffers.
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        row['step_s_median'] = round(float(np.median(times)), 4)
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--out', default='benchmarks/results/siglip_memory.json')
    parser.add_argument('--batches', default='1024,2048,4096,8192,16384')
    parser.add_argument('--embed', type=int, default=512)
    parser.add_argument('--chunk_sizes', default='512,1024')
    parser.add_argument(
        '--time_max_batch', type=int, default=4096, help='run and time batches up to this (0: none)'
    )
    args = parser.parse_args()

    chunk_sizes = [int(c) for c in args.chunk_sizes.split(',')]
    full_fn = loss_and_grad(siglip_loss)
    chunked_fns = {c: loss_and_grad(siglip_loss_chunked, chunk_size=c) for c in chunk_sizes}
    rows = []
    for batch in [int(b) for b in args.batches.split(',')]:
        run = batch <= args.time_max_batch
        rows.append(
            {
                'batch': batch,
                'logits_bytes': batch * batch * 4,  # One (B, B) f32 matrix, for scale.
                'full': measure(full_fn, batch, args.embed, run),
                'chunked': {
                    str(c): measure(fn, batch, args.embed, run) for c, fn in chunked_fns.items()
                },
            }
        )

    result = {
        'benchmark': 'siglip_memory',
        'embed': args.embed,
        'dtype': 'float32',
        'backend': jax.default_backend(),
        'device': str(jax.devices()[0].device_kind),
        'jax': jax.__version__,
        'cpu_count': os.cpu_count(),
        'machine': platform.machine(),
        'rows': rows,
    }
    results_io.write_json(args.out, result)

    print(
        f'SigLIP loss+grad: XLA temp memory in MiB (seconds per call where run), '
        f'E={args.embed}, f32, {result["backend"]}'
    )
    names = ['full'] + [f'chunk {c}' for c in chunk_sizes]
    print(f'{"B":>6}' + ''.join(f'{n:>22}' for n in names))
    for r in rows:
        cells = [r['full']] + [r['chunked'][str(c)] for c in chunk_sizes]
        print(
            f'{r["batch"]:>6}'
            + ''.join(
                f'{m["temp_bytes"] / MIB:>12.1f}'
                + (f' ({m["step_s_median"]:.3f} s)' if 'step_s_median' in m else ' ' * 10)
                for m in cells
            )
        )
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
