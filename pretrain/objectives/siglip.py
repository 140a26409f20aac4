"""SigLIP: pairwise sigmoid contrast over the global batch (Zhai et al. 2023).

    logits_ij = s * <zimg_i, ztxt_j> + b        s = exp(logit_scale), b = logit_bias
    z_ij      = +1 if i == j else -1
    loss      = -1/B sum_i sum_j log sigmoid(z_ij * logits_ij)

Normalised by B, not B^2 (paper, Alg. 1; big_vision): each image contributes one
positive and B-1 negative binary terms. Every pair is independent, so the loss is
a plain sum over text blocks, which `siglip_loss_chunked` exploits to keep memory
linear in B. Like CLIP, under jit on a batch sharded over the mesh the products
`zimg @ ztxt.T` make GSPMD gather the text side: no explicit collectives.
"""

from typing import Any

import jax
import jax.numpy as jnp

from pretrain.objectives.options import read_options


def _loss_dtype(*arrays) -> jnp.dtype:
    # Loss maths in at least f32 even if the towers ran in bf16 (a sum of B^2
    # log-sigmoids is far beyond bf16's 8 bits); f64 stays f64 for the tests.
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_shapes(zimg, ztxt):
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f'zimg and ztxt must both be (B, E); got {zimg.shape} and {ztxt.shape}.')


def siglip_loss(
    *, zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array
) -> tuple[jax.Array, dict]:
    """Sigmoid loss on the full (B, B) logit matrix. zimg, ztxt: (B, E) L2-normalised."""
    _check_shapes(zimg, ztxt)
    dtype = _loss_dtype(zimg, ztxt)
    zimg_be, ztxt_be = zimg.astype(dtype), ztxt.astype(dtype)
    scale, bias = jnp.asarray(scale, dtype), jnp.asarray(bias, dtype)
    n = zimg_be.shape[0]

    logits_bb = scale * (zimg_be @ ztxt_be.T) + bias  # rows: images, columns: texts
    signs_bb = 2 * jnp.eye(n, dtype=dtype) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(signs_bb * logits_bb)) / n

    labels_b = jnp.arange(n)
    metrics = {
        'i2t_acc': jnp.mean(jnp.argmax(logits_bb, axis=1) == labels_b),
        't2i_acc': jnp.mean(jnp.argmax(logits_bb, axis=0) == labels_b),
        'scale': scale,
        'bias': bias,
    }
    return loss, jax.lax.stop_gradient(metrics)


def siglip_loss_chunked(
    *, zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array, chunk_size: int
) -> tuple[jax.Array, dict]:
    """`siglip_loss` (same value, gradients and metrics) without the (B, B) matrix.

    Scans over blocks of `chunk_size` texts. The block body is under
    `jax.checkpoint`, so the backward pass keeps only each block's inputs and
    recomputes its (B, chunk_size) logits: peak memory is O(B * chunk_size + B * E)
    instead of O(B^2), for one extra forward matmul per block.
    """
    _check_shapes(zimg, ztxt)
    n, e = zimg.shape
    if chunk_size <= 0 or n % chunk_size:
        raise ValueError(
            f'siglip chunk_size must be a positive divisor of the global batch size: '
            f'batch {n}, chunk_size {chunk_size}.'
        )
    dtype = _loss_dtype(zimg, ztxt)
    zimg_be, ztxt_be = zimg.astype(dtype), ztxt.astype(dtype)
    scale, bias = jnp.asarray(scale, dtype), jnp.asarray(bias, dtype)
    num_chunks = n // chunk_size

    # With -log sigmoid(-x) = softplus(x) and -log sigmoid(x) = softplus(x) - x:
    #   sum_ij -log sigmoid(z_ij logits_ij) = sum_ij softplus(logits_ij) - sum_i logits_ii
    # so blocks need no (B, chunk) label matrix (XLA would hoist and keep one per
    # block shape), and the positives cost one row-wise dot product.
    positives_b = scale * jnp.sum(zimg_be * ztxt_be, axis=1) + bias

    @jax.checkpoint
    def block(ztxt_ce, start):
        # Texts start .. start+C-1 against all images.
        logits_bc = scale * (zimg_be @ ztxt_ce.T) + bias
        softplus_sum = jnp.sum(jax.nn.softplus(logits_bc))
        # Retrieval metrics need no gradient; stop it here so that no metric
        # state becomes a residual of the backward pass.
        logits_bc = jax.lax.stop_gradient(logits_bc)
        text_ids_c = start + jnp.arange(chunk_size, dtype=jnp.int32)
        t2i_hits = jnp.sum(jnp.argmax(logits_bc, axis=0) == text_ids_c, dtype=jnp.int32)
        return softplus_sum, (
            t2i_hits,
            jnp.max(logits_bc, axis=1),
            start + jnp.argmax(logits_bc, axis=1).astype(jnp.int32),
        )

    def step(carry, xs):
        softplus_sum, t2i_hits, best_b, best_idx_b = carry
        block_sum, (block_hits, block_best_b, block_idx_b) = block(*xs)
        # Strict '>' keeps the earliest text on ties, like a global argmax.
        better_b = block_best_b > best_b
        carry = (
            softplus_sum + block_sum,
            t2i_hits + block_hits,
            jnp.where(better_b, block_best_b, best_b),
            jnp.where(better_b, block_idx_b, best_idx_b),
        )
        return carry, None

    init = (
        jnp.zeros((), dtype),
        jnp.zeros((), jnp.int32),
        jnp.full((n,), -jnp.inf, dtype),
        jnp.zeros((n,), jnp.int32),
    )
    xs = (
        ztxt_be.reshape(num_chunks, chunk_size, e),
        jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size,
    )
    (softplus_sum, t2i_hits, _, best_idx_b), _ = jax.lax.scan(step, init, xs)
    loss = (softplus_sum - jnp.sum(positives_b)) / n

    metrics = {
        'i2t_acc': jnp.mean(best_idx_b == jnp.arange(n)),
        't2i_acc': t2i_hits / n,
        'scale': scale,
        'bias': bias,
    }
    return loss, jax.lax.stop_gradient(metrics)


class Siglip:
    """Objective wrapper: picks the fields, runs both towers, calls the sigmoid loss.

    Config (all optional): `chunk_size` (0 = full (B, B) logits, else the chunked
    loss with blocks of that many texts), `image_field` ('image'), `text_field` ('text').
    """

    CONFIG_KEYS = {'chunk_size': 0, 'image_field': 'image', 'text_field': 'text'}

    def __init__(self, config: Any = None):
        options = read_options('siglip', config, self.CONFIG_KEYS)
        self.chunk_size = int(options['chunk_size'])
        self.image_field, self.text_field = options['image_field'], options['text_field']
        self.fields = (self.image_field, self.text_field)

    def __call__(self, model, batch, *, rng=None, train: bool) -> tuple[jax.Array, dict]:
        del rng  # Deterministic loss; dropout rngs, if any, live in the model.
        zimg, _ = model.encode_image(batch[self.image_field], train=train)
        ztxt, _ = model.encode_text(batch[self.text_field], train=train)
        kwargs = dict(
            zimg=zimg, ztxt=ztxt, scale=jnp.exp(model.logit_scale[...]), bias=model.logit_bias[...]
        )
        if self.chunk_size:
            return siglip_loss_chunked(**kwargs, chunk_size=self.chunk_size)
        return siglip_loss(**kwargs)
