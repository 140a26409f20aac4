"""ImageTextModel: the two towers, their projections into the joint space, temperature."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from pretrain.models import layers
from pretrain.models.text import TextTransformer
from pretrain.models.vit import VisionTransformer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
IMAGE_PROJS = ('linear', 'none')


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.square(x).sum(-1, keepdims=True), eps * eps))


class Identity(nnx.Module):
    """`image_proj` of towers whose pooled output already is the embedding (SigLIP's MAP)."""

    def __call__(self, x):
        return x


class ImageTextModel(nnx.Module):
    """Image and text towers with linear projections to `embed_dim`.

    `logit_scale` is stored as a log (CLIP: log 1/0.07; SigLIP: log 10) and `logit_bias`
    is SigLIP's b (init -10); objectives that do not use one leave its gradient at zero.
    Encoders return `(z, aux)`, z L2-normalised float32, aux with slash keys
    ('img/tokens', 'img/pooled', ...) for evaluators and dense heads to pick from.

    Knobs for imported layouts (pretrain/weights/) are read with defaults, so configs
    written before they existed (a run's config.json) still build the same model:
    `image_proj='none'` (SigLIP: no image projection; embed_dim must equal the image
    width), `proj_bias` (SigLIP's text head has a bias).

    `matmul_precision` is entered as `jax.default_matmul_precision` around each encoder,
    so it holds for training and for the evaluators, which call these methods.
    """

    def __init__(self, config: ConfigDict, *, rngs: nnx.Rngs):
        if config.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{config.dtype}'; valid: {', '.join(DTYPES)}")
        dtype = DTYPES[config.dtype]
        img, txt = config.image, config.text
        for key, value in [
            ('embed_dim', config.embed_dim),
            *((f'image.{k}', img[k]) for k in ('width', 'heads', 'patch', 'image_size')),
            *((f'text.{k}', txt[k]) for k in ('width', 'heads', 'vocab_size', 'context_length')),
        ]:
            if value < 1:
                raise ValueError(f'{key} must be >= 1, got {value}')
        attention = config.get('attention', 'auto')
        self.matmul_precision = layers.resolve_matmul_precision(
            config.get('matmul_precision', 'default')
        )
        self.image = VisionTransformer(
            width=img.width,
            depth=img.depth,
            heads=img.heads,
            patch=img.patch,
            image_size=img.image_size,
            mlp_ratio=img.mlp_ratio,
            pool=img.pool,
            remat=config.remat,
            dtype=dtype,
            ln_pre=img.get('ln_pre', False),
            patch_bias=img.get('patch_bias', True),
            activation=img.get('activation', 'gelu_tanh'),
            ln_eps=img.get('ln_eps', 1e-6),
            pixel_mean=img.get('pixel_mean', None),
            pixel_std=img.get('pixel_std', None),
            attention=attention,
            posemb=img.get('posemb', 'learn'),
            stem=img.get('stem', 'patch'),
            rngs=rngs,
        )
        self.text = TextTransformer(
            width=txt.width,
            depth=txt.depth,
            heads=txt.heads,
            vocab_size=txt.vocab_size,
            context_length=txt.context_length,
            mlp_ratio=txt.mlp_ratio,
            causal=txt.causal,
            pool=txt.pool,
            pad_id=txt.pad_id,
            remat=config.remat,
            dtype=dtype,
            mask_padding=txt.get('mask_padding', True),
            activation=txt.get('activation', 'gelu_tanh'),
            ln_eps=txt.get('ln_eps', 1e-6),
            attention=attention,
            rngs=rngs,
        )
        image_proj = config.get('image_proj', 'linear')
        proj_bias = config.get('proj_bias', False)

        def projection(width):
            """A tower's (width -> embed_dim) projection into the shared embedding space."""
            return layers.Dense(
                width,
                config.embed_dim,
                axes=('embed', None),
                use_bias=proj_bias,
                rngs=rngs,
                dtype=dtype,
            )

        if image_proj not in IMAGE_PROJS:
            raise ValueError(f"unknown image_proj '{image_proj}'; valid: {', '.join(IMAGE_PROJS)}")
        if image_proj == 'none':
            if config.embed_dim != img.width:
                raise ValueError(
                    f"image_proj='none' needs embed_dim ({config.embed_dim}) equal to the "
                    f'image width ({img.width})'
                )
            self.image_proj = Identity()
        else:
            self.image_proj = projection(img.width)
        self.text_proj = projection(txt.width)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(config.logit_scale_init), jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(config.logit_bias_init, jnp.float32))
        # DreamLIP's sub-caption grouping contrast has its own learnable temperature (a log,
        # like logit_scale); objectives that do not use it leave its gradient at zero.
        self.grouping_logit_scale = nnx.Param(
            jnp.asarray(math.log(config.grouping_logit_scale_init), jnp.float32)
        )

    def precision(self):
        """The context the towers run in: `matmul_precision` as JAX's matmul precision."""
        if self.matmul_precision == 'default':
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)

    def encode_image(self, image, *, train: bool = False):
        with self.precision():
            pooled, aux = self.image(image, train=train)
            emb = self.image_proj(pooled)
        return l2_normalize(emb), {
            'img/pooled': pooled,
            'img/tokens': aux['tokens'],
            'img/grid': aux['grid'],
            'img/emb': emb,
        }

    def encode_text(self, tokens, *, train: bool = False):
        with self.precision():
            pooled, aux = self.text(tokens, train=train)
            emb = self.text_proj(pooled)
        return l2_normalize(emb), {
            'txt/pooled': pooled,
            'txt/tokens': aux['tokens'],
            'txt/valid': aux['valid'],
            'txt/emb': emb,
        }

    def encode_packed_texts(self, tokens, segments, positions, ends):
        """(B, T, E) L2-normalised embeddings of the T texts packed in each row (PackTexts),
        read at their EOS positions `ends` (B, T): equal to encode_text of each text alone."""
        if self.text.pool != 'eos':
            raise ValueError(f"packed texts need model.text.pool 'eos', not '{self.text.pool}'")
        with self.precision():
            x = self.text.encode_packed(tokens, segments, positions)
            pooled = jnp.take_along_axis(x, ends[..., None], axis=1)
            return l2_normalize(self.text_proj(pooled))

    def __call__(self, image, tokens, *, train: bool = False):
        zimg, img_aux = self.encode_image(image, train=train)
        ztxt, txt_aux = self.encode_text(tokens, train=train)
        return (zimg, ztxt), {**img_aux, **txt_aux}
