"""Vision Transformer: patch embedding (or a conv stem), learned or sincos2d positions, pre-norm
blocks, pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.models import layers

POOLS = ('cls', 'mean', 'map')
POSEMBS = ('learn', 'sincos2d')
STEMS = ('patch', 'conv')


def interpolate_posemb(pos_nd, grid: tuple[int, int]):
    """Resizes a (gh*gw, d) table of learned positions to another patch grid (bilinear).

    Lets a model trained at one resolution run at another (finetuning, dense eval).
    """
    n, d = pos_nd.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f'position table of {n} entries is not a square grid')
    if (side, side) == tuple(grid):
        return pos_nd
    resized = jax.image.resize(pos_nd.reshape(side, side, d), (*grid, d), 'bilinear')
    return resized.reshape(grid[0] * grid[1], d)


def sincos2d_posemb(grid: tuple[int, int], width: int, temperature: float = 10_000.0):
    """(gh*gw, width) fixed 2D sine-cosine positions (MoCo v3; big_vision's plain ViT spaces
    the frequencies by width / 4 - 1 instead of width / 4).

    A quarter of the channels each: sin and cos of the column, then of the row, at
    frequencies temperature**(-i / (width / 4)). Computed for any grid, so nothing is
    interpolated at another resolution.
    """
    if width % 4:
        raise ValueError(f'sincos2d positions need a width divisible by 4, got {width}')
    rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing='ij')
    omega = temperature ** -(jnp.arange(width // 4) / (width // 4))
    x = cols.reshape(-1, 1) * omega[None]
    y = rows.reshape(-1, 1) * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def conv_stem_channels(patch: int, width: int) -> list[int]:
    """Channels of ConvStem's feature maps, input first: 3, then doubling up to `width`."""
    if patch < 2 or patch & (patch - 1):
        raise ValueError(f"stem 'conv' needs a power-of-two patch >= 2, got {patch}")
    n = patch.bit_length() - 1  # stride-2 convolutions
    return [3] + [max(width >> (n - 1 - i), 8) for i in range(n)]


class ConvStem(nnx.Module):
    """Early convolutions instead of the linear patch embedding (Xiao et al. 2021, "Early
    Convolutions Help Transformers See Better", arXiv 2106.14881): log2(patch) 3x3 stride-2
    convolutions with GELU, channels doubling up to `width`, then a 1x1 convolution (a Dense
    on the tokens) to `width`. Same patch grid and token count as the patch embedding.

    Why: a linear map of each patch sees pixels only through a fixed grid, so edges and
    corners must be relearnt at every offset inside the patch. Shapes is the case in point:
    the tiny ViT supervised on the largest object's shape alone (6 classes, chance 16.7%) is
    at 23% after 200 steps and 29% after 600 with the patch embedding, 63% after 200 and
    89% after 400 with this stem (benchmarks/supervised_shape.py; figures in
    benchmarks/results/ablation_dreamlip_screens.md).
    No norm between the convolutions (the paper's BatchNorm would tie examples together).
    """

    def __init__(self, patch: int, width: int, *, rngs: nnx.Rngs, dtype):
        channels = conv_stem_channels(patch, width)
        init = nnx.initializers.lecun_normal()
        self.kernels = nnx.List(
            [
                layers.param(rngs, init, (3, 3, c_in, c_out), (None, None, None, None))
                for c_in, c_out in zip(channels[:-1], channels[1:])
            ]
        )
        self.biases = nnx.List(
            [layers.param(rngs, layers.zeros, (c,), (None,)) for c in channels[1:]]
        )
        self.out = layers.Dense(channels[-1], width, axes=(None, 'embed'), rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, x_bhwc):
        """(B, H, W, 3) scaled pixels -> (B, H/patch * W/patch, width)."""
        x = x_bhwc
        for kernel, bias in zip(self.kernels, self.biases):
            x = conv3x3_stride2(x, kernel[...].astype(self.dtype))
            x = jax.nn.gelu(x + bias[...].astype(self.dtype))
        b, h, w, c = x.shape
        return self.out(x.reshape(b, h * w, c))


def conv3x3_stride2(x_bhwc, kernel_hwio):
    """A 3x3 stride-2 'SAME' convolution as one 2D matmul of the nine strided shifts.

    Same values as lax.conv_general_dilated (XLA's 'SAME' pads the far side first), and on
    CPU twice as fast with its gradients: ConvStem's forward + backward at batch 128, 64 px,
    170 -> 83 ms (one process, alternating rounds; results/ablation_dreamlip_screens.md).
    """
    b, h, w, c = x_bhwc.shape
    ho, wo = -(-h // 2), -(-w // 2)
    pad_h, pad_w = max(2 * ho + 1 - h, 0), max(2 * wo + 1 - w, 0)
    x = jnp.pad(
        x_bhwc, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    # (dy, dx, channel) order, the order of the HWIO kernel's rows once flattened.
    shifts = [
        x[:, dy : dy + 2 * ho - 1 : 2, dx : dx + 2 * wo - 1 : 2]
        for dy in range(3)
        for dx in range(3)
    ]
    cols = jnp.concatenate(shifts, axis=-1).reshape(b * ho * wo, 9 * c)
    y = layers.matmul(cols, kernel_hwio.reshape(9 * c, -1))
    return y.reshape(b, ho, wo, -1)


class MapHead(nnx.Module):
    """Multihead attention pooling: one learned probe attends over the tokens (SigLIP's MAP)."""

    def __init__(
        self,
        d: int,
        heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype,
        activation: str = 'gelu_tanh',
        ln_eps: float = 1e-6,
    ):
        self.probe = layers.param(
            rngs, nnx.initializers.xavier_uniform(), (1, 1, d), (None, None, 'embed')
        )
        self.heads = heads
        self.q = layers.Dense(d, d, axes=('embed', 'heads'), rngs=rngs, dtype=dtype)
        self.kv = layers.Dense(d, 2 * d, axes=('embed', 'heads'), rngs=rngs, dtype=dtype)
        self.out = layers.Dense(d, d, axes=('heads', 'embed'), rngs=rngs, dtype=dtype)
        self.ln = layers.LayerNorm(d, rngs=rngs, dtype=dtype, eps=ln_eps)
        self.mlp = layers.Mlp(d, int(d * mlp_ratio), rngs=rngs, dtype=dtype, activation=activation)

    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        hk = (self.heads, d // self.heads)
        q = self.q(jnp.broadcast_to(self.probe[...].astype(x_btd.dtype), (b, 1, d)))
        kv = self.kv(x_btd).reshape(b, t, 2, *hk)
        y = jax.nn.dot_product_attention(q.reshape(b, 1, *hk), kv[:, :, 0], kv[:, :, 1])
        y = self.out(y.reshape(b, 1, d))
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


class VisionTransformer(nnx.Module):
    """ViT returning `(pooled, aux)`; aux['tokens'] holds the normalised patch tokens.

    Images arrive as uint8 (or float in [0, 255]) and are scaled to [-1, 1] here, on device,
    so the input pipeline ships bytes (4x less host->device traffic than float32);
    `pixel_mean`/`pixel_std` (per channel, in 0..255 units) replace that scaling for
    imported models trained on other statistics (OpenAI CLIP's).

    The other knobs exist to run public layouts exactly (pretrain/weights/): `ln_pre`
    (CLIP's LayerNorm before the blocks), `patch_bias` (CLIP's patch conv has none),
    `activation` and `ln_eps` (CLIP: quick_gelu or exact gelu, 1e-5). Their defaults are
    this codebase's own model.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        patch: int,
        image_size: int,
        mlp_ratio: float = 4.0,
        pool: str = 'cls',
        remat: str = 'none',
        dtype=jnp.float32,
        ln_pre: bool = False,
        patch_bias: bool = True,
        activation: str = 'gelu_tanh',
        ln_eps: float = 1e-6,
        pixel_mean: tuple | None = None,
        pixel_std: tuple | None = None,
        attention: str = 'auto',
        posemb: str = 'learn',
        stem: str = 'patch',
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"unknown pool '{pool}'; valid: {', '.join(POOLS)}")
        if posemb not in POSEMBS:
            raise ValueError(f"unknown posemb '{posemb}'; valid: {', '.join(POSEMBS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem '{stem}'; valid: {', '.join(STEMS)}")
        if image_size % patch:
            raise ValueError(f'image_size {image_size} is not divisible by patch {patch}')
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError('pixel_mean and pixel_std must be given together (or neither)')
        self.patch, self.pool, self.dtype, self.width = patch, pool, dtype, width
        self.pixel_mean = None if pixel_mean is None else tuple(float(m) for m in pixel_mean)
        self.pixel_std = None if pixel_std is None else tuple(float(s) for s in pixel_std)
        grid = image_size // patch
        self.grid = (grid, grid)  # the patch grid at image_size, that the table is built for
        self.stem = stem
        if stem == 'conv':
            self.embed = ConvStem(patch, width, rngs=rngs, dtype=dtype)
        else:
            self.embed = layers.Dense(
                patch * patch * 3,
                width,
                axes=(None, 'embed'),
                rngs=rngs,
                dtype=dtype,
                use_bias=patch_bias,
            )
        normal = nnx.initializers.normal(width**-0.5)
        # 'sincos2d' has no parameter: the table is a function of the grid.
        self.pos = (
            layers.param(rngs, normal, (grid * grid, width), (None, 'embed'))
            if posemb == 'learn'
            else None
        )
        self.cls = (
            layers.param(rngs, layers.zeros, (1, 1, width), (None, None, 'embed'))
            if pool == 'cls'
            else None
        )
        self.ln_pre = (
            layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=ln_eps) if ln_pre else None
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
        self.map = (
            MapHead(
                width,
                heads,
                mlp_ratio,
                rngs=rngs,
                dtype=dtype,
                activation=activation,
                ln_eps=ln_eps,
            )
            if pool == 'map'
            else None
        )

    def pixels(self, image):
        """(B, H, W, 3) uint8 (or 0..255 floats) -> scaled pixels in the compute dtype."""
        b, h, w, c = image.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f'image {h}x{w} is not divisible by patch {self.patch}')
        if self.pixel_mean is None:
            return image.astype(self.dtype) * (2 / 255) - 1
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        return ((image.astype(jnp.float32) - mean) / std).astype(self.dtype)

    def patchify(self, image):
        x = self.pixels(image)
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c), (h // p, w // p)

    def positions(self, grid: tuple[int, int]):
        """(gh*gw, width) position table for a patch grid: learned (resized) or sincos2d."""
        if self.pos is None:
            return sincos2d_posemb(grid, self.width)
        return interpolate_posemb(self.pos[...], grid)

    def embed_tokens(self, image):
        """(B, T, d) tokens entering the first block (CLS first if any), and the patch grid."""
        if self.stem == 'conv':
            x = self.pixels(image)
            grid = (x.shape[1] // self.patch, x.shape[2] // self.patch)
            x = self.embed(x)
        else:
            patches, grid = self.patchify(image)
            x = self.embed(patches)
        x = x + self.positions(grid).astype(self.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return x, grid

    def __call__(self, image, *, train: bool = False):
        del train  # no dropout in these towers; kept for a uniform signature.
        x, grid = self.embed_tokens(image)
        pre_ln = self.encoder(x)
        x = self.ln(pre_ln)
        tokens = x[:, 1:] if self.cls is not None else x
        if self.pool == 'cls':
            pooled = x[:, 0]
        elif self.pool == 'mean':
            pooled = tokens.mean(axis=1)
        else:
            pooled = self.map(tokens)
        return pooled, {'tokens': tokens, 'grid': grid}
