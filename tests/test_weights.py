"""Public weight layouts load into ImageTextModel and give the reference library's outputs.

The fixtures in tests/fixtures/weights/ were written by tests/fixtures/make_weight_fixtures.py
from tiny randomly initialised models built by transformers / open_clip themselves (every
parameter perturbed), with those libraries' embeddings for fixed inputs. No torch here.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import F32_MATMULS
from configs import common
from pretrain import weights
from pretrain.weights import exported

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'weights')
CLIP_MEAN = tuple(round(255 * m, 6) for m in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(round(255 * s, 6) for s in (0.26862954, 0.26130258, 0.27577711))


def tiny_config(**knobs):
    """The fixtures' size (width 32, 2 blocks, 2 heads, mlp 64, 16 px / patch 8, vocab 64,
    8 positions) with the layout's knobs as `--config.model.*` overrides would set them."""
    config = common.model_config(
        image=common.vit_config('mu', patch=8, image_size=16),
        text=common.text_config('mu', context_length=8, vocab_size=64),
        embed_dim=16,
    )
    for tower in (config.image, config.text):
        tower.width, tower.depth, tower.heads, tower.mlp_ratio = 32, 2, 2, 2.0
    for key, value in knobs.items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


CLIP_KNOBS = {
    'image.ln_pre': True,
    'image.patch_bias': False,
    'image.ln_eps': 1e-5,
    'text.ln_eps': 1e-5,
    'text.pool': 'argmax',
    'image.pixel_mean': CLIP_MEAN,
    'image.pixel_std': CLIP_STD,
}
SIGLIP_KNOBS = {
    'image.pool': 'map',
    'text.causal': False,
    'text.mask_padding': False,
    'text.pool': 'last',
    'text.pad_id': 1,
    'image_proj': 'none',
    'proj_bias': True,
    'embed_dim': 32,
}
LAYOUTS = {
    'hf_clip': (
        'hf_clip',
        {**CLIP_KNOBS, 'image.activation': 'quick_gelu', 'text.activation': 'quick_gelu'},
    ),
    'open_clip': (
        'open_clip',
        {**CLIP_KNOBS, 'image.activation': 'gelu', 'text.activation': 'gelu'},
    ),
    'hf_siglip': ('hf_siglip', SIGLIP_KNOBS),
    'big_vision': ('big_vision/siglip.npz', SIGLIP_KNOBS),
}


def imported(fmt):
    path, knobs = LAYOUTS[fmt]
    config = tiny_config(**knobs)
    model = exported.build_model(config, seed=1)
    weights.import_weights(model, config, fmt, os.path.join(FIXTURES, path))
    return config, model


def reference(fmt):
    return np.load(os.path.join(FIXTURES, fmt.split('/')[0], 'reference.npz'))


@pytest.mark.parametrize('fmt', list(LAYOUTS))
def test_import_matches_reference_embeddings(fmt):
    _, model = imported(fmt)
    ref = reference(fmt)
    zimg, img_aux = model.encode_image(jnp.asarray(ref['images']))
    ztxt, txt_aux = model.encode_text(jnp.asarray(ref['tokens']))
    scale = np.abs(ref['img_feat']).max()
    assert scale > 0.5  # the reference features are not trivially small
    np.testing.assert_allclose(
        np.asarray(img_aux['img/emb']), ref['img_feat'], atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(txt_aux['txt/emb']), ref['txt_feat'], atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(zimg), ref['img_emb'], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ztxt), ref['txt_emb'], atol=1e-4)


def test_wrong_knob_is_refused_with_the_override_to_set():
    """A CLIP config with SigLIP's gelu would load and compute something else: refused."""
    config = tiny_config(**{**LAYOUTS['hf_clip'][1], 'image.activation': 'gelu_tanh'})
    model = exported.build_model(config)
    with pytest.raises(weights.WeightsError, match='--config.model.image.activation=quick_gelu'):
        weights.import_weights(model, config, 'hf_clip', os.path.join(FIXTURES, 'hf_clip'))


def test_bad_keys_are_listed(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = load_file(os.path.join(FIXTURES, 'hf_clip', 'model.safetensors'))
    del src['text_model.final_layer_norm.bias']
    del src['vision_model.encoder.layers.1.mlp.fc2.weight']
    src['vision_model.extra_head.weight'] = np.zeros((2, 2), np.float32)
    d = tmp_path / 'clip'
    shutil.copytree(os.path.join(FIXTURES, 'hf_clip'), d)
    save_file(src, str(d / 'model.safetensors'))
    config = tiny_config(**LAYOUTS['hf_clip'][1])
    model = exported.build_model(config)
    before = np.asarray(model.text.tok[...]).copy()
    with pytest.raises(weights.WeightsError) as e:
        weights.import_weights(model, config, 'hf_clip', str(d))
    msg = str(e.value)
    for key in (
        'text_model.final_layer_norm.bias',
        'vision_model.encoder.layers.1.mlp.fc2.weight',
        'vision_model.extra_head.weight',
    ):
        assert key in msg
    np.testing.assert_array_equal(np.asarray(model.text.tok[...]), before)  # nothing written


def test_mis_shaped_and_extra_layers_are_listed():
    """A model of 1 block and another vocabulary than the file: every misfit is named."""
    config = tiny_config(**LAYOUTS['hf_siglip'][1])
    config.image.depth = 1
    config.text.vocab_size = 50
    model = exported.build_model(config)
    with pytest.raises(weights.WeightsError) as e:
        weights.import_weights(model, config, 'hf_siglip', os.path.join(FIXTURES, 'hf_siglip'))
    msg = str(e.value)
    assert 'unknown keys: vision_model.encoder.layers.1.' in msg
    config.image.depth = 2
    model = exported.build_model(config)
    with pytest.raises(weights.WeightsError, match=r'text.tok \(64, 32\) vs model \(50, 32\)'):
        weights.import_weights(model, config, 'hf_siglip', os.path.join(FIXTURES, 'hf_siglip'))


def test_big_vision_scanned_blocks_load_the_same(tmp_path):
    """big_vision's scan=True stacks the blocks as 'encoderblock/...' on a leading axis."""
    with np.load(os.path.join(FIXTURES, 'big_vision', 'siglip.npz')) as f:
        arrays = {k: f[k] for k in f.files}
    scanned = {}
    for k, v in arrays.items():
        if '/encoderblock_0/' in k:
            rest = [arrays[k.replace('/encoderblock_0/', f'/encoderblock_{i}/')] for i in range(2)]
            scanned[k.replace('/encoderblock_0/', '/encoderblock/')] = np.stack(rest)
        elif '/encoderblock_' not in k:
            scanned[k] = v
    np.savez(tmp_path / 'scanned.npz', **scanned)
    config, model = imported('big_vision')
    other = exported.build_model(config, seed=2)
    weights.import_weights(other, config, 'big_vision', str(tmp_path / 'scanned.npz'))
    for k, v in exported.flat_params(model).items():
        np.testing.assert_array_equal(exported.flat_params(other)[k], v)


def test_unknown_format_and_pickle_are_refused(tmp_path):
    config = tiny_config()
    with pytest.raises(weights.WeightsError, match='valid: export, hf_clip'):
        weights.convert('timm', str(tmp_path), config)
    (tmp_path / 'model.bin').write_bytes(b'\x80\x04')
    with pytest.raises(weights.WeightsError, match='pickle is refused'):
        weights.convert('open_clip', str(tmp_path / 'model.bin'), config)


@pytest.mark.parametrize('fmt', ['hf_clip', 'hf_siglip'])
def test_hf_export_round_trips(fmt, tmp_path):
    config, model = imported(fmt)
    out = weights.save_hf(str(tmp_path / fmt), model, config, fmt)
    again = exported.build_model(config, seed=3)
    weights.import_weights(again, config, fmt, out)
    a, b = exported.flat_params(model), exported.flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    # The file has the layout's own keys: the same set as the fixture written by transformers.
    from safetensors.numpy import load_file

    theirs = load_file(os.path.join(FIXTURES, fmt, 'model.safetensors'))
    ours = load_file(os.path.join(out, 'model.safetensors'))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_hf_export_writes_sincos2d_positions_as_the_learned_table(tmp_path):
    """A model with fixed sincos2d positions exports to HF CLIP (which has a learned table)
    and comes back as a 'learn' model with the same embeddings; importing HF weights into a
    sincos2d model is refused with the override to set."""
    path, knobs = LAYOUTS['hf_clip']
    config = tiny_config(**knobs)
    config.image.posemb = 'sincos2d'
    model = exported.build_model(config, seed=4)
    out = weights.save_hf(str(tmp_path / 'hf'), model, config, 'hf_clip')
    with pytest.raises(weights.WeightsError, match='image.posemb=learn'):
        weights.import_weights(exported.build_model(config), config, 'hf_clip', out)
    learned = tiny_config(**knobs)
    again = exported.build_model(learned, seed=5)
    weights.import_weights(again, learned, 'hf_clip', out)
    size = config.image.image_size
    image = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        np.asarray(again.encode_image(jnp.asarray(image))[0]),
        np.asarray(model.encode_image(jnp.asarray(image))[0]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_export_refuses_a_model_of_another_layout():
    config = tiny_config()  # this codebase's default ViT: patch bias, no ln_pre
    model = exported.build_model(config)
    with pytest.raises(weights.WeightsError, match='image.ln_pre=True'):
        weights.export_hf(model, config, 'hf_clip')


def test_config_init_loads_a_layout_into_the_train_state():
    """`config.init` (format + path) is applied to a fresh train state, each parameter with
    its sharding; the embeddings are the reference library's."""
    import jax
    from flax import nnx

    from configs import clip
    from pretrain import sharding, train

    config = clip.get_config()
    config.model = tiny_config(**LAYOUTS['hf_clip'][1])
    config.init.format, config.init.path = 'hf_clip', os.path.join(FIXTURES, 'hf_clip')
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = train.init_train_state(config, mesh)
        state = weights.maybe_load_init(config, state, shardings)
        model, _ = nnx.merge(graphdef, state)
        ref = reference('hf_clip')
        zimg, _ = model.encode_image(jnp.asarray(ref['images']))
        ztxt, _ = model.encode_text(jnp.asarray(ref['tokens']))
    np.testing.assert_allclose(np.asarray(zimg), ref['img_emb'], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ztxt), ref['txt_emb'], atol=1e-4)
    # The default (no init) leaves the state as it was created.
    config.init.format = ''
    assert weights.maybe_load_init(config, state, shardings) is state


def test_dense_readout_rebuilds_an_imported_clip_vit():
    """The dense evaluator re-runs the ViT up to its last block; with CLIP's ln_pre it must
    still give back the model's own tokens (else dense eval of imported CLIP is wrong)."""
    from pretrain.evaluators import dense_zeroshot

    _, model = imported('hf_clip')
    vit, images = model.image, jnp.asarray(reference('hf_clip')['images'])
    _, aux = model.encode_image(images)
    x = dense_zeroshot.tokens_before_last_block(vit, images)
    rebuilt = vit.ln(vit.encoder.blocks[-1](x))[:, 1:]
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(aux['img/tokens']), atol=1e-5)


@pytest.mark.parametrize('fmt', list(LAYOUTS))
def test_printed_overrides_build_the_model_of_the_weights(fmt):
    """`python -m pretrain.weights FORMAT PATH` prints overrides that, applied to a shipped
    config, give a model the weights load into and that matches the reference."""
    from pretrain import config_cli

    path = os.path.join(FIXTURES, LAYOUTS[fmt][0])
    overrides = weights.overrides(fmt, path) + F32_MATMULS  # f32, to match the reference
    config = config_cli.build_config('configs/clip.py', config_cli.parse_overrides(overrides)[0])
    model = exported.build_model(config.model)
    weights.import_weights(model, config.model, fmt, path)
    ref = reference(fmt)
    zimg, _ = model.encode_image(jnp.asarray(ref['images']))
    np.testing.assert_allclose(np.asarray(zimg), ref['img_emb'], atol=1e-4)
