"""Distributed-training contracts: mesh parsing, parameter shardings, and mesh independence.

The headline test trains the same tiny CLIP (same seed, same loader batches) on 1 CPU
device, on 8 devices as data=2,fsdp=2,tensor=2 and as data=8, and asserts that losses,
gradients and final parameters agree, that the jitted step compiles once, and that init is
bitwise identical. The device count is fixed when JAX starts, so each count runs in its own
process (tests/mesh_run.py); the two processes run concurrently.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from conftest import F32_MATMULS, ROOT, TINY
from pretrain import config_cli, sharding, train
from pretrain.models import layers

STEPS = 8


# The shapes below rely on these widths; pinned here in case TINY changes.
PIN = [
    '--config.model.image.width=32',
    '--config.model.text.width=32',
    '--config.model.image.heads=2',
    '--config.model.text.heads=2',
]


def tiny_config(*extra):
    overrides, _ = config_cli.parse_overrides(TINY + PIN + F32_MATMULS + list(extra))
    return config_cli.build_config('configs/clip.py', overrides)


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


# -- mesh shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'sizes,devices,want',
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((1, 1, -1), 4, (1, 1, 4)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((-1, 1, 1), 1, (1, 1, 1)),
        ((1, 2, 1), 2, (1, 2, 1)),
    ],
)
def test_mesh_shape(sizes, devices, want):
    assert sharding.mesh_shape(dict(zip(sharding.AXES, sizes)), devices) == want


@pytest.mark.parametrize(
    'sizes,devices,message',
    [
        (
            (-1, -1, 1),
            8,
            r"at most one axis may be -1, got \{'data': -1, 'fsdp': -1, 'tensor': 1\}",
        ),
        ((2, 2, 1), 8, r"needs 4 devices, 8 are present"),
        ((2, 2, 4), 8, r"needs 16 devices, 8 are present"),
        ((3, -1, 1), 8, r"mesh \{'data': 3, 'fsdp': -1, 'tensor': 1\} does not divide 8 devices"),
        ((1, 1, 2), 1, r"needs 2 devices, 1 are present"),
    ],
)
def test_mesh_shape_errors(sizes, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(dict(zip(sharding.AXES, sizes)), devices)


@pytest.mark.parametrize('sizes', [(-2, -1, 1), (0, -1, 1), (-2, -4, 1)])
def test_mesh_shape_rejects_non_positive_sizes(sizes):
    with pytest.raises(ValueError, match='-1 or a positive'):
        sharding.mesh_shape(dict(zip(sharding.AXES, sizes)), 8)


def test_make_mesh_axes_are_auto():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    assert mesh.axis_names == sharding.AXES and tuple(mesh.devices.shape) == (1, 1, 1)
    assert all(t == AxisType.Auto for t in mesh.axis_types)  # DESIGN.md: Explicit breaks patchify
    assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
    assert sharding.replicated(mesh).spec == P()


# -- parameter shardings (abstract meshes: no devices needed) ------------------------------


def abstract_mesh(sizes):
    return AbstractMesh(tuple(sizes), sharding.AXES, axis_types=(AxisType.Auto,) * 3)


def abstract_train_state(config):
    """What init_train_state reads the logical axes from, without creating anything."""
    with nnx.use_eager_sharding(False), nnx.logical_axis_rules(config.mesh.rules):
        return nnx.split(nnx.eval_shape(lambda: train.create_model_and_optimizer(config)))[1]


def specs_by_name(shardings):
    out = {}
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        names = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
        names = [n for n in names if n != 'value']
        out['/'.join(names)] = tuple(s.spec)
    return out


def normalise(spec):
    """P('a', None) and P('a') place an array alike; compare without trailing Nones."""
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


@pytest.fixture(scope='module')
def tiny_abstract():
    config = tiny_config()
    return config, abstract_train_state(config)


def test_state_shardings_on_2x2x2(tiny_abstract):
    config, abstract = tiny_abstract
    specs = specs_by_name(
        sharding.state_shardings(abstract, abstract_mesh((2, 2, 2)), config.mesh.rules)
    )
    blk = 'image/encoder/blocks/0'
    want = {
        f'0/{blk}/mlp/fc1/kernel': ('fsdp', 'tensor'),  # (embed, mlp)
        f'0/{blk}/mlp/fc2/kernel': ('tensor', 'fsdp'),  # (mlp, embed)
        f'0/{blk}/attn/qkv/kernel': ('fsdp', 'tensor'),
        f'0/{blk}/attn/out/kernel': ('tensor', 'fsdp'),
        f'0/{blk}/mlp/fc1/bias': ('tensor',),
        f'0/{blk}/ln1/scale': (),  # norms replicated
        f'0/{blk}/ln2/bias': (),
        '0/image/ln/scale': (),
        '0/text/tok': ('tensor', 'fsdp'),  # 258 rows split in 2: fine
        '0/image/pos': (None, 'fsdp'),
        '0/image_proj/kernel': ('fsdp',),
        '0/logit_scale': (),
        # Adam moments follow their parameters; counters replicated.
        f'1/opt_state/1/mu/{blk}/mlp/fc1/kernel': ('fsdp', 'tensor'),
        f'1/opt_state/1/nu/{blk}/mlp/fc1/kernel': ('fsdp', 'tensor'),
        '1/opt_state/1/nu/text/tok': ('tensor', 'fsdp'),
        '1/opt_state/1/count': (),
        '1/step': (),
    }
    for name, spec in want.items():
        assert normalise(specs[name]) == spec, (name, specs[name])
    # Every Adam moment is placed exactly as its parameter.
    for name, spec in specs.items():
        for moment in ('mu', 'nu'):
            prefix = f'1/opt_state/1/{moment}/'
            if name.startswith(prefix):
                assert spec == specs['0/' + name[len(prefix) :]], name
    # Something substantial is sharded over both model axes.
    both = [n for n, s in specs.items() if 'fsdp' in s and 'tensor' in s and n.startswith('0/')]
    assert len(both) >= 8, both


def test_state_shardings_fall_back_to_replication():
    config = tiny_config('--config.input.tokenizer=bytes', '--config.model.text.vocab_size=258')
    abstract = abstract_train_state(config)
    # tensor=4 does not divide the 258-token byte vocabulary: that dimension is replicated,
    # the embedding dimension stays split over fsdp. The 32-wide kernels still split 4-way.
    specs = specs_by_name(
        sharding.state_shardings(abstract, abstract_mesh((1, 2, 4)), config.mesh.rules)
    )
    assert normalise(specs['0/text/tok']) == (None, 'fsdp')
    assert normalise(specs['1/opt_state/1/mu/text/tok']) == (None, 'fsdp')
    assert normalise(specs['0/image/encoder/blocks/0/attn/qkv/kernel']) == ('fsdp', 'tensor')
    # fsdp=3 divides none of the model-width (32) dimensions: nothing is split at all.
    specs = specs_by_name(
        sharding.state_shardings(abstract, abstract_mesh((1, 3, 1)), config.mesh.rules)
    )
    assert all('fsdp' not in s for s in specs.values()), specs


def test_state_shardings_odd_shapes_and_tuple_axes():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.a = layers.param(rngs, layers.zeros, (3, 8), ('embed', 'mlp'))  # 3 % 2 != 0
            self.b = layers.param(rngs, layers.zeros, (6, 5), ('embed', 'mlp'))  # 5 % 2 != 0
            self.c = layers.param(rngs, layers.zeros, (4, 8), ('batchy', 'mlp'))  # tuple rule
            self.d = layers.param(rngs, layers.zeros, (6, 8), ('batchy', None))  # 6 % 4 != 0

    rules = (('embed', 'fsdp'), ('mlp', 'tensor'), ('batchy', ('data', 'fsdp')))
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: Odd(nnx.Rngs(0))))
    specs = specs_by_name(sharding.state_shardings(state, abstract_mesh((2, 2, 2)), rules))
    assert normalise(specs['a']) == (None, 'tensor')
    assert normalise(specs['b']) == ('fsdp',)
    assert normalise(specs['c']) == (('data', 'fsdp'), 'tensor')
    assert normalise(specs['d']) == ()


# -- 1 vs 8 devices: the same run ----------------------------------------------------------


def _launch(devices, meshes):
    env = dict(os.environ)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    env['JAX_PLATFORMS'] = 'cpu'
    args = [
        sys.executable,
        os.path.join(ROOT, 'tests', 'mesh_run.py'),
        f'--steps={STEPS}',
        *(f'--mesh={m}' for m in meshes),
        *TINY,
        *PIN,
        *F32_MATMULS,
    ]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _report(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f'mesh_run exit {proc.returncode}\nstdout:\n{out[-4000:]}\n' f'stderr:\n{err[-4000:]}'
        )
    line = [l for l in out.splitlines() if l.startswith('MESH_RUN_JSON ')][-1]
    return json.loads(line[len('MESH_RUN_JSON ') :])


@pytest.fixture(scope='module')
def runs():
    """{'1': single device, '222': 2x2x2, '8': data=8, plus grad_accum=2 on 1 and 2x2x2}."""
    eight = _launch(8, ['2,2,2', '8,1,1', '2,2,2:2'])
    one = _launch(1, ['-1,1,1', '-1,1,1:2'])
    try:
        r1, r8 = _report(one), _report(eight)
    finally:
        for proc in (one, eight):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert r1['device_count'] == 1 and r8['device_count'] == 8
    named = {
        '1': r1['runs'][0],
        '1:2': r1['runs'][1],
        '222': r8['runs'][0],
        '8': r8['runs'][1],
        '222:2': r8['runs'][2],
    }
    assert named['222']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert named['8']['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
    assert named['222:2']['grad_accum'] == 2 and named['1:2']['grad_accum'] == 2
    return named


def test_same_batches_and_same_init_on_every_mesh(runs):
    base = runs['1']
    for name, run in runs.items():
        assert run['batch_digests'] == base['batch_digests'], name
        # Same seed, sharded or not: bitwise identical parameters.
        assert run['init_digest'] == base['init_digest'], name
    assert len(set(base['batch_digests'])) == STEPS  # a new batch every step


@pytest.mark.parametrize('mesh', ['222', '8'])
def test_losses_agree_with_single_device(runs, mesh):
    a, b = runs['1'], runs[mesh]
    diffs = [rel(x, y) for x, y in zip(a['losses'], b['losses'])]
    gdiffs = [rel(x, y) for x, y in zip(a['grad_norms'], b['grad_norms'])]
    print(
        f'\n1 vs {mesh}: loss rel diff step 1 {diffs[0]:.2e}, max {max(diffs):.2e}; '
        f'grad-norm max {max(gdiffs):.2e}'
    )
    assert len(diffs) == STEPS
    assert diffs[0] <= 1e-5, diffs
    assert max(diffs) <= 1e-3, diffs
    assert max(gdiffs) <= 1e-3, gdiffs
    assert a['losses'][-1] < a['losses'][0] - 0.3  # it trains: equality is not of a constant


@pytest.mark.parametrize('mesh', ['222', '8'])
def test_final_parameters_agree_with_single_device(runs, mesh):
    a, b = runs['1']['final_norms'], runs[mesh]['final_norms']
    assert a.keys() == b.keys()
    worst = max(rel(a[k], b[k]) for k in a)
    print(
        f'\n1 vs {mesh}: final per-parameter norm rel diff max {worst:.2e}, '
        f"global {rel(a['global'], b['global']):.2e}"
    )
    assert rel(a['global'], b['global']) <= 1e-4
    assert worst <= 1e-3
    assert runs[mesh]['final_digest'] != runs[mesh]['init_digest']  # parameters moved


def test_grad_accum_agrees_across_meshes(runs):
    a, b = runs['1:2'], runs['222:2']
    diffs = [rel(x, y) for x, y in zip(a['losses'], b['losses'])]
    print(f'\ngrad_accum=2, 1 vs 222: loss rel diff step 1 {diffs[0]:.2e}, max {max(diffs):.2e}')
    assert diffs[0] <= 1e-5 and max(diffs) <= 1e-3, diffs
    # CLIP under accumulation contrasts within micro-batches: a different loss than full batch.
    assert rel(a['losses'][0], runs['1']['losses'][0]) > 1e-3


@pytest.mark.parametrize('mesh', ['222', '8', '222:2', '1'])
def test_train_step_compiles_once(runs, mesh):
    compiles = runs[mesh]['compiles']
    print(f'\n{mesh}: {compiles}')
    assert compiles['step1'] == 1, compiles  # the counter sees the first compilation ...
    assert compiles['after_step1'] == 0, compiles  # ... and no recompile in steps 2..8
    assert compiles['cache_size'] == 1, compiles
    assert runs[mesh]['state_shardings_kept']


def test_parameters_are_sharded_on_devices(runs):
    got = runs['222']['shardings']
    # (global shape, per-device shard shape) on the 2x2x2 mesh.
    assert got['image/encoder/blocks/0/mlp/fc1/kernel']['shape'] == [32, 128]
    assert got['image/encoder/blocks/0/mlp/fc1/kernel']['shard_shape'] == [16, 64]
    assert got['image/encoder/blocks/0/mlp/fc1/kernel']['spec'][:2] == ['fsdp', 'tensor']
    assert got['image/encoder/blocks/0/attn/out/kernel']['shard_shape'] == [16, 16]
    assert got['text/tok']['shard_shape'] == [512, 16]  # 1,024 shapes BPE ids / tensor 2
    assert got['image/encoder/blocks/0/ln1/scale']['shard_shape'] == [32]  # replicated
    assert got['logit_scale']['shard_shape'] == []
    # data=8 alone shards no parameter (pure data parallelism).
    for name, s in runs['8']['shardings'].items():
        assert s['shard_shape'] == s['shape'], name
