"""Dense zero-shot segmentation, MaskCLIP style: per-patch image features against the class
text embeddings, argmax per patch, nearest upsampling to pixels, mIoU.

Two separate halves, so each can be checked alone:
  readout  `patch_features(model, images, readout)` -> (B, N, D) unit-norm joint-space
           features, one per patch;
  scoring  `patch_labels(features, class_emb, bg_emb, ...)` -> per-patch labels, then
           `SegmentationScore` (host numpy): upsample, confusion matrix, mIoU.
The test feeds the scoring features fitted to the masks and checks it reaches the ceiling
(`miou_ceiling`: the majority class of every patch, upsampled), so a floor-level figure is
the model's, not the evaluator's.

Readouts (DESIGN.md: which one carries the signal depends on the pooling; measure, do not
assume):
  'tokens'          the final patch tokens, aux['img/tokens'];
  'value'           MaskCLIP's value path of the last block, out(v(ln1(x))) with no
                    query-key mixing, no residual and no MLP (as ClearCLIP);
  'value_residual'  the original MaskCLIP code: x + out(v(ln1(x))), then + mlp(ln2(.)).
Every readout then goes through the ViT's final LayerNorm and `model.image_proj`.

Background rule (`background`):
  'prompt'     a patch is background if one of `background_prompts` beats every class;
  'threshold'  a patch is background if its best class similarity is below `threshold`.
Labels: 0 background, 1 + class, as the shapes `seg` field; ground-truth pixels labelled
`num_labels` or more (IGNORE = 255: VOC's borders, ADE20K's "other") are not scored.
Sources: shapes (its 48 classes), 'ade20k' and 'voc' layouts (common.segmentation_data:
image and label map centre-cropped with one geometry; ADE20K has no background class, so
its config turns the background rule off with a threshold below any similarity).

Metrics: `miou` (pixels, over the classes present in the ground truth or the prediction,
background included if `include_background`), `patch_acc` (label of a patch vs its
majority ground-truth label), `object_patch_acc` (on patches whose majority is an object,
the best class ignoring the background rule: DESIGN's "full class right on object
patches"), and `miou_ceiling`.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np

from input_pipeline import pipeline
from input_pipeline.sources import shapes
from pretrain.evaluators import common
from pretrain.evaluators.zeroshot import class_embeddings, encode_texts
from pretrain.models.towers import l2_normalize

READOUTS = ('tokens', 'value', 'value_residual')
BACKGROUNDS = ('prompt', 'threshold')


# ---------------------------------------------------------------------------------------
# Readout.


def tokens_before_last_block(vit, images):
    """(B, T, d) tokens entering the ViT's last block (CLS first if the ViT has one).

    Rebuilt from the module's pieces, exactly as VisionTransformer.__call__ runs them (the
    test checks that the last block + final LN give back aux['img/tokens']).
    """
    x, _ = vit.embed_tokens(images)  # patches + positions + CLS (+ CLIP's ln_pre)
    for block in vit.encoder.blocks[:-1]:
        x = block(x)
    return x


def patch_features(model, images, readout: str):
    """(B, N, D) unit-norm per-patch features in the joint image-text space."""
    vit = model.image
    # The matmul precision encode_image runs the tower in (models without one: as they are).
    with getattr(model, 'precision', contextlib.nullcontext)():
        if readout == 'tokens':
            tokens = model.encode_image(images)[1]['img/tokens']
        else:
            x = tokens_before_last_block(vit, images)
            last = vit.encoder.blocks[-1]
            y = last.attn.values(last.ln1(x))
            if readout == 'value_residual':
                y = x + y
                y = y + last.mlp(last.ln2(y))
            tokens = vit.ln(y)
            tokens = tokens[:, 1:] if vit.cls is not None else tokens
        return l2_normalize(model.image_proj(tokens))


# ---------------------------------------------------------------------------------------
# Scoring.


def patch_labels(feat_bnd, class_emb_cd, bg_emb_kd, *, background: str, threshold: float):
    """(labels, object labels), both (B, N) int: 0 background / 1 + class, and the best class
    (1 + class) ignoring the background rule. jnp, so it runs inside the jitted readout.
    """
    sim_bnc = jnp.einsum('bnd,cd->bnc', feat_bnd, class_emb_cd)
    obj = jnp.argmax(sim_bnc, -1) + 1
    top = jnp.max(sim_bnc, -1)
    if background == 'prompt':
        is_bg = jnp.einsum('bnd,kd->bnk', feat_bnd, bg_emb_kd).max(-1) > top
    elif background == 'threshold':
        is_bg = top < threshold
    else:
        raise ValueError(f"unknown background rule '{background}'; valid: {', '.join(BACKGROUNDS)}")
    return jnp.where(is_bg, 0, obj), obj


def patch_majority(seg_bhw: np.ndarray, patch: int, num_labels: int) -> np.ndarray:
    """(B, H/p, W/p): the most frequent scored label of each patch (the lowest on ties);
    `num_labels` for a patch with no scored pixel."""
    b, h, w = seg_bhw.shape
    gh, gw = h // patch, w // patch
    blocks = seg_bhw.reshape(b, gh, patch, gw, patch).transpose(0, 1, 3, 2, 4)
    blocks = np.minimum(blocks.reshape(-1, patch * patch), num_labels)  # ignored: one bin
    bins = num_labels + 1
    idx = np.arange(b * gh * gw)[:, None] * bins + blocks
    counts = np.bincount(idx.ravel(), minlength=b * gh * gw * bins).reshape(b, gh, gw, bins)
    scored = counts[..., :num_labels]
    return np.where(scored.any(-1), scored.argmax(-1), num_labels)


def upsample(labels_bgg: np.ndarray, patch: int) -> np.ndarray:
    """Nearest-neighbour: every pixel takes its patch's label."""
    return np.repeat(np.repeat(labels_bgg, patch, axis=1), patch, axis=2)


def confusion(gt, pred, num_labels: int) -> np.ndarray:
    """(L, L) counts, rows ground truth, columns prediction; gt >= L (ignored) not counted."""
    gt, pred = np.asarray(gt, np.int64).ravel(), np.asarray(pred, np.int64).ravel()
    scored = gt < num_labels
    idx = gt[scored] * num_labels + pred[scored]
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def mean_iou(conf: np.ndarray, *, include_background: bool = True) -> float:
    """Mean over the labels present in the ground truth or the prediction of
    TP / (TP + FP + FN), from a confusion matrix accumulated over the whole dataset."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    if not include_background:
        present[0] = False
    return float((tp[present] / union[present]).mean()) if present.any() else float('nan')


class SegmentationScore:
    """Accumulates patch-label predictions of a dataset against its pixel masks."""

    def __init__(self, num_labels: int, patch: int, *, include_background: bool = True):
        self.num_labels, self.patch, self.include_background = num_labels, patch, include_background
        self.conf = np.zeros((num_labels, num_labels), np.int64)
        self.patches = self.patches_right = self.objects = self.objects_right = 0

    def update(self, labels_bgg, seg_bhw, obj_labels_bgg=None):
        majority = patch_majority(seg_bhw, self.patch, self.num_labels)
        self.conf += confusion(seg_bhw, upsample(labels_bgg, self.patch), self.num_labels)
        scored = majority < self.num_labels
        self.patches += int(scored.sum())
        self.patches_right += int((labels_bgg == majority)[scored].sum())
        if obj_labels_bgg is not None:
            on_object = (majority > 0) & scored
            self.objects += int(on_object.sum())
            self.objects_right += int((obj_labels_bgg == majority)[on_object].sum())

    def result(self) -> dict:
        out = {
            'miou': mean_iou(self.conf, include_background=self.include_background),
            'patch_acc': self.patches_right / max(self.patches, 1),
        }
        if self.objects:
            out['object_patch_acc'] = self.objects_right / self.objects
        return out


def ceiling_miou(seg_bhw, patch: int, num_labels: int, *, include_background=True) -> float:
    """The best a patch-level answer can score: each patch's majority label, upsampled."""
    score = SegmentationScore(num_labels, patch, include_background=include_background)
    score.update(patch_majority(seg_bhw, patch, num_labels), seg_bhw)
    return score.result()['miou']


# ---------------------------------------------------------------------------------------


class DenseZeroShot:
    """Yields `<name>/miou`, `<name>/patch_acc`, `<name>/object_patch_acc` and
    `<name>/miou_ceiling`."""

    def __init__(self, config, *, name: str = 'dense_zeroshot'):
        self.config, self.name = config, name
        if config.readout not in READOUTS:
            raise ValueError(
                f"evals.{name}.readout '{config.readout}'; valid: " f"{', '.join(READOUTS)}"
            )
        if config.background not in BACKGROUNDS:
            raise ValueError(
                f"evals.{name}.background '{config.background}'; valid: "
                f"{', '.join(BACKGROUNDS)}"
            )
        if config.background == 'prompt' and not config.background_prompts:
            raise ValueError(f"evals.{name}: background 'prompt' needs background_prompts")
        readout, rule, threshold = config.readout, config.background, float(config.threshold)

        def predict(model, class_emb, bg_emb, images):
            feats = patch_features(model, images, readout)
            return patch_labels(feats, class_emb, bg_emb, background=rule, threshold=threshold)

        self._predict = common.Predictor(predict, batch_size=config.batch_size)
        self._texts = common.Predictor(encode_texts, batch_size=config.batch_size)
        self._data = None
        self._ceilings: dict[int, float] = {}  # patch size -> ceiling mIoU

    def _load(self):
        c = self.config
        if c.source == 'shapes':
            rec = common.shapes_records(
                c, start=c.start, num=c.num_examples, fields=['image', 'seg']
            )
            images, segs, names = rec['image'], rec['seg'], tuple(shapes.class_names())
        else:
            images, segs, names = common.segmentation_data(c)
        tokenizer = pipeline.make_tokenizer(c)
        classes = common.Prompts(names, tuple(c.templates))
        bg_texts = list(c.background_prompts) or ['background.']  # unused by 'threshold'
        return (
            images,
            segs,
            len(names),
            common.trim_padding(tokenizer(classes.texts())),
            common.trim_padding(tokenizer(bg_texts)),
        )

    def run(self, model):
        if self._data is None:
            self._data = self._load()
        images, segs, num_classes, class_tokens, bg_tokens = self._data
        num_labels = 1 + num_classes
        patch = model.image.patch
        class_emb = class_embeddings(self._texts, model, class_tokens, num_classes)
        bg_emb = self._texts(model, [bg_tokens])
        score = SegmentationScore(
            num_labels, patch, include_background=self.config.include_background
        )
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        start = 0
        for labels, obj in self._predict.batches(model, [images], consts=(class_emb, bg_emb)):
            n = len(labels)
            score.update(labels.reshape(n, *grid), segs[start : start + n], obj.reshape(n, *grid))
            start += n
        if patch not in self._ceilings:
            self._ceilings[patch] = ceiling_miou(
                segs, patch, num_labels, include_background=self.config.include_background
            )
        for key, value in {**score.result(), 'miou_ceiling': self._ceilings[patch]}.items():
            yield f'{self.name}/{key}', value
