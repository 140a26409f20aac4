"""CLIP with quality captions (arXiv 2405.08911): rewritten captions instead of alt-text.

  python -m pretrain.main --config configs/quality_captions.py --workdir /tmp/qc
  python -m pretrain.main --config configs/quality_captions.py --workdir DIR \
      --config.input.caption_probs.alt_text=1.0 --config.input.caption_probs.caption=0.0

Plain CLIP loss; the point is the data. Each example's training caption is drawn per epoch
from its caption fields with these probabilities (input_pipeline/captions.py: ChooseCaption).
Every field is listed, so an override can move probability between them.
"""

from configs import clip

VARIANTS = clip.VARIANTS


def get_config(arg: str | None = None):
    # Model, optimizer, steps and evaluation: configs/clip.py's (tiny: patch 8, mean pooling,
    # lr 2e-3), so this differs from CLIP only in its captions (ablation variant (b)).
    config = clip.get_config(arg)
    # Mostly the accurate rewritten caption, some raw alt-text: the paper finds a mix keeps
    # the alt-text's diversity while the rewritten captions carry the accurate content.
    config.input.caption_probs = {'alt_text': 0.25, 'caption': 0.75}
    return config
