"""Model FLOPs per train step, counted analytically, and the peak they are measured against.

Counting (the usual "6 N T" bookkeeping, made exact for our layers): a matmul of (m, k) by
(k, n) is 2mkn FLOPs; backward costs two forward matmuls (grads w.r.t. input and weight),
so a train step is 3x the forward. Per transformer block and token of width d, mlp f and
T tokens: qkv 2*3d^2, out 2d^2, mlp 2*2df, attention scores + values 2*2Td. Element-wise
ops (norms, gelu, softmax) are left out, as MFU conventions do (PaLM appendix B).
Rematerialisation's recomputation is not counted either: MFU is about useful model FLOPs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.models import layers, vit


def transformer_forward(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    d, f, t = width, width * mlp_ratio, tokens
    per_token_layer = 2 * (3 * d * d + d * d + 2 * d * f) + 2 * 2 * t * d
    return t * depth * per_token_layer


def image_text_forward(
    model_config, *, image_size: int | None = None, text_length: int | None = None
) -> float:
    """Forward FLOPs of one image + one caption through ImageTextModel."""
    img, txt = model_config.image, model_config.text
    image_size = image_size or img.image_size
    text_length = text_length or txt.context_length
    patches = (image_size // img.patch) ** 2
    tokens = patches + (1 if img.pool == 'cls' else 0)
    if img.get('stem', 'patch') == 'conv':  # 3x3 stride-2 convolutions, then 1x1 to width
        channels = vit.conv_stem_channels(img.patch, img.width)
        side, flops = image_size, 0
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            side = -(-side // 2)
            flops += 2 * side * side * 9 * c_in * c_out
        flops += 2 * patches * channels[-1] * img.width
    else:
        flops = 2 * patches * (img.patch * img.patch * 3) * img.width  # patch embedding
    flops += transformer_forward(tokens, img.width, img.depth, img.mlp_ratio)
    if img.pool == 'map':  # probe attention + its mlp on one token
        flops += 2 * (
            img.width**2 * (1 + 2 * tokens + 1)
            + 2 * tokens * img.width
            + 2 * img.width * img.width * img.mlp_ratio
        )
    flops += transformer_forward(text_length, txt.width, txt.depth, txt.mlp_ratio)
    flops += 2 * (img.width + txt.width) * model_config.embed_dim  # projections
    return flops


def train_step_flops(config, fields=('image', 'text')) -> float:
    """Model FLOPs of one train step (forward + backward = 3x) for the batch `fields`.

    Text lengths are those of the batch (`input.context_length`), not the size of the
    position table; with `texts` in the fields each image also has K sub-captions of
    `input.subcaption_context_length` tokens through the text tower (DreamLIP), and with
    `packed_tokens` its caption and sub-captions are one row of `input.packed_length`
    (what the tower then computes: attention over the whole row, masked or not).
    """
    batch, txt, inp = config.batch_size, config.model.text, config.input
    packed = 'packed_tokens' in fields
    text_length = inp.packed_length if packed else inp.context_length
    per_example = image_text_forward(config.model, text_length=text_length)
    if 'texts' in fields:
        per_example += inp.num_subcaptions * 2 * txt.width * config.model.embed_dim
        if not packed:
            per_example += inp.num_subcaptions * transformer_forward(
                inp.subcaption_context_length, txt.width, txt.depth, txt.mlp_ratio
            )
    logits = 2 * batch * batch * config.model.embed_dim  # B x B similarity of the losses
    return 3 * (batch * per_example + logits)


# bf16 dense peak per chip (vendor datasheets, no sparsity).
# Matched in this order against the device kind, a name as part of it: 'GB200' first.
PEAK_FLOPS = {
    'GB200': 2500e12,
    'B200': 2250e12,
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def measured_matmul_flops(n: int = 2048, repeats: int = 5, operand_dtype=np.float32) -> float:
    """FLOP/s of a jitted n^3 matmul on this host's CPU devices: the CPU 'peak'.

    `operand_dtype` bfloat16: bf16 operands accumulated in f32, the dots that
    `model.matmul_precision='bfloat16'` runs (pretrain.models.layers.matmul).

    The rows of the left operand are split over every local device, so the figure is the
    host's with any number of virtual CPU devices (--xla_force_host_platform_device_count):
    one virtual device computes on one thread, and 2 of them on 2 cores measured 231 against
    518 GFLOP/s on one device. With one device this is a plain matmul.
    """
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('rows',))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('rows'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    m = n - n % mesh.size  # rows divisible by the devices
    # From host numpy: a jnp array would live on global device 0, another process's device.
    a = jax.device_put(np.ones((m, n), operand_dtype), rows)
    b = jax.device_put(np.ones((n, n), operand_dtype), replicated)
    mm = jax.jit(
        lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), out_shardings=rows
    )
    with jax.set_mesh(mesh):  # this host's devices, whatever mesh the caller has set
        return 2 * m * n * n / best_time(mm, a, b, repeats=repeats)


def best_time(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` calls of fn(*args) in seconds, after one untimed call."""
    jax.block_until_ready(fn(*args))
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def peak_flops_per_device(device=None, matmul_precision: str = 'default') -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for one device of the default backend.

    On CPU the measured rate of the matmuls the model runs: f32, or with
    `matmul_precision='bfloat16'` bf16 operands (5.3x the f32 rate with AMX).
    """
    device = device or jax.devices()[0]
    if device.platform == 'cpu':
        if layers.resolve_matmul_precision(matmul_precision) == 'bfloat16':
            rate = measured_matmul_flops(operand_dtype=jnp.bfloat16)
            return rate, 'measured 2048^3 bf16 matmul, f32 accumulation'
        return measured_matmul_flops(), 'measured 2048^3 f32 matmul'
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peak, f'{name} bf16 dense datasheet peak'
    return float('nan'), f'unknown device kind {device.device_kind!r}'
