"""DreamLIP: language-image pre-training with long captions (arXiv 2403.17007).

    python -m pretrain.main --config configs/dreamlip.py --workdir /tmp/dreamlip      # CPU
    python -m pretrain.main --config configs/dreamlip.py:b16 --workdir DIR            # B/16

Until the DreamLIP objectives land (sub-caption multi-positive contrast and
sub-caption-to-patch grouping), this trains CLIP on the accurate short captions; the
`objectives` dict below is where those terms are added with their weights.
"""

from configs import clip

VARIANTS = clip.VARIANTS


def get_config(arg: str | None = None):
    config = clip.get_config(arg)
    config.input.caption_field = 'caption'
    config.objectives = {'clip': {'weight': 1.0}}
    return config
