"""CLIP: softmax image-text contrast over the global batch.

python -m pretrain.main --config configs/clip.py --workdir /tmp/clip        # CPU, minutes
python -m pretrain.main --config configs/clip.py:b16 --workdir /mnt/bucket/clip  # ViT-B/16 @ 224
"""

from configs import common

VARIANTS = ('tiny', 'b16')


def get_config(arg: str | None = None):
    variant = arg or 'tiny'
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    if variant == 'tiny':
        # DESIGN.md's CPU recipe with two changes (screening runs, all figures:
        # benchmarks/results/ablation_dreamlip_screens.md):
        # - patch 8 (8x8 grid) instead of 16 (4x4): a shapes object covers 2x2-3x3 patches,
        #   so dense evaluation has something to resolve (patch-level mIoU ceiling 30% -> 59%)
        #   for ~0.1 s more per step;
        # - mean pooling instead of CLS: the global embedding is then the mean of the
        #   projected patch tokens, so CLIP trains exactly the patch features that dense
        #   zero-shot reads ('tokens' readout). CLIP on alt-text, 400 steps: dense object-patch
        #   accuracy 9.6% with mean + 'tokens', 2.0% with CLS + 'value' (ablation_dreamlip*.md).
        # 0.32 s/step on 2 quiet cores (benchmarks/train_step.py), 400 steps ~2.5 minutes.
        # lr 2e-3 (DESIGN's 1e-3 doubled) trained stably; not isolated from the two changes
        # above (at 300 steps it matched what patch 16 + CLS + 1e-3 reached at 400).
        # Text: the shapes BPE ('shapes_bpe', 1,024 ids) instead of bytes: every caption,
        # alt-text and long-caption sentence fits 32 tokens (bytes needed 80-132), the text
        # tower is 2.5x shorter and its tokens are words. CLIP, 400 steps, one core: 4.1 vs
        # 5.4 minutes, zero-shot 33.8 vs 25.6, shape 23.6 vs 19.1, i->t R@1 35.7 vs 28.9.
        # Conv stem (pretrain/models/vit.ConvStem) instead of the linear patch embedding:
        # shape is learnt several times sooner. DreamLIP at 800 steps ends at zero-shot 98.8 /
        # shape 92.6 (seed 0) and 93.4 / 75.2 (seed 1), against 51.6 / 44.7 with the patch
        # embedding; this CLIP recipe (800 steps, seed 0) at 98.2 / 90.0 against 51.2 / 49.4
        # (benchmarks/results/ablation_dreamlip_screens.md, "Conv stem"; supervised on shape
        # alone: benchmarks/supervised_shape.py). +11% FLOPs and step time on CPU
        # (configs/dreamlip.py: 0.455 / 0.461 -> 0.509 / 0.510 s, benchmarks/train_step.py).
        config = common.base_config(total_steps=800, batch_size=128)
        image = common.vit_config('mu', patch=8, image_size=64, pool='mean')
        image.stem = 'conv'
        config.model = common.model_config(
            image=image,
            text=common.text_config(
                'mu', context_length=32, vocab_size=common.SHAPES_BPE_VOCAB_SIZE
            ),
            embed_dim=128,
            # bf16 matmul operands on CPUs with AMX or AVX-512 BF16 (f32 elsewhere): the
            # DreamLIP step 0.515 -> 0.403 s on a 2-core Xeon (AMX), 0.763 -> 0.635 s on a
            # 2-core AMD EPYC (Zen 4), and the quick start ended no worse (Xeon, seed 0,
            # 600 steps: zero-shot / shape 92.6 / 79.1 against 82.4 / 70.3 in f32). Tests of
            # exact equivalences pin 'default' (f32). benchmarks/README.md, "bf16 matmul
            # operands on CPU".
            matmul_precision='auto',
        )
        config.optim = common.optim_config(lr=2e-3, warmup_steps=30)
        config.input = common.shapes_input(
            image_size=64, context_length=32, tokenizer='shapes_bpe'
        )
        # The four evaluators: ~5.5 s on 2 cores the first time (render + compile), ~1.8 s after.
        config.eval_every = 400
        config.evals = common.evals_config()
        # With mean pooling the final tokens are what the global embedding averages: read
        # them (DESIGN.md: the value path only carries the signal under CLS pooling).
        config.evals.dense_zeroshot.readout = 'tokens'
    else:
        # 32k batch = e.g. 256 hosts x 128, as in CLIP/SigLIP; ~ 12.8B samples seen in the papers,
        # here 100k steps (3.3B samples) as a real but affordable run.
        config = common.base_config(total_steps=100_000, batch_size=32_768)
        config.model = common.model_config(
            image=common.vit_config('B', patch=16, image_size=224),
            text=common.text_config('B', context_length=77),
            embed_dim=512,
            dtype='bfloat16',
            # 'auto' (pretrain/auto_remat.py): no remat where XLA says the compiled step fits
            # the device's free memory, else 'nothing_saveable'. One H100, batch 512 (session
            # 22): 'none' 0.179 s/step with 39 GB of XLA temporaries, 'nothing_saveable'
            # 0.208 s / 5.3 GB, 'dots_saveable' 0.227 s / 23 GB (benchmarks/README.md). The
            # 32k batch on launch/gke_jobset.yaml's 16 GPUs is 2,048 per GPU: ~4x those
            # figures, so 'nothing_saveable' there; 'none' at 512 per 80 GB GPU.
            remat='auto',
        )
        config.optim = common.optim_config(lr=5e-4, warmup_steps=2_000, weight_decay=0.2)
        config.input = common.shapes_input(image_size=224, context_length=77)
        config.checkpoint.every = 1_000
        # Held on every host: ~1.8 GB of 224 px eval images (2k + 2k + 7k + 0.5k scenes).
        config.eval_every = 5_000
        config.evals = common.evals_config(
            num_examples=2048, probe_sizes=(4096, 1024, 2048), dense_examples=512, batch_size=1024
        )
        config.checkpoint.keep_every = 10_000
        config.log_every = 50
    config.objectives = {'clip': {'weight': 1.0}}
    return config
