"""Linear probe on frozen image features: closed-form ridge regression to one-hot targets.

Ridge instead of logistic regression: one eigendecomposition of the feature covariance
gives the solution for every regularisation strength at the cost of a matrix product, so
the strength is chosen on a validation split from a grid for free, and nothing iterates.
The chosen model is refit on train + validation and scored on the test split.

The strength is relative, lambda * mean eigenvalue of the covariance, so one grid fits
features of any scale (pooled tokens or unit-norm embeddings).
Train / val / test are consecutive, disjoint index ranges of the shapes eval split; on
real data ('folder' / 'tfds', common.probe_data) train and val come from the train split
and test from the test split.
"""

from __future__ import annotations

import numpy as np

from input_pipeline.sources import shapes
from pretrain.evaluators import common
from pretrain.evaluators.zeroshot import encode_images

FEATURES = ('pooled', 'embedding')
LABELS = {
    'label': shapes.NUM_CLASSES,
    'shape_label': len(shapes.SHAPES),
    'colour_label': len(shapes.COLOURS),
}


class Ridge:
    """min_W |Xc W - Yc|^2 / n + lambda * s * |W|^2 on centred X and one-hot Y (so the bias is
    not regularised), s = mean eigenvalue of Xc'Xc / n.

    With Xc'Xc / n = V diag(e) V':  W(lambda) = V diag(1 / (e + lambda s)) V' Xc'Yc / n.
    """

    def __init__(self, x_nd: np.ndarray, y_n: np.ndarray, num_classes: int):
        x = np.asarray(x_nd, np.float64)
        y = np.eye(num_classes)[np.asarray(y_n)]
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        xc, n = x - self.x_mean, len(x)
        self.evals, self.evecs = np.linalg.eigh(xc.T @ xc / n)
        self.scale = max(float(self.evals.mean()), 1e-12)
        self.xty = self.evecs.T @ (xc.T @ (y - self.y_mean) / n)  # V' Xc'Yc / n, (d, C)

    def weights(self, lam: float) -> np.ndarray:
        return self.evecs @ (self.xty / (self.evals + lam * self.scale)[:, None])

    def predict(self, x_nd: np.ndarray, lam: float) -> np.ndarray:
        return (np.asarray(x_nd, np.float64) - self.x_mean) @ self.weights(lam) + self.y_mean


def accuracy(scores_nc, labels_n) -> float:
    return float((np.argmax(scores_nc, -1) == np.asarray(labels_n)).mean())


def ridge_probe(train, val, test, *, num_classes: int, lambdas) -> dict:
    """train/val/test: (features, labels) pairs. Picks lambda by validation top-1 (the largest
    lambda among ties: the simpler model), refits on train + val, returns test top-1.
    """
    lambdas = sorted(float(l) for l in lambdas)
    if not lambdas or lambdas[0] <= 0:
        raise ValueError(f'ridge lambdas must be positive, got {lambdas}')
    fit = Ridge(*train, num_classes)
    val_acc = [accuracy(fit.predict(val[0], lam), val[1]) for lam in lambdas]
    best = max(i for i, a in enumerate(val_acc) if a == max(val_acc))
    refit = Ridge(
        np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]), num_classes
    )
    return {
        'top1': accuracy(refit.predict(test[0], lambdas[best]), test[1]),
        'val_top1': val_acc[best],
        'log10_lambda': float(np.log10(lambdas[best])),
    }


class LinearProbe:
    """Yields `<name>/top1` (test), `<name>/val_top1` and `<name>/log10_lambda` (the chosen one).

    `feature`: 'pooled' (the image tower's pooled output, before the projection: the usual
    probe feature) or 'embedding' (the normalised joint-space embedding).
    """

    def __init__(self, config, *, name: str = 'linear_probe'):
        self.config, self.name = config, name
        if config.feature not in FEATURES:
            raise ValueError(
                f"evals.{name}.feature '{config.feature}'; valid: " f"{', '.join(FEATURES)}"
            )
        if config.source == 'shapes' and config.label not in LABELS:
            raise ValueError(f"evals.{name}.label '{config.label}'; valid: {', '.join(LABELS)}")
        pick = 1 if config.feature == 'pooled' else 0  # encode_images: (embedding, pooled)
        self._images = common.Predictor(encode_images, batch_size=config.batch_size, pick=pick)
        self._data = None

    def _load(self):
        c = self.config
        if c.source != 'shapes':
            return common.probe_data(c)
        sizes = (c.num_train, c.num_val, c.num_test)
        rec = common.shapes_records(c, start=c.start, num=sum(sizes), fields=['image', c.label])
        return rec['image'], rec[c.label], np.cumsum(sizes)[:2], LABELS[c.label]

    def run(self, model):
        if self._data is None:
            self._data = self._load()
        images, labels, cuts, num_classes = self._data
        feats = self._images(model, [images])
        splits = [tuple(np.split(a, cuts)[i] for a in (feats, labels)) for i in range(3)]
        out = ridge_probe(*splits, num_classes=num_classes, lambdas=self.config.lambdas)
        for key, value in out.items():
            yield f'{self.name}/{key}', value
