"""What every evaluator shares: a jitted predict function run over host arrays, eval records
(the shapes eval split, or real data from the input pipeline's sources), and the text prompts
dataclass.

Placement (the simplest correct option under any mesh): every process holds the whole eval
set on the host (it is rendered or read once, deterministically; real images are held as
files and decoded batch by batch, see `DecodedImages`). Each batch is cut from it
with `jax.make_array_from_callback`, so every device gets exactly its rows of a batch sharded
over the mesh's batch axes (data, fsdp), whatever the process layout; the outputs are
constrained to be replicated, so every process reads the full result back. The eval batch
size is rounded up to a multiple of the batch-shard count and the last batch is padded (the
padded rows are dropped on the host), so a predicted function compiles once per shape, not
per eval run, and evaluators that call the same one share it (`jitted_apply`).
With no mesh active (a bare model in a notebook) batches go to the default device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from input_pipeline import transforms
from input_pipeline.sources import coco, image_folder, segmentation, shapes
from pretrain import sharding


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Class names x templates ('a photo of a {}.'); `texts()` is class-major.

    "a" before a vowel becomes "an" after filling in ("an orange ring"), as captions write it.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def texts(self) -> list[str]:
        return [
            re.sub(r'\b([Aa]) (?=[aeiou])', r'\1n ', t.format(c))
            for c in self.classnames
            for t in self.templates
        ]


class Predictor:
    """`fn(model, *consts, *rows) -> pytree of arrays`, jitted and run over host arrays in batches.

    `consts` go to every device whole (e.g. class text embeddings); `rows` are cut into
    batches along their first axis. See the module docstring for placement. Predictors of
    the same module-level `fn` share one jitted function (`jitted_apply`); `pick` (an index
    or key) fetches only that output of `fn` to the host.
    """

    def __init__(self, fn: Callable, *, batch_size: int, pick=None):
        self.fn, self.batch_size, self.pick = fn, int(batch_size), pick

    def batches(self, model, rows: Sequence[np.ndarray], consts: Sequence = ()) -> Iterator:
        """Yields the host (numpy) outputs batch by batch, padding rows removed."""
        mesh = jax.sharding.get_mesh()
        jitted = jitted_apply(self.fn, mesh)
        shards = 1 if mesh.empty else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
        size = -(-self.batch_size // shards) * shards
        graphdef, state = nnx.split(model)
        consts = tuple(_place(np.asarray(c), mesh, P()) for c in consts)
        total = len(rows[0])
        pending = None
        for start in range(0, total, size):
            valid = min(size, total - start)
            batch = tuple(
                _place(
                    _pad(np.asarray(r[start : start + size]), size), mesh, P(sharding.BATCH_AXES)
                )
                for r in rows
            )
            out = jitted(graphdef, state, consts, batch)
            out = (out if self.pick is None else out[self.pick]), valid
            # Fetch the previous batch only after dispatching this one: host and device overlap.
            if pending is not None:
                yield _fetch(*pending)
            pending = out
        if pending is not None:
            yield _fetch(*pending)

    def __call__(self, model, rows: Sequence[np.ndarray], consts: Sequence = ()):
        """All outputs, concatenated over batches."""
        outs = list(self.batches(model, rows, consts))
        if not outs:
            raise ValueError('Predictor called with no rows')
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


@functools.lru_cache(maxsize=32)
def jitted_apply(fn: Callable, mesh):
    """`fn` jitted as a Predictor runs it, one per (fn, mesh). The zeroshot, retrieval and
    probe evaluators encode images, and zeroshot, retrieval and dense texts, of the same
    shapes with `zeroshot.encode_*`; with a jitted function per evaluator the first
    evaluation compiled the image tower three times and the text tower three times
    (`pretrain.evaluate` on the quick start's run: 7 compilations, now 3). Bounded, as
    closures (one per evaluator built) are keys too.
    """

    def apply(graphdef, state, consts, rows):  # the graphdef is a static argument
        return fn(nnx.merge(graphdef, state), *consts, *rows)

    kwargs = {} if mesh.empty else {'out_shardings': sharding.replicated(mesh)}
    return jax.jit(apply, static_argnums=0, **kwargs)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _place(x: np.ndarray, mesh, spec: P):
    if mesh.empty:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def _fetch(out, valid: int):
    return jax.tree.map(lambda a: np.asarray(a)[:valid], jax.device_get(out))


def trim_padding(tokens_nl: np.ndarray, *, pad_id: int = 0, multiple: int = 16) -> np.ndarray:
    """Drops the padding columns no text reaches (kept to a multiple of 16 columns).

    Exact for the text tower: its pooling ignores padding and positions are sliced to the
    length given, and prompts of ~30 bytes in a 96-token context run ~3x faster.
    """
    used = int((tokens_nl != pad_id).sum(-1).max(initial=1))
    return tokens_nl[:, : min(tokens_nl.shape[1], -(-used // multiple) * multiple)]


def shapes_records(section, *, start: int, num: int, fields: Sequence[str]) -> dict:
    """Records [start, start + num) of the shapes eval split as stacked arrays (str fields:
    lists). The eval split is its own seed stream, so none of these scenes was trained on.
    """
    if section.source != 'shapes':
        raise ValueError(f"unknown eval source '{section.source}'; valid here: shapes")
    if num < 1:
        raise ValueError(f'need at least one eval example, got {num}')
    source = shapes.ShapesSource(
        split='eval',
        seed=section.seed,
        image_size=section.image_size,
        max_objects=section.max_objects,
        num_records=start + num,
    )
    records = [source[i] for i in range(start, start + num)]
    stackable = lambda f: isinstance(records[0][f], (np.ndarray, np.generic))
    return {
        f: np.stack([r[f] for r in records]) if stackable(f) else [r[f] for r in records]
        for f in fields
    }


# ---------------------------------------------------------------------------------------
# Real data. A section's `source` picks the input pipeline source; records hold ENCODED
# images, decoded here batch by batch (`DecodedImages`), so a 50k-image eval set never sits
# decoded in host memory: only the labels / captions / label maps are held.

# evaluator kind -> the real sources it reads (besides 'shapes').
REAL_SOURCES = {
    'zeroshot': ('folder', 'tfds'),
    'linear_probe': ('folder', 'tfds'),
    'retrieval': ('coco', 'flickr'),
    'dense_zeroshot': ('ade20k', 'voc'),
}


# Optional section fields of real sources and their defaults (a split per source).
SPLITS = {'tfds': 'test', 'coco': 'val2017', 'flickr': 'test', 'ade20k': 'validation', 'voc': 'val'}
OPTIONAL = dict(
    root='',
    annotations='',
    images='',
    tfds_name='',
    data_dir='',
    image_key='image',
    label_key='label',
    classnames=(),
    num_examples=0,  # 0: all; N: N records spread over the whole set (`subset`)
    num_threads=8,  # image decoding threads
    test_root='',  # linear_probe: the test split's folder ('folder')
    test_split='test',  # linear_probe: the test split ('tfds')
)


def field(section, key: str):
    """section[key], or its default when the section does not have it (split: per source)."""
    if key in section:
        return section[key]
    return SPLITS.get(section.source, '') if key == 'split' else OPTIONAL[key]


def open_source(section):
    """The input pipeline source a real-data section names; ValueError (one line, naming the
    path or field) if it cannot be opened or is empty."""
    kind, root, split = section.source, field(section, 'root'), field(section, 'split')
    if kind in ('folder', 'ade20k', 'voc') and not root:
        raise ValueError(f"source '{kind}' needs `root` (the dataset folder)")
    if kind == 'folder':
        return image_folder.ImageFolder(root)
    if kind == 'tfds':
        from input_pipeline.sources import tfds  # imports tensorflow_datasets: only when used

        if not field(section, 'tfds_name'):
            raise ValueError("source 'tfds' needs `tfds_name` (e.g. 'cifar10')")
        return tfds.TfdsSource(
            section.tfds_name,
            split=split,
            data_dir=field(section, 'data_dir'),
            fields={'image': field(section, 'image_key'), 'label': field(section, 'label_key')},
        )
    if kind in ('coco', 'flickr'):
        return coco.CaptionedImages(*caption_paths(section), split=split)
    if kind == 'ade20k':
        return segmentation.ADE20K(root, split)
    if kind == 'voc':
        return segmentation.PascalVOC(root, split)
    raise ValueError(f"unknown eval source '{kind}'")


def caption_paths(section) -> tuple[str, str]:
    """(captions file, image folder): `annotations` / `images` if set, else the standard
    layout under `root`: COCO root/annotations/captions_<split>.json + root/<split>/,
    Flickr30k root/dataset_flickr30k.json (Karpathy) + root/flickr30k-images/."""
    root, annotations, images = (field(section, k) for k in ('root', 'annotations', 'images'))
    if not (root or (annotations and images)):
        raise ValueError(f"source '{section.source}' needs `root` (or `annotations` and `images`)")
    if section.source == 'coco':
        default = coco.coco_paths(root, field(section, 'split'))
    else:
        default = (
            os.path.join(root, 'dataset_flickr30k.json'),
            os.path.join(root, 'flickr30k-images'),
        )
    return annotations or default[0], images or default[1]


def tfds_classnames(section) -> tuple[str, ...]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(section.tfds_name, data_dir=field(section, 'data_dir') or None)
    feature = builder.info.features[field(section, 'label_key')]
    if not hasattr(feature, 'names'):
        raise ValueError(
            f"tfds '{section.tfds_name}' field '{field(section, 'label_key')}' is a "
            f'{type(feature).__name__}, not a ClassLabel: set `classnames`'
        )
    return tuple(image_folder.class_name(n) for n in feature.names)


def subset(total: int, num: int) -> np.ndarray:
    """Indices of `num` records spread evenly over all `total` (every class of a sorted
    folder, not the first ones); num <= 0 or >= total: all."""
    if num <= 0 or num >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, num).round().astype(np.int64))


def decode_center_crop(size: int) -> Callable[[dict], np.ndarray]:
    """record -> uint8 (size, size, 3): decode, resize the short side, centre crop."""
    transform = transforms.DecodeResizeCenterCrop(size)
    return lambda record: transform(record)['image']


class DecodedImages:
    """The images of `source[indices]`, decoded on demand: `x[a:b]` -> uint8 (n, S, S, 3).

    Behaves as the (N, S, S, 3) array the Predictor slices batch by batch, with `len` and
    `shape`; `num_threads` decode in parallel (Pillow, libjpeg-turbo and OpenCV release the
    GIL). An undecodable image is an error naming its record: an eval set is fixed, and
    skipping a record would change the metric silently.
    """

    def __init__(
        self,
        source,
        indices,
        decode: Callable[[dict], np.ndarray],
        *,
        size: int,
        num_threads: int = 8,
    ):
        self.source, self.indices, self.decode = source, np.asarray(indices), decode
        self.shape = (len(self.indices), size, size, 3)
        self.num_threads = max(1, int(num_threads))

    def __len__(self) -> int:
        return self.shape[0]

    def _one(self, index: int) -> np.ndarray:
        record = self.source[int(index)]
        try:
            return self.decode(record)
        except Exception as e:
            raise ValueError(f"eval image {record.get('id', index)!r}: {e}") from e

    def __getitem__(self, key: slice) -> np.ndarray:
        indices = self.indices[key]
        if len(indices) == 0:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        with concurrent.futures.ThreadPoolExecutor(min(self.num_threads, len(indices))) as pool:
            return np.stack(list(pool.map(self._one, indices)))


def labels_of(source, indices) -> np.ndarray:
    if isinstance(source, image_folder.ImageFolder):
        return source.labels[indices]  # from the paths: no file read
    return np.asarray([source[int(i)]['label'] for i in indices], np.int64)


def classnames_of(section, source) -> tuple[str, ...]:
    """`classnames` if set (e.g. CLIP's readable ImageNet names for a folder of WordNet
    ids), else the folder names / TFDS label names with '_' read as a space."""
    if field(section, 'classnames'):
        return tuple(section.classnames)
    if isinstance(source, image_folder.ImageFolder):
        return source.classnames
    return tfds_classnames(section)


def _check_labels(labels, names):
    if len(labels) and labels.max() >= len(names):
        raise ValueError(f'labels go up to {labels.max()} but there are {len(names)} class names')


def decoded_images(section, source, indices, decode=None) -> DecodedImages:
    """The `indices` records of `source`, decoded per batch at section.image_size: centre
    cropped, unless `decode` (record -> image) says otherwise."""
    return DecodedImages(
        source,
        indices,
        decode or decode_center_crop(section.image_size),
        size=section.image_size,
        num_threads=field(section, 'num_threads'),
    )


def classification_data(section) -> tuple[DecodedImages, np.ndarray, tuple[str, ...]]:
    """(images, labels (N,), class names) of a 'folder' or 'tfds' section."""
    source = open_source(section)
    indices = subset(len(source), field(section, 'num_examples'))
    labels, names = labels_of(source, indices), classnames_of(section, source)
    _check_labels(labels, names)
    images = decoded_images(section, source, indices)
    return images, labels, names


def test_split_section(section):
    """The section of a probe's test split: `test_root` ('folder') / `test_split` ('tfds')."""
    test = ConfigDict(section.to_dict())
    test.root, test.split = field(section, 'test_root'), field(section, 'test_split')
    if section.source == 'folder' and not test.root:
        raise ValueError("source 'folder' needs `test_root` (the test split's folder)")
    return test


class Concat:
    """Records of several sources end to end (a probe's train split, then its test split)."""

    def __init__(self, *sources):
        self.sources = sources
        self.offsets = np.cumsum([0, *(len(s) for s in sources)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        k = int(np.searchsorted(self.offsets, index, side='right')) - 1
        return self.sources[k][int(index - self.offsets[k])]


def check_probe(section, train, test) -> None:
    """The probe's splits fit: a validation split smaller than train, the same classes."""
    if not 0 < section.num_val < len(train):
        raise ValueError(
            f'num_val must be in [1, {len(train) - 1}] (the train split has {len(train)})'
        )
    if isinstance(train, image_folder.ImageFolder) and train.classes != test.classes:
        raise ValueError(
            f"test_root '{test.root}' has other class folders than root '{train.root}'"
        )


def probe_data(section):
    """(images, labels, (train, train + val) cuts, num_classes) of a 'folder' / 'tfds' probe.

    Train and val come from the train split (`root` / `split`): `num_val` records drawn with
    a fixed seed, then `num_train` of the rest (0: all); test is `num_test` records (0: all)
    of the test split (`test_root` / `test_split`), spread evenly.
    """
    train, test = open_source(section), open_source(test_split_section(section))
    check_probe(section, train, test)
    names = classnames_of(section, train)
    num_val, num_train = section.num_val, section.num_train
    order = np.random.default_rng(0).permutation(len(train))
    val = np.sort(order[:num_val])
    rest = order[num_val:]
    train_idx = np.sort(rest[:num_train] if num_train > 0 else rest)
    test_idx = subset(len(test), section.num_test)
    labels = np.concatenate(
        [labels_of(train, train_idx), labels_of(train, val), labels_of(test, test_idx)]
    )
    _check_labels(labels, names)
    images = decoded_images(
        section, Concat(train, test), np.concatenate([train_idx, val, test_idx + len(train)])
    )
    cuts = np.array([len(train_idx), len(train_idx) + len(val)])
    return images, labels, cuts, len(names)


def caption_data(section) -> tuple[DecodedImages, list[str], np.ndarray]:
    """(images, captions image-major, caption -> image index) of a 'coco' / 'flickr' section:
    every caption of every image (COCO has 5-7), as the retrieval protocol counts them."""
    source = open_source(section)
    indices = subset(len(source), field(section, 'num_examples'))
    per_image = [source.captions(int(i)) for i in indices]
    captions = [c for caps in per_image for c in caps]
    txt_image = np.repeat(np.arange(len(indices)), [len(caps) for caps in per_image])
    images = decoded_images(section, source, indices)
    return images, captions, txt_image


def segmentation_data(section):
    """(images, segs (N, S, S) uint8, class names) of an 'ade20k' / 'voc' section.

    Image and label map share one centre-crop geometry (segmentation.py); the labels are
    held in memory (the ceiling needs them all), the images decoded per batch.
    """
    source = open_source(section)
    indices = subset(len(source), field(section, 'num_examples'))
    size = section.image_size
    segs = np.stack([segmentation.center_crop_labels(source.labels(int(i)), size) for i in indices])
    images = decoded_images(
        section, source, indices, decode=lambda r: segmentation.center_crop_pair(r, size)['image']
    )
    names = tuple(field(section, 'classnames')) or source.classnames
    if len(names) != len(source.classnames):
        raise ValueError(
            f'classnames: {len(names)} names for the {len(source.classnames)} classes of '
            f"'{section.source}'"
        )
    return images, segs, names
