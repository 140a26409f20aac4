"""SigLIP: sigmoid image-text contrast; `chunk_size` > 0 keeps loss memory linear in batch.

python -m pretrain.main --config configs/siglip.py --workdir /tmp/siglip
python -m pretrain.main --config configs/siglip.py:b16 --workdir DIR
"""

from configs import clip

VARIANTS = clip.VARIANTS


def get_config(arg: str | None = None):
    # Tiny: configs/clip.py's model, optimizer and steps (patch 8, mean pooling, lr 2e-3).
    config = clip.get_config(arg)
    # SigLIP paper, section 3: t' = log 10 and b = -10 at init, so the initial loss is not
    # dominated by the many easy negatives.
    config.model.logit_scale_init = 10.0
    config.model.logit_bias_init = -10.0
    # Chunked at scale: 32k x 32k logits would not fit; 0 = one full B x B block.
    chunk = 0 if config.batch_size <= 4096 else 4096
    config.objectives = {'siglip': {'weight': 1.0, 'chunk_size': chunk}}
    if (arg or 'tiny') == 'b16':
        config.model.image.pool = 'map'  # SigLIP's MAP head
    return config
