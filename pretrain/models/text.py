"""Text Transformer: token + learned position embeddings, causal or bidirectional blocks."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pretrain.models import layers

# eos: the last non-pad token; argmax: the position of the largest token id (OpenAI CLIP's
# EOS, id 49407, is its vocabulary's largest, so open_clip and HF CLIP pool there); last: the
# final position (big_vision / SigLIP pad with EOS, so the last token always is one); mean.
POOLS = ('eos', 'argmax', 'last', 'mean')


class TextTransformer(nnx.Module):
    """Returns `(pooled, aux)` for (B, L) int32 token ids padded with `pad_id` at the end.

    EOS pooling reads the last real token, found as (number of non-pad tokens - 1), so it
    works for any tokenizer that ends a caption with EOS and pads after it. The context
    length is a config field: positions are not capped at CLIP's 77.

    Bidirectional towers mask padding out of attention unless `mask_padding` is False:
    SigLIP attends to its padding (it pads with EOS), so imported SigLIP towers turn it off.
    `activation` / `ln_eps` as in the ViT.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        vocab_size: int,
        context_length: int,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pool: str = 'eos',
        pad_id: int = 0,
        remat: str = 'none',
        dtype=jnp.float32,
        mask_padding: bool = True,
        activation: str = 'gelu_tanh',
        ln_eps: float = 1e-6,
        attention: str = 'auto',
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"unknown text pool '{pool}'; valid: {', '.join(POOLS)}")
        self.causal, self.pool, self.pad_id, self.dtype = causal, pool, pad_id, dtype
        self.mask_padding = mask_padding
        self.context_length = context_length
        self.tok = layers.param(
            rngs, nnx.initializers.normal(0.02), (vocab_size, width), ('vocab', 'embed')
        )
        self.pos = layers.param(
            rngs, nnx.initializers.normal(0.01), (context_length, width), (None, 'embed')
        )
        self.encoder = layers.Encoder(
            width,
            depth,
            heads,
            mlp_ratio,
            rngs=rngs,
            dtype=dtype,
            remat=remat,
            activation=activation,
            ln_eps=ln_eps,
            attention=attention,
        )
        self.ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=ln_eps)

    def _embed(self, tokens_bl, pos_emb):
        """Token embeddings plus `pos_emb`, the position table read at each token's place."""
        return self.tok[...].astype(self.dtype)[tokens_bl] + pos_emb.astype(self.dtype)

    def encode_packed(self, tokens_bl, segments_bl, positions_bl):
        """Token features (B, L, W) of rows that hold several texts back to back
        (input_pipeline.captions.PackTexts): each attends only to its own earlier tokens and
        has its own positions, so it gets the features it gets alone. Causal towers only: a
        bidirectional one would need no causal mask but the same segments (not needed yet).
        """
        if not self.causal:
            raise ValueError('packed texts need a causal text tower (model.text.causal)')
        x = self._embed(tokens_bl, self.pos[...][positions_bl])
        same_text = segments_bl[:, None, :, None] == segments_bl[:, None, None, :]
        return self.ln(self.encoder(x, mask=same_text, is_causal=True))

    def __call__(self, tokens_bl, *, train: bool = False):
        del train
        b, l = tokens_bl.shape
        if l > self.context_length:
            raise ValueError(f'{l} tokens exceed the context length {self.context_length}')
        valid_bl = tokens_bl != self.pad_id
        x = self._embed(tokens_bl, self.pos[...][:l])
        if self.causal:
            # Causal attention never looks right, so padding after EOS cannot leak in.
            x = self.encoder(x, is_causal=True)
        elif self.mask_padding:
            mask = valid_bl[:, None, :, None] & valid_bl[:, None, None, :]
            x = self.encoder(x, mask=mask | jnp.eye(l, dtype=bool))  # eye: pad rows stay finite
        else:
            x = self.encoder(x)
        x = self.ln(x)
        if self.pool in ('eos', 'argmax'):
            if self.pool == 'eos':
                last = jnp.maximum(valid_bl.sum(-1) - 1, 0)
            else:
                last = jnp.argmax(tokens_bl, axis=-1)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        elif self.pool == 'last':
            pooled = x[:, -1]
        else:
            w = valid_bl[..., None].astype(x.dtype)
            pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1)
        return pooled, {'tokens': x, 'valid': valid_bl}
