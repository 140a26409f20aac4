"""Proof of learning: short runs of the shipped recipes beat random initialisation on every
evaluator, by margins stated here (issue 5).

The random-init figures come from the same config's model at step 0, scored by the same
evaluators on the same held-out scenes, so the margin is the training's, not the data's.
The trained figures are the run's own end-of-training evaluation row in metrics.jsonl.
"""

import json
import os

import jax
import pytest
from flax import nnx

from pretrain import config_cli, sharding, train
from pretrain.evaluators import build_evaluators, run_evaluators


def random_init_metrics(spec: str, overrides: list[str], names=None) -> dict:
    """The evaluators' row (`names` only, if given) for the config's model as initialised."""
    config = config_cli.build_config(spec, config_cli.parse_overrides(overrides)[0])
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, state, _ = train.init_train_state(config, mesh)
        model, _ = nnx.merge(graphdef, state)
        return run_evaluators(build_evaluators(config, names), model)


def trained_metrics(python, spec: str, overrides: list[str], workdir: str) -> dict:
    """Trains with the product's entry point; returns the final evaluation row."""
    python(
        ['-m', 'pretrain.main', '--config', spec, '--workdir', workdir, '--config.progress=false']
        + overrides
    )
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return next(r for r in reversed(rows) if 'eval/zeroshot/top1' in r)


def assert_beats(trained: dict, random: dict, margins: dict):
    report = {k: (round(random[k], 4), round(trained[k], 4), m) for k, m in margins.items()}
    for key, margin in margins.items():
        assert trained[key] >= random[key] + margin, f'{key}: (random, trained, margin) {report}'


# A very short default run: 30 steps of configs/dreamlip.py, judged on zero-shot and
# retrieval only (the cheap evaluators) on 256 eval scenes. ~45 s on 2 shared cores.
FAST = [
    '--config.total_steps=30',
    '--config.eval_every=30',
    '--config.checkpoint.every=1000',
    '--config.evals.zeroshot.num_examples=256',
    '--config.evals.retrieval.num_examples=256',
    # The run evaluates everything at its end; keep the two unscored evaluators small.
    '--config.evals.linear_probe.num_train=256',
    '--config.evals.linear_probe.num_val=128',
    '--config.evals.linear_probe.num_test=128',
    '--config.evals.dense_zeroshot.num_examples=64',
]


def test_very_short_default_run_beats_random_init(python, tmp_path):
    """30 steps in, colour is being learnt and retrieval has left chance; shape, R@1 and the
    48 classes have not moved yet (measured: 48-class top-1 1.2 -> 1.6%, i->t R@1 0 -> 0)."""
    spec = 'configs/dreamlip.py'
    random = random_init_metrics(spec, FAST, names=['zeroshot', 'retrieval'])
    trained = trained_metrics(python, spec, FAST, str(tmp_path / 'run'))
    assert_beats(
        trained,
        random,
        {
            # measured: colour top-1 10.2 -> 21.1%, text->image R@10 3.5 -> 13.7%
            'eval/zeroshot/colour_top1': 0.05,
            'eval/retrieval/t2i_r10': 0.05,
        },
    )


# Margins for the config's default run (400 steps), about half of what it measured over
# random init (2 shared cores, benchmarks/results/ablation_dreamlip.json); random init scores
# zero-shot 1.6%, colour 9.6%, R@1 0.2 / 0.0%, probe 16.4% (colour is linear even in random
# features), dense object-patch accuracy 2.7% and mIoU 0.7%.
# Dense mIoU is not asserted: no tiny recipe gets it off the all-background floor in 400
# steps (trained 0.7-1.4%); object-patch accuracy is the dense figure that moves. These
# runs are variants (d) and (b) of benchmarks/ablation_dreamlip.py (same command and seed).
SLOW_MARGINS = {
    # measured at step 400: zero-shot 14.8, colour 70.5, R@1 16.0 / 13.1, probe 20.4, obj 6.6
    'configs/dreamlip.py': {
        'eval/zeroshot/top1': 0.07,
        'eval/zeroshot/colour_top1': 0.3,
        'eval/retrieval/i2t_r1': 0.08,
        'eval/retrieval/t2i_r1': 0.06,
        'eval/linear_probe/top1': 0.02,  # the probe on trained features beats random-init's
        'eval/dense_zeroshot/object_patch_acc': 0.02,
    },
    # measured at step 400: zero-shot 20.1, colour 68.4, R@1 21.9 / 22.9, probe 19.4, obj 16.9
    'configs/quality_captions.py': {
        'eval/zeroshot/top1': 0.07,
        'eval/zeroshot/colour_top1': 0.3,
        'eval/retrieval/i2t_r1': 0.08,
        'eval/retrieval/t2i_r1': 0.06,
        'eval/linear_probe/top1': 0.02,
        'eval/dense_zeroshot/object_patch_acc': 0.02,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize('spec', sorted(SLOW_MARGINS))
def test_default_run_beats_random_init_on_every_evaluator(python, tmp_path, spec):
    """The tiny recipe's default run against its step-0 model: every evaluator improves."""
    random = random_init_metrics(spec, [])
    trained = trained_metrics(python, spec, [], str(tmp_path / 'run'))
    assert_beats(trained, random, SLOW_MARGINS[spec])
