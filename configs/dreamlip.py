"""DreamLIP: language-image pre-training with long captions (arXiv 2403.17007).

  python -m pretrain.main --config configs/dreamlip.py --workdir /tmp/dreamlip      # CPU
  python -m pretrain.main --config configs/dreamlip.py:b16 --workdir DIR            # B/16

Each image comes with its raw (alt-text) caption and K sentences sampled per epoch from a
long caption: CLIP contrast on the raw captions, multi-positive contrast of the image
against its raw caption and sub-captions, and sub-caption-to-patch grouping
(pretrain/objectives/dreamlip.py has the maths and where it departs from the public code).
"""

from configs import clip

VARIANTS = clip.VARIANTS


def get_config(arg: str | None = None):
    config = clip.get_config(arg)
    tiny = (arg or 'tiny') == 'tiny'
    # The paper's data: noisy web captions plus MLLM long captions; in shapes, alt_text is
    # the web caption and long_caption the rewritten one.
    config.input.caption_field = 'alt_text'
    config.input.subcaption_field = 'long_caption'
    # Shapes long captions have 2-4 sentences, so K=3 rarely repeats one; the paper uses 6+
    # sentences per real long caption. With the shapes BPE every sentence fits 32 tokens
    # (bytes needed 96-132), so the 1 + K texts per image cost about as much as the image
    # tower: a step is ~1.5x a CLIP step (benchmarks/results/ablation_dreamlip.md). The
    # tiny model, optimizer, steps and evaluation (patch 8, mean pooling, lr 2e-3, 800
    # steps, 'tokens' dense readout) are configs/clip.py's, so the ablation
    # (benchmarks/ablation_dreamlip.py) compares objectives and captions only.
    config.input.num_subcaptions = 3 if tiny else 6
    config.input.subcaption_context_length = 32 if tiny else 77
    config.model.text.context_length = max(
        config.model.text.context_length, config.input.subcaption_context_length
    )
    config.objectives = {
        'dreamlip': {
            'weight': 1.0,
            'global_loss': 'clip',  # or 'siglip'
            'clip_weight': 1.0,
            'multipos_weight': 1.0,
            'multipos_form': 'infonce',  # the paper's form; 'circle' = the public code's
            'grouping_weight': 1.0,
            'threshold': -1.0,  # -1: keep patches at or above the uniform weight 1/N
            'ignore_duplicates': True,
        }
    }
    return config
