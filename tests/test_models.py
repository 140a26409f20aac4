"""Towers against an independent numpy forward pass, pooling and position behaviour."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import clip, common
from pretrain.models import layers
from pretrain.models.text import TextTransformer
from pretrain.models.towers import ImageTextModel
from pretrain import flops
from pretrain.models.vit import (
    ConvStem,
    VisionTransformer,
    conv_stem_channels,
    interpolate_posemb,
    sincos2d_posemb,
)


def np_layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_block(x, p, heads, causal):
    """Pre-norm transformer block written out in float64 numpy."""
    b, t, d = x.shape
    k = d // heads
    h = np_layernorm(x, p['ln1']['scale'], p['ln1']['bias'])
    qkv = h @ p['attn']['qkv']['kernel'] + p['attn']['qkv']['bias']
    qkv = qkv.reshape(b, t, 3, heads, k)
    q, kk, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum('bqhk,bshk->bhqs', q, kk) / np.sqrt(k)
    if causal:
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = np.einsum('bhqs,bshk->bqhk', w, v).reshape(b, t, d)
    x = x + att @ p['attn']['out']['kernel'] + p['attn']['out']['bias']
    h = np_layernorm(x, p['ln2']['scale'], p['ln2']['bias'])
    h = np_gelu(h @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias'])
    return x + h @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']


def np_params(module):
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module, nnx.Param))
    )


@pytest.mark.parametrize('attention', ['auto', 'xla'])
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('precision', ['default', 'bfloat16'])
def test_block_matches_numpy(causal, attention, precision):
    # Under 'bfloat16' the CPU path computes q, k and v as three matmuls (Attention): the
    # same function, with bf16-rounded matmul operands (~1e-2 here).
    block = layers.Block(16, 4, 4.0, rngs=nnx.Rngs(0), attention=attention)
    # Non-trivial norms and biases so every parameter matters.
    for path, v in nnx.iter_graph(block):
        if isinstance(v, nnx.Param):
            v[...] = v[...] + 0.1 * jax.random.normal(jax.random.key(len(path)), v.shape)
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    with jax.default_matmul_precision(precision):
        got = block(jnp.asarray(x), is_causal=causal)
    want = np_block(x.astype(np.float64), np_params(block), 4, causal)
    # bf16 operands on CPU: ~1e-2. Under either context manager a GPU runs f32 dots in TF32
    # (jax maps 'bfloat16' to XLA's DEFAULT precision, TF32 there): ~1e-3.
    cpu = jax.default_backend() == 'cpu'
    tol = (1e-4 if precision == 'default' else 5e-2) if cpu else 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


def np_patch_embed(img, p, pos):
    """Patch tokens of (2, 8, 8, 3) images at patch 4, the reference for both ViT tests."""
    x = img.astype(np.float64) * 2 / 255 - 1
    x = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    return x @ p['embed']['kernel'] + p['embed']['bias'] + pos


def test_vit_matches_numpy_and_pools():
    vit = VisionTransformer(
        width=16, depth=2, heads=2, patch=4, image_size=8, pool='cls', rngs=nnx.Rngs(1)
    )
    img = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    pooled, aux = vit(jnp.asarray(img))
    p = np_params(vit)
    x = np_patch_embed(img, p, p['pos'])
    x = np.concatenate([np.broadcast_to(p['cls'], (2, 1, 16)), x], 1)
    for i in range(2):
        x = np_block(x, p['encoder']['blocks'][i], 2, causal=False)
    x = np_layernorm(x, p['ln']['scale'], p['ln']['bias'])
    np.testing.assert_allclose(np.asarray(pooled), x[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux['tokens']), x[:, 1:], rtol=1e-4, atol=1e-4)

    for pool in ('mean', 'map'):
        v = VisionTransformer(
            width=16, depth=1, heads=2, patch=4, image_size=8, pool=pool, rngs=nnx.Rngs(1)
        )
        pooled, aux = v(jnp.asarray(img))
        assert pooled.shape == (2, 16) and aux['tokens'].shape == (2, 4, 16)
        if pool == 'mean':
            np.testing.assert_allclose(pooled, aux['tokens'].mean(1), rtol=1e-5, atol=1e-6)


def test_posemb_interpolation_runs_at_other_resolutions():
    vit = VisionTransformer(
        width=16, depth=1, heads=2, patch=4, image_size=16, pool='mean', rngs=nnx.Rngs(0)
    )
    pooled, aux = vit(jnp.zeros((1, 24, 24, 3), jnp.uint8))
    assert aux['tokens'].shape == (1, 36, 16) and aux['grid'] == (6, 6)
    table = jnp.arange(16 * 2, dtype=jnp.float32).reshape(16, 2)
    np.testing.assert_array_equal(interpolate_posemb(table, (4, 4)), table)
    assert interpolate_posemb(table, (8, 8)).shape == (64, 2)


def test_sincos2d_positions_match_numpy_and_follow_the_grid():
    # Independent reference: per patch (row r, column c) and frequency w_i = 10000^(-i/(d/4)),
    # the channels are sin(c w), cos(c w), sin(r w), cos(r w), each a quarter of d.
    grid, d = (3, 5), 16
    w = 10000.0 ** -(np.arange(d // 4) / (d // 4))
    want = np.array(
        [
            np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
            for r in range(grid[0])
            for c in range(grid[1])
        ]
    )
    np.testing.assert_allclose(np.asarray(sincos2d_posemb(grid, d)), want, atol=1e-6)
    with pytest.raises(ValueError, match='divisible by 4'):
        sincos2d_posemb(grid, 18)

    small = dict(width=16, depth=1, heads=2, patch=4, image_size=8, rngs=nnx.Rngs(0))
    vit = VisionTransformer(pool='cls', posemb='sincos2d', **small)
    assert vit.pos is None  # no parameter: nothing to train, decay or resize
    img = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    tokens, grid = vit.embed_tokens(jnp.asarray(img))
    x = np_patch_embed(img, np_params(vit), np.asarray(sincos2d_posemb((2, 2), 16)))
    np.testing.assert_allclose(np.asarray(tokens[:, 1:]), x, rtol=1e-5, atol=1e-5)
    # At another resolution the table is computed for that grid, not interpolated.
    np.testing.assert_array_equal(vit.positions((3, 4)), sincos2d_posemb((3, 4), 16))
    _, aux = vit(jnp.zeros((1, 12, 16, 3), jnp.uint8))
    assert aux['tokens'].shape == (1, 12, 16) and aux['grid'] == (3, 4)
    with pytest.raises(ValueError, match="unknown posemb 'sincos'; valid: learn, sincos2d"):
        VisionTransformer(posemb='sincos', **small)


def np_conv3x3_stride2(x, kernel, bias):
    """(B, H, W, Cin) -> (B, ceil(H/2), ceil(W/2), Cout): XLA's 'SAME' pads the far side."""
    b, h, w, _ = x.shape
    ho, wo = -(-h // 2), -(-w // 2)
    pad_h, pad_w = max(2 * (ho - 1) + 3 - h, 0), max(2 * (wo - 1) + 3 - w, 0)
    pads = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    xp = np.pad(x, pads)
    out = np.zeros((b, ho, wo, kernel.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]  # (B, 3, 3, Cin)
            out[:, i, j] = np.einsum('bxyc,xyco->bo', window, kernel)
    return out + bias


def test_conv_stem_matches_numpy_and_keeps_the_patch_grid():
    small = dict(width=16, depth=1, heads=2, patch=4, image_size=8, pool='mean')
    vit = VisionTransformer(stem='conv', rngs=nnx.Rngs(3), **small)
    assert conv_stem_channels(4, 16) == [3, 8, 16]
    for path, v in nnx.iter_graph(vit.embed):  # non-zero biases, so every parameter matters
        if isinstance(v, nnx.Param):
            v[...] = v[...] + 0.1 * jax.random.normal(jax.random.key(len(path)), v.shape)
    img = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    tokens, grid = vit.embed_tokens(jnp.asarray(img))
    p = np_params(vit)
    x = img.astype(np.float64) * 2 / 255 - 1
    stem = p['embed']
    for i in range(len(stem['kernels'])):  # nnx.List -> {0: ..., 1: ...}
        x = np_gelu(np_conv3x3_stride2(x, stem['kernels'][i], stem['biases'][i]))
    x = x.reshape(2, 4, 16) @ p['embed']['out']['kernel'] + p['embed']['out']['bias'] + p['pos']
    assert grid == (2, 2)
    np.testing.assert_allclose(np.asarray(tokens), x, rtol=1e-4, atol=1e-4)
    # Another resolution: the same grid rule as the patch embedding, positions resized.
    _, aux = vit(jnp.zeros((1, 12, 16, 3), jnp.uint8))
    assert aux['tokens'].shape == (1, 12, 16) and aux['grid'] == (3, 4)
    with pytest.raises(ValueError, match="unknown stem 'convs'; valid: patch, conv"):
        VisionTransformer(stem='convs', rngs=nnx.Rngs(0), **small)
    with pytest.raises(ValueError, match="power-of-two patch"):
        VisionTransformer(stem='conv', rngs=nnx.Rngs(0), **{**small, 'patch': 6, 'image_size': 12})


def test_conv_stem_flops_match_xla_cost_analysis():
    config = clip.get_config()
    img = config.model.image
    stem = ConvStem(img.patch, img.width, rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = jnp.zeros((1, img.image_size, img.image_size, 3))
    xla = jax.jit(lambda x: stem(x)).lower(x).compile().cost_analysis()['flops']
    img.stem = 'patch'
    with_patch = flops.image_text_forward(config.model)
    img.stem = 'conv'
    with_conv = flops.image_text_forward(config.model)
    patch_embed = 2 * (img.image_size // img.patch) ** 2 * img.patch**2 * 3 * img.width
    analytic = with_conv - with_patch + patch_embed
    # XLA also counts the bias adds and GELUs, which the analytic count leaves out.
    assert 0.9 < analytic / xla <= 1.0, (analytic, xla)


def test_text_pooling_ignores_padding_and_future_tokens():
    tt = TextTransformer(
        width=16,
        depth=2,
        heads=2,
        vocab_size=20,
        context_length=100,
        causal=True,
        pool='eos',
        rngs=nnx.Rngs(0),
    )
    a = np.array([[5, 6, 7, 1, 0, 0, 0, 0]])
    b = np.array(
        [
            [
                5,
                6,
                7,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        ]
    )  # longer than CLIP's 77
    pa, _ = tt(jnp.asarray(a))
    pb, aux = tt(jnp.asarray(b))
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pa, aux["tokens"][:, 3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='context length'):
        tt(jnp.zeros((1, 101), jnp.int32))

    bi = TextTransformer(
        width=16,
        depth=1,
        heads=2,
        vocab_size=20,
        context_length=16,
        causal=False,
        pool='mean',
        rngs=nnx.Rngs(0),
    )
    short = np.array([[5, 6, 1, 0, 0, 0]])
    padded = np.array([[5, 6, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        bi(jnp.asarray(short))[0], bi(jnp.asarray(padded))[0], rtol=1e-5, atol=1e-6
    )


def test_image_text_model_outputs_unit_vectors_and_params_carry_axes():
    config = clip.get_config()
    with nnx.use_eager_sharding(False):
        model = ImageTextModel(config.model, rngs=nnx.Rngs(0))
    (zi, zt), aux = model(jnp.zeros((2, 64, 64, 3), jnp.uint8), jnp.ones((2, 32), jnp.int32))
    np.testing.assert_allclose(jnp.linalg.norm(zi, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(zt, axis=-1), 1, rtol=1e-5)
    image = config.model.image  # one token per patch: (64 / patch)^2 of them
    assert aux['img/tokens'].shape == (2, (64 // image.patch) ** 2, image.width)
    assert float(jnp.exp(model.logit_scale[...])) == pytest.approx(1 / 0.07, rel=1e-5)
    axes = model.image.encoder.blocks[0].mlp.fc1.kernel.get_metadata()['out_sharding']
    assert axes == ('embed', 'mlp')


@pytest.mark.parametrize('size', sorted(common.VIT_SIZES))
def test_size_table_is_consistent(size):
    width, depth, heads = common.VIT_SIZES[size]
    assert width % heads == 0 and common.TEXT_SIZES[size][0] % common.TEXT_SIZES[size][2] == 0


def test_remat_gives_the_same_gradients():
    def grads(remat):
        enc = layers.Encoder(16, 2, 2, 4.0, rngs=nnx.Rngs(0), remat=remat)
        x = jnp.ones((2, 3, 16))
        return nnx.grad(lambda m: (m(x) ** 2).sum())(enc)

    g0, g1 = grads('none'), grads('nothing_saveable')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)
    with pytest.raises(ValueError, match='unknown remat policy'):
        layers.remat_policy('everything')
    # A policy factory needs arguments a config string cannot give: not offered, refused.
    assert 'nothing_saveable' in layers.remat_policy_names()
    assert 'save_only_these_names' not in layers.remat_policy_names()
    with pytest.raises(ValueError, match="unknown remat policy 'save_only_these_names'"):
        layers.remat_policy('save_only_these_names')


@pytest.mark.parametrize('d_in,d_out', [(24, 8), (8, 24)])
def test_dense_matmul_gradients_match_autodiff(d_in, d_out):
    # layers.matmul writes the CPU weight gradient as (dy^T x)^T when d_in > d_out.
    x = jax.random.normal(jax.random.key(0), (32, d_in))
    w = jax.random.normal(jax.random.key(1), (d_in, d_out))
    loss = lambda mm: lambda x, w: jnp.sum(jnp.sin(mm(x, w)))
    got = jax.jit(jax.grad(loss(layers.matmul), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def bf16_rounded(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


# jax maps 'bfloat16' to XLA's DEFAULT precision, which XLA:GPU runs as TF32 for f32 dots,
# not as bf16 operands: the bf16 rounding below is layers.matmul's own, on CPU.
ON_CPU_ONLY = pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason="layers.matmul rounds to bf16 on CPU only"
)


@ON_CPU_ONLY
@pytest.mark.parametrize('d_in,d_out', [(48, 16), (16, 48)])
def test_bf16_matmul_operands_match_numpy_on_rounded_operands(d_in, d_out):
    # Under jax.default_matmul_precision('bfloat16') layers.matmul rounds x, w and the
    # incoming gradient to bf16 and accumulates in f32 on CPU (which otherwise computes
    # every f32 dot in f32): the output and both gradients equal float64 products of the
    # rounded operands, not of the f32 ones.
    x, w, dy = (
        np.random.default_rng(i).normal(size=shape).astype(np.float32)
        for i, shape in enumerate([(64, d_in), (d_in, d_out), (64, d_out)])
    )
    loss = lambda x, w: jnp.sum(layers.matmul(x, w) * dy)
    with jax.default_matmul_precision('bfloat16'):
        y = jax.jit(layers.matmul)(x, w)
        dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    x16, w16, dy16 = bf16_rounded(x), bf16_rounded(w), bf16_rounded(dy)
    for got, want_bf16, want_f32 in [
        (y, x16 @ w16, x.astype(np.float64) @ w),
        (dx, dy16 @ w16.T, dy.astype(np.float64) @ w.T),
        (dw, x16.T @ dy16, x.T.astype(np.float64) @ dy),
    ]:
        got = np.asarray(got, np.float64)
        np.testing.assert_allclose(got, want_bf16, rtol=1e-5, atol=1e-5)
        # Rounding the operands moves the result by ~1e-2 here: far more than the check.
        assert np.abs(got - want_f32).max() > 1e-3
    y_f32 = jax.jit(layers.matmul)(x, w)  # outside the context: f32 again
    np.testing.assert_allclose(y_f32, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


@ON_CPU_ONLY
@pytest.mark.skipif(not layers.cpu_bf16_flags(), reason='a CPU without bf16 dot instructions')
def test_bf16_matmul_runs_its_three_dots_in_bf16():
    # XLA turns a bf16 dot it cannot hand to YNNPACK back into an f32 dot (converting the
    # operands) without a word: the forward and both gradient dots must keep bf16 operands.
    x, w = jnp.ones((256, 48)), jnp.ones((48, 16))
    for shapes in [(x, w), (x[:, :16], w.T)]:  # d_in > d_out and d_in < d_out
        loss = lambda x, w: jnp.sum(jnp.sin(layers.matmul(x, w)))
        with jax.default_matmul_precision('bfloat16'):
            hlo = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes).compile().as_text()
        types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo))  # HLO names are unique
        dots = re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo)
        assert len(dots) == 3, hlo
        assert [(types[a], types[b]) for a, b in dots] == [('bf16', 'bf16')] * 3, hlo


def test_cpu_bf16_flags_reads_the_flags_line(tmp_path):
    # Cut-down /proc/cpuinfo of the two CPU kinds measured (benchmarks/README.md) and one
    # without bf16 dot instructions; a flag must match whole ('avx512_bf16x' is not one).
    head = 'processor\t: 0\nvendor_id\t: X\nmodel name\t: Y\n'
    for flags, want in [
        ('fpu avx2 avx512f amx_bf16 amx_tile amx_int8', ('amx_bf16',)),  # Xeon, Sapphire Rapids
        ('fpu avx2 avx512f avx512_bf16 avx512_vnni', ('avx512_bf16',)),  # EPYC, Zen 4
        ('fpu avx2 avx512f avx512_bf16x', ()),
        ('fpu sse2 avx2 fma', ()),
    ]:
        path = tmp_path / 'cpuinfo'
        cpu = f'{head}flags\t\t: {flags}\nbugs\t\t: amx_bf16\n\n'
        path.write_text(cpu + cpu)
        assert layers.cpu_bf16_flags(str(path)) == want
    assert layers.cpu_bf16_flags(str(tmp_path / 'missing')) == ()
    want = 'bfloat16' if layers.cpu_bf16_flags() else 'default'
    assert layers.resolve_matmul_precision('auto') == (
        want if jax.default_backend() == 'cpu' else 'default'
    )


def test_matmul_precision_of_the_model_config():
    config = clip.get_config()
    with nnx.use_eager_sharding(False):
        config.model.matmul_precision = 'default'
        f32 = ImageTextModel(config.model, rngs=nnx.Rngs(0))
        config.model.matmul_precision = 'bfloat16'
        bf16 = ImageTextModel(config.model, rngs=nnx.Rngs(0))
    image = jax.random.randint(jax.random.key(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, 100)
    (zi, zt), _ = f32(image, tokens)
    (zi16, zt16), _ = bf16(image, tokens)
    for a, b in [(zi, zi16), (zt, zt16)]:  # same parameters; only the operands' rounding
        assert 1e-5 < float(jnp.abs(a - b).max()) < 5e-2
    config.model.matmul_precision = 'bf16'
    with pytest.raises(ValueError, match="unknown matmul_precision 'bf16'; valid: auto, default"):
        ImageTextModel(config.model, rngs=nnx.Rngs(0))


def test_layernorm_folded_into_dense_matches_layernorm_then_dense():
    # Dense(x, norm=ln) folds ln's scale and shift into the kernel and bias: the same function
    # and the same gradients for x, the LayerNorm's parameters and the Dense's.
    ln = layers.LayerNorm(12, rngs=nnx.Rngs(0))
    dense = layers.Dense(12, 20, axes=(None, None), rngs=nnx.Rngs(1))
    for i, v in enumerate([ln.scale, ln.bias, dense.bias]):
        v[...] = v[...] + 0.3 * jax.random.normal(jax.random.key(i), v.shape)
    x = 3.0 * jax.random.normal(jax.random.key(9), (4, 7, 12)) + 1.0

    def loss(folded):
        def f(ln, dense, x):
            y = dense(x, norm=ln) if folded else dense(ln(x))
            return jnp.sum(jnp.sin(y))

        return jax.grad(f, argnums=(0, 1, 2))

    got, want = loss(True)(ln, dense, x), loss(False)(ln, dense, x)
    np.testing.assert_allclose(dense(x, norm=ln), dense(ln(x)), rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_dense_split_matches_slices_of_its_output():
    # Dense.split (Attention's q, k, v off CPU): one matmul per column block, the same values
    # and gradients as slicing the whole output.
    ln = layers.LayerNorm(12, rngs=nnx.Rngs(0))
    dense = layers.Dense(12, 18, axes=(None, None), rngs=nnx.Rngs(1))
    dense.bias[...] = jax.random.normal(jax.random.key(2), (18,))
    x = jax.random.normal(jax.random.key(3), (4, 5, 12))
    w = jax.random.normal(jax.random.key(4), (3, 4, 5, 6))

    def loss(split):
        def f(dense, x):
            parts = dense.split(x, 3, norm=ln) if split else jnp.split(dense(x, norm=ln), 3, -1)
            return sum(jnp.sum(jnp.sin(p) * w[i]) for i, p in enumerate(parts))

        return f

    np.testing.assert_allclose(loss(True)(dense, x), loss(False)(dense, x), rtol=1e-5)
    got = jax.grad(loss(True), argnums=(0, 1))(dense, x)
    want = jax.grad(loss(False), argnums=(0, 1))(dense, x)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_attention_in_batch_chunks_matches_whole_batch(causal):
    # Attention on CPU runs in batch chunks (layers.Attention), with the q, k, v biases added
    # in each chunk; padding masks are per example. Values and gradients (biases included)
    # must equal attention on the whole batch with the biases added first.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 5, 2, 8))
    bias = 0.5 * jax.random.normal(jax.random.key(1), (3, 2, 8))
    cotangent = jax.random.normal(jax.random.key(2), (4, 5, 16))
    valid = jnp.arange(5)[None, :] < jnp.array([5, 3, 1, 4])[:, None]
    pairs = valid[:, None, :, None] & valid[:, None, None, :]
    mask = None if causal else pairs | jnp.eye(5, dtype=bool)

    def whole(q, k, v, bias):
        y = layers.attention_heads_first(
            q + bias[0], k + bias[1], v + bias[2], mask=mask, is_causal=causal
        )
        return jnp.sum(y * cotangent)

    def chunked(q, k, v, bias):
        y = layers.attention_heads_first(q, k, v, mask=mask, is_causal=causal, chunks=2, bias=bias)
        return jnp.sum(y * cotangent)

    np.testing.assert_allclose(chunked(q, k, v, bias), whole(q, k, v, bias), rtol=1e-6)
    got = jax.grad(chunked, argnums=(0, 1, 2, 3))(q, k, v, bias)
    want = jax.grad(whole, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_unknown_attention_implementation_is_named():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; valid: auto"):
        layers.Attention(16, 4, rngs=nnx.Rngs(0), implementation='flash')


@pytest.mark.parametrize('causal', [False, True])
def test_odd_length_attention_padded_to_even_matches(causal):
    # The cuDNN path pads 197 tokens to 198 and hides the pad by sequence lengths; the same
    # padding through XLA's implementation must give the unpadded result.
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 7, 4, 8))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='xla')
    got = layers.attention_even_length(q, k, v, is_causal=causal, implementation='xla')
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_encoder_padding_an_odd_length_once_matches(causal, monkeypatch):
    # On the cuDNN path an Encoder pads 197 tokens to 198 once for all its blocks. The same
    # padding, with XLA's implementation standing in for cuDNN's, must give the unpadded
    # outputs and gradients.
    x = jax.random.normal(jax.random.key(3), (2, 7, 16))
    encoder = layers.Encoder(16, 2, 2, 2.0, rngs=nnx.Rngs(0), attention='xla')

    def outputs():
        loss = lambda x: jnp.square(encoder(x, is_causal=causal)).mean()
        return encoder(x, is_causal=causal), jax.grad(loss)(x)

    want = outputs()
    seen = []
    pad_once = layers.attention_even_length

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], kw['kv_length']))
        return pad_once(q, k, v, **kw)

    monkeypatch.setattr(layers.Attention, 'runs_cudnn', lambda self, mask=None: mask is None)
    monkeypatch.setattr(layers, 'attention_even_length', spy)
    got = outputs()
    assert seen[:2] == [(8, 7), (8, 7)]  # every block saw 8 tokens, 7 of them real
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_encoder_pins_its_residual_stream_row_major_on_gpu(monkeypatch):
    # On GPU (faked on CPU: an f32 model then takes the same XLA attention path) every
    # block's residual stream carries a layout constraint, which must not change values or
    # gradients against the unconstrained stream (the 'cpu' path, with the same attention).
    x = jax.random.normal(jax.random.key(4), (2, 5, 16))
    encoder = layers.Encoder(16, 2, 2, 2.0, rngs=nnx.Rngs(0), attention='xla')

    def run(backend):
        monkeypatch.setattr(jax, 'default_backend', lambda: backend)
        loss = lambda x: jnp.square(encoder(x)).mean()
        hlo = jax.jit(jax.grad(loss)).lower(x).as_text()
        return encoder(x), jax.grad(loss)(x), hlo.count('LayoutConstraint')

    want, got = run('cpu'), run('gpu')
    assert want[2] == 0 and got[2] >= 2 * 2  # two per block, forward (and backward) passes
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
@pytest.mark.parametrize('causal', [False, True])
def test_cudnn_attention_matches_xla_in_bfloat16(causal):
    # 'auto' on GPU in bf16 is cuDNN flash attention: same outputs and input gradients as
    # XLA's attention, to bf16 precision.
    x = jax.random.normal(jax.random.key(1), (4, 197, 64), jnp.bfloat16)
    outs = {}
    for impl in ('cudnn', 'xla'):
        block = layers.Block(64, 4, 4.0, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, attention=impl)
        loss = lambda x: jnp.square(block(x, is_causal=causal).astype(jnp.float32)).mean()
        outs[impl] = (block(x, is_causal=causal), jax.grad(loss)(x))
    for got, want in zip(outs['cudnn'], outs['xla']):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        # bf16 precision relative to each array's scale (the input gradients are ~1e-4).
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02 * np.abs(want).max())
