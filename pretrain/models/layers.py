"""Transformer building blocks shared by the image and text towers.

Parameters are created with logical axis names (`embed`, `mlp`, `heads`, `vocab`) that
`pretrain.sharding` maps onto mesh axes. Shape suffixes on names: b batch, t tokens,
d model width, f mlp width, h heads, k head dim.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from pretrain import host

# Initialisers follow common ViT/CLIP practice: xavier for projections, small normal for
# embeddings (big_vision uses the same choices).
xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def param(rngs: nnx.Rngs, init, shape, axes, dtype=jnp.float32) -> nnx.Param:
    """A parameter created from `init` and annotated with logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


@jax.custom_vjp
def _matmul_wide_rhs_grad(x_nd, w_df):
    return x_nd @ w_df


def _matmul_fwd(x_nd, w_df):
    return x_nd @ w_df, (x_nd, w_df)


def _matmul_bwd(res, dy_nf):
    x_nd, w_df = res
    # The barrier stops XLA folding the transpose back into the dot (it would turn
    # (dy^T x)^T into x^T dy again); transposing the small (f, d) result costs nothing.
    dw_fd = jax.lax.optimization_barrier(dy_nf.T @ x_nd)
    return dy_nf @ w_df.T, dw_fd.T


_matmul_wide_rhs_grad.defvjp(_matmul_fwd, _matmul_bwd)


def _row_major_transpose(a_mn):
    """a.T as its own row-major (n, m) array, for a bf16 dot on CPU.

    XLA's CPU compiler decides whether a bf16 dot can run as one (YNNPACK) before it
    assigns layouts. A transpose reaches that check as a column-major view ({0,1}
    layout), which it takes for unsupported, and it then converts both operands back to
    f32 (no faster than the f32 dot). A reshape's result is row-major there; the barrier
    keeps JAX from cancelling the two reshapes. XLA still folds them away afterwards and
    writes the transpose as a copy.
    """
    a_nm = a_mn.T
    return jax.lax.optimization_barrier(a_nm[..., None]).reshape(a_nm.shape)


def _dot_f32(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_bf16_operands(x_nd, w_df):
    return _dot_f32(x_nd.astype(jnp.bfloat16), w_df.astype(jnp.bfloat16))


def _matmul_bf16_fwd(x_nd, w_df):
    x16, w16 = x_nd.astype(jnp.bfloat16), w_df.astype(jnp.bfloat16)
    return _dot_f32(x16, w16), (x16, w16)


def _matmul_bf16_bwd(res, dy_nf):
    x16, w16 = res
    dy16 = dy_nf.astype(jnp.bfloat16)
    dx_nd = _dot_f32(dy16, _row_major_transpose(w16))
    # The weight gradient transposes the narrower of the two (N, .) operands.
    if x16.shape[1] <= dy16.shape[1]:
        dw_df = _dot_f32(_row_major_transpose(x16), dy16)
    else:  # the barrier keeps the small (f, d) result's transpose out of the dot
        dw_df = jax.lax.optimization_barrier(_dot_f32(_row_major_transpose(dy16), x16)).T
    return dx_nd, dw_df


_matmul_bf16_operands.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


def bf16_matmul_operands() -> bool:
    """Whether f32 matmuls round their operands to bfloat16 here (f32 accumulation).

    On accelerators XLA reads `jax.default_matmul_precision` itself; XLA on CPU computes
    every f32 dot in f32 whatever it says. `matmul` honours 'bfloat16' there, which is
    the setting `model.matmul_precision` (towers.py) enters.
    """
    precision = jax.config.jax_default_matmul_precision
    return jax.default_backend() == 'cpu' and str(precision).lower() in BF16_PRECISIONS


BF16_PRECISIONS = ('bfloat16', 'bf16_bf16_f32')
MATMUL_PRECISIONS = ('auto', 'default', 'bfloat16', 'float32')


# /proc/cpuinfo flags of the instructions that multiply bf16 matrices: AMX tiles (Intel Xeon
# since Sapphire Rapids) and AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake).
# XLA's YNNPACK kernels use either (benchmarks/README.md, "bf16 matmul operands on CPU").
CPU_BF16_FLAGS = ('amx_bf16', 'avx512_bf16')


def cpu_bf16_flags(cpuinfo: str = host.CPUINFO) -> tuple[str, ...]:
    """Which of `CPU_BF16_FLAGS` this host's CPU has (Linux only; () elsewhere)."""
    flags = (host.cpuinfo('flags', cpuinfo) or '').split()
    return tuple(name for name in CPU_BF16_FLAGS if name in flags)


def resolve_matmul_precision(name: str) -> str:
    """`model.matmul_precision` as the value for `jax.default_matmul_precision`.

    'auto' is 'bfloat16' on CPUs that multiply bf16 in hardware (`cpu_bf16_flags`), where
    bf16 operands make the ViT-Ti step 1.5-1.6x faster (AMX on a Xeon, AVX-512 BF16 on an
    AMD EPYC: benchmarks/README.md), and 'default' elsewhere: accelerators already run the
    towers in bf16 (`model.dtype`), and CPUs without such instructions would emulate it.
    'default' is each backend's own (f32 on CPU), 'float32' full f32 everywhere. On GPU
    jax maps 'bfloat16' to XLA's DEFAULT precision, which runs f32 dots in TF32 there
    (seen on an H200: tests/test_models.py); the bf16 operands are `matmul`'s, on CPU.
    """
    if name not in MATMUL_PRECISIONS:
        raise ValueError(
            f"unknown matmul_precision '{name}'; valid: {', '.join(MATMUL_PRECISIONS)}"
        )
    if name == 'auto':
        return 'bfloat16' if jax.default_backend() == 'cpu' and cpu_bf16_flags() else 'default'
    return name


def matmul(x_nd, w_df):
    """x @ w for (N, d) x (d, f), with CPU-specific forward and gradient dots.

    Under `jax.default_matmul_precision('bfloat16')` on CPU (`bf16_matmul_operands`):
    the operands are rounded to bf16 and the three dots (forward, input and weight
    gradients) accumulate in f32, each as a plain (row-major) x (row-major) dot, the
    one form XLA hands to YNNPACK's bf16 kernels. Where the CPU has AMX (Intel Xeon
    since Sapphire Rapids) those run at ~1.5 TFLOP/s on 2 cores against ~285 for f32
    (measured: benchmarks/README.md, "bf16 matmul operands on CPU"). The activations
    saved for the backward pass are bf16 too: half the memory.

    Otherwise f32 on CPU computes the weight gradient x^T dy as one Eigen dot contracting
    the N = B*T rows (YNNPACK does not take that form). Eigen runs it much faster when the
    narrower operand is on the left: for the MLP's fc2 (768 -> 192, N = 8192) x^T dy ran at
    ~150 GFLOP/s on one core and (dy^T x)^T at ~220. XLA canonicalises the operand order
    itself, so for d > f the gradient is written as (dy^T x)^T with a barrier. ViT-Ti CLIP
    step -3% (benchmarks/README.md). Elsewhere plain autodiff.
    """
    f32 = x_nd.dtype == jnp.float32 and w_df.dtype == jnp.float32
    if f32 and bf16_matmul_operands():
        return _matmul_bf16_operands(x_nd, w_df)
    if jax.default_backend() == 'cpu' and w_df.shape[0] > w_df.shape[1]:
        return _matmul_wide_rhs_grad(x_nd, w_df)
    return x_nd @ w_df


class Dense(nnx.Module):
    """y = x @ W + b, computed as one 2D matmul over all leading axes.

    Flattening (..., d_in) to (N, d_in) first is ~15% faster on CPU than nnx.Linear's
    einsum: XLA then emits half the transposes for the weight gradient (DESIGN.md).

    `norm`: a LayerNorm to apply to x first, with its scale and shift folded into this
    layer: (x_hat * g + s) @ W + b = x_hat @ (g[:, None] * W) + (s @ W + b). The scaled
    (N, d_in) activations and their gradient are never formed; the fold costs a (d_in,
    d_out) multiply. Same parameters, same function; ViT-Ti CLIP step on 2 CPU cores
    0.732 / 0.735 / 0.734 -> 0.709 / 0.713 / 0.718 s (benchmarks/README.md).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype=jnp.float32,
        kernel_init=xavier,
    ):
        self.kernel = param(rngs, kernel_init, (d_in, d_out), axes)
        self.bias = param(rngs, zeros, (d_out,), (axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x, *, norm: LayerNorm | None = None):
        return self.split(x, 1, norm=norm)[0]

    def folded(self, norm: LayerNorm | None = None):
        """(kernel, bias) with `norm`'s scale and shift folded in (bias None: no bias)."""
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if norm is not None:
            bias = norm.bias[...] @ kernel + (0.0 if bias is None else bias)
            kernel = norm.scale[...][:, None] * kernel
        return kernel, bias

    def split(self, x, parts: int, *, norm: LayerNorm | None = None, bias: bool = True):
        """The output as `parts` equal column blocks, each its own matmul into its own buffer.

        Same function as slicing __call__'s output, without the slices: on GPU each is a
        copy of its block, and their gradients are concatenated back (see Attention).
        `bias=False` leaves the bias out, for a caller that adds `folded(norm)[1]` itself.
        """
        lead = x.shape[:-1]
        kernel, b = self.folded(norm)
        if norm is not None:
            x = norm.normalize(x)
        x_nd = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        outputs = [matmul(x_nd, w) for w in jnp.split(kernel.astype(self.dtype), parts, axis=1)]
        if bias and b is not None:
            outputs = [y + bb for y, bb in zip(outputs, jnp.split(b.astype(self.dtype), parts))]
        return [y.reshape(*lead, y.shape[-1]) for y in outputs]


class LayerNorm(nnx.Module):
    """LayerNorm in float32 whatever the compute dtype: bf16 statistics drift."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = param(rngs, ones, (d,), ('norm',))
        self.bias = param(rngs, zeros, (d,), ('norm',))
        self.eps = eps
        self.dtype = dtype

    def normalize(self, x):
        """(x - mean) / std over the last axis, in float32, before the scale and shift."""
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return (x32 - mean) * jax.lax.rsqrt(var + self.eps)

    def __call__(self, x):
        return (self.normalize(x) * self.scale[...] + self.bias[...]).astype(self.dtype)


def attention_heads_first(
    q_bthk, k_bthk, v_bthk, *, mask=None, is_causal: bool = False, chunks: int = 1, bias=None
):
    """Softmax attention with heads before tokens, as plain einsums (the CPU path).

    On CPU, `jax.nn.dot_product_attention`'s (B, T, H, K) layout makes XLA's small batched
    matmuls about 2x slower than this (B, H, T, K) one: the whole ViT-Ti train step is
    6-8% faster (benchmarks/README.md). On GPU the library call is kept for cuDNN flash.

    `chunks` > 1 computes it for that many contiguous slices of the batch, one after the
    other (same arithmetic per example).

    `bias`: (3, H, K), added to q, k and v first, in each chunk. Its gradient is then summed
    per chunk: added before the chunks, it made XLA compute each of q, k and v's gradients
    twice from the chunks (a transposing concatenation for the input-gradient dot, and
    another for the bias-gradient sum). ViT-Ti bf16 step -3.5% (eight alternated pairs),
    DreamLIP tiny -2.5% (benchmarks/README.md).
    """
    b, t, h, k = q_bthk.shape
    if chunks > 1 and b % chunks == 0:
        per_example = mask is not None and mask.ndim == 4 and mask.shape[0] == b
        masks = jnp.split(mask, chunks) if per_example else [mask] * chunks
        split = lambda a: jnp.split(a, chunks)
        parts = [
            attention_heads_first(q, kk, v, mask=m, is_causal=is_causal, bias=bias)
            for q, kk, v, m in zip(split(q_bthk), split(k_bthk), split(v_bthk), masks)
        ]
        return jnp.concatenate(parts)
    if bias is not None:
        q_bthk, k_bthk, v_bthk = q_bthk + bias[0], k_bthk + bias[1], v_bthk + bias[2]
    q, kk, v = (a.transpose(0, 2, 1, 3) for a in (q_bthk, k_bthk, v_bthk))  # (B, H, T, K)
    logits = jnp.einsum('bhqk,bhsk->bhqs', q * (k**-0.5), kk)
    if is_causal:
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bhqs,bhsk->bhqk', w, v).transpose(0, 2, 1, 3).reshape(b, t, h * k)


ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def check_attention_implementation(name: str) -> str:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation '{name}'; valid: "
            + ', '.join(ATTENTION_IMPLEMENTATIONS)
        )
    return name


def attention_even_length(q, k, v, *, is_causal: bool, implementation: str, kv_length=None):
    """`jax.nn.dot_product_attention` (B, T, H, K) on an even number of tokens.

    cuDNN's fused attention trains only on even sequence lengths (ViT-B/16 at 224 has 197
    tokens: jax raises NotImplementedError). An odd T is padded by one zero token, which
    `key_value_seq_lengths` hides from every query (cuDNN's padding mask, no bias tensor),
    and the padded query row is dropped. Equal to the unpadded call (tests/test_models.py).

    `kv_length`: the inputs are already padded (`Encoder` pads once for all its blocks) and
    only their first `kv_length` tokens are real. A causal mask hides trailing padding by
    itself, so it is then left to the causal mask alone.
    """
    b, t = q.shape[:2]
    if kv_length is not None or t % 2 == 0:
        lengths = None if kv_length is None or is_causal else jnp.full((b,), kv_length, jnp.int32)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=is_causal,
            key_value_seq_lengths=lengths,
            implementation=implementation,
        )
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    lengths = jnp.full((b,), t, jnp.int32)
    y = jax.nn.dot_product_attention(
        pad(q),
        pad(k),
        pad(v),
        is_causal=is_causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return y[:, :t]


class Attention(nnx.Module):
    """Multi-head self-attention.

    `implementation` (config `model.attention`):
    - 'auto': heads-first einsums on CPU, where they are faster. On GPU with a 16-bit compute
      dtype and no mask, cuDNN's fused flash attention (an odd length padded by one token,
      once per `Encoder`, or here by `attention_even_length`); with a mask (a bidirectional
      text tower's padding) XLA, since cuDNN takes a dense mask only as a bias, and on even
      lengths only. Otherwise XLA. (jax's own `implementation=None` is XLA today, never
      cuDNN.)
    - 'xla' / 'cudnn': `jax.nn.dot_product_attention` with that implementation on any
      backend ('cudnn' raises where cuDNN cannot run the call, e.g. on CPU).
    """

    def __init__(
        self,
        d: int,
        heads: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        implementation: str = 'auto',
    ):
        if d % heads:
            raise ValueError(f'width {d} is not divisible by heads {heads}')
        self.heads = heads
        self.implementation = check_attention_implementation(implementation)
        self.qkv = Dense(d, 3 * d, axes=('embed', 'heads'), rngs=rngs, dtype=dtype)
        self.out = Dense(d, d, axes=('heads', 'embed'), rngs=rngs, dtype=dtype)

    def values(self, x_btd):
        """The value path alone (MaskCLIP's dense readout): out(v), no query-key mixing."""
        return self.out(self.qkv.split(x_btd, 3)[2])

    def runs_cudnn(self, mask=None) -> bool:
        """Whether this layer's attention is cuDNN's fused kernel for inputs with `mask`."""
        if mask is not None:
            return False
        if self.implementation == 'auto':
            half = self.qkv.dtype in (jnp.bfloat16, jnp.float16)
            return jax.default_backend() == 'gpu' and half
        return self.implementation == 'cudnn'

    def __call__(self, x_btd, *, mask=None, is_causal: bool = False, norm=None, kv_length=None):
        """Self-attention of x_btd, or of norm(x_btd) with norm folded into qkv (Dense).

        `kv_length`: only the first kv_length tokens are real, the rest padding that no real
        token may attend to (`Encoder` pads an odd length once for cuDNN); cuDNN path only.
        """
        b, t, d = x_btd.shape
        cudnn = self.runs_cudnn(mask)
        if kv_length is not None and not cudnn:
            raise ValueError('kv_length (padded tokens) is for the cuDNN attention path only')
        heads_first_cpu = self.implementation == 'auto' and jax.default_backend() == 'cpu'
        heads = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        # q, k and v as three matmuls, each into its own buffer. Slicing one (B, T, 3, H, K)
        # output copied all three for cuDNN, and the backward concatenated their gradients
        # (11 of 175 kernel-ms per CLIP B/16 step on the H100); three matmuls: step 0.183 ->
        # 0.179 s. On CPU each gradient then goes to its own dot: with bf16 operands ViT-Ti
        # 0.921 / 0.899 -> 0.880 / 0.852 s and DreamLIP tiny 0.48 -> 0.44 s; in f32 (once
        # attention added the qkv bias per chunk) ViT-Ti 1.706 / 1.615 / 1.867 / 1.783 ->
        # 1.697 / 1.560 / 1.760 / 1.739 s, alternated (benchmarks/README.md).
        q, k, v = map(heads, self.qkv.split(x_btd, 3, norm=norm, bias=not heads_first_cpu))
        if heads_first_cpu:
            # 8 batch chunks keep each chunk's (B/8, H, T, T) scores (0.8 MB for ViT-Ti) in
            # L2 and give XLA independent ops: ViT-Ti CLIP step -3% on one core
            # (benchmarks/README.md). Only on one device: slicing a batch sharded over
            # devices would move rows between them.
            chunks = 8 if jax.device_count() == 1 else 1
            bias = self.qkv.folded(norm)[1]
            if bias is not None:
                bias = bias.astype(q.dtype).reshape(3, self.heads, d // self.heads)
            y = attention_heads_first(
                q, k, v, mask=mask, is_causal=is_causal, chunks=chunks, bias=bias
            )
            return self.out(y)
        if cudnn:
            impl = 'cudnn' if self.implementation == 'auto' else self.implementation
            y_bthk = attention_even_length(
                q, k, v, is_causal=is_causal, implementation=impl, kv_length=kv_length
            )
        else:
            impl = 'xla' if self.implementation == 'auto' else self.implementation
            y_bthk = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, implementation=impl
            )
        return self.out(y_bthk.reshape(b, t, d))


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


# The MLP nonlinearities of the layouts we train or import: 'gelu_tanh' (big_vision / SigLIP,
# HF 'gelu_pytorch_tanh'; our default), 'gelu' (exact erf form: open_clip, torch nn.GELU),
# 'quick_gelu' (OpenAI CLIP and its HF / open_clip '-quickgelu' ports).
ACTIVATIONS = {
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'quick_gelu': quick_gelu,
}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nnx.Module):

    def __init__(
        self,
        d: int,
        f: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        activation: str = 'gelu_tanh',
    ):
        self.fc1 = Dense(d, f, axes=('embed', 'mlp'), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(f, d, axes=('mlp', 'embed'), rngs=rngs, dtype=dtype)
        activation_fn(activation)  # fail at construction on a bad name
        self.activation = activation

    def __call__(self, x, *, norm=None):
        # Off CPU the activation alone is rematerialised: the backward recomputes it from
        # fc1's output, fused into its gradient, instead of storing one more (N, f) tensor
        # per block. CLIP B/16 on the H100: step 0.183 -> 0.175 s and 9.4 GB (one bf16 (N, f)
        # per block) less XLA temp memory. On CPU it saves memory only (ViT-Ti: 16% less
        # temp memory, same f32 speed) and costs time with bf16 operands, where the stored
        # output is fc2's bf16 operand: DreamLIP tiny step 3.5% and ViT-Ti 2% faster without
        # it, for 14% / 22% more temp memory (benchmarks/README.md).
        act = ACTIVATIONS[self.activation]
        if jax.default_backend() != 'cpu':
            act = jax.checkpoint(act)
        return self.fc2(act(self.fc1(x, norm=norm)))


def row_major(x):
    """x pinned to the row-major layout, on GPU (elsewhere x itself).

    XLA's GPU layout assignment stored both towers' residual streams of CLIP B/16 batch
    minor, (T, D, B) in memory (its optimised HLO, jax 0.11.2): each Dense then read the
    stream through a transpose and wrote its output back through another, and LayerNorm's
    statistics became strided column reductions. Pinned here (and so its gradient, which
    the constraint's transpose rule pins too), the stream stays (B, T, D), the layout its
    matmuls read.
    """
    if jax.default_backend() != 'gpu':
        return x
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        d: int,
        heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        activation: str = 'gelu_tanh',
        ln_eps: float = 1e-6,
        attention: str = 'auto',
    ):
        self.ln1 = LayerNorm(d, rngs=rngs, dtype=dtype, eps=ln_eps)
        self.attn = Attention(d, heads, rngs=rngs, dtype=dtype, implementation=attention)
        self.ln2 = LayerNorm(d, rngs=rngs, dtype=dtype, eps=ln_eps)
        self.mlp = Mlp(d, int(d * mlp_ratio), rngs=rngs, dtype=dtype, activation=activation)

    def __call__(self, x, *, mask=None, is_causal: bool = False, kv_length=None):
        # Each LayerNorm's scale and shift are folded into the Dense after it (Dense `norm`).
        # row_major: see there (a no-op off GPU).
        y = self.attn(x, mask=mask, is_causal=is_causal, norm=self.ln1, kv_length=kv_length)
        x = row_major(x + y)
        return row_major(x + self.mlp(x, norm=self.ln2))


def remat_policy(name: str):
    """Config name -> jax.checkpoint policy; 'none' means no rematerialisation.

    'auto' builds as 'none': the train step picks the policy at its first step
    (pretrain/auto_remat.py) and builds its own model with it.
    """
    if name in ('none', 'auto'):
        return None
    valid = remat_policy_names()
    if name not in valid:
        raise ValueError(f"unknown remat policy '{name}'; valid: none, auto, {', '.join(valid)}")
    return getattr(jax.checkpoint_policies, name)


def remat_policy_names() -> list[str]:
    """The jax.checkpoint_policies that are policies themselves, called per primitive with
    its parameters as keywords; not the factories beside them (save_only_these_names(...)
    and the like), which a config string cannot call."""
    names = []
    for name in dir(jax.checkpoint_policies):
        fn = getattr(jax.checkpoint_policies, name)
        if name.startswith('_') or not callable(fn):
            continue
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
        if inspect.Parameter.VAR_KEYWORD in kinds:
            names.append(name)
    return names


class Encoder(nnx.Module):
    """A stack of blocks, optionally rematerialised block by block.

    `remat` names a jax.checkpoint policy ('nothing_saveable', 'dots_saveable', ...). Remat
    trades compute for memory: it is 15-50% slower on CPU, so configs turn it on only for
    accelerator-sized models.
    """

    def __init__(
        self,
        d: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = 'none',
        activation: str = 'gelu_tanh',
        ln_eps: float = 1e-6,
        attention: str = 'auto',
    ):
        self.blocks = nnx.List(
            [
                Block(
                    d,
                    heads,
                    mlp_ratio,
                    rngs=rngs,
                    dtype=dtype,
                    activation=activation,
                    ln_eps=ln_eps,
                    attention=attention,
                )
                for _ in range(depth)
            ]
        )
        self.policy = remat_policy(remat)
        self.remat = self.policy is not None

    def __call__(self, x, *, mask=None, is_causal: bool = False):
        t = x.shape[1]
        # cuDNN's attention trains only on even lengths. An odd sequence (197 tokens for
        # B/16 at 224) is padded by one zero token here, once, rather than q, k and v inside
        # every block (attention_even_length); the pad is hidden from the real tokens as a
        # key and dropped at the end, so the result is the same.
        pad = t % 2 == 1 and len(self.blocks) > 0 and self.blocks[0].attn.runs_cudnn(mask)
        kv_length = t if pad else None
        if pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        run = lambda blk, y: blk(y, mask=mask, is_causal=is_causal, kv_length=kv_length)
        if self.remat:
            run = nnx.remat(run, policy=self.policy)
        x = row_major(x)
        for block in self.blocks:
            x = run(block, x)
        return x[:, :t] if pad else x
