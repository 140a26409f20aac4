"""How fast the tiny image tower learns a shapes label when supervised directly.

    python -m benchmarks.supervised_shape --stem patch --steps 600
    python -m benchmarks.supervised_shape --stem conv --steps 600 --out results/x.json

A diagnostic behind the tiny recipes' conv stem: contrastive runs learn colour in ~200 steps
and shape late; this asks whether the image tower itself, with a linear head and
cross-entropy on the label (the largest object's shape by default, 6 classes, chance
16.7%), learns shape any sooner. The tower is configs/clip.py's tiny one; the optimizer
is its AdamW with warmup and cosine (optim.make_optimizer). Held-out accuracy on the first 512
shapes eval scenes every `--eval_every` steps; JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from configs import clip
from input_pipeline.sources import shapes
from pretrain import optim
from pretrain.models.towers import ImageTextModel
from pretrain.models.vit import STEMS

LABELS = {
    'shape_label': len(shapes.SHAPES),
    'colour_label': len(shapes.COLOURS),
    'label': shapes.NUM_CLASSES,
}


class Classifier(nnx.Module):
    def __init__(self, model_config, num_classes: int, *, rngs: nnx.Rngs):
        # The image tower exactly as pre-training builds it; the text tower is dropped.
        self.tower = ImageTextModel(model_config, rngs=rngs).image
        self.head = nnx.Linear(model_config.image.width, num_classes, rngs=rngs)

    def __call__(self, images):
        return self.head(self.tower(images)[0])


def records(source, indices, label: str):
    recs = [source[int(i)] for i in indices]
    return np.stack([r['image'] for r in recs]), np.array([r[label] for r in recs], np.int32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--stem', default='patch', choices=STEMS)
    parser.add_argument('--posemb', default='learn', choices=('learn', 'sincos2d'))
    parser.add_argument('--label', default='shape_label', choices=sorted(LABELS))
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--eval_every', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='')
    args = parser.parse_args(argv)

    config = clip.get_config()
    image_config = config.model.image
    image_config.stem, image_config.posemb = args.stem, args.posemb
    model = Classifier(config.model, LABELS[args.label], rngs=nnx.Rngs(args.seed))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optim.make_optimizer(config.optim, params, args.steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, images, labels):
        return (model(images).argmax(-1) == labels).mean()

    train = shapes.ShapesSource('train', image_size=image_config.image_size)
    held_out = shapes.ShapesSource('eval', image_size=image_config.image_size)
    eval_images, eval_labels = records(held_out, range(512), args.label)
    rng = np.random.default_rng(args.seed)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = records(train, rng.integers(0, len(train), config.batch_size), args.label)
        loss = train_step(model, optimizer, images, labels)
        if step % args.eval_every == 0 or step == args.steps:
            acc = 100 * float(accuracy(model, eval_images, eval_labels))
            curve.append({'step': step, 'loss': float(loss), 'eval_accuracy': acc})
            print(f'step {step}: loss {float(loss):.3f}, held-out accuracy {acc:.1f}%', flush=True)
    result = {
        'stem': args.stem,
        'posemb': args.posemb,
        'label': args.label,
        'chance': 100 / LABELS[args.label],
        'seed': args.seed,
        'batch_size': config.batch_size,
        'curve': curve,
        'wall_s': time.perf_counter() - start,
        'jax': jax.__version__,
    }
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
