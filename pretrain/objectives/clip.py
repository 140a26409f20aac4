"""CLIP: symmetric softmax contrast over the global batch (Radford et al. 2021).

    logits_ij = s * <zimg_i, ztxt_j>            s = min(exp(logit_scale), 100)
    loss      = 1/2 [ mean_i CE(logits_i., i) + mean_j CE(logits_.j, j) ]
              = 1/2B sum_i [lse_j logits_ij - logits_ii] + 1/2B sum_j [lse_i logits_ij - logits_jj]

Every image is contrasted with every text of the *global* batch. Under jit with the
batch sharded over the mesh, `zimg @ ztxt.T` makes GSPMD gather the text side, so
the loss needs no explicit collectives and is the same on any mesh.
"""

from typing import Any

import jax
import jax.numpy as jnp

from pretrain.objectives.options import read_options

# open_clip clamps the temperature at 100 so the logits cannot blow up early in
# training; above it the scale gets no gradient.
MAX_SCALE = 100.0


def clip_loss(*, zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE. zimg, ztxt: (B, E) L2-normalised; scale: exp'd temperature."""
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f'zimg and ztxt must both be (B, E); got {zimg.shape} and {ztxt.shape}.')
    # Loss maths in at least f32 even if the towers ran in bf16: softmax over a
    # large batch loses too much in bf16 (f64 stays f64 for the reference tests).
    dtype = jnp.promote_types(jnp.result_type(zimg, ztxt), jnp.float32)
    zimg_be, ztxt_be = zimg.astype(dtype), ztxt.astype(dtype)
    scale = jnp.minimum(jnp.asarray(scale, dtype), MAX_SCALE)

    logits_bb = scale * (zimg_be @ ztxt_be.T)  # rows: images, columns: texts
    positives_b = jnp.diagonal(logits_bb)
    i2t = jnp.mean(jax.nn.logsumexp(logits_bb, axis=1) - positives_b)
    t2i = jnp.mean(jax.nn.logsumexp(logits_bb, axis=0) - positives_b)
    loss = 0.5 * (i2t + t2i)

    labels_b = jnp.arange(logits_bb.shape[0])
    metrics = {
        'i2t_acc': jnp.mean(jnp.argmax(logits_bb, axis=1) == labels_b),
        't2i_acc': jnp.mean(jnp.argmax(logits_bb, axis=0) == labels_b),
        'scale': scale,
    }
    return loss, jax.lax.stop_gradient(metrics)


class Clip:
    """Objective wrapper: picks the fields, runs both towers, calls `clip_loss`.

    Config (all optional): `image_field` ('image'), `text_field` ('text'); a config
    can thus hold two CLIP terms, e.g. one on alt-text and one on accurate captions.
    """

    CONFIG_KEYS = {'image_field': 'image', 'text_field': 'text'}  # name: default

    def __init__(self, config: Any = None):
        options = read_options('clip', config, self.CONFIG_KEYS)
        self.image_field, self.text_field = options['image_field'], options['text_field']
        self.fields = (self.image_field, self.text_field)

    def __call__(self, model, batch, *, rng=None, train: bool) -> tuple[jax.Array, dict]:
        del rng  # Deterministic loss; dropout rngs, if any, live in the model.
        zimg, _ = model.encode_image(batch[self.image_field], train=train)
        ztxt, _ = model.encode_text(batch[self.text_field], train=train)
        return clip_loss(zimg=zimg, ztxt=ztxt, scale=jnp.exp(model.logit_scale[...]))
