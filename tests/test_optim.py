"""Optimizer contracts (pretrain/optim.py) and the train step's gradient accumulation.

Every number is checked against an independent numpy computation: the decay mask and the
layer-wise lr scales against rules written out by path, the schedule against its formula,
AdamW (global-norm clipping, masked decay, layer scales) against a numpy loop, and
`grad_accum` micro-batching against the full-batch step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import F32_MATMULS, TINY
from configs import clip
from pretrain import config_cli, optim, sharding, step as step_lib, train
from pretrain.models.towers import ImageTextModel


def tiny_config(*extra):
    # The patch embedding: the tests below list its parameter names by hand.
    stem = ['--config.model.image.stem=patch']
    overrides, _ = config_cli.parse_overrides(TINY + stem + F32_MATMULS + list(extra))
    return config_cli.build_config('configs/clip.py', overrides)


def path_names(path):
    return tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def leaves_by_name(tree):
    return {'/'.join(path_names(p)): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def model_params(config):
    model = ImageTextModel(config.model, rngs=nnx.Rngs(0))
    return nnx.as_pure(nnx.state(model, nnx.Param))


# -- weight-decay mask ---------------------------------------------------------------------


@pytest.mark.parametrize('pool', ['cls', 'map'])
def test_decay_mask_on_image_text_model(pool):
    params = model_params(tiny_config(f'--config.model.image.pool={pool}'))
    mask = leaves_by_name(optim.decay_mask(params))
    shapes = {k: v.shape for k, v in leaves_by_name(params).items()}
    assert mask.keys() == shapes.keys()

    for name, decayed in mask.items():
        last = name.split('/')[-1]
        # Independent rule: only the matrices of linear maps (Dense kernels) are decayed.
        want = last == 'kernel'
        assert decayed == want, f'{name} {shapes[name]}: decay {decayed}, want {want}'

    # The ones that matter, by name (and that the rule above is not vacuous).
    for name in [
        'image/encoder/blocks/0/mlp/fc1/kernel',
        'image/encoder/blocks/0/attn/qkv/kernel',
        'image/embed/kernel',
        'image_proj/kernel',
        'text_proj/kernel',
        'text/encoder/blocks/0/attn/out/kernel',
    ]:
        assert mask[name], name
    for name in [
        'image/pos',
        'text/pos',
        'text/tok',
        'logit_scale',
        'logit_bias',
        'image/ln/scale',
        'image/ln/bias',
        'image/encoder/blocks/0/ln1/scale',
        'image/encoder/blocks/0/mlp/fc1/bias',
        'image/embed/bias',
    ]:
        assert not mask[name], name
    if pool == 'cls':
        assert not mask['image/cls']
    else:
        assert not mask['image/map/probe']  # (1, 1, d): 3D, yet a learned token, not a map
        assert mask['image/map/kv/kernel']
    assert len(shapes['text/tok']) == 2 and len(shapes['image/pos']) == 2  # 2D, still not decayed


# -- layer-wise lr decay -------------------------------------------------------------------


def test_layer_decay_scales_by_hand():
    d_img, d_txt, decay = 3, 2, 0.7
    config = tiny_config(
        f'--config.model.image.depth={d_img}', f'--config.model.text.depth={d_txt}'
    )
    params = model_params(config)
    scales = leaves_by_name(optim.layer_decay_scales(params, decay))

    def want(name):
        parts = name.split('/')
        tower = parts[0]
        depth = {'image': d_img, 'text': d_txt}.get(tower)
        if depth is None:  # projections, logit_scale/bias: after every block
            return 1.0
        if 'blocks' in parts:
            return decay ** (depth - int(parts[parts.index('blocks') + 1]))
        if parts[1] in ('embed', 'pos', 'cls', 'tok'):
            return decay ** (depth + 1)
        assert parts[1] == 'ln', name  # the final norm is the tower's head
        return 1.0

    checked = set()
    for name, got in scales.items():
        assert math.isclose(float(got), want(name), rel_tol=1e-12), (name, got, want(name))
        checked.add(name)
    # Spot values written out, so the hand rule above cannot drift with the code.
    assert math.isclose(scales['image/encoder/blocks/0/mlp/fc1/kernel'], 0.7**3)
    assert math.isclose(scales['image/encoder/blocks/2/attn/qkv/bias'], 0.7)
    assert math.isclose(scales['image/embed/kernel'], 0.7**4)
    assert math.isclose(scales['image/pos'], 0.7**4)
    assert math.isclose(scales['text/tok'], 0.7**3)
    assert math.isclose(scales['text/encoder/blocks/1/ln2/scale'], 0.7)
    assert scales['image/ln/scale'] == scales['text_proj/kernel'] == scales['logit_scale'] == 1.0


# -- schedule ------------------------------------------------------------------------------


def np_schedule(t, *, lr, warmup, total, end):
    if t < warmup:
        return lr * t / warmup
    decay_steps = max(total, warmup + 1) - warmup
    frac = min(t - warmup, decay_steps) / decay_steps
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize(
    'warmup,total,end_factor', [(10, 100, 0.0), (3, 20, 0.1), (0, 10, 0.0), (5, 5, 0.0)]
)
def test_schedule_matches_formula(warmup, total, end_factor):
    cfg = clip.get_config().optim
    cfg.update(dict(lr=3e-3, warmup_steps=warmup, end_lr_factor=end_factor))
    sched = optim.schedule(cfg, total)
    steps = np.arange(0, total + 6)
    got = np.asarray([float(sched(t)) for t in steps])
    want = np.asarray(
        [np_schedule(t, lr=3e-3, warmup=warmup, total=total, end=3e-3 * end_factor) for t in steps]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    if warmup:
        assert got[0] == 0.0
        assert math.isclose(got[warmup], 3e-3, rel_tol=1e-6)  # the peak is reached at `warmup`
    end_at = max(total, warmup + 1)  # (total == warmup still decays, over one step)
    np.testing.assert_allclose(got[end_at:], 3e-3 * end_factor, atol=1e-10)  # then stays there


# -- AdamW against numpy -------------------------------------------------------------------


def toy_params():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        'image': {
            'embed': {'kernel': f(6, 4), 'bias': f(4)},
            'pos': f(3, 4),
            'encoder': {
                'blocks': {
                    0: {'mlp': {'fc1': {'kernel': f(4, 8), 'bias': f(8)}}, 'ln1': {'scale': f(4)}},
                    1: {'mlp': {'fc1': {'kernel': f(4, 8), 'bias': f(8)}}, 'ln1': {'scale': f(4)}},
                }
            },
            'ln': {'scale': f(4)},
        },
        'proj': {'kernel': f(4, 2)},
        'logit_scale': np.float32(2.0),
    }


def np_adamw(params, grads_seq, *, lr_fn, b1, b2, eps, wd, clip, decay_fn, scale_fn):
    """Reference AdamW on {name: array}; lr_fn(count) with count = updates done before."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
            if decay_fn(k):
                u = u + wd * p[k]
            p[k] = p[k] - lr_fn(t - 1) * scale_fn(k) * u
        out.append({k: x.copy() for k, x in p.items()})
    return out


@pytest.mark.parametrize('layer_decay', [1.0, 0.5])
def test_make_optimizer_matches_numpy_adamw(layer_decay):
    cfg = clip.get_config().optim
    cfg.update(
        dict(
            lr=0.05,
            warmup_steps=1,
            weight_decay=0.3,
            clip_norm=1.0,
            end_lr_factor=0.1,
            layer_decay=layer_decay,
        )
    )
    total = 4
    params = toy_params()
    tx = optim.make_optimizer(cfg, params, total)
    rng = np.random.default_rng(1)
    # Step 1 and 3 are clipped (global norm >> 1), step 2 is not.
    scales = [10.0, 0.01, 3.0]
    grads_seq = [
        jax.tree.map(lambda x, s=s: (s * rng.normal(size=np.shape(x))).astype(np.float32), params)
        for s in scales
    ]
    norms = [math.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(gs))) for gs in grads_seq]
    assert norms[0] > 1 and norms[1] < 1 and norms[2] > 1

    opt_state = tx.init(params)
    p = jax.tree.map(jnp.asarray, params)
    got = []
    for grads in grads_seq:
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        got.append(leaves_by_name(p))

    flat = leaves_by_name(params)
    no_decay = {
        'image/embed/bias',
        'image/pos',
        'image/encoder/blocks/0/mlp/fc1/bias',
        'image/encoder/blocks/0/ln1/scale',
        'image/encoder/blocks/1/mlp/fc1/bias',
        'image/encoder/blocks/1/ln1/scale',
        'image/ln/scale',
        'logit_scale',
    }
    # Layer scales by hand: image tower depth 2; blocks i -> d**(2-i), embed/pos -> d**3.
    d = layer_decay
    hand_scales = {'image/embed/kernel': d**3, 'image/embed/bias': d**3, 'image/pos': d**3}
    for i in (0, 1):
        for leaf in ('mlp/fc1/kernel', 'mlp/fc1/bias', 'ln1/scale'):
            hand_scales[f'image/encoder/blocks/{i}/{leaf}'] = d ** (2 - i)
    want = np_adamw(
        flat,
        [leaves_by_name(g) for g in grads_seq],
        lr_fn=lambda c: np_schedule(c, lr=0.05, warmup=1, total=total, end=0.005),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        wd=0.3,
        clip=1.0,
        decay_fn=lambda k: k not in no_decay,
        scale_fn=lambda k: hand_scales.get(k, 1.0),
    )
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for k in flat:
            np.testing.assert_allclose(
                np.asarray(g[k]), w[k], rtol=2e-5, atol=2e-6, err_msg=f'step {step} {k}'
            )
    # The first update runs at lr(0) = 0 (warmup from 0): parameters only move from step 2.
    for k in flat:
        np.testing.assert_array_equal(np.asarray(got[0][k]), flat[k])
    assert not np.allclose(np.asarray(got[1]['proj/kernel']), flat['proj/kernel'])


@pytest.mark.parametrize('layer_decay', [1.0, 0.5])
def test_mask_and_layer_scales_reach_nnx_optimizer(layer_decay):
    """Through nnx.Optimizer on the real model: with zero gradients Adam's step is 0, so only
    decoupled weight decay moves a parameter, by lr * wd * layer scale, and only if masked in."""
    config = tiny_config(
        '--config.model.image.depth=2',
        '--config.optim.warmup_steps=0',
        f'--config.optim.layer_decay={layer_decay}',
    )
    model = ImageTextModel(config.model, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim, params, 10), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, leaves_by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = jax.tree.map(np.asarray, leaves_by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    lr, wd = config.optim.lr, config.optim.weight_decay
    blocks = 'image/encoder/blocks'
    hand = {
        f'{blocks}/0/mlp/fc1/kernel': layer_decay**2,
        f'{blocks}/1/mlp/fc1/kernel': layer_decay,
        'image/embed/kernel': layer_decay**3,
        'image_proj/kernel': 1.0,
    }
    for name, scale in hand.items():
        np.testing.assert_allclose(
            after[name], before[name] * (1 - lr * wd * scale), rtol=1e-6, err_msg=name
        )
    for name in (
        'image/pos',
        'text/tok',
        'image/ln/scale',
        f'{blocks}/0/mlp/fc1/bias',
        'logit_scale',
    ):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    moved = {k for k in before if not np.array_equal(after[k], before[k])}
    assert moved == {k for k in before if k.endswith('kernel')}


# -- gradient accumulation -----------------------------------------------------------------


def test_microbatches_strided_layout():
    batch = {'image': np.arange(12 * 2).reshape(12, 2), 'text': np.arange(12)[:, None, None] * 10}
    micro = step_lib.microbatches(batch, 3)
    assert micro['image'].shape == (3, 4, 2) and micro['text'].shape == (3, 4, 1, 1)
    for i in range(3):
        rows = [i, i + 3, i + 6, i + 9]
        np.testing.assert_array_equal(micro['image'][i], batch['image'][rows])
        np.testing.assert_array_equal(micro['text'][i], batch['text'][rows])
    with pytest.raises(ValueError, match='batch of 12 does not split into 5 micro-batches'):
        step_lib.microbatches(batch, 5)


class MeanSquaredEmbedding:
    """A loss that is a mean over examples: mean_i |e_img(i) - c|^2 + |e_txt(i)|^2 / 2."""

    fields = ('image', 'text')

    def __call__(self, model, batch, *, rng, train):
        del rng
        _, img = model.encode_image(batch['image'], train=train)
        _, txt = model.encode_text(batch['text'], train=train)
        per_example = jnp.square(img['img/emb'] - 0.3).sum(-1) + 0.5 * jnp.square(
            txt['txt/emb']
        ).sum(-1)
        return per_example.mean(), {'img_norm': jnp.linalg.norm(img['img/emb'], axis=-1).mean()}


def random_batch(config, n, seed=0):
    rng = np.random.default_rng(seed)
    s, l = config.input.image_size, config.input.context_length
    text = rng.integers(2, 258, (n, l)).astype(np.int32)
    lengths = rng.integers(3, l, n)
    text[np.arange(l)[None] >= lengths[:, None]] = 0  # padded after a variable length
    return {'image': rng.integers(0, 256, (n, s, s, 3)).astype(np.uint8), 'text': text}


def test_grad_accum_equals_full_batch():
    config = tiny_config()
    batch = random_batch(config, 16)

    def run(grad_accum):
        model = ImageTextModel(config.model, rngs=nnx.Rngs(0))
        # Plain SGD with lr 1: the parameter change *is* the gradient, so this compares gradients.
        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        before = jax.tree.map(np.asarray, leaves_by_name(nnx.to_pure_dict(state[0])))
        fn = jax.jit(
            step_lib.make_train_step(
                graphdef,
                MeanSquaredEmbedding(),
                lr_schedule=lambda s: 1.0,
                seed=0,
                grad_accum=grad_accum,
            )
        )
        state, metrics = fn(state, batch)
        after = jax.tree.map(np.asarray, leaves_by_name(nnx.to_pure_dict(state[0])))
        return before, after, jax.device_get(metrics)

    before, full, m1 = run(1)
    _, accum, m4 = run(4)
    assert math.isclose(m1['loss'], m4['loss'], rel_tol=1e-5), (m1['loss'], m4['loss'])
    assert math.isclose(m1['img_norm'], m4['img_norm'], rel_tol=1e-5)
    assert math.isclose(m1['grad_norm'], m4['grad_norm'], rel_tol=1e-5)
    assert m1['grad_norm'] > 0
    moved, worst = 0, 0.0
    for k in full:
        # lr 1: before - after is the gradient itself (in float64 to keep its digits).
        g_full = before[k].astype(np.float64) - full[k]
        g_accum = before[k].astype(np.float64) - accum[k]
        scale = np.abs(g_full).max()
        if scale == 0:
            np.testing.assert_array_equal(g_accum, 0, err_msg=k)
            continue
        moved += 1
        # Relative to the leaf's largest gradient: float32 sums in another order differ by ~1e-7.
        err = np.abs(g_accum - g_full).max() / scale
        worst = max(worst, err)
        assert err < 1e-5, (k, err)
    assert moved > 10  # the gradient reached both towers
    print(f'grad_accum=4 vs 1: max gradient difference {worst:.2e} of the leaf max')


def test_grad_accum_step_runs_on_real_model_with_adamw():
    """The jitted step as train.py builds it (shardings, donation), CLIP, grad_accum=2."""
    config = tiny_config('--config.grad_accum=2', '--config.total_steps=3')
    from pretrain.objectives import compose

    objective = compose.build_objective(config.objectives)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = train.init_train_state(config, mesh)
        sched = optim.schedule(config.optim, config.total_steps)
        fn = jax.jit(
            step_lib.make_train_step(
                graphdef,
                objective,
                lr_schedule=sched,
                seed=config.seed,
                grad_accum=config.grad_accum,
            ),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        losses = []
        for i in range(3):
            host_batch = random_batch(config, config.batch_size, seed=i)
            if i == 0:
                # CLIP under accumulation sees each strided micro-batch's own negatives (step.py):
                # the step's loss is the mean of the loss on rows 0,2,4,... and on rows 1,3,5,...
                loss_of = jax.jit(
                    lambda st, b: objective(nnx.merge(graphdef, st)[0], b, rng=None, train=True)[0]
                )
                want = np.mean(
                    [
                        float(loss_of(state, {k: v[j::2] for k, v in host_batch.items()}))
                        for j in range(2)
                    ]
                )
                full = float(loss_of(state, host_batch))
            batch = sharding.global_batch(host_batch, mesh)
            state, metrics = fn(state, batch)
            m = jax.device_get(metrics)
            assert np.isfinite(m['loss']) and np.isfinite(m['grad_norm']) and m['grad_norm'] > 0
            assert math.isclose(float(m['lr']), float(sched(i)), rel_tol=1e-6)
            losses.append(float(m['loss']))
        assert int(state[1]['step'][...]) == 3
        assert fn._cache_size() == 1
    assert math.isclose(losses[0], want, rel_tol=1e-5), (losses[0], want)
    assert not math.isclose(losses[0], full, rel_tol=1e-3)  # not the full-batch contrast
