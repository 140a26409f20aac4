"""Contrastive objectives against independent float64 numpy references.

The references restate the maths in numpy (stable logsumexp / softplus forms) and
get their gradients by central finite differences, so they share no code with
the JAX losses. The JAX losses are compared in x64 (tight) and in f32 (the dtype
that training uses, loose).
"""

import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pretrain.objectives import compose
from pretrain.objectives.clip import Clip, clip_loss
from pretrain.objectives.siglip import Siglip, siglip_loss, siglip_loss_chunked

# ----------------------------------------------------------------------------
# numpy references (float64)


def np_logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_softplus(x):
    # log(1 + e^x) without overflow for large |x|.
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def np_clip_loss(zimg, ztxt, scale):
    logits = min(scale, 100.0) * zimg @ ztxt.T
    pos = np.diag(logits)
    i2t = np.mean(np_logsumexp(logits, axis=1) - pos)
    t2i = np.mean(np_logsumexp(logits, axis=0) - pos)
    return 0.5 * (i2t + t2i)


def np_siglip_loss(zimg, ztxt, scale, bias):
    b = zimg.shape[0]
    logits = scale * zimg @ ztxt.T + bias
    signs = 2 * np.eye(b) - 1
    # -log sigmoid(x) = softplus(-x)
    return np.sum(np_softplus(-signs * logits)) / b


def np_grad(f, args, h=1e-6):
    """Central finite differences of f(*args) wrt every float argument."""
    args = [np.array(a, dtype=np.float64) for a in args]
    grads = []
    for k, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [x.copy() for x in args]
            minus = [x.copy() for x in args]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(b=6, e=5, seed=0, aligned=0.5):
    """L2-normalised pairs; `aligned` pulls text i towards image i so that the
    positives are not all lost in the noise."""
    rng = np.random.default_rng(seed)
    zimg = unit_rows(rng.normal(size=(b, e)))
    ztxt = unit_rows(aligned * zimg + (1 - aligned) * unit_rows(rng.normal(size=(b, e))))
    return zimg, ztxt


def jax_value_and_grad(loss_fn, zimg, ztxt, scale, bias, **kwargs):
    def f(zi, zt, s, b):
        return loss_fn(zimg=zi, ztxt=zt, scale=s, bias=b, **kwargs)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        zimg, ztxt, scale, bias
    )


def clip_with_bias(*, zimg, ztxt, scale, bias):
    del bias  # Same signature as siglip for the shared helpers.
    return clip_loss(zimg=zimg, ztxt=ztxt, scale=scale)


# ----------------------------------------------------------------------------
# Loss values and gradients vs numpy

CASES = [
    # (jax loss, numpy reference, scale, bias)
    (clip_with_bias, lambda zi, zt, s, b: np_clip_loss(zi, zt, s), 1.0, 0.0),
    (clip_with_bias, lambda zi, zt, s, b: np_clip_loss(zi, zt, s), 10.0, 0.0),
    (clip_with_bias, lambda zi, zt, s, b: np_clip_loss(zi, zt, s), 150.0, 0.0),  # clamped at 100
    (siglip_loss, np_siglip_loss, 1.0, 0.0),
    (siglip_loss, np_siglip_loss, 10.0, -10.0),  # SigLIP's init
    (siglip_loss, np_siglip_loss, 30.0, 3.0),
]
CASE_IDS = ['clip-s1', 'clip-s10', 'clip-s150', 'siglip-s1', 'siglip-s10b-10', 'siglip-s30b3']


@pytest.mark.parametrize('loss_fn, np_loss, scale, bias', CASES, ids=CASE_IDS)
def test_loss_and_grads_match_numpy_x64(loss_fn, np_loss, scale, bias):
    zimg, ztxt = embeddings()
    want_loss = np_loss(zimg, ztxt, scale, bias)
    want_grads = np_grad(np_loss, [zimg, ztxt, scale, bias])
    with jax.enable_x64(True):
        (loss, _), grads = jax_value_and_grad(
            loss_fn, zimg, ztxt, np.float64(scale), np.float64(bias)
        )
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
        for name, got, want in zip(['zimg', 'ztxt', 'scale', 'bias'], grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=name)
        if loss_fn is clip_with_bias and scale > 100:
            assert grads[2] == 0.0  # Clamped temperature is frozen.


@pytest.mark.parametrize('loss_fn, np_loss, scale, bias', CASES, ids=CASE_IDS)
def test_loss_and_grads_match_numpy_f32(loss_fn, np_loss, scale, bias):
    # More pairs and sharper alignment: large, saturated logits in f32.
    zimg, ztxt = embeddings(b=16, e=8, seed=1, aligned=0.8)
    want_loss = np_loss(zimg, ztxt, scale, bias)
    want_grads = np_grad(np_loss, [zimg, ztxt, scale, bias])
    (loss, _), grads = jax_value_and_grad(
        loss_fn,
        zimg.astype(np.float32),
        ztxt.astype(np.float32),
        np.float32(scale),
        np.float32(bias),
    )
    assert loss.dtype == jnp.float32
    # atol: logits reach 100, so f32 rounding of lse - pos is ~1e-7 absolute.
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    for name, got, want in zip(['zimg', 'ztxt', 'scale', 'bias'], grads, want_grads):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('loss_fn', [clip_with_bias, siglip_loss])
def test_metrics(loss_fn):
    zimg, ztxt = embeddings(b=12, e=6, seed=2, aligned=0.3)
    _, metrics = loss_fn(zimg=zimg, ztxt=ztxt, scale=5.0, bias=-1.0)
    sims = zimg @ ztxt.T
    np.testing.assert_allclose(metrics['i2t_acc'], np.mean(sims.argmax(1) == np.arange(12)))
    np.testing.assert_allclose(metrics['t2i_acc'], np.mean(sims.argmax(0) == np.arange(12)))
    np.testing.assert_allclose(metrics['scale'], 5.0)
    assert 0 < metrics['i2t_acc'] < 1  # The case is not trivial.
    if loss_fn is siglip_loss:
        np.testing.assert_allclose(metrics['bias'], -1.0)


def test_bf16_embeddings_give_f32_loss():
    zimg, ztxt = embeddings()
    zimg, ztxt = jnp.asarray(zimg, jnp.bfloat16), jnp.asarray(ztxt, jnp.bfloat16)
    assert clip_loss(zimg=zimg, ztxt=ztxt, scale=10.0)[0].dtype == jnp.float32
    assert siglip_loss(zimg=zimg, ztxt=ztxt, scale=10.0, bias=-10.0)[0].dtype == jnp.float32
    chunked = siglip_loss_chunked(zimg=zimg, ztxt=ztxt, scale=10.0, bias=-10.0, chunk_size=3)
    assert chunked[0].dtype == jnp.float32


# ----------------------------------------------------------------------------
# Chunked SigLIP == full SigLIP


@pytest.mark.parametrize('scale, bias', [(10.0, -5.0), (100.0, -10.0)])  # The latter saturates.
@pytest.mark.parametrize('chunk_size', [1, 2, 4, 8, 16])
def test_siglip_chunked_matches_full(chunk_size, scale, bias):
    zimg, ztxt = embeddings(b=16, e=8, seed=3, aligned=0.4)
    # Two copies of image 7 as texts 7 and 8, across every block boundary: the
    # argmax tie must go to text 7 in both forms, or i2t_acc differs.
    ztxt[7] = ztxt[8] = zimg[7]
    args = (zimg.astype(np.float32), ztxt.astype(np.float32), np.float32(scale), np.float32(bias))
    (want, want_m), want_g = jax_value_and_grad(siglip_loss, *args)
    (got, got_m), got_g = jax_value_and_grad(siglip_loss_chunked, *args, chunk_size=chunk_size)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for name, g, w in zip(['zimg', 'ztxt', 'scale', 'bias'], got_g, want_g):
        # Sums in another order: float32 rounding of the largest terms, so absolute error up
        # to ~1e-6 of the largest gradient (on an H100 one element missed atol=1e-6 by 1e-7).
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=name)
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        np.testing.assert_allclose(got_m[k], want_m[k], err_msg=k)


def test_siglip_chunked_matches_full_in_float64():
    """Under jax_enable_x64 the scan's integer carries keep one dtype (int32), and float64
    embeddings give float64 agreement."""
    zimg, ztxt = embeddings(b=8, e=4, seed=1)
    with jax.enable_x64(True):
        args = dict(zimg=zimg.astype(np.float64), ztxt=ztxt.astype(np.float64), scale=10.0)
        want, want_m = siglip_loss(**args, bias=-5.0)
        got, got_m = siglip_loss_chunked(**args, bias=-5.0, chunk_size=4)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert float(got_m['i2t_acc']) == float(want_m['i2t_acc'])


@pytest.mark.parametrize('chunk_size', [0, -4, 3, 32])
def test_siglip_chunked_rejects_bad_chunk_size(chunk_size):
    zimg, ztxt = embeddings(b=8)
    with pytest.raises(ValueError, match=f'batch 8, chunk_size {chunk_size}'):
        siglip_loss_chunked(zimg=zimg, ztxt=ztxt, scale=1.0, bias=0.0, chunk_size=chunk_size)


def test_siglip_chunked_memory_is_linear_in_batch():
    """XLA's own buffer assignment (compile only): the full loss keeps (B, B)
    logits for the backward pass, the chunked one only (B, chunk) blocks.

    Batches large enough that the (B, B) arrays dwarf what else lands in the temp size: on
    GPU a 32 MiB cuBLAS workspace, present at some sizes and not others (seen on an H100:
    chunked 0.8 / 1.6 / 34.6 MB at B = 512 / 1024 / 2048).
    """

    def temp_bytes(loss_fn, b, **kwargs):
        def f(zi, zt, s, bias):
            return loss_fn(zimg=zi, ztxt=zt, scale=s, bias=bias, **kwargs)

        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
        emb = jax.ShapeDtypeStruct((b, 64), jnp.float32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return vg.lower(emb, emb, scalar, scalar).compile().memory_analysis().temp_size_in_bytes

    sizes = (2048, 4096, 8192)
    full = [temp_bytes(siglip_loss, b) for b in sizes]
    chunked = [temp_bytes(siglip_loss_chunked, b, chunk_size=128) for b in sizes]
    matrix_bytes = sizes[-1] ** 2 * 4  # one (B, B) float32 array at the largest batch
    info = f'temp bytes at batch {sizes}: full {full}, chunked {chunked}'
    # Quadrupling B: x16 when quadratic, x4 when linear; 8 is the midpoint (in log). Not per
    # doubling: on an H200 the full loss kept four (B, B) arrays at 2048 and 4096, three
    # at 8192 (full 67 / 268 / 805 MB).
    assert full[2] > 8 * full[0], info
    assert full[2] >= matrix_bytes, info
    assert chunked[2] < matrix_bytes / 4, info  # 8192 x 128 blocks: never a (B, B) array
    if jax.default_backend() == 'cpu':  # no workspace: the growth itself is linear
        assert chunked[2] - chunked[1] < 3 * (chunked[1] - chunked[0]), info


# ----------------------------------------------------------------------------
# Objective classes end to end on a tiny model


class TinyImageText(nnx.Module):
    """Stands in for ImageTextModel: same encoder contract, two Linear towers."""

    def __init__(self, *, image_dim=4 * 4 * 3, seq_len=5, embed=8, rngs: nnx.Rngs):
        self.img_proj = nnx.Linear(image_dim, embed, rngs=rngs)
        self.txt_proj = nnx.Linear(seq_len, embed, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.log(jnp.float32(10.0)))
        self.logit_bias = nnx.Param(jnp.float32(-5.0))

    def encode_image(self, image, *, train):
        del train
        z = self.img_proj(image.reshape(image.shape[0], -1))
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True), {'img/pooled': z}

    def encode_text(self, tokens, *, train):
        del train
        z = self.txt_proj(tokens.astype(jnp.float32))
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True), {'txt/pooled': z}


def tiny_batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        'image': rng.uniform(size=(b, 4, 4, 3)).astype(np.float32),
        'text': rng.integers(0, 100, size=(b, 5)).astype(np.int32),
        'long_text': rng.integers(0, 100, size=(b, 5)).astype(np.int32),
    }


def objective_value_and_grad(objective, model, batch):
    def loss_fn(model):
        return objective(model, batch, rng=jax.random.key(0), train=True)

    return nnx.value_and_grad(loss_fn, has_aux=True)(model)


def test_clip_objective_end_to_end():
    model, batch = TinyImageText(rngs=nnx.Rngs(0)), tiny_batch()
    objective = Clip(ml_collections.ConfigDict({'weight': 1.0}))
    assert objective.fields == ('image', 'text')
    (loss, metrics), grads = objective_value_and_grad(objective, model, batch)

    zimg = np.asarray(model.encode_image(batch['image'], train=False)[0], np.float64)
    ztxt = np.asarray(model.encode_text(batch['text'], train=False)[0], np.float64)
    np.testing.assert_allclose(loss, np_clip_loss(zimg, ztxt, 10.0), rtol=1e-5)
    np.testing.assert_allclose(metrics['scale'], 10.0, rtol=1e-6)
    # d/d(log s) = s * d/ds
    (want_ds,) = np_grad(lambda s: np_clip_loss(zimg, ztxt, s), [10.0])
    np.testing.assert_allclose(grads.logit_scale[...], 10.0 * want_ds, rtol=1e-4)
    assert np.abs(grads.img_proj.kernel[...]).max() > 0
    assert np.abs(grads.txt_proj.kernel[...]).max() > 0


def test_siglip_objective_end_to_end_full_equals_chunked():
    model, batch = TinyImageText(rngs=nnx.Rngs(1)), tiny_batch()
    full = Siglip({'weight': 1.0})
    chunked = Siglip({'weight': 1.0, 'chunk_size': 2, 'text_field': 'long_text'})
    assert full.chunk_size == 0 and chunked.chunk_size == 2
    assert chunked.fields == ('image', 'long_text')

    (loss, metrics), grads = objective_value_and_grad(full, model, batch)
    zimg = np.asarray(model.encode_image(batch['image'], train=False)[0], np.float64)
    ztxt = np.asarray(model.encode_text(batch['text'], train=False)[0], np.float64)
    np.testing.assert_allclose(loss, np_siglip_loss(zimg, ztxt, 10.0, -5.0), rtol=1e-5)
    (want_db,) = np_grad(lambda b: np_siglip_loss(zimg, ztxt, 10.0, b), [-5.0])
    np.testing.assert_allclose(grads.logit_bias[...], want_db, rtol=1e-4)
    np.testing.assert_allclose(metrics['bias'], -5.0)

    # The chunked loss on the same texts, through the model, in nnx.jit.
    batch_same = {**batch, 'long_text': batch['text']}
    step = nnx.jit(objective_value_and_grad, static_argnums=0)
    (loss_c, _), grads_c = step(chunked, model, batch_same)
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.state(grads, nnx.Param),
        nnx.state(grads_c, nnx.Param),
    )


# ----------------------------------------------------------------------------
# Composite


def objectives_config(**entries):
    return ml_collections.ConfigDict(entries)


def test_composite_weights_and_metric_names():
    model, batch = TinyImageText(rngs=nnx.Rngs(2)), tiny_batch()
    objective = compose.build_objective(
        objectives_config(
            clip={'weight': 1.0},
            sig={'kind': 'siglip', 'weight': 0.5, 'chunk_size': 4, 'text_field': 'long_text'},
        )
    )
    assert objective.fields == ('image', 'text', 'long_text')
    loss, metrics = objective(model, batch, rng=jax.random.key(0), train=True)

    clip_l, clip_m = Clip()(model, batch, train=True)
    sig_l, sig_m = Siglip({'chunk_size': 4, 'text_field': 'long_text'})(model, batch, train=True)
    np.testing.assert_allclose(loss, clip_l + 0.5 * sig_l, rtol=1e-6)
    np.testing.assert_allclose(metrics['loss'], loss)
    np.testing.assert_allclose(metrics['loss_clip'], clip_l, rtol=1e-6)
    np.testing.assert_allclose(metrics['loss_sig'], sig_l, rtol=1e-6)
    want_keys = {'loss', 'loss_clip', 'loss_sig'}
    want_keys |= {f'clip/{k}' for k in clip_m} | {f'sig/{k}' for k in sig_m}
    assert set(metrics) == want_keys
    assert 'sig/bias' in metrics and 'clip/i2t_acc' in metrics


class Recorder:
    """A fake objective kind: records its rng, returns a fixed loss."""

    fields = ('image',)
    calls = []

    def __init__(self, config):
        self.value = config.get('value', 1.0)

    def __call__(self, model, batch, *, rng, train):
        Recorder.calls.append(rng)
        return jnp.float32(self.value), {'value': jnp.float32(self.value)}


class Boom(Recorder):
    fields = ('never_loaded',)

    def __call__(self, model, batch, *, rng, train):
        raise AssertionError('an objective with weight 0 was computed')


def test_composite_skips_zero_weight_and_splits_rngs(monkeypatch):
    # Later objectives join the table the same way: one more entry in OBJECTIVES.
    monkeypatch.setitem(compose.OBJECTIVES, 'recorder', Recorder)
    monkeypatch.setitem(compose.OBJECTIVES, 'boom', Boom)
    monkeypatch.setattr(Recorder, 'calls', [])
    config = objectives_config(
        a={'kind': 'recorder', 'weight': 2.0, 'value': 3.0},
        b={'kind': 'boom', 'weight': 0.0},
        c={'kind': 'recorder', 'weight': -1.0, 'value': 5.0},
    )
    objective = compose.build_objective(config)
    assert objective.fields == ('image',)  # Boom's field is not requested.
    rng = jax.random.key(7)
    loss, metrics = objective(None, {}, rng=rng, train=True)
    np.testing.assert_allclose(loss, 2.0 * 3.0 - 5.0)
    assert set(metrics) == {'loss', 'loss_a', 'a/value', 'loss_c', 'c/value'}
    # Index in the config, so b's weight does not change c's rng.
    want = [jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 2)]
    assert len(Recorder.calls) == 2
    for got, w in zip(Recorder.calls, want):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(w))


def test_build_objective_errors():
    with pytest.raises(
        ValueError, match=r"unknown kind 'sigclip'.*\['clip', 'dreamlip', 'siglip'\]"
    ):
        compose.build_objective(objectives_config(x={'kind': 'sigclip', 'weight': 1.0}))
    with pytest.raises(ValueError, match=r"unknown kind 'clipp'"):
        compose.build_objective(objectives_config(clipp={'weight': 1.0}))
    # A typo fails even when the term is switched off.
    with pytest.raises(ValueError, match='unknown kind'):
        compose.build_objective(objectives_config(clip={'weight': 1.0}, sglip={'weight': 0.0}))
    with pytest.raises(ValueError, match='needs a `weight`'):
        compose.build_objective(objectives_config(clip={'chunk_size': 0}))
    with pytest.raises(ValueError, match='non-zero weight'):
        compose.build_objective(objectives_config(clip={'weight': 0.0}))


# ----------------------------------------------------------------------------
# Sharded == unsharded (8 fake CPU devices need a fresh process)

SHARDED_CHECK = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pretrain.objectives.clip import clip_loss
    from pretrain.objectives.siglip import siglip_loss, siglip_loss_chunked

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    zimg = unit(rng.normal(size=(32, 16))).astype(np.float32)
    ztxt = unit(zimg + rng.normal(size=(32, 16))).astype(np.float32)
    scale, bias = np.float32(10.0), np.float32(-5.0)

    losses = {
        'clip': lambda zi, zt, s, b: clip_loss(zimg=zi, ztxt=zt, scale=s),
        'siglip': lambda zi, zt, s, b: siglip_loss(zimg=zi, ztxt=zt, scale=s, bias=b),
        # 8 blocks of 4 (one per device) and 2 blocks of 16 (fewer than devices).
        'chunked4': lambda zi, zt, s, b: siglip_loss_chunked(zimg=zi, ztxt=zt, scale=s, bias=b, chunk_size=4),
        'chunked16': lambda zi, zt, s, b: siglip_loss_chunked(zimg=zi, ztxt=zt, scale=s, bias=b, chunk_size=16),
    }
    for name, f in losses.items():
        vg = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)
        want = jax.jit(vg)(zimg, ztxt, scale, bias)
        with jax.set_mesh(mesh):
            batch_sharding = NamedSharding(mesh, P('data'))
            zi, zt = jax.device_put(zimg, batch_sharding), jax.device_put(ztxt, batch_sharding)
            got = jax.jit(vg)(zi, zt, scale, bias)
        assert len(got[1][0].sharding.device_set) == 8, (name, got[1][0].sharding)
        for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(got), jax.tree.leaves(want)):
            err = np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))
            assert err <= 1e-5, (name, jax.tree_util.keystr(path[0]), err)
        print(name, 'ok', float(got[0][0]))
    """)


def test_sharded_matches_unsharded(python):
    # Own process: the 8 CPU devices must be set before JAX starts.
    result = python(['-c', SHARDED_CHECK], devices=8, env={'JAX_PLATFORMS': 'cpu'}, timeout=300)
    assert result.stdout.count(' ok ') == 4, result.stdout
