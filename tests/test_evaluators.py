"""Evaluators: every metric against an independent numpy computation on hand-built cases, the
dense scorer on features whose answer is known, every evaluator end to end on a random tiny
model (1 device, and 1 vs 8 devices), and `python -m pretrain.evaluate` on a real workdir."""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import clip
from conftest import TINY, read_metrics
from input_pipeline.sources import shapes
from pretrain import sharding, train
from pretrain.evaluators import build_evaluators, common, run_evaluators
from pretrain.evaluators import dense_zeroshot as dz
from pretrain.evaluators import linear_probe as lp
from pretrain.evaluators import retrieval as rt
from pretrain.evaluators import zeroshot as zs

# --- metrics against numpy references --------------------------------------------------


def np_topk(scores, labels, k):
    top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    return np.mean([labels[i] in top[i] for i in range(len(labels))])


def test_topk_accuracy_matches_numpy():
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.1, 0.2], [0.2, 0.3, 0.1], [0.5, 0.4, 0.6]])
    labels = np.array([1, 2, 0, 1])
    # Row by row: rank of the label 0, 1, 1, 2 -> top1 1/4, top2 3/4, top3 1.
    assert zs.topk_accuracy(scores, labels, 1) == 0.25
    assert zs.topk_accuracy(scores, labels, 2) == 0.75
    assert zs.topk_accuracy(scores, labels, 3) == 1.0
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(200, 48)), rng.integers(0, 48, 200)
    for k in (1, 5, 10):
        assert zs.topk_accuracy(scores, labels, k) == pytest.approx(np_topk(scores, labels, k))
    # Ties count against: a constant scorer is never right, not always right.
    assert zs.topk_accuracy(np.zeros((10, 5)), np.arange(10) % 5, 1) == 0.0


def np_recall(img, txt, txt_image, k):
    """Brute force over the full similarity matrix, with sorting."""
    sims = img @ txt.T
    i2t = [
        bool(set(np.argsort(-sims[i])[:k]) & set(np.flatnonzero(txt_image == i)))
        for i in range(len(img))
    ]
    t2i = [txt_image[j] in np.argsort(-sims[:, j])[:k] for j in range(len(txt))]
    return np.mean(i2t), np.mean(t2i)


def test_recall_at_k_hand_built_multi_caption():
    # 3 images on the axes; image 0 has captions 0 and 1, image 1 has 2, image 2 has 3.
    img = np.eye(3)
    txt = np.array(
        [
            [0.1, 0.9, 0.0],  # caption of image 0 that points at image 1
            [0.6, 0.0, 0.5],  # caption of image 0, right but weakly
            [0.0, 0.2, 0.9],  # caption of image 1 that points at image 2
            [0.0, 0.3, 1.0],
        ]
    )  # caption of image 2
    txt_image = np.array([0, 0, 1, 2])
    out = rt.recall_at_k(img, txt, txt_image, ks=(1, 2, 3), chunk_size=2)
    # i2t: image 0's best caption is caption 1 (0.6), first -> hit@1 via ANY caption; image 1's
    # own caption (0.2) is third, after 0.9 and 0.3; image 2's own (1.0) first.
    assert (out['i2t_r1'], out['i2t_r2'], out['i2t_r3']) == (2 / 3, 2 / 3, 1.0)
    # t2i: caption 0 -> image 1 first, own image second; 1 -> own first; 2 -> own second; 3 first.
    assert (out['t2i_r1'], out['t2i_r2']) == (0.5, 1.0)


def test_recall_at_k_matches_brute_force_with_chunks():
    rng = np.random.default_rng(1)
    n = 23
    txt_image = np.concatenate([np.arange(n), rng.integers(0, n, 17)])  # 1 or more per image
    img, txt = rng.normal(size=(n, 8)), rng.normal(size=(len(txt_image), 8))
    for chunk in (1, 5, 1000):
        out = rt.recall_at_k(img, txt, txt_image, ks=(1, 5, 10), chunk_size=chunk)
        for k in (1, 5, 10):
            i2t, t2i = np_recall(img, txt, txt_image, k)
            assert out[f'i2t_r{k}'] == pytest.approx(i2t) and out[f't2i_r{k}'] == pytest.approx(t2i)
    # A constant model retrieves nothing (ties count against), and captions need images.
    const = rt.recall_at_k(np.ones((4, 2)), np.ones((4, 2)), np.arange(4), ks=(1,))
    assert const == {'i2t_r1': 0.0, 't2i_r1': 0.0}
    with pytest.raises(ValueError, match='every image needs'):
        rt.recall_at_k(np.ones((3, 2)), np.ones((2, 2)), np.array([0, 1]))


def test_recall_at_k_counts_identical_captions_of_other_images_as_right():
    # Images 0 and 2 have the same caption text (texts 0 and 2 are one vector): whichever of
    # the two an image ranks first is right, and either image is right for that text.
    rng = np.random.default_rng(3)
    n = 12
    img, txt = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    txt[2] = txt[0]
    group = rt.caption_groups([('a',), ('b',), ('a',)] + [(str(i),) for i in range(3, n)])
    assert group.tolist()[:4] == [0, 1, 0, 2]
    for chunk in (1, 4, 100):
        out = rt.recall_at_k(
            img, txt, np.arange(n), ks=(1, 3), chunk_size=chunk, image_group_n=group
        )
        sims = img @ txt.T
        for k in (1, 3):
            # Brute force: a hit if any text (image) of the query's group is in the top k.
            i2t = [group[i] in group[np.argsort(-sims[i])[:k]] for i in range(n)]
            t2i = [group[j] in group[np.argsort(-sims[:, j])[:k]] for j in range(n)]
            assert out[f'i2t_r{k}'] == pytest.approx(np.mean(i2t))
            assert out[f't2i_r{k}'] == pytest.approx(np.mean(t2i))
    # Without groups the twins' captions tie and count against each other.
    txt = np.array([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])
    strict = rt.recall_at_k(np.eye(3), txt, np.arange(3), ks=(1,))
    assert strict['i2t_r1'] == pytest.approx(1 / 3)
    twins = rt.caption_groups([('x',), ('y',), ('x',)])
    grouped = rt.recall_at_k(np.eye(3), txt, np.arange(3), ks=(1,), image_group_n=twins)
    assert grouped['i2t_r1'] == pytest.approx(2 / 3)  # image 2 (axis 2) matches no text


def np_ridge_predict(xtr, ytr, x, lam, num_classes):
    """Ridge as least squares on the augmented system [Xc/sqrt(n); sqrt(lam s) I]."""
    xtr = xtr.astype(np.float64)
    n, d = xtr.shape
    xm, y = xtr.mean(0), np.eye(num_classes)[ytr]
    ym = y.mean(0)
    xc = xtr - xm
    s = np.trace(xc.T @ xc / n) / d
    a = np.concatenate([xc / np.sqrt(n), np.sqrt(lam * s) * np.eye(d)])
    b = np.concatenate([(y - ym) / np.sqrt(n), np.zeros((d, num_classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return (x - xm) @ w + ym


def test_ridge_matches_least_squares_and_probe_picks_lambda_on_val():
    rng = np.random.default_rng(2)
    c, d = 5, 12
    centres = rng.normal(size=(c, d)) * 3

    def split(n):
        y = rng.integers(0, c, n)
        return (centres[y] + rng.normal(size=(n, d)) * 4 + 10).astype(np.float32), y

    train, val, test = split(60), split(40), split(50)
    lambdas = (1e-4, 1e-2, 1.0, 100.0)
    fit = lp.Ridge(*train, c)
    for lam in lambdas:
        np.testing.assert_allclose(
            fit.predict(test[0], lam), np_ridge_predict(*train, test[0], lam, c), atol=1e-8
        )
    # The probe's rule, written out: best val top-1 (largest lambda on ties), refit on
    # train + val, score test.
    val_acc = [np.mean(np_ridge_predict(*train, val[0], l, c).argmax(1) == val[1]) for l in lambdas]
    best = [l for l, a in zip(lambdas, val_acc) if a == max(val_acc)][-1]
    both = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    want = np.mean(np_ridge_predict(*both, test[0], best, c).argmax(1) == test[1])
    out = lp.ridge_probe(train, val, test, num_classes=c, lambdas=lambdas)
    assert out == pytest.approx(
        {'top1': want, 'val_top1': max(val_acc), 'log10_lambda': np.log10(best)}
    )
    # Separable features: the probe is perfect.
    onehot = lambda y: (np.eye(c)[y] + 0.01 * rng.normal(size=(len(y), c)), y)
    ys = [rng.integers(0, c, n) for n in (50, 20, 30)]
    assert lp.ridge_probe(*map(onehot, ys), num_classes=c, lambdas=lambdas)['top1'] == 1.0


def np_miou(gt, pred, include_background=True):
    ious = []
    for c in sorted(set(np.unique(gt)) | set(np.unique(pred))):
        if c == 0 and not include_background:
            continue
        inter = np.sum((gt == c) & (pred == c))
        union = np.sum((gt == c) | (pred == c))
        ious.append(inter / union)
    return np.mean(ious)


def test_miou_matches_numpy_and_accumulates_over_batches():
    gt = np.array([[[0, 0, 1, 1], [0, 2, 2, 1]], [[3, 3, 0, 0], [3, 3, 0, 0]]])
    pred = np.array([[[0, 1, 1, 1], [0, 2, 0, 0]], [[3, 3, 0, 0], [4, 4, 0, 0]]])
    # By hand, intersection / union: bg 6/9, class 1 2/4, 2 1/2, 3 2/4, 4 (only predicted) 0/2.
    conf = dz.confusion(gt, pred, 5)
    assert dz.mean_iou(conf) == pytest.approx((6 / 9 + 2 / 4 + 1 / 2 + 2 / 4 + 0) / 5)
    assert dz.mean_iou(conf, include_background=False) == pytest.approx((2 / 4 + 1 / 2 + 2 / 4) / 4)
    assert dz.mean_iou(conf) == pytest.approx(np_miou(gt, pred))
    assert dz.mean_iou(conf, include_background=False) == pytest.approx(np_miou(gt, pred, False))
    rng = np.random.default_rng(3)
    gt, pred = rng.integers(0, 7, (6, 8, 8)), rng.integers(0, 9, (6, 8, 8))
    per_batch = dz.confusion(gt[:2], pred[:2], 10) + dz.confusion(gt[2:], pred[2:], 10)
    assert dz.mean_iou(per_batch) == pytest.approx(np_miou(gt, pred))


def np_patch_majority(seg, p):
    b, h, w = seg.shape
    out = np.zeros((b, h // p, w // p), int)
    for i in range(b):
        for r in range(h // p):
            for c in range(w // p):
                counts = collections.Counter(
                    seg[i, r * p : (r + 1) * p, c * p : (c + 1) * p].ravel().tolist()
                )
                top = max(counts.values())
                out[i, r, c] = min(k for k, v in counts.items() if v == top)
    return out


def test_patch_majority_and_upsample():
    seg = np.array([[[0, 0, 5, 5], [0, 3, 5, 3], [2, 2, 0, 1], [2, 1, 1, 0]]])
    assert dz.patch_majority(seg, 2, 6).tolist() == [[[0, 5], [2, 0]]]  # 0 vs 1 tie -> 0
    np.testing.assert_array_equal(
        dz.upsample(np.array([[[1, 2], [3, 4]]]), 2),
        [[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]],
    )
    seg = np.random.default_rng(4).integers(0, 4, (3, 16, 16))
    np.testing.assert_array_equal(dz.patch_majority(seg, 4, 4), np_patch_majority(seg, 4))


# --- dense zero-shot on a model whose answer is known -----------------------------------


@pytest.mark.parametrize('background', ['prompt', 'threshold'])
def test_dense_scoring_reaches_the_ceiling_on_features_fitted_to_the_masks(background):
    """A readout that returns each patch's majority class embedding must score the ceiling:
    then a floor-level figure on a real model is the model's, not the evaluator's."""
    patch, num_labels = 8, 1 + shapes.NUM_CLASSES
    source = shapes.ShapesSource('eval', image_size=64)
    seg = np.stack([source[i]['seg'] for i in range(48)])
    majority = np_patch_majority(seg, patch)  # (B, 8, 8)
    # Text side: class c (label c + 1) and background embed as orthogonal unit vectors.
    emb = np.eye(num_labels, dtype=np.float32)
    class_emb, bg_emb = emb[1:], emb[:1]
    ceiling = np_miou(seg, dz.upsample(majority, patch))
    assert 0.5 < ceiling < 1.0  # objects cover several 8 px patches; edges still cost

    rng = np.random.default_rng(5)
    for noise, at_least in ((0.0, 1.0), (0.1, 0.95)):  # exact, then fitted but noisy
        feats = emb[majority.reshape(len(seg), -1)]
        feats = feats + noise * rng.normal(size=feats.shape)
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        labels, obj = dz.patch_labels(
            jnp.asarray(feats, jnp.float32), class_emb, bg_emb, background=background, threshold=0.5
        )
        score = dz.SegmentationScore(num_labels, patch)
        grid = (len(seg), 8, 8)
        for s in (slice(0, 20), slice(20, None)):  # accumulated over batches
            score.update(
                np.asarray(labels).reshape(grid)[s], seg[s], np.asarray(obj).reshape(grid)[s]
            )
        out = score.result()
        assert out['miou'] >= at_least * ceiling - 1e-9, (noise, out, ceiling)
        assert out['patch_acc'] >= at_least - 0.05 and out['object_patch_acc'] >= at_least - 0.05
    assert dz.ceiling_miou(seg, patch, num_labels) == pytest.approx(ceiling)
    # The all-background floor DESIGN.md reports: background IoU over the classes present.
    floor = dz.mean_iou(dz.confusion(seg, np.zeros_like(seg), num_labels))
    assert floor == pytest.approx(np_miou(seg, np.zeros_like(seg))) and floor < 0.05


# --- the evaluators on a real (random) model --------------------------------------------


def tiny_config():
    """A 2-block ViT-32px / text model and eval sets of a few dozen examples."""
    config = clip.get_config('tiny')
    config.model.image.update(width=32, depth=2, heads=2, image_size=32, patch=8)
    config.model.text.update(width=32, depth=1, heads=2, context_length=32)
    config.model.embed_dim = 16
    config.input.update(image_size=32, context_length=32)
    ev = config.evals
    ev.zeroshot.num_examples = ev.retrieval.num_examples = 40
    ev.dense_zeroshot.num_examples = 24
    ev.linear_probe.update(num_train=64, num_val=32, num_test=32)
    ev.retrieval.caption_fields = ('caption', 'alt_text')  # 2 captions per image
    for section in ev.values():
        section.batch_size = 16  # several batches, the last one padded
    return config


@pytest.fixture(scope='module')
def tiny_model():
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        graphdef, state, _ = train.init_train_state(config, mesh)
    model, _ = nnx.merge(graphdef, state)
    return config, mesh, model


def test_prompts_fill_templates_with_articles():
    prompts = common.Prompts(('orange ring', 'red circle'), ('a {}.', 'a photo of a {}.'))
    assert prompts.texts() == [
        'an orange ring.',
        'a photo of an orange ring.',
        'a red circle.',
        'a photo of a red circle.',
    ]


def test_predictor_pads_batches_shares_its_jit_and_fetches_the_picked_output():
    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.float32(2.0))

    def both(model, x):
        return x, x * model.w[...]

    rows = np.arange(10, dtype=np.float32)[:, None]  # 3 batches of 4, the last one padded
    whole = common.Predictor(both, batch_size=4)(Scale(), [rows])
    picked = common.Predictor(both, batch_size=4, pick=1)(Scale(), [rows])
    np.testing.assert_array_equal(whole[0], rows)
    np.testing.assert_array_equal(whole[1], 2 * rows)
    np.testing.assert_array_equal(picked, 2 * rows)
    # Both predictors ran one jitted function, compiled once for the one batch shape.
    assert common.jitted_apply(both, jax.sharding.get_mesh())._cache_size() == 1


def test_build_evaluators_from_the_tiny_clip_config():
    config = clip.get_config('tiny')
    evaluators = build_evaluators(config)
    assert sorted((e.name, type(e).__name__) for e in evaluators) == [
        ('dense_zeroshot', 'DenseZeroShot'),
        ('linear_probe', 'LinearProbe'),
        ('retrieval', 'Retrieval'),
        ('zeroshot', 'ZeroShot'),
    ]
    for e in evaluators:  # None in the section -> the training input's values
        # Zero-shot classifies one-object scenes (a classification set); the rest see 1-3.
        objects = 1 if e.name == 'zeroshot' else 3
        assert (e.config.image_size, e.config.context_length, e.config.max_objects) == (
            64,
            32,
            objects,
        )
    assert config.eval_every > 0 and clip.get_config('b16').evals.zeroshot.num_examples > 512
    with config.unlocked():
        config.evals.retrieval.kind = 'retreival'
    with pytest.raises(
        ValueError,
        match="unknown evaluator kind 'retreival'; valid: zeroshot, "
        'retrieval, linear_probe, dense_zeroshot',
    ):
        build_evaluators(config)
    with pytest.raises(ValueError, match='unknown evaluator'):
        build_evaluators(clip.get_config('tiny'), ['zero'])
    config = clip.get_config('tiny')
    config.evals.dense_zeroshot.source = 'folder'
    with pytest.raises(
        ValueError,
        match="evals.dense_zeroshot.source: unknown source 'folder' for a dense_zeroshot "
        'evaluator; valid: shapes, ade20k, voc',
    ):
        build_evaluators(config)


def test_every_evaluator_runs_on_a_random_tiny_model(tiny_model):
    config, mesh, model = tiny_model
    evaluators = build_evaluators(config)
    predictors = [
        p for e in evaluators for p in vars(e).values() if isinstance(p, common.Predictor)
    ]
    # One jitted function per predicted function: zeroshot, retrieval and dense share theirs.
    common.jitted_apply.cache_clear()  # none compiled by an earlier test in this process
    jitted = {p.fn: common.jitted_apply(p.fn, mesh) for p in predictors}.values()
    with jax.set_mesh(mesh):
        first = run_evaluators(evaluators, model)
        compiled = [f._cache_size() for f in jitted]
        second = run_evaluators(evaluators, model)
    names = {k for k in first if not k.endswith('/seconds')}
    assert names == {
        'eval/zeroshot/top1',
        'eval/zeroshot/top5',
        'eval/zeroshot/shape_top1',
        'eval/zeroshot/colour_top1',
        *(f'eval/retrieval/{d}_r{k}' for d in ('i2t', 't2i') for k in (1, 5, 10)),
        'eval/linear_probe/top1',
        'eval/linear_probe/val_top1',
        'eval/linear_probe/log10_lambda',
        'eval/dense_zeroshot/miou',
        'eval/dense_zeroshot/patch_acc',
        'eval/dense_zeroshot/object_patch_acc',
        'eval/dense_zeroshot/miou_ceiling',
    }
    for k in names - {'eval/linear_probe/log10_lambda'}:
        assert 0.0 <= first[k] <= 1.0, (k, first[k])
    assert {k: first[k] for k in names} == {k: second[k] for k in names}
    # The second run (the trainer's next eval) compiles nothing.
    assert compiled == [f._cache_size() for f in jitted]
    # The image tower (zeroshot, retrieval, probe), the text tower (zeroshot, retrieval,
    # dense: prompts of 16 tokens, captions of 32) and the dense predictions. Before they
    # were shared, the image tower compiled three times and the text tower four.
    assert len(predictors) == 7 and compiled == [1, 2, 1]


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_dense_readouts_rebuild_the_vit_forward(pool):
    config = tiny_config()
    config.model.image.pool = pool
    with nnx.use_eager_sharding(False):
        model = train.create_model_and_optimizer(config)[0]
    images = np.asarray(np.random.default_rng(6).integers(0, 256, (3, 32, 32, 3)), np.uint8)
    _, aux = model.encode_image(images)
    vit = model.image
    with model.precision():  # the towers' matmul precision (the tiny config's 'auto')
        x = dz.tokens_before_last_block(vit, images)
        rebuilt = vit.ln(vit.encoder.blocks[-1](x))
    rebuilt = rebuilt[:, 1:] if pool == 'cls' else rebuilt
    np.testing.assert_allclose(rebuilt, aux['img/tokens'], atol=1e-5)
    for readout in dz.READOUTS:
        feats = np.asarray(dz.patch_features(model, images, readout))
        assert feats.shape == (3, 16, 16)
        np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-5)
    values = np.asarray(dz.patch_features(model, images, 'value'))
    with model.precision():
        want = vit.ln(vit.encoder.blocks[-1].attn.values(vit.encoder.blocks[-1].ln1(x)))
        want = model.image_proj(want[:, 1:] if pool == 'cls' else want)
    np.testing.assert_allclose(
        values, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5
    )


@pytest.mark.parametrize(
    'base, options, metrics',
    [
        (
            'dense_zeroshot',
            dict(readout='tokens', background='threshold', include_background=False),
            {'miou', 'patch_acc', 'object_patch_acc', 'miou_ceiling'},
        ),
        (
            'dense_zeroshot',
            dict(readout='value_residual', background='prompt'),
            {'miou', 'patch_acc', 'object_patch_acc', 'miou_ceiling'},
        ),
        (
            'linear_probe',
            dict(feature='embedding', label='shape_label'),
            {'top1', 'val_top1', 'log10_lambda'},
        ),
    ],
)
def test_evaluator_options_run(tiny_model, base, options, metrics):
    config, mesh, model = tiny_model
    config = config.copy_and_resolve_references()  # the fixture's config stays as it is
    section = config.evals[base].copy_and_resolve_references()
    section.update(options)
    with config.unlocked():
        config.evals['alt'] = section
    (ev,) = build_evaluators(config, ['alt'])
    with jax.set_mesh(mesh):
        out = dict(ev.run(model))
    assert set(out) == {f'alt/{m}' for m in metrics}
    assert all(0 <= v <= 1 for k, v in out.items() if 'lambda' not in k), out


def test_zeroshot_on_an_image_folder(tiny_model, tmp_path):
    """JPEG / PNG class folders on the real tiny model (known answers: tests/test_eval_data.py)."""
    from PIL import Image

    config, mesh, model = tiny_model
    rng = np.random.default_rng(7)
    for name in ('red_thing', 'blue_thing'):
        os.makedirs(tmp_path / name)
        for i, (shape, ext) in enumerate([((40, 50, 3), 'jpg'), ((32, 32), 'png')]):
            image = Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8))
            image.save(tmp_path / name / f'{i}.{ext}')  # (32, 32): greyscale, read as RGB
    config = config.copy_and_resolve_references()
    section = config.evals.zeroshot.copy_and_resolve_references()
    section.update(source='folder', root=str(tmp_path), templates=('a photo of a {}.',))
    with config.unlocked():
        config.evals['folder'] = section
    (ev,) = build_evaluators(config, ['folder'])
    with jax.set_mesh(mesh):
        out = dict(ev.run(model))
    assert set(out) == {'folder/top1'} and 0 <= out['folder/top1'] <= 1  # 2 classes: no top-5
    images, labels, names = common.classification_data(ev.config)
    assert images.shape == (4, 32, 32, 3) and images[:4].shape == (4, 32, 32, 3)
    assert names == ('blue thing', 'red thing') and labels.tolist() == [0, 0, 1, 1]


MESH_SCRIPT = """
import json, sys, jax
from flax import nnx
sys.path.insert(0, 'tests')
from pretrain import sharding, train
from pretrain.evaluators import build_evaluators, run_evaluators
import test_evaluators as t
assert len(jax.devices()) == 8
config = t.tiny_config()
for section in config.evals.values():
  section.batch_size = 10  # rounded up to 12 rows, a multiple of the 4 batch shards
rows = []
for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (2, 2, 2))):
  config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  mesh = sharding.make_mesh(config.mesh, devices)
  with jax.set_mesh(mesh):
    graphdef, state, _ = train.init_train_state(config, mesh)
    model, _ = nnx.merge(graphdef, state)
    rows.append(run_evaluators(build_evaluators(config), model))
print('ROWS', json.dumps(rows))
"""


def test_results_do_not_depend_on_the_mesh(python):
    """1 device vs a (2, 2, 2) mesh of 8: batches sharded over data x fsdp, params over fsdp and
    tensor, the batch rounded up to the 4 batch shards and padded; the metrics must agree."""
    proc = python(['-c', MESH_SCRIPT], devices=8, timeout=300)
    one, eight = json.loads(proc.stdout.split('ROWS ', 1)[1])
    for k in one:
        if not k.endswith('/seconds'):
            assert eight[k] == pytest.approx(one[k], abs=1e-6), k


# --- the command line ------------------------------------------------------------------

SMALL_EVALS = [
    '--config.evals.zeroshot.num_examples=32',
    '--config.evals.retrieval.num_examples=32',
    '--config.evals.dense_zeroshot.num_examples=16',
    '--config.evals.linear_probe.num_train=64',
    '--config.evals.linear_probe.num_val=32',
    '--config.evals.linear_probe.num_test=32',
]


def test_evaluate_command_on_a_trained_workdir_and_on_an_empty_one(python, tmp_path):
    wd = str(tmp_path / 'run')
    python(
        [
            '-m',
            'pretrain.main',
            '--config',
            'configs/clip.py',
            '--workdir',
            wd,
            *TINY,
            '--config.total_steps=2',
        ]
    )
    proc = python(
        [
            '-m',
            'pretrain.evaluate',
            '--config',
            'configs/clip.py',
            '--workdir',
            wd,
            *TINY,
            *SMALL_EVALS,
        ]
    )
    assert 'eval/zeroshot/top1' in proc.stdout and 'step 2' in proc.stdout
    row = read_metrics(wd)[-1]
    assert row['step'] == 2 and 0 <= row['eval/zeroshot/top1'] <= 1
    assert 'eval/retrieval/i2t_r1' in row and 'eval/dense_zeroshot/miou' in row
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(wd, 'tb')))

    empty = tmp_path / 'empty'
    empty.mkdir()
    for workdir, message in (
        (str(empty), 'no checkpoint in'),
        (str(tmp_path / 'missing'), 'does not exist'),
    ):
        proc = python(
            ['-m', 'pretrain.evaluate', '--config', 'configs/clip.py', '--workdir', workdir],
            check=False,
            timeout=60,
        )
        assert proc.returncode == 2 and message in proc.stderr
        assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(empty) == []  # nothing created in a workdir that has no run
