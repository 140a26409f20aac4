"""DreamLIP: language-image pre-training with long captions (Zheng et al. 2024, arXiv 2403.17007).

Each image i comes with its raw caption and K sub-captions (sentences sampled from a long,
MLLM-written caption; `texts_valid` marks the real ones). Three terms, each weighted:

1. Global contrast: CLIP softmax (`clip.clip_loss`) or SigLIP (`siglip.siglip_loss`) between
   images and raw captions over the global batch.

2. Multi-positive contrast, image -> all texts of the global batch (T = B (1 + K) texts: every
   image's raw caption and sub-captions; invalid sub-captions are neither positives nor
   negatives). P_i = image i's own valid texts, N_i = the other images' valid texts.
   - 'infonce' (the paper's formula), s = exp(logit_scale) shared with the CLIP term:
         loss_i = -1/|P_i| sum_{p in P_i} log( exp(s <v_i,t_p>) / sum_{j in P_i u N_i} exp(s <v_i,t_j>) )
   - 'circle' (the public code's `pairwise_circleloss`, Sun et al. 2020) on cosines c_ij:
         alpha_p = [1 + m - c_ip]_+        alpha_n = [c_in + m]_+        (no gradient)
         delta_p = 1 - m                   delta_n = m
         loss_i  = softplus( lse_{n in N_i} g alpha_n (c_in - delta_n)
                           + lse_{p in P_i} -g alpha_p (c_ip - delta_p) )      g = gamma
   Both are averaged over images. Only image -> text, as in the paper (and the public code,
   where the text -> image circle term is commented out): in the other direction every text
   has a single positive image, so it would be a plain InfoNCE, close to the global term.

3. Sub-caption-specific grouping (the paper's fine-grained alignment, after SPARC): for image
   b's valid sub-caption k with embedding t_bk and its projected, normalised patch tokens
   p_bn (n = 1..N):
         a_bkn = <p_bn, t_bk>
         u_bkn = (a_bkn - min_n a_bkn) / (max_n a_bkn - min_n a_bkn)        in [0, 1]
         w_bkn = u_bkn [u_bkn >= threshold] / sum_n (same)                   (uniform if all 0)
         g_bk  = normalise( sum_n w_bkn p_bn )                               grouped embedding
   then a symmetric InfoNCE between the B*K grouped embeddings and the B*K sub-captions of the
   global batch with its own learnable temperature s_g = exp(model.grouping_logit_scale):
         logits_(bk),(b'k') = s_g <g_bk, t_b'k'>,   positives on the diagonal,
   invalid sub-captions removed from rows and columns.

   The patch tokens are projected with the image projection (`model.image_proj`) before
   anything else: the grouped embedding is contrasted with sub-caption embeddings, which live
   in the joint space, while the tower's tokens live in the image tower's width (768 vs 512 for
   ViT-B/16, where the released code's einsum of raw tokens against text embeddings cannot run;
   and even at equal widths the two spaces are unrelated). The same linear map that makes the
   global image embedding from the pooled token also makes mean-pooled tokens and pooled
   projections coincide, and it is the space in which dense zero-shot evaluation compares
   patches with prompts. The released code also calls the contrast with a
   `logit_scale_local` that its model never defines; a fixed scale of 1 on cosines would give
   logits in [-1, 1] and an almost flat softmax, so the temperature is a learnable parameter.

False negatives. Sub-captions are sampled with replacement when a long caption has fewer than
K sentences, and scene sentences repeat across images; a text identical to a positive is then
also counted as a negative, which caps what the losses can reach and pushes identical
embeddings apart. With `ignore_duplicates` (default on) texts whose token ids equal one of the
positives' are dropped from the negatives (identity by a 2x32-bit polynomial hash of the
token ids; trailing pads (id 0) do not change it). This departs from the paper, which does not
discuss it; switch it off to reproduce the paper exactly.

Everything is written over global-batch arrays; under jit with the batch sharded over the mesh
GSPMD gathers what each product needs, so the losses are the same on any mesh (tested).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.captions import PACKED_FIELDS
from pretrain.objectives.clip import MAX_SCALE, clip_loss
from pretrain.objectives.options import read_options
from pretrain.objectives.siglip import siglip_loss, siglip_loss_chunked

# Stand-in for -inf in masked logsumexps: exp() of it is 0, yet a row that is masked
# everywhere stays finite, so neither its value nor its gradient becomes NaN.
_MASKED = -1e30


def _loss_dtype(*arrays) -> jnp.dtype:
    # Loss maths in at least f32 even if the towers ran in bf16; f64 stays f64 (tests).
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _normalise(x, eps=1e-6):
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def _masked_lse(x, mask, axis):
    return jax.nn.logsumexp(jnp.where(mask, x, _MASKED), axis=axis)


def _split_masks(pos_mask, neg_mask):
    pos_mask = jnp.asarray(pos_mask, bool)
    neg_mask = ~pos_mask if neg_mask is None else jnp.asarray(neg_mask, bool) & ~pos_mask
    return pos_mask, neg_mask


def _check_multipos_shapes(zimg, ztxt_all, pos_mask, neg_mask):
    if zimg.ndim != 2 or ztxt_all.ndim != 2 or zimg.shape[1] != ztxt_all.shape[1]:
        raise ValueError(
            f'zimg must be (B, E) and ztxt_all (T, E); got {zimg.shape}, {ztxt_all.shape}.'
        )
    want = (zimg.shape[0], ztxt_all.shape[0])
    for name, m in (('pos_mask', pos_mask), ('neg_mask', neg_mask)):
        if m is not None and tuple(m.shape) != want:
            raise ValueError(f'{name} must be (B, T) = {want}; got {tuple(m.shape)}.')


# ----------------------------------------------------------------------------
# 2. Multi-positive contrast


def multipos_infonce_loss(
    *,
    zimg: jax.Array,
    ztxt_all: jax.Array,
    pos_mask: jax.Array,
    scale: jax.Array,
    neg_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Multi-positive InfoNCE, image -> texts (the paper's form).

    zimg (B, E), ztxt_all (T, E): L2-normalised. pos_mask (B, T): P_i. neg_mask (B, T): N_i
    (default: every text that is not a positive; a positive is never a negative). Texts in
    neither set (padding, duplicates) take no part in row i. scale: exp'd temperature,
    clamped at 100 like CLIP's. Averaged over images with at least one positive.
    """
    _check_multipos_shapes(zimg, ztxt_all, pos_mask, neg_mask)
    pos_mask, neg_mask = _split_masks(pos_mask, neg_mask)
    dtype = _loss_dtype(zimg, ztxt_all)
    scale = jnp.minimum(jnp.asarray(scale, dtype), MAX_SCALE)
    logits_bt = scale * (zimg.astype(dtype) @ ztxt_all.astype(dtype).T)

    # -1/|P| sum_p (logit_p - lse_{P u N}) = lse_{P u N} - mean_{p in P} logit_p
    used_bt = pos_mask | neg_mask
    lse_b = _masked_lse(logits_bt, used_bt, axis=1)
    num_pos_b = jnp.sum(pos_mask, axis=1)
    has_pos_b = num_pos_b > 0
    mean_pos_b = jnp.sum(jnp.where(pos_mask, logits_bt, 0), axis=1) / jnp.maximum(num_pos_b, 1)
    loss_b = jnp.where(has_pos_b, lse_b - mean_pos_b, 0)
    loss = jnp.sum(loss_b) / jnp.maximum(jnp.sum(has_pos_b), 1)

    metrics = _multipos_metrics(logits_bt, pos_mask, used_bt, has_pos_b)
    metrics['scale'] = scale
    return loss, jax.lax.stop_gradient(metrics)


def multipos_circle_loss(
    *,
    zimg: jax.Array,
    ztxt_all: jax.Array,
    pos_mask: jax.Array,
    gamma: float = 32.0,
    margin: float = 0.25,
    neg_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Circle loss (Sun et al. 2020) on cosines, image -> texts, as in DreamLIP's public code.

    Same inputs and masks as `multipos_infonce_loss`; no temperature (gamma plays its part).
    The alphas are constants for the gradient (`.detach()` in the reference). The released
    code divides this term by 10 (`I2mT_loss ... / 10.0`); here that is the term's weight.
    """
    _check_multipos_shapes(zimg, ztxt_all, pos_mask, neg_mask)
    pos_mask, neg_mask = _split_masks(pos_mask, neg_mask)
    dtype = _loss_dtype(zimg, ztxt_all)
    cos_bt = zimg.astype(dtype) @ ztxt_all.astype(dtype).T

    alpha_p = jax.lax.stop_gradient(jax.nn.relu(1 + margin - cos_bt))
    alpha_n = jax.lax.stop_gradient(jax.nn.relu(cos_bt + margin))
    delta_p, delta_n = 1 - margin, margin
    logit_p = -gamma * alpha_p * (cos_bt - delta_p)
    logit_n = gamma * alpha_n * (cos_bt - delta_n)
    # An empty set gives lse ~ -1e30 and softplus ~ 0: no pull without a positive, no push
    # without a negative.
    loss_b = jax.nn.softplus(
        _masked_lse(logit_p, pos_mask, axis=1) + _masked_lse(logit_n, neg_mask, axis=1)
    )
    has_pos_b = jnp.any(pos_mask, axis=1)
    loss = jnp.sum(jnp.where(has_pos_b, loss_b, 0)) / jnp.maximum(jnp.sum(has_pos_b), 1)

    metrics = _multipos_metrics(cos_bt, pos_mask, pos_mask | neg_mask, has_pos_b)
    return loss, jax.lax.stop_gradient(metrics)


def _multipos_metrics(scores_bt, pos_mask, used_bt, has_pos_b):
    # acc: the best-scoring text (among positives and negatives) is a positive.
    best_t = jnp.argmax(jnp.where(used_bt, scores_bt, -jnp.inf), axis=1)
    hit_b = jnp.take_along_axis(pos_mask, best_t[:, None], axis=1)[:, 0]
    n = jnp.maximum(jnp.sum(has_pos_b), 1)
    return {
        'acc': jnp.sum(hit_b & has_pos_b) / n,
        'num_pos': jnp.sum(jnp.where(has_pos_b, jnp.sum(pos_mask, axis=1), 0)) / n,
    }


# ----------------------------------------------------------------------------
# 3. Sub-caption-specific grouping


def grouping_weights(*, patch_z: jax.Array, sub_z: jax.Array, threshold: float) -> jax.Array:
    """(B, K, N) weights over image b's patches for its sub-caption k (rows sum to 1).

    Min-max normalised patch similarity, values below `threshold` set to 0, renormalised.
    threshold < 0 means 1/N, the default: SPARC's choice (Bica et al. 2024, whose grouping
    DreamLIP follows), i.e. a patch stays if its normalised similarity reaches the uniform
    weight; it adapts to the patch count, only drops clearly unrelated patches, and keeps
    gradients flowing to most patches early in training, when similarities are still noise.
    (The released DreamLIP code's default, 0, keeps every patch but the least similar one;
    large fixed values such as 0.5 make sharper groups but can lock onto the first patches
    that happen to win.) A row whose values are all zero (every patch equally similar)
    falls back to uniform weights (mean pooling) instead of the reference's 0/0.
    """
    num_patches = patch_z.shape[1]
    thr = 1.0 / num_patches if threshold < 0 else float(threshold)
    sim_bkn = jnp.einsum('bne,bke->bkn', patch_z, sub_z)
    lo = jnp.min(sim_bkn, axis=-1, keepdims=True)
    span = jnp.max(sim_bkn, axis=-1, keepdims=True) - lo
    unit_bkn = (sim_bkn - lo) / jnp.where(span > 0, span, 1)
    kept_bkn = jnp.where(unit_bkn < thr, 0, unit_bkn)
    total = jnp.sum(kept_bkn, axis=-1, keepdims=True)
    return jnp.where(total > 0, kept_bkn / jnp.where(total > 0, total, 1), 1.0 / num_patches)


def grouping_loss(
    *,
    patch_z: jax.Array,
    sub_z: jax.Array,
    sub_valid: jax.Array,
    scale: jax.Array,
    threshold: float = -1.0,
    neg_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Grouped patch embeddings vs sub-captions, symmetric InfoNCE over the global batch.

    patch_z (B, N, E): patch tokens in the joint space, L2-normalised. sub_z (B, K, E):
    sub-caption embeddings, L2-normalised. sub_valid (B, K) bool. scale: exp'd grouping
    temperature (clamped at 100). neg_mask (B*K, B*K), rows/columns in (b, k) order: pairs
    that count as negatives (default: every off-diagonal pair); invalid sub-captions are
    removed from rows and columns whatever it says. Averaged over valid sub-captions, both
    directions, halved (CLIP's normalisation).
    """
    if (
        patch_z.ndim != 3
        or sub_z.ndim != 3
        or patch_z.shape[0] != sub_z.shape[0]
        or patch_z.shape[2] != sub_z.shape[2]
        or tuple(sub_valid.shape) != sub_z.shape[:2]
    ):
        raise ValueError(
            f'want patch_z (B, N, E), sub_z (B, K, E), sub_valid (B, K); got '
            f'{patch_z.shape}, {sub_z.shape}, {tuple(sub_valid.shape)}.'
        )
    b, k, e = sub_z.shape
    dtype = _loss_dtype(patch_z, sub_z)
    patch_z, sub_z = patch_z.astype(dtype), sub_z.astype(dtype)
    scale = jnp.minimum(jnp.asarray(scale, dtype), MAX_SCALE)

    weights_bkn = grouping_weights(patch_z=patch_z, sub_z=sub_z, threshold=threshold)
    grouped = _normalise(jnp.einsum('bkn,bne->bke', weights_bkn, patch_z)).reshape(b * k, e)
    texts = sub_z.reshape(b * k, e)
    valid = jnp.asarray(sub_valid, bool).reshape(b * k)

    logits_gt = scale * (grouped @ texts.T)  # rows: grouped embeddings, columns: sub-captions
    eye = jnp.eye(b * k, dtype=bool)
    used = eye | (~eye if neg_mask is None else jnp.asarray(neg_mask, bool))
    used = used & valid[:, None] & valid[None, :]
    positives = jnp.diagonal(logits_gt)
    g2t = _masked_lse(logits_gt, used, axis=1) - positives
    t2g = _masked_lse(logits_gt, used, axis=0) - positives
    num_valid = jnp.maximum(jnp.sum(valid), 1)
    loss = 0.5 * jnp.sum(jnp.where(valid, g2t + t2g, 0)) / num_valid

    ids = jnp.arange(b * k)
    masked = jnp.where(used, logits_gt, -jnp.inf)
    kept = jnp.sum(weights_bkn > 0, axis=-1) / weights_bkn.shape[-1]  # (B, K)
    metrics = {
        'g2t_acc': jnp.sum(valid & (jnp.argmax(masked, axis=1) == ids)) / num_valid,
        't2g_acc': jnp.sum(valid & (jnp.argmax(masked, axis=0) == ids)) / num_valid,
        'kept': jnp.sum(jnp.where(valid, kept.reshape(-1), 0)) / num_valid,  # patch fraction
        'scale': scale,
    }
    return loss, jax.lax.stop_gradient(metrics)


# ----------------------------------------------------------------------------
# Duplicate texts (false negatives)

_HASH_BASES = (1_000_003, 2_654_435_761)


def text_hashes(tokens: jax.Array) -> jax.Array:
    """(..., L) int token ids -> (..., 2) uint32: two polynomial hashes mod 2^32.

    sum_l tok_l * base^l with wrapping uint32 arithmetic: equal rows hash equally, trailing
    zeros (padding) add nothing, and two independent bases make collisions (~T^2 / 2^64)
    negligible. A collision only drops a negative, it never adds a positive.
    """
    length = tokens.shape[-1]
    powers = np.ones((2, length), np.uint32)
    for i, base in enumerate(_HASH_BASES):
        for pos in range(1, length):
            powers[i, pos] = np.uint32((int(powers[i, pos - 1]) * base) % 2**32)
    tok = tokens.astype(jnp.uint32)
    return jnp.stack([jnp.sum(tok * jnp.asarray(p), axis=-1, dtype=jnp.uint32) for p in powers], -1)


def _same_text(h_a, h_b):
    """(..., 2) and (..., 2) hashes -> equality, broadcast over the leading axes."""
    return jnp.all(h_a == h_b, axis=-1)


# ----------------------------------------------------------------------------
# Objective

GLOBAL_LOSSES = ('clip', 'siglip')
MULTIPOS_FORMS = ('infonce', 'circle')
CONFIG_KEYS = {
    # name: default
    'global_loss': 'clip',  # 'clip' | 'siglip' for term 1
    'clip_weight': 1.0,  # term 1 (whichever global_loss)
    'multipos_weight': 1.0,  # term 2
    'grouping_weight': 1.0,  # term 3
    'multipos_form': 'infonce',  # 'infonce' (paper) | 'circle' (public code)
    'gamma': 32.0,  # circle loss scale (public code's default)
    'margin': 0.25,  # circle loss margin (public code's default)
    'threshold': -1.0,  # grouping sparsity; < 0: 1/N patches (SPARC)
    'ignore_duplicates': True,  # texts equal to a positive are not negatives
    'chunk_size': 0,  # siglip global term: 0 = full logits, else chunked
    'packed': False,  # encode each image's texts packed in one row (input.packed_length)
    'image_field': 'image',
    'text_field': 'text',  # raw caption (B, L)
    'texts_field': 'texts',  # sub-captions (B, K, L)
    'texts_valid_field': 'texts_valid',  # (B, K) bool
}


class DreamLip:
    """The DreamLIP objective: one image-tower call, one or two text-tower calls, three terms.

    Config keys (all optional, defaults in CONFIG_KEYS), besides compose's `weight`/`kind`;
    unknown keys are an error. A term with weight 0 is not computed, and without the
    multi-positive and grouping terms the sub-caption fields are not requested.

    The grouping term needs a learnable scalar `model.grouping_logit_scale` (log of the
    temperature, like `logit_scale`); its init lives in the model config.
    """

    def __init__(self, config: Any = None):
        c = read_options('dreamlip', config, CONFIG_KEYS)
        if c['global_loss'] not in GLOBAL_LOSSES:
            raise ValueError(f"dreamlip global_loss {c['global_loss']!r}; valid: {GLOBAL_LOSSES}.")
        if c['multipos_form'] not in MULTIPOS_FORMS:
            raise ValueError(
                f"dreamlip multipos_form {c['multipos_form']!r}; valid: {MULTIPOS_FORMS}."
            )
        if c['threshold'] >= 1:
            raise ValueError(
                f"dreamlip threshold must be < 1 (min-max values are in [0, 1]); "
                f"got {c['threshold']}."
            )
        self.global_loss, self.multipos_form = c['global_loss'], c['multipos_form']
        self.clip_weight = float(c['clip_weight'])
        self.multipos_weight = float(c['multipos_weight'])
        self.grouping_weight = float(c['grouping_weight'])
        self.gamma, self.margin = float(c['gamma']), float(c['margin'])
        self.threshold = float(c['threshold'])
        self.ignore_duplicates = bool(c['ignore_duplicates'])
        self.chunk_size = int(c['chunk_size'])
        self.image_field, self.text_field = c['image_field'], c['text_field']
        self.texts_field, self.texts_valid_field = c['texts_field'], c['texts_valid_field']
        if not (self.clip_weight or self.multipos_weight or self.grouping_weight):
            raise ValueError(
                'dreamlip: clip_weight, multipos_weight and grouping_weight are all 0.'
            )
        self.uses_subcaptions = bool(self.multipos_weight or self.grouping_weight)
        self.packed = bool(c['packed']) and self.uses_subcaptions
        self.fields = (self.image_field, self.text_field)
        if self.uses_subcaptions:
            self.fields += (self.texts_field, self.texts_valid_field)
        if self.packed:  # the unpacked tokens stay: duplicate detection hashes them
            self.fields += PACKED_FIELDS

    def _encode_texts(self, model, text_bl, texts_bkl, *, train):
        """(B, L) and (B, K, L) -> (B, 1 + K, E) embeddings, raw caption at index 0.

        One text-tower call over B (1 + K) rows when both have the same length: image b's
        texts are stacked next to each other before flattening, so a batch-sharded input
        stays local to its device. Otherwise two calls (padding the sub-captions to the
        raw caption's length would only waste tower compute).
        """
        b, k, l = texts_bkl.shape
        if text_bl.shape[1] == l:
            tokens = jnp.concatenate([text_bl[:, None], texts_bkl], axis=1).reshape(b * (1 + k), l)
            z, _ = model.encode_text(tokens, train=train)
            return z.reshape(b, 1 + k, -1)
        z_raw, _ = model.encode_text(text_bl, train=train)
        z_sub, _ = model.encode_text(texts_bkl.reshape(b * k, l), train=train)
        return jnp.concatenate([z_raw[:, None], z_sub.reshape(b, k, -1)], axis=1)

    def __call__(self, model, batch, *, rng=None, train: bool) -> tuple[jax.Array, dict]:
        del rng  # Deterministic loss; dropout rngs, if any, live in the model.
        if self.grouping_weight and not hasattr(model, 'grouping_logit_scale'):
            raise ValueError(
                'dreamlip grouping term needs a learnable `model.grouping_logit_scale` (log of '
                'the grouping temperature, a scalar nnx.Param like `logit_scale`); '
                f'{type(model).__name__} has none. Add it to the model, or set grouping_weight=0.'
            )
        zimg, img_aux = model.encode_image(batch[self.image_field], train=train)
        text_bl = batch[self.text_field]
        if self.uses_subcaptions:
            texts_bkl = batch[self.texts_field]
            valid_bk = jnp.asarray(batch[self.texts_valid_field], bool)
            b, k, _ = texts_bkl.shape
            if text_bl.shape[0] != b or tuple(valid_bk.shape) != (b, k):
                raise ValueError(
                    f'dreamlip wants text (B, L), texts (B, K, L), texts_valid (B, K); '
                    f'got {text_bl.shape}, {texts_bkl.shape}, {valid_bk.shape}.'
                )
            if self.packed:  # the same embeddings from the real tokens only (PackTexts)
                ztxt_bte = model.encode_packed_texts(*(batch[f] for f in PACKED_FIELDS))
            else:
                ztxt_bte = self._encode_texts(model, text_bl, texts_bkl, train=train)
            ztxt = ztxt_bte[:, 0]
        else:
            ztxt, _ = model.encode_text(text_bl, train=train)

        total, metrics = 0.0, {}

        def add(name, weight, loss_and_metrics):
            nonlocal total
            loss, sub = loss_and_metrics
            total = total + weight * loss
            metrics[f'loss_{name}'] = loss
            metrics.update({f'{name}/{key}': v for key, v in sub.items()})

        if self.clip_weight:
            if self.global_loss == 'clip':
                term = clip_loss(zimg=zimg, ztxt=ztxt, scale=jnp.exp(model.logit_scale[...]))
            else:
                kwargs = dict(
                    zimg=zimg,
                    ztxt=ztxt,
                    scale=jnp.exp(model.logit_scale[...]),
                    bias=model.logit_bias[...],
                )
                term = (
                    siglip_loss_chunked(**kwargs, chunk_size=self.chunk_size)
                    if self.chunk_size
                    else siglip_loss(**kwargs)
                )
            add('clip', self.clip_weight, term)

        if self.uses_subcaptions:
            t = 1 + k
            # Text (b, j) of the flattened (B (1 + K)) list; the raw caption is always valid.
            valid_bt = jnp.concatenate([jnp.ones((b, 1), bool), valid_bk], axis=1)
            hashes_bt2 = (
                text_hashes(
                    jnp.concatenate(
                        [
                            _pad_to(text_bl[:, None], texts_bkl.shape[2]),
                            _pad_to(texts_bkl, text_bl.shape[1]),
                        ],
                        axis=1,
                    )
                )
                if self.ignore_duplicates
                else None
            )

        if self.multipos_weight:
            # pos[i, (b, j)] = b == i & valid; neg = b != i & valid & not a copy of a positive.
            own_bb = jnp.eye(b, dtype=bool)
            pos_mask = (own_bb[:, :, None] & valid_bt[None]).reshape(b, b * t)
            neg_mask = (~own_bb[:, :, None] & valid_bt[None]).reshape(b, b * t)
            if self.ignore_duplicates:
                h_all = hashes_bt2.reshape(b * t, 2)
                # copy[i, x] = text x equals one of image i's valid texts.
                same = _same_text(hashes_bt2[:, :, None, :], h_all[None, None])  # (B, 1+K, T)
                copy = jnp.any(same & valid_bt[:, :, None], axis=1)
                neg_mask = neg_mask & ~copy
            ztxt_all = ztxt_bte.reshape(b * t, -1)
            if self.multipos_form == 'infonce':
                term = multipos_infonce_loss(
                    zimg=zimg,
                    ztxt_all=ztxt_all,
                    pos_mask=pos_mask,
                    neg_mask=neg_mask,
                    scale=jnp.exp(model.logit_scale[...]),
                )
            else:
                term = multipos_circle_loss(
                    zimg=zimg,
                    ztxt_all=ztxt_all,
                    pos_mask=pos_mask,
                    neg_mask=neg_mask,
                    gamma=self.gamma,
                    margin=self.margin,
                )
            add('multipos', self.multipos_weight, term)

        if self.grouping_weight:
            # See the module docstring for why the tokens go through the image projection.
            patch_z = _normalise(
                model.image_proj(img_aux['img/tokens']).astype(_loss_dtype(img_aux['img/tokens']))
            )
            neg_mask = None
            if self.ignore_duplicates:
                h_sub = hashes_bt2[:, 1:].reshape(b * k, 2)
                neg_mask = ~_same_text(h_sub[:, None], h_sub[None])
            term = grouping_loss(
                patch_z=patch_z,
                sub_z=ztxt_bte[:, 1:],
                sub_valid=valid_bk,
                scale=jnp.exp(model.grouping_logit_scale[...]),
                threshold=self.threshold,
                neg_mask=neg_mask,
            )
            add('grouping', self.grouping_weight, term)

        return total, metrics


def _pad_to(tokens, length):
    """Right-pads the last axis with zeros to `length` (no-op if already that long or longer)."""
    extra = length - tokens.shape[-1]
    if extra <= 0:
        return tokens
    return jnp.pad(tokens, [(0, 0)] * (tokens.ndim - 1) + [(0, extra)])
