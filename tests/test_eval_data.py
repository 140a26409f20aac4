"""Evaluators on real-data layouts: ImageFolder, TFDS, COCO / Karpathy / Flickr captions,
ADE20K and Pascal VOC, built here as small fixtures with Pillow.

End to end, each evaluator runs on a known-answer model (`CodeModel`): its image features
are a one-hot of a code painted into the pixels, its text features a one-hot of the code the
test gives each prompt or caption. So what a right evaluator must report follows from the
fixture alone, and the tests compute it in numpy (brute-force recall, a confusion matrix),
independently of the evaluators' chunked / batched code.
"""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ml_collections import ConfigDict

from configs import clip, common as config_common
from conftest import read_metrics
from input_pipeline import tokenizers, transforms
from input_pipeline.sources import coco, image_folder, segmentation
from pretrain import config_cli
from pretrain.evaluators import build_evaluators, common
from pretrain.evaluators.build import check_source

STEP = 30  # red = code * STEP: far enough apart to survive JPEG and resizing (codes <= 8)
CONTEXT = 48
DIM = 16  # codes 0..15


# --- the known-answer model -------------------------------------------------------------


class Patch(nnx.Module):
    def __init__(self, patch: int):
        self.patch = patch


class CodeModel(nnx.Module):
    """image -> one_hot(round(mean red / STEP)), per image and per patch; text -> one_hot of
    the code given to that exact text (zeros for an unknown one)."""

    def __init__(self, text_codes: dict, *, patch: int = 8):
        tokenizer = tokenizers.ByteTokenizer(CONTEXT)  # the evaluators' (input.tokenizer)
        texts = list(text_codes)
        self.table = nnx.Variable(jnp.asarray(tokenizer(texts)))
        self.codes = nnx.Variable(jnp.asarray([text_codes[t] for t in texts]))
        self.image = Patch(patch)

    def _code(self, red):
        return jax.nn.one_hot(jnp.clip(jnp.round(red / STEP), 0, DIM - 1).astype(jnp.int32), DIM)

    def encode_image(self, images):
        x = images.astype(jnp.float32)[..., 0]
        b, h, w = x.shape
        p = self.image.patch
        patches = x.reshape(b, h // p, p, w // p, p).mean((2, 4)).reshape(b, -1)
        code = self._code(x.mean((1, 2)))  # aux as ImageTextModel's: evaluators read pooled
        return code, {'img/pooled': code, 'img/tokens': self._code(patches)}

    def image_proj(self, tokens):
        return tokens

    def encode_text(self, tokens):
        table = self.table[...]
        n = tokens.shape[1]  # the evaluators trim padding columns; the rest must be padding
        same = (table[None, :, :n] == tokens[:, None, :]).all(-1) & (table[None, :, n:] == 0).all(
            -1
        )
        code = jnp.where(same.any(-1), self.codes[...][jnp.argmax(same, -1)], -1)
        return jnp.where(code[:, None] >= 0, jax.nn.one_hot(code, DIM), 0.0), {}


def run(evaluator, model):
    return dict(evaluator.run(model))


def tiny_config(evals: dict):
    config = clip.get_config('tiny')
    config.input.update(image_size=32, context_length=CONTEXT, tokenizer='bytes')
    config.evals = evals
    return config


def build_one(section, name='real'):
    section.batch_size = 4  # several batches, the last one padded
    (evaluator,) = build_evaluators(tiny_config({name: section}))
    return evaluator


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    return buf.getvalue()


def solid(code: int, shape, rng) -> np.ndarray:
    """An image of red code * STEP, green and blue random (one colour: JPEG keeps it)."""
    return np.broadcast_to([code * STEP, *rng.integers(0, 256, 2)], (*shape, 3)).astype(np.uint8)


# --- sources ----------------------------------------------------------------------------

FOLDER_CLASSES = ('blue', 'dark_red', 'green')  # sorted: labels 0, 1, 2


WRONG = {('dark_red', 1): 3, ('green', 2): 1}  # (class, index) -> painted code


def make_image_folder(root, rng, wrong=WRONG):
    """3 classes of JPEG and PNG images of several sizes; painted code = label + 1, except
    the `wrong` ones. Returns (labels, painted codes) in source order."""
    labels, codes = [], []
    for label, name in enumerate(FOLDER_CLASSES):
        os.makedirs(root / name / 'nested')
        for i, (shape, fmt) in enumerate(
            [((40, 50), 'JPEG'), ((32, 32), 'PNG'), ((64, 48), 'JPEG'), ((30, 30), 'PNG')]
        ):
            code = wrong.get((name, i), label + 1)
            folder = root / name / ('nested' if i == 3 else '')
            ext = '.jpg' if fmt == 'JPEG' else '.png'
            (folder / f'{i}{ext}').write_bytes(encode(solid(code, shape, rng), fmt))
            labels.append(label)
            codes.append(code)
    (root / 'green' / 'README.txt').write_text('not an image')
    return np.array(labels), np.array(codes)


def test_image_folder_source(tmp_path):
    make_image_folder(tmp_path, np.random.default_rng(0))
    source = image_folder.ImageFolder(str(tmp_path))
    assert source.classnames == ('blue', 'dark red', 'green') and len(source) == 12
    record = source[6]
    assert record['label'] == 1 and record['id'] == os.path.join('dark_red', '2.jpg')
    assert isinstance(record['image'], bytes) and record['image'][:2] == b'\xff\xd8'
    assert source[7]['id'] == os.path.join('dark_red', 'nested', '3.png')  # nested folders
    assert source.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # the README is left out
    with pytest.raises(ValueError, match="no such directory '.*missing'"):
        image_folder.ImageFolder(str(tmp_path / 'missing'))
    (tmp_path / 'empty' / 'a').mkdir(parents=True)
    with pytest.raises(ValueError, match='has no images'):
        image_folder.ImageFolder(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='has no class sub-folders'):
        image_folder.ImageFolder(str(tmp_path / 'empty' / 'a'))


def coco_fixture(root, rng, num_images=7):
    """COCO val layout with 2-5 captions per image (plus one image without any, left out).
    Image i is painted code i + 1; captions are 'caption k of image i'."""
    (root / 'annotations').mkdir(parents=True)
    (root / 'val2017').mkdir()
    images, annotations, captions = [], [], []
    for i in range(num_images + 1):
        image_id = 100 + 7 * i  # ids are not indices
        name = f'{image_id:012d}.jpg'
        (root / 'val2017' / name).write_bytes(encode(solid(i + 1, (36, 44), rng), 'JPEG'))
        images.append({'id': image_id, 'file_name': name, 'height': 36, 'width': 44})
        if i == num_images:
            continue  # no caption: not in the eval set
        caps = [f'caption {k} of image {i}' for k in range(2 + i % 4)]
        captions.append(caps)
        for k, text in enumerate(caps):
            annotations.append(
                {'id': len(annotations), 'image_id': image_id, 'caption': text + ' \n'}
            )
    rng.shuffle(annotations)  # captions of an image are not contiguous in COCO files
    data = {'images': images, 'annotations': annotations, 'info': {}, 'licenses': []}
    (root / 'annotations' / 'captions_val2017.json').write_text(json.dumps(data))
    # The order within an image is the file's order: read it back as COCO files have it.
    order = {}
    for ann in annotations:
        order.setdefault(ann['image_id'], []).append(ann['caption'].strip())
    return [order[100 + 7 * i] for i in range(num_images)]


def test_coco_karpathy_and_flickr_sources(tmp_path):
    rng = np.random.default_rng(1)
    captions = coco_fixture(tmp_path, rng)
    source = coco.CaptionedImages(*coco.coco_paths(str(tmp_path), 'val2017'))
    assert len(source) == 7  # the caption-less image is left out
    record = source[2]
    assert record['id'] == 114 and record['captions'] == captions[2]
    assert record['caption'] == captions[2][0] and record['image'][:2] == b'\xff\xd8'
    assert sorted(len(c) for c in captions) == sorted(2 + i % 4 for i in range(7))
    # One caption drawn per example per epoch: all of them over epochs, reproducibly.
    sample = coco.SampleCaption()
    drawn = {
        transforms.apply([sample], record, rng_key=(0, epoch, 2))['caption'] for epoch in range(40)
    }
    assert drawn == set(captions[2])
    again = transforms.apply([sample], record, rng_key=(0, 3, 2))['caption']
    assert again == transforms.apply([sample], record, rng_key=(0, 3, 2))['caption']

    karpathy = {
        'images': [
            {'filename': 'a.jpg', 'filepath': 'val2017', 'split': 'test', 'imgid': 0,
             'sentences': [{'raw': 'one '}, {'raw': 'two'}]},
            {'filename': 'b.jpg', 'filepath': 'val2017', 'split': 'train', 'imgid': 1,
             'sentences': [{'raw': 'three'}]},
        ]
    }  # fmt: skip
    (tmp_path / 'dataset_coco.json').write_text(json.dumps(karpathy))
    items = coco.read_captions(str(tmp_path / 'dataset_coco.json'), split='test')
    assert [(i.path, i.captions) for i in items] == [
        (os.path.join('val2017', 'a.jpg'), ('one', 'two'))
    ]
    with pytest.raises(ValueError, match=r"no images in split 'val'; splits: \['test', 'train'\]"):
        coco.read_captions(str(tmp_path / 'dataset_coco.json'), split='val')
    (tmp_path / 'results.token').write_text(
        'x.jpg#0\tA dog.\nx.jpg#1\tA brown dog.\n\ny.jpg#0\tA cat.\n'
    )
    items = coco.read_captions(str(tmp_path / 'results.token'))
    assert [(i.path, i.captions) for i in items] == [
        ('x.jpg', ('A dog.', 'A brown dog.')),
        ('y.jpg', ('A cat.',)),
    ]
    with pytest.raises(ValueError, match="no such file '.*nope.json'"):
        coco.CaptionedImages(str(tmp_path / 'nope.json'), str(tmp_path))


def make_ade20k(root, rng, num=3):
    """80 x 64 images (centre square: columns 8..72) of 16 x 16 blocks, resized 2x down to
    32 px: each 8 px patch is one block. Labels use 3 classes + 0 ('other', ignored); the
    painted code is the label's code except a few wrong blocks. The side bands that the
    crop drops carry a class of their own (label 9) that must not show in the scores."""
    (root / 'images' / 'validation').mkdir(parents=True)
    (root / 'annotations' / 'validation').mkdir(parents=True)
    code_of = {3: 1, 7: 2, 13: 3}  # ADE label -> painted code
    segs, painted = [], []
    for n in range(num):
        blocks = rng.choice([0, 3, 7, 13], size=(4, 4), p=[0.1, 0.3, 0.3, 0.3])
        codes = np.vectorize(lambda l: code_of.get(l, 0))(blocks)
        codes[rng.random((4, 4)) < 0.2] = rng.integers(1, 4)  # some wrong blocks
        label = np.full((64, 80), 9, np.uint8)
        label[:, 8:72] = np.kron(blocks, np.ones((16, 16), np.int64))
        label[:4, 8:12] = 0  # a corner of 'other' inside a block: not scored
        red = np.full((64, 80), 5 * STEP, np.uint8)
        red[:, 8:72] = np.kron(codes, np.ones((16, 16), np.int64)) * STEP
        image = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
        image[..., 0] = red
        stem = f'ADE_val_{n:08d}'
        # Lossless data under the layout's .jpg name (decoders go by content): the painted
        # codes must survive exactly for the known answer.
        (root / 'images' / 'validation' / f'{stem}.jpg').write_bytes(encode(image, 'PNG'))
        Image.fromarray(label, mode='L').save(root / 'annotations' / 'validation' / f'{stem}.png')
        segs.append(label)
        painted.append(codes)
    return np.stack(segs), np.stack(painted), code_of


def make_voc(root, rng, num=3):
    """VOC layout, palette label PNGs: 0 background, classes 1..20, 255 borders."""
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / d).mkdir(parents=True)
    code_of = {0: 4, 1: 1, 15: 2}  # background, aeroplane, person -> painted code
    segs, painted, ids = [], [], []
    for n in range(num):
        blocks = rng.choice([0, 1, 15], size=(4, 4))
        codes = np.vectorize(code_of.get)(blocks)
        codes[rng.random((4, 4)) < 0.25] = rng.choice([1, 2, 4])
        label = np.kron(blocks, np.ones((16, 16), np.int64)).astype(np.uint8)
        label[20:22, :] = 255  # an object border: not scored
        image = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
        image[..., 0] = np.kron(codes, np.ones((16, 16), np.int64)) * STEP
        stem = f'2007_{n:06d}'
        (root / 'JPEGImages' / f'{stem}.jpg').write_bytes(encode(image, 'PNG'))
        png = Image.fromarray(label, mode='P')
        png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        png.save(root / 'SegmentationClass' / f'{stem}.png')
        segs.append(label)
        painted.append(codes)
        ids.append(stem)
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('\n'.join(ids) + '\n')
    return np.stack(segs), np.stack(painted), code_of


def test_segmentation_sources_and_shared_geometry(tmp_path):
    rng = np.random.default_rng(2)
    ade_segs, _, _ = make_ade20k(tmp_path / 'ade', rng)
    ade = segmentation.ADE20K(str(tmp_path / 'ade'))
    assert len(ade) == 3 and len(ade.classnames) == 150 and ade.classnames[2] == 'sky'
    record = ade[1]
    want = np.where(ade_segs[1] == 0, 255, ade_segs[1])
    np.testing.assert_array_equal(record['seg'], want)  # 0 'other' -> IGNORE
    assert record['id'] == 'ADE_val_00000001' and isinstance(record['image'], bytes)
    out = segmentation.center_crop_pair(record, 32)
    assert out['image'].shape == (32, 32, 3) and out['seg'].shape == (32, 32)
    # the centre square, 2x down at pixel centres (PIL's nearest: source pixel 2i + 1)
    np.testing.assert_array_equal(out['seg'], want[:, 8:72][1::2, 1::2])
    # image and labels share the geometry: the painted code of every pixel is its block's
    np.testing.assert_array_equal(
        out['image'][..., 0],
        Image.open(io.BytesIO(record['image']))
        .crop((8, 0, 72, 64))
        .resize((32, 32), Image.NEAREST)
        .getchannel(0),
    )

    voc_segs, _, _ = make_voc(tmp_path / 'voc', rng)
    voc = segmentation.PascalVOC(str(tmp_path / 'voc'))
    assert len(voc) == 3 and voc.classnames[0] == 'aeroplane' and len(voc.classnames) == 20
    np.testing.assert_array_equal(voc[2]['seg'], voc_segs[2])  # palette indices, as is
    os.remove(tmp_path / 'voc' / 'SegmentationClass' / '2007_000001.png')
    with pytest.raises(ValueError, match="lists '2007_000001' but '.*2007_000001.png' is missing"):
        segmentation.PascalVOC(str(tmp_path / 'voc'))
    with pytest.raises(ValueError, match='ADE20K: no such directory'):
        segmentation.ADE20K(str(tmp_path / 'voc'))
    rgb = io.BytesIO()
    Image.new('RGB', (4, 4)).save(rgb, format='PNG')
    with pytest.raises(ValueError, match='label PNG has mode RGB'):
        segmentation.read_label_png(rgb.getvalue())


# --- evaluators end to end --------------------------------------------------------------


def prompt_codes(names, templates, codes):
    return {
        t: c for name, c in zip(names, codes) for t in common.Prompts((name,), templates).texts()
    }


def test_zeroshot_on_an_image_folder_end_to_end(tmp_path):
    labels, codes = make_image_folder(tmp_path, np.random.default_rng(3))
    templates = ('a photo of a {}.', 'a {}.')
    section = config_common.folder_zeroshot_eval(str(tmp_path), templates=templates)
    evaluator = build_one(section)
    names = ('blue', 'dark red', 'green')
    model = CodeModel(prompt_codes(names, templates, [1, 2, 3]))
    out = run(evaluator, model)
    # Known answer: an image is classified as the class of its painted code.
    assert out == {'real/top1': pytest.approx(np.mean(codes - 1 == labels))}
    assert out['real/top1'] == pytest.approx(10 / 12)
    # An evenly spread subset keeps every class.
    evaluator = build_one(
        config_common.folder_zeroshot_eval(str(tmp_path), num_examples=6, templates=templates)
    )
    images, sub_labels, _ = common.classification_data(evaluator.config)
    assert len(images) == 6 and set(sub_labels.tolist()) == {0, 1, 2}
    assert images[1:4].shape == (3, 32, 32, 3) and images.shape == (6, 32, 32, 3)


def test_linear_probe_on_image_folders_end_to_end(tmp_path):
    rng = np.random.default_rng(12)
    for n in range(3):  # train: 36 images, all painted right
        make_image_folder(tmp_path / 'train' / f'part{n}', rng, wrong={})
    # One ImageFolder of the three parts: move the class folders' files together.
    for name in FOLDER_CLASSES:
        for n in range(3):
            src = tmp_path / 'train' / f'part{n}' / name
            os.renames(src, tmp_path / 'train_all' / name / f'part{n}')
    labels, codes = make_image_folder(tmp_path / 'test', rng)
    section = config_common.folder_probe_eval(
        str(tmp_path / 'train_all'), str(tmp_path / 'test'), num_val=9, feature='embedding'
    )
    evaluator = build_one(section)
    images, all_labels, cuts, num_classes = common.probe_data(evaluator.config)
    assert (len(images), tuple(cuts), num_classes) == (48, (27, 36), 3)
    assert all_labels[36:].tolist() == labels.tolist()  # test = the test folder, in order
    out = run(evaluator, CodeModel({}))
    # Known answer: features are the painted code, which train labels map 1:1 to classes.
    assert out['real/val_top1'] == 1.0
    assert out['real/top1'] == pytest.approx(np.mean(codes - 1 == labels))  # 10 / 12
    section.num_val = 36
    with pytest.raises(ValueError, match=r'evals.real: num_val must be in \[1, 35\]'):
        build_one(section)
    (tmp_path / 'other' / 'cat').mkdir(parents=True)
    (tmp_path / 'other' / 'cat' / '0.png').write_bytes(encode(solid(1, (8, 8), rng), 'PNG'))
    section.num_val, section.test_root = 9, str(tmp_path / 'other')
    with pytest.raises(ValueError, match="evals.real: test_root '.*other' has other class"):
        build_one(section)


def write_tiny_tfds(data_dir, rng):
    """A TFDS classification dataset in ArrayRecord, written without TensorFlow: the Image
    feature takes already-encoded PNG bytes. Splits: 'test' (9, one painted wrong) and
    'train' (12, all right)."""
    import tensorflow_datasets as tfds

    labels = [i % 3 for i in range(9)]
    codes = [l + 1 if i != 4 else 3 for i, l in enumerate(labels)]

    class TinyColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(None, None, 3)),
                    'label': tfds.features.ClassLabel(names=list(FOLDER_CLASSES)),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            train = [(i % 3, i % 3 + 1) for i in range(12)]
            return {
                'test': self._generate_examples(zip(labels, codes)),
                'train': self._generate_examples(train),
            }

        def _generate_examples(self, items):
            for i, (label, code) in enumerate(items):
                yield i, {'image': encode(solid(code, (24, 40), rng), 'PNG'), 'label': label}

    TinyColours(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
    return 'tiny_colours', np.array(labels), np.array(codes)


def test_zeroshot_on_a_tfds_dataset_end_to_end(tmp_path):
    name, labels, codes = write_tiny_tfds(tmp_path, np.random.default_rng(4))
    templates = ('a photo of a {}.',)
    section = config_common.tfds_zeroshot_eval(name, data_dir=str(tmp_path), templates=templates)
    evaluator = build_one(section)
    model = CodeModel(prompt_codes(('blue', 'dark red', 'green'), templates, [1, 2, 3]))
    assert run(evaluator, model) == {'real/top1': pytest.approx(np.mean(codes - 1 == labels))}
    # The linear probe: train + val from 'train', test from 'test' (known answer as above).
    section = config_common.tfds_probe_eval(
        name, data_dir=str(tmp_path), num_val=3, feature='embedding'
    )
    out = run(build_one(section), CodeModel({}))
    assert out['real/val_top1'] == 1.0
    assert out['real/top1'] == pytest.approx(np.mean(codes - 1 == labels))  # 8 / 9
    section.test_split = 'validation'
    with pytest.raises(
        ValueError, match=r"^evals.real: tfds source: cannot open 'tiny_colours' split 'valid"
    ):
        build_one(section)


def np_recall(img, txt, txt_image, k):
    """Brute force: the full similarity matrix; i2t hits if ANY own caption is in the top k."""
    sims = img @ txt.T
    i2t = []
    for i in range(len(img)):
        order = np.argsort(-sims[i], kind='stable')
        own = np.flatnonzero(txt_image == i)
        best = sims[i, own].max()
        rank = (sims[i] >= best).sum() - (sims[i, own] >= best).sum()  # ties count against
        i2t.append(rank < k)
    t2i = [(sims[:, j] >= sims[txt_image[j], j]).sum() - 1 < k for j in range(len(txt))]
    return np.mean(i2t), np.mean(t2i)


def test_retrieval_on_coco_end_to_end(tmp_path):
    rng = np.random.default_rng(5)
    captions = coco_fixture(tmp_path, rng)
    # The model reads caption k of image i as image i's code, except a few it gets wrong.
    text_codes, txt_image, txt_code = {}, [], []
    for i, caps in enumerate(captions):
        for k, text in enumerate(caps):
            code = i + 1 if (i + k) % 3 else (i + 3) % 7 + 1  # every 3rd caption points elsewhere
            text_codes[text] = code
            txt_image.append(i)
            txt_code.append(code)
    section = config_common.coco_retrieval_eval(str(tmp_path), chunk_size=3)  # chunks of 3
    evaluator = build_one(section)
    out = run(evaluator, CodeModel(text_codes))
    img = np.eye(DIM)[np.arange(1, 8)]
    txt = np.eye(DIM)[txt_code]
    for k in (1, 5, 10):
        i2t, t2i = np_recall(img, txt, np.array(txt_image), k)
        assert out[f'real/i2t_r{k}'] == pytest.approx(i2t), k
        assert out[f'real/t2i_r{k}'] == pytest.approx(t2i), k
    assert 0 < out['real/t2i_r1'] < 1


def np_miou(gt, pred, num_labels, include_background):
    """mIoU from scratch: pixels of gt >= num_labels dropped, classes present in gt or pred."""
    keep = gt < num_labels
    gt, pred = gt[keep], pred[keep]
    ious = []
    for c in range(0 if include_background else 1, num_labels):
        union = ((gt == c) | (pred == c)).sum()
        if union:
            ious.append(((gt == c) & (pred == c)).sum() / union)
    return np.mean(ious)


def patches(label_map, p=8):
    """(H/p, W/p, p, p) blocks of a label map."""
    h, w = label_map.shape
    return label_map.reshape(h // p, p, w // p, p).transpose(0, 2, 1, 3)


def majority(block):
    """The most frequent scored label (the lowest on ties), -1 if none is scored."""
    scored = block[block < 255]
    return np.bincount(scored).argmax() if scored.size else -1


@pytest.mark.parametrize('layout', ['ade20k', 'voc'])
def test_dense_zeroshot_on_ade20k_and_voc_end_to_end(tmp_path, layout):
    rng = np.random.default_rng(6)
    templates = ('a photo of a {}.',)
    if layout == 'ade20k':
        segs, painted, code_of = make_ade20k(tmp_path, rng)
        section = config_common.ade20k_eval(str(tmp_path), templates=templates, readout='tokens')
        names, background_codes = segmentation.ADE20K_CLASSES, {}
        crop = np.where(segs[:, :, 8:72] == 0, 255, segs[:, :, 8:72])  # 'other' is ignored
    else:
        segs, painted, code_of = make_voc(tmp_path, rng)
        section = config_common.voc_eval(str(tmp_path), templates=templates, readout='tokens')
        names = segmentation.VOC_CLASSES
        background_codes = {p: code_of[0] for p in section.background_prompts}
        crop = segs
    # Class c (label 1 + c) -> its painted code; classes not in the fixture -> an unused code.
    class_codes = [code_of.get(1 + c, DIM - 1) for c in range(len(names))]
    model = CodeModel({**prompt_codes(names, templates, class_codes), **background_codes})
    out = run(build_one(section), model)
    # Known answer: each 8 px patch (a 16 px block of the original) takes the label whose
    # code is painted on it (0 = background for VOC), upsampled to the 32 px label crop.
    label_of = {code: label for label, code in code_of.items()}
    label_of.setdefault(0, 1)  # ADE's unpainted 'other': no class scores, argmax = label 1
    pred = np.kron(np.vectorize(label_of.get)(painted), np.ones((1, 8, 8), np.int64))
    gt = crop[:, 1::2, 1::2]
    num_labels = 1 + len(names)
    want = np_miou(gt, pred, num_labels, include_background=layout == 'voc')
    assert out['real/miou'] == pytest.approx(want)
    assert 0.2 < want < 0.95  # a figure between floor and ceiling
    gt_patch = np.array([[[majority(b) for b in row] for row in patches(g)] for g in gt])
    scored = gt_patch >= 0
    patch_pred = np.vectorize(label_of.get)(painted)
    assert out['real/patch_acc'] == pytest.approx((patch_pred == gt_patch)[scored].mean())


# --- build-time errors and the config a user types --------------------------------------


def test_build_errors_are_one_line_and_name_the_section(tmp_path):
    cases = [
        (
            config_common.folder_zeroshot_eval(str(tmp_path / 'none')),
            "evals.real: image folder: no such directory '.*none'",
        ),
        (
            config_common.folder_zeroshot_eval(str(tmp_path)),
            "evals.real: image folder '.*' has no class sub-folders",
        ),
        (config_common.coco_retrieval_eval(), "evals.real: source 'coco' needs `root`"),
        (config_common.ade20k_eval(), "evals.real: source 'ade20k' needs `root`"),
        (config_common.voc_eval(str(tmp_path)), "evals.real: Pascal VOC: no such file '.*val.txt'"),
    ]
    for section, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            build_one(section)
        assert '\n' not in str(info.value)
    with pytest.raises(
        ValueError,
        match="evals.x.source: unknown source 'coco' for a zeroshot evaluator; "
        'valid: shapes, folder, tfds',
    ):
        check_source('zeroshot', ConfigDict({'source': 'coco'}), 'x')
    with pytest.raises(
        ValueError, match="'voc' for a linear_probe evaluator; valid: shapes, folder, tfds$"
    ):
        check_source('linear_probe', ConfigDict({'source': 'voc'}), 'x')


def test_eval_real_config_with_overrides(tmp_path):
    coco_fixture(tmp_path / 'coco', np.random.default_rng(7))
    make_voc(tmp_path / 'voc', np.random.default_rng(8))
    config = config_cli.build_config(
        'configs/eval_real.py:clip',
        [
            ('evals.coco.root', str(tmp_path / 'coco')),
            ('evals.voc.root', str(tmp_path / 'voc')),
            ('evals.voc.num_examples', '2'),
        ],
    )
    assert config.model.image.image_size == 64 and set(config.evals) >= {
        'imagenet',
        'coco',
        'ade20k',
        'voc',
    }
    evaluators = build_evaluators(config, ['coco', 'voc'])
    assert [(e.name, e.config.source, e.config.image_size) for e in evaluators] == [
        ('coco', 'coco', 64),
        ('voc', 'voc', 64),
    ]
    with pytest.raises(ValueError, match="evals.imagenet: source 'folder' needs `root`"):
        build_evaluators(config, ['imagenet'])
    with pytest.raises(config_cli.ConfigError, match='name the training config'):
        config_cli.build_config('configs/eval_real.py', [])
    # A run's config.json (as a workdir holds it) works too, and the evaluators tokenize
    # with the run's tokenizer.
    train_config = clip.get_config('tiny')
    train_config.input.image_size = 48
    train_config.input.tokenizer_path = '/models/spm.model'
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.json').write_text(train_config.to_json())
    config = config_cli.build_config(
        f"configs/eval_real.py:{tmp_path / 'run'}", [('evals.coco.root', str(tmp_path / 'coco'))]
    )
    (evaluator,) = build_evaluators(config, ['coco'])
    assert evaluator.config.image_size == 48
    assert evaluator.config.tokenizer_path == '/models/spm.model'
    with pytest.raises(config_cli.ConfigError, match="no training config '.*nope.json'"):
        config_cli.build_config(f"configs/eval_real.py:{tmp_path / 'nope.json'}", [])


@pytest.mark.slow
def test_evaluate_command_on_real_data(python, tmp_path):
    """The command a user types: a checkpoint of configs/clip.py, evaluated on ImageFolder,
    COCO and VOC fixtures through configs/eval_real.py."""
    from conftest import TINY

    make_image_folder(tmp_path / 'folder', np.random.default_rng(9))
    coco_fixture(tmp_path / 'coco', np.random.default_rng(10))
    make_voc(tmp_path / 'voc', np.random.default_rng(11))
    wd = str(tmp_path / 'run')
    python(['-m', 'pretrain.main', '--config', 'configs/clip.py', '--workdir', wd, *TINY])
    proc = python(
        [
            '-m',
            'pretrain.evaluate',
            '--config',
            f'configs/eval_real.py:{wd}',  # the run's config.json: TINY overrides included
            '--workdir',
            wd,
            '--only',
            'imagenet,coco,voc',
            f'--config.evals.imagenet.root={tmp_path / "folder"}',
            f'--config.evals.coco.root={tmp_path / "coco"}',
            f'--config.evals.voc.root={tmp_path / "voc"}',
            "--config.evals.imagenet.templates=('a photo of a {}.',)",
        ]
    )
    for metric in ('imagenet/top1', 'coco/i2t_r5', 'coco/t2i_r10', 'voc/miou'):
        assert f'eval/{metric}' in proc.stdout, proc.stdout
    row = read_metrics(wd)[-1]
    assert 0 <= row['eval/voc/miou'] <= 1 and 0 <= row['eval/coco/t2i_r1'] <= 1
    proc = python(
        ['-m', 'pretrain.evaluate', '--config', 'configs/eval_real.py:clip', '--workdir', wd]
        + [*TINY, '--only', 'ade20k'],
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: evals.ade20k: source 'ade20k' needs `root` (the dataset folder)"
    )
