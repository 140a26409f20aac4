"""pretrain.export: a trained checkpoint -> safetensors + JSON that load back to the same
model, evaluate, and initialise a new run; pretrain.evaluate reads the run's own config."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, read_metrics, run_python
from pretrain import config_cli, evaluate, export, sharding, train, weights

SMALL_EVALS = [
    '--config.evals.zeroshot.num_examples=16',
    '--config.evals.retrieval.num_examples=16',
]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 2-step tiny CLIP run (in this process: no extra JAX start-up), and its export."""
    root = tmp_path_factory.mktemp('export')
    wd, dst = str(root / 'run'), str(root / 'export')
    config = config_cli.build_config('configs/clip.py', config_cli.parse_overrides(TINY)[0])
    with config.unlocked():
        config.total_steps = 2
    train.run(config, wd)
    export.export(wd, dst)
    return wd, dst


def batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    tokens = rng.integers(2, 258, (3, 32)).astype(np.int32)
    tokens[:, 20:] = 0
    return jnp.asarray(images), jnp.asarray(tokens)


def test_export_files_and_reload_give_the_checkpoint_model(run):
    wd, dst = run
    assert sorted(os.listdir(dst)) == ['config.json', 'model.safetensors']
    with open(os.path.join(dst, 'config.json')) as f:
        meta = json.load(f)
    assert meta['format'] == 'pretrain.export' and meta['step'] == 2
    assert meta['model']['image']['width'] == 32  # the run's overrides, not the file's defaults

    from safetensors.numpy import load_file

    keys = set(load_file(os.path.join(dst, 'model.safetensors')))
    assert {'logit_scale', 'logit_bias', 'image_proj.kernel', 'text.tok'} <= keys
    assert not any('opt_state' in k or k.startswith('1.') for k in keys)  # no optimizer

    model_config, model = weights.load_exported(dst)
    config = export.read_run_config(wd)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        ckpt_model = evaluate.restore_model(config, wd, 2, mesh)
    images, tokens = batch()
    (zi, zt), _ = model(images, tokens)
    (ci, ct), _ = ckpt_model(images, tokens)
    np.testing.assert_array_equal(np.asarray(zi), np.asarray(ci))
    np.testing.assert_array_equal(np.asarray(zt), np.asarray(ct))
    # Trained, not the init: step-2 parameters differ from a fresh model of that config.
    fresh = weights.exported.build_model(model_config, seed=0)
    assert not np.array_equal(np.asarray(fresh.image.pos[...]), np.asarray(model.image.pos[...]))
    assert float(model.logit_scale[...]) == float(ckpt_model.logit_scale[...])


def test_evaluate_an_export_and_a_workdir_without_config(run, capsys):
    wd, dst = run
    assert (
        evaluate.main(['--weights', dst, '--workdir', wd, '--only', 'zeroshot', *SMALL_EVALS]) == 0
    )
    out = capsys.readouterr().out
    assert 'step 2' in out and 'eval/zeroshot/top1' in out
    row = read_metrics(wd)[-1]
    assert row['step'] == 2 and 0 <= row['eval/zeroshot/top1'] <= 1
    # The checkpoint itself, with no --config and none of the training overrides repeated.
    assert evaluate.main(['--workdir', wd, '--only', 'retrieval', *SMALL_EVALS]) == 0
    assert 'eval/retrieval/i2t_r1' in read_metrics(wd)[-1]


def test_init_from_an_export_fills_the_train_state(run):
    wd, dst = run
    config = export.read_run_config(wd)
    with config.unlocked():
        config.init.format, config.init.path = 'export', dst
        config.seed = 5  # a different random init underneath
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        _, state, shardings = train.init_train_state(config, mesh)
        state = weights.maybe_load_init(config, state, shardings)
    from flax import nnx
    from safetensors.numpy import load_file

    want = load_file(os.path.join(dst, 'model.safetensors'))
    got = {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state[0])}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Same shapes, another function: refused, naming the override that would match.
    with config.unlocked():
        config.model.image.activation = 'gelu'
    with pytest.raises(weights.WeightsError, match='--config.model.image.activation=gelu_tanh'):
        weights.maybe_load_init(config, state, shardings)


def test_evaluate_an_export_needs_evaluators_from_somewhere(run, capsys):
    _, dst = run
    assert evaluate.main(['--weights', dst]) == 2
    assert 'pass --config' in capsys.readouterr().err


def test_export_errors_are_one_line(tmp_path, run):
    wd, _ = run
    for args, message in (
        (['--workdir', str(tmp_path / 'missing')], 'does not exist'),
        (['--workdir', wd, '--step', '7'], 'no checkpoint for step 7'),
    ):
        proc = run_python(
            ['-m', 'pretrain.export', *args, '--out', str(tmp_path / 'o')], check=False, timeout=120
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'o')
