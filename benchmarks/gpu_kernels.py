"""CLIP B/16's attention and LayerNorm on one GPU, timed alone, by implementation.

    python -m benchmarks.gpu_kernels [--batch 512] [--out benchmarks/results/gpu_kernels.json]

Why: in the CLIP B/16 bf16 step on an H200 (benchmarks/README.md, session 18) cuDNN's flash
attention took 25 ms of 150 kernel-ms for ~2.2 TFLOP (~90 TFLOP/s) and the LayerNorm
fusions 17 ms, while the matmuls ran at ~700 TFLOP/s. 50% MFU needs a ~128 ms step, so these
two are where the missing time is. This script times each alone on the step's shapes so
that an implementation can be chosen on figures:

- attention, forward and forward + backward, (B, T, H, K) bf16: the image tower's 197
  tokens as the model runs them (`layers.attention_even_length`: padded to 198 with a
  key-length mask), and unmasked at 198, 192 and 256 tokens, to see what the mask and
  cuDNN's 64-row tiles cost; XLA's attention; Pallas' Triton flash attention
  (`jax.experimental.pallas.ops.gpu.attention.mha`, padded to 256 with segment ids) and its
  Mosaic GPU (Hopper wgmma) kernels (`attention_mgpu`, 256 tokens in float16, which its
  kernels need: they take no padding mask, so that row bounds the time, not a drop-in);
  the text tower's causal 77 (78) tokens;
- LayerNorm forward and backward on the (B * 197, 768) stream: `LayerNorm.normalize` as
  XLA fuses it, against Pallas' Triton `layer_norm`.

Each row: median milliseconds over --iters calls after warm-up, and TFLOP/s of attention's
useful matmuls (4 B H T^2 K forward over the real tokens, halved when causal; forward +
backward counted as 3x the forward, the model-FLOPs convention of pretrain/flops.py) or,
for LayerNorm, GB/s over the bytes it must move (x read and y written forward; x, dy read
and dx written backward). A row that fails records its error instead: the script runs on
CPU too (the cuDNN and Pallas rows then fail), which is how tests run it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import results_io
from pretrain.models import layers


def median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def forward_and_backward(attend):
    """jit of attend(q, k, v) and of its value and q, k, v gradients against a cotangent."""

    def loss(q, k, v, ct):
        return jnp.vdot(attend(q, k, v).astype(jnp.float32), ct)

    return jax.jit(attend), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def attention_variants(batch: int):
    """(name, heads, padded tokens, real tokens, causal, attend(q, k, v)) for each row."""

    def library(implementation, causal=False, kv_length=None):
        def attend(q, k, v):
            return layers.attention_even_length(
                q, k, v, is_causal=causal, implementation=implementation, kv_length=kv_length
            )

        return attend

    def xla(causal):
        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='xla')

        return attend

    def pallas_triton(real):
        def attend(q, k, v):
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention

            # Segment 1 for the real tokens, 0 for the padding: padded keys are hidden from
            # real queries; the padded queries' rows are dropped by the model anyway.
            seg = jnp.broadcast_to((jnp.arange(q.shape[1]) < real).astype(jnp.int32), q.shape[:2])
            scale = q.shape[-1] ** -0.5
            return pallas_attention.mha(q, k, v, seg, sm_scale=scale)

        return attend

    def pallas_mosaic(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        config = attention_mgpu.TuningConfig(
            block_q=64, block_kv=64, max_concurrent_steps=2, **blocks
        )
        return attention_mgpu.attention(q, k, v, config)

    # Its kernels stage tiles in float16 buffers (jax 0.11.2): bf16 inputs fail to lower.
    pallas_mosaic.dtype = jnp.float16

    return [
        ('image cudnn as the model runs it (198, kv_length 197)', 12, 198, 197, False,
         library('cudnn', kv_length=197)),
        ('image cudnn 198 unmasked', 12, 198, 198, False, library('cudnn')),
        ('image cudnn 192 unmasked', 12, 192, 192, False, library('cudnn')),
        ('image cudnn 256 unmasked', 12, 256, 256, False, library('cudnn')),
        ('image xla 197', 12, 197, 197, False, xla(False)),
        ('image pallas triton 256 (segment ids, 197 real)', 12, 256, 197, False,
         pallas_triton(197)),
        # Hopper wgmma kernels; no padding mask, so a bound on time, not a drop-in.
        ('image pallas mosaic-gpu 256 unmasked, float16', 12, 256, 256, False, pallas_mosaic),
        ('text cudnn causal as the model runs it (78, 77 real)', 8, 78, 77, True,
         library('cudnn', causal=True, kv_length=77)),
        ('text xla causal 77', 8, 77, 77, True, xla(True)),
    ]


def time_attention(batch: int, iters: int, head_dim: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, heads, tokens, real, causal, attend in attention_variants(batch):
        shape = (batch, tokens, heads, head_dim)
        dtype = getattr(attend, 'dtype', jnp.bfloat16)
        q, k, v, ct = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
        ct = ct.astype(jnp.float32)
        flops = 4 * batch * heads * real * real * head_dim * (0.5 if causal else 1.0)
        row = {'name': name, 'shape_bthk': list(shape), 'real_tokens': real, 'causal': causal}

        def measure():  # called at once, inside this iteration
            fwd, fwd_bwd = forward_and_backward(attend)
            forward = median_ms(fwd, q, k, v, iters=iters)
            both = median_ms(fwd_bwd, q, k, v, ct, iters=iters)
            return {
                'forward_ms': forward,
                'forward_backward_ms': both,
                'forward_tflops': flops / forward / 1e9,
                'forward_backward_tflops': 3 * flops / both / 1e9,
            }

        rows.append(measured_row(row, measure))
    return rows


def measured_row(row: dict, measure) -> dict:
    """row with measure()'s figures, or with the error of a variant this backend lacks."""
    try:
        row.update(measure())
    except Exception as e:  # noqa: BLE001 - recorded, and the other rows still run
        first = (str(e).splitlines() or [''])[0]
        row['error'] = f'{type(e).__name__}: {first[:300]}'
    print(row_line(row), flush=True)
    return row


def time_layer_norm(batch: int, iters: int, tokens: int = 197, width: int = 768) -> list[dict]:
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch * tokens, width)), jnp.bfloat16)
    dy = jnp.ones_like(x)
    norm = layers.LayerNorm(width, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)

    def ours(x):
        return norm.normalize(x).astype(jnp.bfloat16)

    def pallas_triton(x):
        from jax.experimental.pallas.ops.gpu import layer_norm as pallas_ln

        ones, zeros = jnp.ones((width,), x.dtype), jnp.zeros((width,), x.dtype)
        # The kernel normalises the last axis of a 3D array.
        return pallas_ln.layer_norm(x[None], ones, zeros, eps=1e-6)[0]

    nbytes = x.size * x.dtype.itemsize
    rows = []
    variants = (('layernorm xla (normalize)', ours), ('layernorm pallas triton', pallas_triton))
    for name, fn in variants:

        def measure():  # called at once, inside this iteration
            backward_fn = jax.jit(lambda x, dy: jax.vjp(fn, x)[1](dy)[0])
            forward = median_ms(jax.jit(fn), x, iters=iters)
            backward = median_ms(backward_fn, x, dy, iters=iters)
            return {
                'forward_ms': forward,
                'backward_ms': backward,
                'forward_gbps': 2 * nbytes / forward / 1e6,
                'backward_gbps': 3 * nbytes / backward / 1e6,
            }

        rows.append(measured_row({'name': name, 'shape': list(x.shape)}, measure))
    return rows


def row_line(row: dict) -> str:
    if 'error' in row:
        return f"{row['name']}: {row['error']}"
    if 'forward_tflops' in row:
        return (
            f"{row['name']}: forward {row['forward_ms']:.3f} ms ({row['forward_tflops']:.0f} "
            f"TFLOP/s), +backward {row['forward_backward_ms']:.3f} ms "
            f"({row['forward_backward_tflops']:.0f} TFLOP/s)"
        )
    return (
        f"{row['name']}: forward {row['forward_ms']:.3f} ms ({row['forward_gbps']:.0f} GB/s), "
        f"backward {row['backward_ms']:.3f} ms ({row['backward_gbps']:.0f} GB/s)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=512)
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--out', default='benchmarks/results/gpu_kernels.json')
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    result = {
        'device': getattr(device, 'device_kind', str(device)),
        'backend': jax.default_backend(),
        'jax': jax.__version__,
        'python': platform.python_version(),
        'batch': args.batch,
        'iters': args.iters,
        'attention': time_attention(args.batch, args.iters),
        'layer_norm': time_layer_norm(args.batch, args.iters),
    }
    results_io.write_json(args.out, result)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
