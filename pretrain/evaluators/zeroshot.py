"""Zero-shot classification: class names x prompt templates -> one text embedding per class
(the mean of its templates' embeddings, renormalised, as in CLIP), nearest class per image.

Sources:
  shapes  the held-out eval split; `tasks` picks the label sets: 'class' (48 colour x shape
          classes against `label`, the largest object), 'shape' (6, `shape_label`) and
          'colour' (8, `colour_label`). Colour and shape are learnt at very different speeds
          (DESIGN.md), so they are reported apart.
  folder  an ImageFolder layout, root/<class name>/<image> (JPEG, PNG, ...); the class name
          is the folder name with '_' read as a space, or `classnames`.
  tfds    a TFDS classification dataset (`tfds_name`, `split`, `data_dir`; ArrayRecord);
          class names from its label feature, or `classnames`.
Real images are decoded batch by batch, resized (short side) and centre-cropped
(common.classification_data).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from input_pipeline import pipeline
from input_pipeline.sources import shapes
from pretrain.evaluators import common

# task -> (record field, class names). 'class' is reported as top1/top5, others prefixed.
SHAPES_TASKS = {
    'class': ('label', tuple(shapes.class_names())),
    'shape': ('shape_label', shapes.SHAPES),
    # Long captions call objects "shape", "object" or "figure"; a bare colour is no object.
    'colour': ('colour_label', tuple(f'{c} shape' for c in shapes.COLOURS)),
}


def topk_accuracy(scores_nc: np.ndarray, labels_n: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores.

    A tie counts against the label (rank = how many other classes score at least as high),
    so a constant scorer gets 0, not 1.
    """
    own = np.take_along_axis(scores_nc, np.asarray(labels_n)[:, None], axis=1)
    rank = (scores_nc >= own).sum(1) - 1
    return float((rank < k).mean())


def encode_images(model, images):
    """Each image's embedding and its pooled tower output (f32). One function for the
    zeroshot, retrieval and linear-probe evaluators, so the image tower compiles once for
    all three (`common.jitted_apply`); each fetches the output it reads (`pick`)."""
    z, aux = model.encode_image(images)
    return z, aux['img/pooled'].astype(jnp.float32)


def encode_texts(model, tokens):
    return model.encode_text(tokens)[0]


def class_embeddings(
    text_predictor: common.Predictor, model, tokens: np.ndarray, num_classes: int
) -> np.ndarray:
    """(C, D): each class's template embeddings averaged and renormalised.

    `tokens` holds the class-major prompt texts of `Prompts.texts()`.
    """
    z = text_predictor(model, [tokens])
    z = z.reshape(num_classes, -1, z.shape[-1]).mean(1)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


class ZeroShot:
    """Yields `<name>/top1`, `<name>/top5` ('class' or folder classes) and, for shapes,
    `<name>/shape_top1`, `<name>/colour_top1`. Top-k is reported for k = 1 and any k up to
    half the classes: a looser k says little (top-5 of 6 shapes is right 5 times in 6).
    """

    def __init__(self, config, *, name: str = 'zeroshot'):
        self.config, self.name = config, name
        if config.source == 'shapes':
            unknown = sorted(set(config.tasks) - set(SHAPES_TASKS))
            if unknown:
                raise ValueError(
                    f'evals.{name}.tasks: unknown {unknown}; valid: ' f"{', '.join(SHAPES_TASKS)}"
                )
        self._images = common.Predictor(encode_images, batch_size=config.batch_size, pick=0)
        self._texts = common.Predictor(encode_texts, batch_size=config.batch_size)
        self._data = None  # loaded at the first run, then kept

    def _load(self):
        c = self.config
        if c.source != 'shapes':
            images, labels, names = common.classification_data(c)
            tasks = {'class': (labels, names)}
        else:
            fields = [SHAPES_TASKS[t][0] for t in c.tasks]
            rec = common.shapes_records(
                c, start=c.start, num=c.num_examples, fields=['image', *fields]
            )
            images = rec['image']
            tasks = {t: (rec[SHAPES_TASKS[t][0]], SHAPES_TASKS[t][1]) for t in c.tasks}
        tokenizer = pipeline.make_tokenizer(c)
        prompts = {}
        for task, (labels, names) in tasks.items():
            texts = common.Prompts(tuple(names), tuple(c.templates)).texts()
            prompts[task] = (labels, common.trim_padding(tokenizer(texts)), len(names))
        return images, prompts

    def run(self, model):
        if self._data is None:
            self._data = self._load()
        images, tasks = self._data
        z_img = self._images(model, [images])
        for task, (labels, tokens, num_classes) in tasks.items():
            scores = z_img @ class_embeddings(self._texts, model, tokens, num_classes).T
            prefix = '' if task == 'class' else f'{task}_'
            for k in self.config.top_k:
                if k == 1 or k <= num_classes // 2:
                    yield f'{self.name}/{prefix}top{k}', topk_accuracy(scores, labels, k)
