"""DreamLIP losses and objective against independent float64 numpy references.

The references restate each loss with explicit loops over images / sub-captions and index
sets (no masks, no matrix tricks), build the objective's positive/negative sets from token
equality (not the objective's hashes), and get gradients by central finite differences; they
share no code with pretrain/objectives/dreamlip.py.
"""

import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pretrain.objectives import compose
from test_objectives import np_grad
from pretrain.objectives.dreamlip import (
    DreamLip,
    grouping_loss,
    multipos_circle_loss,
    multipos_infonce_loss,
    text_hashes,
)

# ----------------------------------------------------------------------------
# numpy references (float64)


def np_logsumexp(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def np_softplus(x):
    return max(x, 0.0) + np.log1p(np.exp(-abs(x)))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_clip(zimg, ztxt, scale):
    logits = min(scale, 100.0) * zimg @ ztxt.T
    n = len(zimg)
    i2t = np.mean([np_logsumexp(logits[i]) - logits[i, i] for i in range(n)])
    t2i = np.mean([np_logsumexp(logits[:, j]) - logits[j, j] for j in range(n)])
    return 0.5 * (i2t + t2i)


def np_siglip(zimg, ztxt, scale, bias):
    logits = scale * zimg @ ztxt.T + bias
    n = len(zimg)
    return (
        sum(
            np_softplus(-(1.0 if i == j else -1.0) * logits[i, j])
            for i in range(n)
            for j in range(n)
        )
        / n
    )


def np_multipos_infonce(zimg, ztxt, pos, neg, scale):
    """-1/|P_i| sum_p log softmax over P_i u N_i; mean over images with a positive."""
    logits = min(scale, 100.0) * zimg @ ztxt.T
    losses = []
    for i in range(len(zimg)):
        p_set = [t for t in range(len(ztxt)) if pos[i, t]]
        used = [t for t in range(len(ztxt)) if pos[i, t] or neg[i, t]]
        if not p_set:
            continue
        lse = np_logsumexp(logits[i, used])
        losses.append(-np.mean([logits[i, p] - lse for p in p_set]))
    return np.mean(losses)


def np_multipos_circle(zimg, ztxt, pos, neg, gamma, margin, alpha_cos=None):
    """Circle loss; alphas from `alpha_cos` (frozen copy) so that finite differences give the
    stop-gradient derivative."""
    cos = zimg @ ztxt.T
    ac = cos if alpha_cos is None else alpha_cos
    losses = []
    for i in range(len(zimg)):
        p_set = [t for t in range(len(ztxt)) if pos[i, t]]
        n_set = [t for t in range(len(ztxt)) if neg[i, t] and not pos[i, t]]
        if not p_set:
            continue
        lp = np_logsumexp(
            [-gamma * max(1 + margin - ac[i, p], 0) * (cos[i, p] - (1 - margin)) for p in p_set]
        )
        ln = (
            np_logsumexp([gamma * max(ac[i, n] + margin, 0) * (cos[i, n] - margin) for n in n_set])
            if n_set
            else -np.inf
        )
        losses.append(np_softplus(lp + ln))
    return np.mean(losses)


def np_group_weights(patch, sub, threshold):
    """(B, K, N) weights and the smallest |u - threshold| (finite differences must not cross it)."""
    b_size, n_patch, _ = patch.shape
    thr = 1.0 / n_patch if threshold < 0 else threshold
    w = np.zeros((b_size, sub.shape[1], n_patch))
    gap = np.inf
    for b in range(b_size):
        for k in range(sub.shape[1]):
            a = patch[b] @ sub[b, k]
            u = (a - a.min()) / (a.max() - a.min())
            if thr > 0:  # at 0 there is no jump: u = 0 weighs 0 either way
                gap = min(gap, np.min(np.abs(u - thr)))
            kept = np.where(u >= thr, u, 0.0)
            w[b, k] = kept / kept.sum()
    return w, gap


def np_grouping(patch, sub, valid, scale, threshold, neg=None):
    b_size, k_size, e = sub.shape
    w, _ = np_group_weights(patch, sub, threshold)
    grouped = unit(np.einsum('bkn,bne->bke', w, patch)).reshape(-1, e)
    texts = sub.reshape(-1, e)
    logits = min(scale, 100.0) * grouped @ texts.T
    idx = [r for r in range(b_size * k_size) if valid.reshape(-1)[r]]
    neg = ~np.eye(b_size * k_size, dtype=bool) if neg is None else neg
    g2t = sum(
        np_logsumexp([logits[r, c] for c in idx if c == r or neg[r, c]]) - logits[r, r] for r in idx
    )
    t2g = sum(
        np_logsumexp([logits[r, c] for r in idx if r == c or neg[r, c]]) - logits[c, c] for c in idx
    )
    return 0.5 * (g2t + t2g) / len(idx)


# ----------------------------------------------------------------------------
# Random inputs with the objective's structure


def multipos_case(b=4, k=2, e=5, seed=0, aligned=0.5):
    """Images, their B (1 + K) texts (raw first), masks with invalid sub-captions and one
    cross-image duplicate removed from the negatives."""
    rng = np.random.default_rng(seed)
    t = 1 + k
    zimg = unit(rng.normal(size=(b, e)))
    ztxt = unit(aligned * zimg[:, None] + (1 - aligned) * unit(rng.normal(size=(b, t, e))))
    valid = np.ones((b, t), bool)
    valid[0, 2] = valid[2, 1] = valid[2, 2] = False  # image 2: raw caption only
    pos = np.zeros((b, b * t), bool)
    neg = np.zeros((b, b * t), bool)
    for i in range(b):
        for bb in range(b):
            for j in range(t):
                pos[i, bb * t + j] = bb == i and valid[bb, j]
                neg[i, bb * t + j] = bb != i and valid[bb, j]
    neg[1, 3 * t + 1] = False  # a text equal to one of image 1's positives
    return zimg, ztxt.reshape(b * t, e), pos, neg


def grouping_case(b=3, k=3, n=5, e=4, seed=0):
    rng = np.random.default_rng(seed)
    patch = unit(rng.normal(size=(b, n, e)))
    # Sub-caption k of image b leans towards patch k: weights are not uniform.
    sub = unit(0.6 * patch[:, :k] + 0.4 * unit(rng.normal(size=(b, k, e))))
    valid = np.ones((b, k), bool)
    valid[0, 2] = valid[2, 1] = False
    return patch, sub, valid


def vg(fn, *args, argnums):
    return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(*args)


# ----------------------------------------------------------------------------
# 2. Multi-positive InfoNCE


@pytest.mark.parametrize('scale', [1.0, 10.0, 150.0])
def test_multipos_infonce_matches_numpy_x64(scale):
    zimg, ztxt, pos, neg = multipos_case()
    want = np_multipos_infonce(zimg, ztxt, pos, neg, scale)
    want_g = np_grad(
        lambda zi, zt, s: np_multipos_infonce(zi, zt, pos, neg, s), [zimg, ztxt, scale]
    )

    def f(zi, zt, s):
        return multipos_infonce_loss(zimg=zi, ztxt_all=zt, pos_mask=pos, neg_mask=neg, scale=s)

    with jax.enable_x64(True):
        (loss, metrics), grads = vg(f, zimg, ztxt, np.float64(scale), argnums=(0, 1, 2))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, want, rtol=1e-10)
        for name, g, w in zip(['zimg', 'ztxt', 'scale'], grads, want_g):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8, err_msg=name)
        if scale > 100:
            assert float(grads[2]) == 0.0  # clamped like CLIP's
    # Texts in neither set (invalid, duplicate) get no gradient.
    unused = ~(pos | neg).any(0)
    assert unused.sum() == 3 and np.all(np.asarray(grads[1])[unused] == 0)
    np.testing.assert_allclose(metrics['num_pos'], pos.sum(1).mean())
    best = np.argmax(np.where(pos | neg, zimg @ ztxt.T, -np.inf), axis=1)
    np.testing.assert_allclose(metrics['acc'], np.mean(pos[np.arange(4), best]))


def test_multipos_infonce_f32_and_default_neg_mask():
    zimg, ztxt, pos, neg = multipos_case(b=6, k=3, e=8, seed=1, aligned=0.8)
    want = np_multipos_infonce(zimg, ztxt, pos, ~pos, 30.0)
    want_gi, want_gt = np_grad(
        lambda zi, zt: np_multipos_infonce(zi, zt, pos, ~pos, 30.0), [zimg, ztxt]
    )

    def f(zi, zt):
        return multipos_infonce_loss(zimg=zi, ztxt_all=zt, pos_mask=pos, scale=np.float32(30.0))

    (loss, _), (gi, gt) = vg(f, zimg.astype(np.float32), ztxt.astype(np.float32), argnums=(0, 1))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(gi, want_gi, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gt, want_gt, rtol=1e-3, atol=1e-5)
    # bf16 embeddings: f32 loss maths.
    bf16 = multipos_infonce_loss(
        zimg=jnp.asarray(zimg, jnp.bfloat16),
        ztxt_all=jnp.asarray(ztxt, jnp.bfloat16),
        pos_mask=pos,
        scale=30.0,
    )
    assert bf16[0].dtype == jnp.float32


# ----------------------------------------------------------------------------
# 2'. Multi-positive circle loss


@pytest.mark.parametrize('gamma, margin', [(32.0, 0.25), (8.0, 0.4)])
def test_multipos_circle_matches_numpy_x64(gamma, margin):
    zimg, ztxt, pos, neg = multipos_case(seed=2)
    cos0 = zimg @ ztxt.T
    # The relu kinks of the alphas are not hit (they have no gradient anyway, but keep the
    # case away from them so that the values are smooth around it).
    assert np.min(np.abs(np.concatenate([1 + margin - cos0[pos], cos0[neg] + margin]))) > 1e-3
    want = np_multipos_circle(zimg, ztxt, pos, neg, gamma, margin)
    # Alphas frozen at their values: the stop-gradient derivative.
    want_g = np_grad(
        lambda zi, zt: np_multipos_circle(zi, zt, pos, neg, gamma, margin, alpha_cos=cos0),
        [zimg, ztxt],
    )

    def f(zi, zt):
        return multipos_circle_loss(
            zimg=zi, ztxt_all=zt, pos_mask=pos, neg_mask=neg, gamma=gamma, margin=margin
        )

    with jax.enable_x64(True):
        (loss, metrics), grads = vg(f, zimg, ztxt, argnums=(0, 1))
        np.testing.assert_allclose(loss, want, rtol=1e-10)
        for name, g, w in zip(['zimg', 'ztxt'], grads, want_g):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8, err_msg=name)
    unused = ~(pos | neg).any(0)
    assert np.all(np.asarray(grads[1])[unused] == 0)
    # The full derivative (through the alphas) is a different number: the stop is real.
    full_g = np_grad(
        lambda zi, zt: np_multipos_circle(zi, zt, pos, neg, gamma, margin), [zimg, ztxt]
    )
    assert np.abs(full_g[0] - np.asarray(grads[0])).max() > 1e-3
    assert 'acc' in metrics


def test_multipos_circle_f32_and_degenerate_rows():
    zimg, ztxt, pos, neg = multipos_case(b=6, k=3, e=8, seed=3, aligned=0.8)
    want = np_multipos_circle(zimg, ztxt, pos, neg, 32.0, 0.25)

    def f(zi, zt):
        return multipos_circle_loss(zimg=zi, ztxt_all=zt, pos_mask=pos, neg_mask=neg)

    (loss, _), grads = vg(f, zimg.astype(np.float32), ztxt.astype(np.float32), argnums=(0, 1))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    # No negatives at all (one image): softplus(lse_p + (-inf)) = 0, finite gradients.
    (loss1, _), grads1 = vg(
        lambda zi, zt: multipos_circle_loss(
            zimg=zi, ztxt_all=zt, pos_mask=pos[:1, :4], neg_mask=np.zeros((1, 4), bool)
        ),
        zimg[:1],
        ztxt[:4],
        argnums=(0, 1),
    )
    assert float(loss1) == 0.0
    assert all(np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0) for g in grads1)


# ----------------------------------------------------------------------------
# 3. Grouping


@pytest.mark.parametrize('threshold', [-1.0, 0.0, 0.5])
def test_grouping_matches_numpy_x64(threshold):
    patch, sub, valid = grouping_case(seed=4)
    _, gap = np_group_weights(patch, sub, threshold)
    assert gap > 1e-4  # finite differences stay on one side of the threshold
    scale = 7.0
    want = np_grouping(patch, sub, valid, scale, threshold)
    want_g = np_grad(lambda p, s, sc: np_grouping(p, s, valid, sc, threshold), [patch, sub, scale])

    def f(p, s, sc):
        return grouping_loss(patch_z=p, sub_z=s, sub_valid=valid, scale=sc, threshold=threshold)

    with jax.enable_x64(True):
        (loss, metrics), grads = vg(f, patch, sub, np.float64(scale), argnums=(0, 1, 2))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, want, rtol=1e-10)
        for name, g, w in zip(['patch_z', 'sub_z', 'scale'], grads, want_g):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8, err_msg=name)
    # Invalid sub-captions get no gradient.
    assert np.all(np.asarray(grads[1])[~valid] == 0)
    w, _ = np_group_weights(patch, sub, threshold)
    np.testing.assert_allclose(metrics['kept'], np.mean((w > 0)[valid]))
    np.testing.assert_allclose(metrics['scale'], scale)


def test_grouping_f32_neg_mask_and_threshold_sparsifies():
    patch, sub, valid = grouping_case(b=4, k=3, n=9, e=6, seed=5)
    bk = 12
    sub[1, 1] = sub[0, 1]  # the same sentence for images 0 and 1 (flat indices 1 and 4)...
    neg = ~np.eye(bk, dtype=bool)
    neg[1, 4] = neg[4, 1] = False  # ...is not a negative
    for threshold in (-1.0, 0.6):
        assert np_group_weights(patch, sub, threshold)[1] > 1e-4
        want = np_grouping(patch, sub, valid, 20.0, threshold, neg)
        want_g = np_grad(lambda p, s: np_grouping(p, s, valid, 20.0, threshold, neg), [patch, sub])

        def f(p, s):
            return grouping_loss(
                patch_z=p,
                sub_z=s,
                sub_valid=valid,
                scale=np.float32(20.0),
                threshold=threshold,
                neg_mask=neg,
            )

        (loss, metrics), grads = vg(
            f, patch.astype(np.float32), sub.astype(np.float32), argnums=(0, 1)
        )
        np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
        for g, w in zip(grads, want_g):
            np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-5)
        if threshold > 0:
            assert float(metrics['kept']) < 0.6  # the threshold drops patches
    # The duplicate pair matters: without the mask the loss differs.
    with_dup_negative = np_grouping(patch, sub, valid, 20.0, -1.0)
    assert abs(with_dup_negative - np_grouping(patch, sub, valid, 20.0, -1.0, neg)) > 1e-4


def test_grouping_degenerate_cases_are_finite():
    patch, sub, valid = grouping_case(seed=6)
    # All patches of image 0 equal: min = max, weights fall back to uniform (no 0/0).
    patch[0] = patch[0, :1]
    (loss, _), grads = vg(
        lambda p, s: grouping_loss(patch_z=p, sub_z=s, sub_valid=valid, scale=5.0),
        patch.astype(np.float32),
        sub.astype(np.float32),
        argnums=(0, 1),
    )
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    # No valid sub-caption anywhere: loss 0, gradients exactly 0.
    none = np.zeros_like(valid)
    (loss, m), grads = vg(
        lambda p, s: grouping_loss(patch_z=p, sub_z=s, sub_valid=none, scale=5.0),
        patch.astype(np.float32),
        sub.astype(np.float32),
        argnums=(0, 1),
    )
    assert float(loss) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)


def test_text_hashes():
    tokens = np.array(
        [[5, 6, 7, 0, 0], [5, 6, 7, 0, 0], [7, 6, 5, 0, 0], [5, 6, 7, 1, 0], [5, 6, 0, 7, 0]],
        np.int32,
    )
    h = np.asarray(text_hashes(tokens))
    assert h.shape == (5, 2) and h.dtype == np.uint32
    assert (h[0] == h[1]).all()
    assert len({tuple(r) for r in h[1:]}) == 4
    # Trailing padding does not change the hash.
    np.testing.assert_array_equal(np.asarray(text_hashes(tokens[:, :3]))[:3], h[:3])
    # Long rows wrap around 2^32 without overflow errors, and stay distinct.
    rng = np.random.default_rng(0)
    long = rng.integers(1, 50_000, size=(256, 200)).astype(np.int32)
    hl = np.asarray(text_hashes(long))
    assert len({tuple(r) for r in hl}) == 256


# ----------------------------------------------------------------------------
# The objective end to end on a tiny nnx model


def l2n(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TinyDreamModel(nnx.Module):
    """ImageTextModel's contract in miniature: encode_image -> (z, {'img/tokens'}), image_proj,
    encode_text (any length, pad 0, mean over real tokens), logit_scale/bias and, unless
    `grouping=False`, the grouping temperature."""

    def __init__(
        self, *, patch=2, width=6, vocab=16, text_width=7, embed=5, grouping=True, rngs: nnx.Rngs
    ):
        self.patch = patch
        self.patch_embed = nnx.Linear(patch * patch * 3, width, rngs=rngs)
        self.image_proj = nnx.Linear(width, embed, use_bias=False, rngs=rngs)
        self.tok = nnx.Embed(vocab, text_width, rngs=rngs)
        self.text_proj = nnx.Linear(text_width, embed, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.log(jnp.float32(10.0)))
        self.logit_bias = nnx.Param(jnp.float32(-5.0))
        if grouping:
            self.grouping_logit_scale = nnx.Param(jnp.log(jnp.float32(5.0)))

    def encode_image(self, image, *, train):
        del train
        b, h, w, c = image.shape
        p = self.patch
        x = image.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = jnp.tanh(self.patch_embed(x.reshape(b, (h // p) * (w // p), p * p * c)))
        pooled = tokens.mean(1)
        return l2n(self.image_proj(pooled)), {'img/tokens': tokens, 'img/pooled': pooled}

    def encode_text(self, tokens, *, train):
        del train
        valid = (tokens != 0)[..., None]
        pooled = (self.tok(tokens) * valid).sum(1) / jnp.maximum(valid.sum(1), 1)
        return l2n(self.text_proj(pooled)), {'txt/pooled': pooled}


def tiny_batch(b=4, k=3, l=6, seed=0):
    """Sub-captions with padding, invalid slots holding junk, and duplicates: within image 0
    (k 0 and 1), across images (texts[2, 2] == texts[1, 0]), and a raw caption equal to
    another image's sub-caption (text[3] == texts[0, 0])."""
    rng = np.random.default_rng(seed)

    def caption():
        row = np.zeros(l, np.int32)
        n = rng.integers(2, l + 1)
        row[:n] = rng.integers(1, 16, size=n)
        return row

    texts = np.stack([np.stack([caption() for _ in range(k)]) for _ in range(b)])
    text = np.stack([caption() for _ in range(b)])
    valid = np.ones((b, k), bool)
    valid[0, 2] = valid[1, 1] = valid[1, 2] = valid[3, 0] = False
    texts[0, 1] = texts[0, 0]
    texts[2, 2] = texts[1, 0]
    text[3] = texts[0, 0]
    return {
        'image': rng.uniform(size=(b, 4, 4, 3)).astype(np.float32),
        'text': text,
        'texts': texts,
        'texts_valid': valid,
    }


def same_tokens(a, b):
    return tuple(np.trim_zeros(a, 'b')) == tuple(np.trim_zeros(b, 'b'))


def np_masks(batch, ignore_duplicates):
    """Multi-positive (B, B(1+K)) and grouping (BK, BK) sets from token equality."""
    text, texts, valid = batch['text'], batch['texts'], batch['texts_valid']
    b, k, _ = texts.shape
    t = 1 + k
    rows = [[text[i]] + list(texts[i]) for i in range(b)]
    valid_bt = np.concatenate([np.ones((b, 1), bool), valid], 1)
    pos = np.zeros((b, b * t), bool)
    neg = np.zeros((b, b * t), bool)
    for i in range(b):
        for bb in range(b):
            for j in range(t):
                pos[i, bb * t + j] = bb == i and valid_bt[bb, j]
                copy = any(
                    valid_bt[i, jj] and same_tokens(rows[bb][j], rows[i][jj]) for jj in range(t)
                )
                neg[i, bb * t + j] = (
                    bb != i and valid_bt[bb, j] and not (ignore_duplicates and copy)
                )
    subs = texts.reshape(b * k, -1)
    gneg = np.array(
        [
            [
                r != c and not (ignore_duplicates and same_tokens(subs[r], subs[c]))
                for c in range(b * k)
            ]
            for r in range(b * k)
        ]
    )
    return pos, neg, gneg


def np_objective(model, batch, cfg, *, kernel=None, scale=None, gscale=None, alpha_cos=None):
    """(total, per-term losses, image-text cosines) in numpy from the model's own encodings
    (float64); kernel (image_proj), scale, gscale override the model's values and alpha_cos
    freezes the circle loss's alphas, for finite differences."""
    zimg_m, aux = model.encode_image(jnp.asarray(batch['image']), train=False)
    pooled = np.asarray(aux['img/pooled'], np.float64)
    tokens = np.asarray(aux['img/tokens'], np.float64)
    kernel = np.asarray(model.image_proj.kernel[...], np.float64) if kernel is None else kernel
    scale = float(np.exp(model.logit_scale[...])) if scale is None else scale
    gscale = float(np.exp(model.grouping_logit_scale[...])) if gscale is None else gscale
    zimg = unit(pooled @ kernel)
    patch = unit(tokens @ kernel)
    b, k, _ = batch['texts'].shape
    ztxt = np.asarray(model.encode_text(jnp.asarray(batch['text']), train=False)[0], np.float64)
    zsub = np.asarray(
        model.encode_text(jnp.asarray(batch['texts'].reshape(b * k, -1)), train=False)[0],
        np.float64,
    ).reshape(b, k, -1)
    ztxt_all = np.concatenate([ztxt[:, None], zsub], 1).reshape(b * (1 + k), -1)
    pos, neg, gneg = np_masks(batch, cfg.get('ignore_duplicates', True))

    terms = {}
    if cfg.get('global_loss', 'clip') == 'clip':
        terms['clip'] = np_clip(zimg, ztxt, scale)
    else:
        terms['clip'] = np_siglip(zimg, ztxt, scale, float(model.logit_bias[...]))
    if cfg.get('multipos_form', 'infonce') == 'infonce':
        terms['multipos'] = np_multipos_infonce(zimg, ztxt_all, pos, neg, scale)
    else:
        terms['multipos'] = np_multipos_circle(zimg, ztxt_all, pos, neg, 32.0, 0.25, alpha_cos)
    terms['grouping'] = np_grouping(
        patch, zsub, batch['texts_valid'], gscale, cfg.get('threshold', -1.0), gneg
    )
    weights = {n: cfg.get(f'{n}_weight', 1.0) for n in terms}
    return sum(weights[n] * terms[n] for n in terms), terms, zimg @ ztxt_all.T


def objective_vg(objective, model, batch):
    def loss_fn(model):
        return objective(model, batch, rng=jax.random.key(0), train=True)

    return nnx.value_and_grad(loss_fn, has_aux=True)(model)


jit_objective_vg = nnx.jit(objective_vg, static_argnums=0)


CONFIGS = [
    {'clip_weight': 1.0, 'multipos_weight': 0.5, 'grouping_weight': 2.0},
    {'global_loss': 'siglip', 'multipos_form': 'circle', 'multipos_weight': 0.1, 'threshold': 0.3},
    {'global_loss': 'siglip', 'chunk_size': 2, 'ignore_duplicates': False},
]


@pytest.mark.parametrize(
    'cfg', CONFIGS, ids=['clip-infonce', 'siglip-circle', 'siglip-chunked-nodedup']
)
def test_objective_end_to_end_matches_numpy(cfg):
    model, batch = TinyDreamModel(rngs=nnx.Rngs(0)), tiny_batch()
    objective = DreamLip(ml_collections.ConfigDict({'weight': 1.0, **cfg}))
    assert objective.fields == ('image', 'text', 'texts', 'texts_valid')
    (loss, metrics), grads = jit_objective_vg(objective, model, batch)

    want, terms, cos0 = np_objective(model, batch, cfg)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for name, value in terms.items():
        np.testing.assert_allclose(metrics[f'loss_{name}'], value, rtol=1e-5, err_msg=name)
    assert {
        'clip/i2t_acc',
        'multipos/acc',
        'grouping/g2t_acc',
        'grouping/kept',
        'grouping/scale',
    } <= set(metrics)

    # Gradients through the image projection (global, multi-positive and patch paths) and
    # both temperatures, against finite differences of the numpy objective.
    kernel = np.asarray(model.image_proj.kernel[...], np.float64)
    (want_dk,) = np_grad(
        lambda kk: np_objective(model, batch, cfg, kernel=kk, alpha_cos=cos0)[0], [kernel], h=1e-5
    )
    np.testing.assert_allclose(grads.image_proj.kernel[...], want_dk, rtol=2e-3, atol=2e-5)
    s, sg = float(np.exp(model.logit_scale[...])), float(np.exp(model.grouping_logit_scale[...]))
    (want_ds,) = np_grad(lambda x: np_objective(model, batch, cfg, scale=float(x))[0], [s])
    (want_dsg,) = np_grad(lambda x: np_objective(model, batch, cfg, gscale=float(x))[0], [sg])
    # d/d(log s) = s d/ds
    np.testing.assert_allclose(grads.logit_scale[...], s * want_ds, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grads.grouping_logit_scale[...], sg * want_dsg, rtol=1e-3, atol=1e-6)
    assert np.abs(grads.tok.embedding[...]).max() > 0


def test_objective_ignores_invalid_subcaptions():
    model, batch = TinyDreamModel(rngs=nnx.Rngs(1)), tiny_batch(seed=1)
    objective = DreamLip({'weight': 1.0})
    (loss, metrics), grads = jit_objective_vg(objective, model, batch)
    changed = {**batch, 'texts': batch['texts'].copy()}
    rng = np.random.default_rng(9)
    invalid = ~batch['texts_valid']
    changed['texts'][invalid] = rng.integers(1, 16, size=(invalid.sum(), batch['texts'].shape[2]))
    assert not np.array_equal(changed['texts'], batch['texts'])
    (loss2, metrics2), grads2 = jit_objective_vg(objective, model, changed)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6, atol=1e-7)
    for key in metrics:
        np.testing.assert_allclose(metrics2[key], metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nnx.state(grads, nnx.Param),
        nnx.state(grads2, nnx.Param),
    )
    # ...whereas changing a valid one does change the loss.
    changed['texts'][2, 0] = rng.integers(1, 16, size=batch['texts'].shape[2])
    assert abs(float(jit_objective_vg(objective, model, changed)[0][0]) - float(loss)) > 1e-5


def test_objective_raw_caption_of_another_length():
    """text (B, 9) and texts (B, K, 6): two text-tower calls, same result as padded to one."""
    model, batch = TinyDreamModel(rngs=nnx.Rngs(2)), tiny_batch(seed=2)
    objective = DreamLip({'weight': 1.0})
    (loss, metrics), _ = jit_objective_vg(objective, model, batch)
    longer = {**batch, 'text': np.pad(batch['text'], [(0, 0), (0, 3)])}
    (loss2, metrics2), _ = jit_objective_vg(objective, model, longer)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(metrics2['loss_multipos'], metrics['loss_multipos'], rtol=1e-6)


def test_objective_weights_fields_and_errors():
    model, batch = TinyDreamModel(rngs=nnx.Rngs(3)), tiny_batch(seed=3)
    full_loss, full = DreamLip({})(model, batch, train=True)
    # Turned-off terms are not computed; without sub-caption terms, no sub-caption fields.
    clip_only = DreamLip({'multipos_weight': 0.0, 'grouping_weight': 0.0})
    assert clip_only.fields == ('image', 'text')
    loss, metrics = clip_only(model, {'image': batch['image'], 'text': batch['text']}, train=True)
    assert set(metrics) == {'loss_clip', 'clip/i2t_acc', 'clip/t2i_acc', 'clip/scale'}
    np.testing.assert_allclose(loss, full['loss_clip'], rtol=1e-6)
    np.testing.assert_allclose(
        full_loss, full['loss_clip'] + full['loss_multipos'] + full['loss_grouping'], rtol=1e-6
    )

    # A model without the grouping temperature: a clear error, unless grouping is off.
    plain = TinyDreamModel(grouping=False, rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match='grouping_logit_scale'):
        DreamLip({})(plain, batch, train=True)
    _, m = DreamLip({'grouping_weight': 0.0})(plain, batch, train=True)
    assert 'loss_grouping' not in m and 'loss_multipos' in m
    # The grouping-only objective trains the grouping temperature and not the CLIP one.
    (_, _), grads = jit_objective_vg(
        DreamLip({'clip_weight': 0.0, 'multipos_weight': 0.0}), model, batch
    )
    assert grads.logit_scale[...] == 0 and grads.grouping_logit_scale[...] != 0

    unknown = r"unknown dreamlip option\(s\) \['grouping_temperature'\]; valid: chunk_size"
    with pytest.raises(ValueError, match=unknown):
        DreamLip({'grouping_temperature': 0.07})
    with pytest.raises(ValueError, match='multipos_form'):
        DreamLip({'multipos_form': 'triplet'})
    with pytest.raises(ValueError, match='global_loss'):
        DreamLip({'global_loss': 'mse'})
    with pytest.raises(ValueError, match='threshold'):
        DreamLip({'threshold': 1.0})
    with pytest.raises(ValueError, match='all 0'):
        DreamLip({'clip_weight': 0.0, 'multipos_weight': 0.0, 'grouping_weight': 0.0})


def test_compose_builds_dreamlip():
    model, batch = TinyDreamModel(rngs=nnx.Rngs(4)), tiny_batch(seed=4)
    objective = compose.build_objective(
        ml_collections.ConfigDict(
            {'dreamlip': {'weight': 0.5, 'multipos_form': 'circle', 'grouping_weight': 0.25}}
        )
    )
    assert objective.fields == ('image', 'text', 'texts', 'texts_valid')
    loss, metrics = objective(model, batch, rng=jax.random.key(0), train=True)
    inner, inner_m = DreamLip({'multipos_form': 'circle', 'grouping_weight': 0.25})(
        model, batch, train=True
    )
    np.testing.assert_allclose(loss, 0.5 * inner, rtol=1e-6)
    for name in ('clip', 'multipos', 'grouping'):
        np.testing.assert_allclose(
            metrics[f'dreamlip/loss_{name}'], inner_m[f'loss_{name}'], rtol=1e-6
        )
    assert {'loss', 'loss_dreamlip', 'dreamlip/grouping/scale'} <= set(metrics)


# ----------------------------------------------------------------------------
# Sharded == unsharded (8 fake CPU devices need a fresh process)

SHARDED_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pretrain.objectives.dreamlip import (DreamLip, grouping_loss, multipos_circle_loss,
                                              multipos_infonce_loss)
    sys.path.insert(0, 'tests')
    from test_dreamlip import TinyDreamModel, tiny_batch

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P('data'))
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    b, k, n, e = 16, 3, 6, 8
    t = 1 + k
    zimg = unit(rng.normal(size=(b, e))).astype(np.float32)
    ztxt = unit(zimg[:, None] + rng.normal(size=(b, t, e))).reshape(b * t, e).astype(np.float32)
    valid = rng.uniform(size=(b, t)) < 0.7
    valid[:, 0] = True
    own = np.eye(b, dtype=bool)[:, :, None]
    pos = (own & valid[None]).reshape(b, b * t)
    neg = (~own & valid[None]).reshape(b, b * t)
    patch = unit(rng.normal(size=(b, n, e))).astype(np.float32)
    sub = ztxt.reshape(b, t, e)[:, 1:]
    sub_valid = valid[:, 1:]
    scale = np.float32(10.0)

    def check(name, vg, args, sharded_args):
        want = jax.jit(vg)(*args)
        with jax.set_mesh(mesh):
            got = jax.jit(vg)(*sharded_args)
        leaves = jax.tree.leaves(got)
        for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0], leaves, jax.tree.leaves(want)):
            err = np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))
            assert err <= 2e-5, (name, jax.tree_util.keystr(path[0]), err)
        print(name, 'ok', float(leaves[0]))

    losses = {
        'infonce': lambda zi, zt, pm, nm: multipos_infonce_loss(zimg=zi, ztxt_all=zt, pos_mask=pm,
                                                                neg_mask=nm, scale=scale),
        'circle': lambda zi, zt, pm, nm: multipos_circle_loss(zimg=zi, ztxt_all=zt, pos_mask=pm, neg_mask=nm),
    }
    for name, f in losses.items():
        vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        put = lambda x: jax.device_put(x, rows)
        check(name, vg, (zimg, ztxt, pos, neg), tuple(map(put, (zimg, ztxt, pos, neg))))

    g = lambda p, s, v: grouping_loss(patch_z=p, sub_z=s, sub_valid=v, scale=scale)
    vg = jax.value_and_grad(g, argnums=(0, 1), has_aux=True)
    check('grouping', vg, (patch, sub, sub_valid),
          tuple(jax.device_put(x, rows) for x in (patch, sub, sub_valid)))

    model = TinyDreamModel(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = tiny_batch(b=16, seed=5)
    for form in ('infonce', 'circle'):
        objective = DreamLip({'multipos_form': form})
        def f(state, batch):
            return objective(nnx.merge(graphdef, state), batch, train=True)
        vg = jax.value_and_grad(f, has_aux=True)
        check('objective-' + form, vg, (state, batch), (state, jax.device_put(batch, rows)))
    """)


def test_sharded_matches_unsharded(python):
    # Own process: the 8 CPU devices must be set before JAX starts.
    result = python(['-c', SHARDED_CHECK], devices=8, env={'JAX_PLATFORMS': 'cpu'}, timeout=300)
    assert result.stdout.count(' ok ') == 5, result.stdout


def test_packed_texts_give_the_unpacked_loss_and_gradients():
    """configs/dreamlip.py packs each image's caption and sentences into one text-tower row
    (captions.PackTexts + ImageTextModel.encode_packed_texts): same loss and gradients."""
    from configs import dreamlip
    from input_pipeline import pipeline
    from pretrain.models.towers import ImageTextModel

    config = dreamlip.get_config()
    config.batch_size = 16
    config.model.matmul_precision = 'default'  # f32: the same function, to float rounding
    assert config.objectives.dreamlip.packed and config.input.packed_length == 80
    packed = compose.build_objective(config.objectives)
    config.objectives.dreamlip.packed = False
    plain = compose.build_objective(config.objectives)
    assert packed.fields == plain.fields + (
        'packed_tokens',
        'packed_segments',
        'packed_positions',
        'packed_ends',
    )
    with pipeline.train_loader(config, fields=packed.fields) as loader:
        batch = next(loader)
    assert batch['texts_valid'].all()  # 80 tokens hold every shapes image's 1 + 3 texts
    model = ImageTextModel(config.model, rngs=nnx.Rngs(0))
    # Every text's embedding, packed, equals its own encode_text.
    z_packed = model.encode_packed_texts(*(batch[f] for f in packed.fields[4:]))
    z_caption, _ = model.encode_text(batch['text'])
    z_sentences, _ = model.encode_text(batch['texts'].reshape(16 * 3, -1))
    np.testing.assert_allclose(z_packed[:, 0], z_caption, atol=2e-6)
    np.testing.assert_allclose(z_packed[:, 1:].reshape(48, -1), z_sentences, atol=2e-6)

    (loss_p, metrics_p), grads_p = jit_objective_vg(packed.terms[0][3], model, batch)
    (loss_u, metrics_u), grads_u = jit_objective_vg(plain.terms[0][3], model, batch)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
    for key in metrics_u:
        np.testing.assert_allclose(metrics_p[key], metrics_u[key], rtol=1e-5, err_msg=key)
    # Float rounding differs (other matmul shapes): measured up to ~1e-6 of each gradient's
    # largest entry.
    leaves_p = jax.tree.leaves(nnx.state(grads_p, nnx.Param))
    leaves_u = jax.tree.leaves(nnx.state(grads_u, nnx.Param))
    for a, b in zip(leaves_p, leaves_u, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-9
