"""model.remat='auto' (pretrain/auto_remat.py): the step without remat where XLA's memory
analysis says it fits the free device memory, else the fallback policy; the same losses
either way. The CPU backend reports no memory limit, so tests hand `choose` the free bytes."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.train_step import synthetic_batch
from conftest import F32_MATMULS, TINY
from pretrain import auto_remat, config_cli, sharding, train
from pretrain.objectives import compose


def tiny_config(*extra):
    overrides, _ = config_cli.parse_overrides(TINY + F32_MATMULS + list(extra))
    return config_cli.build_config('configs/clip.py', overrides)


def test_auto_without_a_memory_limit_is_none_without_a_trial_compile():
    built = []

    def build_step(name):
        built.append(name)
        return lambda *args: name

    name, step, report = auto_remat.choose(build_step, (), free_bytes=None)
    assert (name, step(), built) == ('none', 'none', ['none'])
    assert 'no memory limit' in report
    if jax.default_backend() == 'cpu':  # memory_stats() is None there
        assert auto_remat.free_device_bytes() is None


@pytest.fixture(scope='module')
def auto_step():
    """The tiny CLIP step's builder for remat 'auto' (each policy's jitted step built once),
    its state's arrays, a batch, the bytes the step without remat needs, and its loss."""
    config = tiny_config('--config.model.remat=auto', '--config.model.text.depth=2')
    mesh = sharding.make_mesh(config.mesh)
    objective = compose.build_objective(config.objectives)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = train.init_train_state(config, mesh)
        auto = train.make_train_step(config, graphdef, objective, shardings, mesh)
        build_step = functools.cache(auto.build_step)
        host = synthetic_batch(config, objective.fields, rows=config.batch_size)
        batch = sharding.global_batch(host, mesh)
        arrays = jax.tree.leaves(state)
        needs = auto_remat.step_bytes(build_step('none').lower(arrays, batch).compile())
        _, metrics = build_step('none')(copies(arrays), batch)
        yield build_step, arrays, batch, needs, float(metrics['loss']), mesh


def copies(arrays):
    return [jnp.array(a, copy=True) for a in arrays]  # the step donates its input


def test_the_candidates_are_different_programs(auto_step):
    # (Whether remat saves memory is XLA's business: on CPU, for models this small, its
    # memory analysis gives both the same temporaries.)
    build_step, arrays, batch, _, _, mesh = auto_step
    with jax.set_mesh(mesh):
        texts = [build_step(n).lower(arrays, batch).as_text() for n in ('none', 'nothing_saveable')]
    assert texts[0] != texts[1]
    assert auto_remat.FALLBACK == 'nothing_saveable'


@pytest.mark.parametrize('fits', [True, False])
def test_auto_picks_none_where_it_fits_else_the_fallback(auto_step, fits):
    build_step, arrays, batch, needs, plain_loss, mesh = auto_step
    # Free memory just above / just below what 'none' needs over FRACTION.
    free = int(needs / auto_remat.FRACTION) + (1024 if fits else -1024)
    said = []
    step = auto_remat.AutoRematStep(build_step, say=said.append, free_bytes=lambda: free)
    with jax.set_mesh(mesh):
        _, metrics = step(copies(arrays), batch)
    want = 'none' if fits else auto_remat.FALLBACK
    assert step.remat == want and step.step is build_step(want), said
    assert len(said) == 1 and said[0].startswith(f"model.remat=auto: '{want}'"), said
    assert f"'none' needs {needs / 2**30:.1f} GiB" in said[0], said
    # Remat changes memory, not numbers: the loss of the step without remat.
    np.testing.assert_allclose(float(metrics['loss']), plain_loss, rtol=1e-6)


def test_fallback_is_taken_even_when_nothing_fits():
    built = []

    class Step:
        def __init__(self, name):
            self.name = name

        def lower(self, *args):
            return self

        def compile(self):
            return self

        def memory_analysis(self):
            size = {'none': 100, auto_remat.FALLBACK: 50}[self.name]
            return types.SimpleNamespace(
                temp_size_in_bytes=size, output_size_in_bytes=0, alias_size_in_bytes=0
            )

    def build_step(name):
        built.append(name)
        return Step(name)

    name, _, report = auto_remat.choose(build_step, (), free_bytes=10)
    assert name == auto_remat.FALLBACK and built == ['none', auto_remat.FALLBACK]
    assert 'may not fit' in report and 'grad_accum' in report, report


def test_training_with_auto_on_cpu_says_what_it_chose(python, tmp_path):
    proc = python(
        ['-m', 'pretrain.main', '--config', 'configs/clip.py', '--workdir', str(tmp_path)]
        + TINY
        + ['--config.model.remat=auto', '--config.total_steps=2']
    )
    out = proc.stdout + proc.stderr
    assert "model.remat=auto: 'none' (the backend reports no memory limit)" in out, out[-2000:]
