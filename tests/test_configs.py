"""Every shipped config builds with every documented variant, and its model initialises."""

import glob
import importlib.util
import os

import jax
import pytest
from flax import nnx

from conftest import ROOT
from pretrain import config_cli
from pretrain.models.towers import ImageTextModel
from pretrain.objectives import compose

CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'common.py')
)


def variants(path):
    spec = importlib.util.spec_from_file_location('cfg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_builds_and_model_shapes_resolve(path):
    for variant in variants(path):
        config = config_cli.build_config(f'{path}:{variant}', [])
        assert config.is_locked
        objective = compose.build_objective(config.objectives)
        assert 'image' in objective.fields
        # Abstract init: checks every size in the config fits together without allocating.
        model = nnx.eval_shape(lambda: ImageTextModel(config.model, rngs=nnx.Rngs(0)))
        assert model.image_proj.kernel.shape == (config.model.image.width, config.model.embed_dim)
        assert (
            config.input.subcaption_context_length <= config.model.text.context_length
            or 'texts' not in objective.fields
        )
        assert config.batch_size % jax.device_count() == 0


def test_b16_is_the_real_scale_run():
    config = config_cli.build_config(os.path.join(ROOT, 'configs/clip.py:b16'), [])
    assert (
        config.model.image.width,
        config.model.image.depth,
        config.model.image.patch,
        config.model.image.image_size,
    ) == (768, 12, 16, 224)
    assert config.model.dtype == 'bfloat16'


def test_command_line_adds_an_objective_next_to_the_configs_own():
    overrides = [
        ('objectives.siglip.weight', '0.5'),
        ('objectives.siglip.chunk_size', '8'),
        ('objectives.sig_alt.kind', 'siglip'),
        ('objectives.sig_alt.weight', '0.25'),
        ('objectives.sig_alt.text_field', 'alt_text'),
    ]
    config = config_cli.build_config(os.path.join(ROOT, 'configs/clip.py'), overrides)
    assert config.objectives.siglip.to_dict() == {'weight': 0.5, 'chunk_size': 8}
    assert config.objectives.sig_alt.text_field == 'alt_text'
    objective = compose.build_objective(config.objectives)
    assert [(name, weight) for name, _, weight, _ in objective.terms] == [
        ('clip', 1.0),
        ('sig_alt', 0.25),
        ('siglip', 0.5),
    ]
    assert objective.terms[2][3].chunk_size == 8
    assert objective.fields == ('image', 'text', 'alt_text')

    # The config file's own entries stay locked; a new entry's options are checked where it
    # is built, so a misspelling is still a one-line error.
    with pytest.raises(config_cli.ConfigError, match="unknown config key 'objectives.clip.wieght'"):
        config_cli.build_config(
            os.path.join(ROOT, 'configs/clip.py'), [('objectives.clip.wieght', '1')]
        )
    config = config_cli.build_config(
        os.path.join(ROOT, 'configs/clip.py'),
        [('objectives.siglip.weight', '1'), ('objectives.siglip.chunk_sise', '8')],
    )
    with pytest.raises(ValueError, match=r"unknown siglip option\(s\) \['chunk_sise'\]"):
        compose.build_objective(config.objectives)
    # Only `section.name.option` under an open section: anything else is locked as before.
    for key in ('objectives.siglip', 'optim.new.key', 'objectives.a.b.c'):
        with pytest.raises(config_cli.ConfigError, match='unknown config key'):
            config_cli.build_config(os.path.join(ROOT, 'configs/clip.py'), [(key, '1')])
