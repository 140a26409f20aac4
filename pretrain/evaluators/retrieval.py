"""Image <-> text retrieval, Recall@K in both directions (COCO / Flickr30k protocol).

Several captions per image are allowed: image->text is a hit at K if ANY of the image's
captions is among the K best texts; text->image scores each caption against its own image.
Similarities are computed in chunks of `chunk_size` queries, so memory is chunk x N, never
N x N (5k COCO images x 25k captions would be 0.5 GB in float32).

Shapes default: held-out images, one caption each from `caption_fields` (the accurate
`caption`; add 'alt_text' for two per image). Short shapes captions repeat word for word
(27% of the 512 default eval captions have a twin: "a green square" describes many scenes),
and identical texts have identical embeddings, so no model can rank one above its twin.
Images whose captions are identical therefore form one group (`image_group_n`) and share
their captions: a twin's caption is a right answer for the image and vice versa, as each
of an image's five COCO captions is. Real data: source 'coco' (captions_val2017.json
layout) or 'flickr' (Karpathy split JSON or Flickr token file), every caption of every image
(common.caption_data).
"""

from __future__ import annotations

import numpy as np

from input_pipeline import pipeline
from pretrain.evaluators import common
from pretrain.evaluators.zeroshot import encode_images, encode_texts


def image_to_text_ranks(img_nd, txt_td, txt_image_t, *, chunk_size: int, image_group_n=None):
    """(N,) rank of each image's best-scoring own caption among the other images' captions.

    A caption is the image's own if its image is in the image's group (default: each
    image its own group). Ties count against the image (a constant model ranks last).
    """
    group_n = _groups(image_group_n, len(img_nd))
    return _ranks(img_nd, txt_td, group_n, group_n[np.asarray(txt_image_t)], chunk_size)


def text_to_image_ranks(img_nd, txt_td, txt_image_t, *, chunk_size: int, image_group_n=None):
    """(T,) rank of each caption's best-scoring own image (any image of its image's group)
    among the other images (ties count against)."""
    group_n = _groups(image_group_n, len(img_nd))
    return _ranks(txt_td, img_nd, group_n[np.asarray(txt_image_t)], group_n, chunk_size)


def _ranks(query_qd, key_kd, query_group_q, key_group_k, chunk_size: int) -> np.ndarray:
    """(Q,) number of keys of other groups that score at least the query's best own key."""
    ranks = np.empty(len(query_qd), np.int64)
    for s in range(0, len(query_qd), chunk_size):
        sims = query_qd[s : s + chunk_size] @ key_kd.T  # (c, K)
        own = key_group_k[None, :] == query_group_q[s : s + len(sims), None]
        best = np.where(own, sims, -np.inf).max(1)
        ranks[s : s + len(sims)] = ((sims >= best[:, None]) & ~own).sum(1)
    return ranks


def _groups(image_group_n, num_images: int) -> np.ndarray:
    if image_group_n is None:
        return np.arange(num_images)
    image_group_n = np.asarray(image_group_n)
    if image_group_n.shape != (num_images,):
        raise ValueError(f'image_group_n has shape {image_group_n.shape}, need ({num_images},)')
    return image_group_n


def recall_at_k(
    img_nd, txt_td, txt_image_t, *, ks=(1, 5, 10), chunk_size: int = 1024, image_group_n=None
) -> dict:
    """{'i2t_r1': ..., 't2i_r1': ...}: fractions of queries with a right answer in the top K.

    `txt_image_t[j]` is the index of caption j's image; every image needs a caption.
    `image_group_n` (optional) groups images that share all their captions (see above).
    """
    counts = np.bincount(np.asarray(txt_image_t), minlength=len(img_nd))
    if counts.shape[0] != len(img_nd) or (counts == 0).any():
        raise ValueError('every image needs at least one caption, and every caption an image')
    kw = dict(chunk_size=chunk_size, image_group_n=image_group_n)
    i2t = image_to_text_ranks(img_nd, txt_td, txt_image_t, **kw)
    t2i = text_to_image_ranks(img_nd, txt_td, txt_image_t, **kw)
    out = {f'i2t_r{k}': float((i2t < k).mean()) for k in ks}
    out.update({f't2i_r{k}': float((t2i < k).mean()) for k in ks})
    return out


def caption_groups(captions_per_image: list[tuple[str, ...]]) -> np.ndarray:
    """(N,) group id per image: images with word-for-word identical captions share one."""
    ids = {}
    return np.array([ids.setdefault(caps, len(ids)) for caps in captions_per_image], np.int64)


class Retrieval:
    """Yields `<name>/i2t_r{K}` and `<name>/t2i_r{K}` for K in `ks`."""

    def __init__(self, config, *, name: str = 'retrieval'):
        self.config, self.name = config, name
        if config.source == 'shapes' and not config.caption_fields:
            raise ValueError(f'evals.{name}.caption_fields is empty')
        self._images = common.Predictor(encode_images, batch_size=config.batch_size, pick=0)
        self._texts = common.Predictor(encode_texts, batch_size=config.batch_size)
        self._data = None

    def _load(self):
        c = self.config
        tokenize = lambda captions: common.trim_padding(pipeline.make_tokenizer(c)(captions))
        if c.source != 'shapes':
            images, captions, txt_image = common.caption_data(c)
            return images, tokenize(captions), txt_image, None
        fields = list(c.caption_fields)
        rec = common.shapes_records(c, start=c.start, num=c.num_examples, fields=['image', *fields])
        per_image = [tuple(rec[f][i] for f in fields) for i in range(c.num_examples)]
        captions = [caption for caps in per_image for caption in caps]  # image-major
        txt_image = np.repeat(np.arange(c.num_examples), len(fields))
        return rec['image'], tokenize(captions), txt_image, caption_groups(per_image)

    def run(self, model):
        if self._data is None:
            self._data = self._load()
        images, tokens, txt_image, image_group = self._data
        metrics = recall_at_k(
            self._images(model, [images]),
            self._texts(model, [tokens]),
            txt_image,
            ks=tuple(self.config.ks),
            chunk_size=self.config.chunk_size,
            image_group_n=image_group,
        )
        for key, value in metrics.items():
            yield f'{self.name}/{key}', value
