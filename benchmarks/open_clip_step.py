"""open_clip's train step on the model `train_step.py` times: the same-machine comparison.

    pip install torch open_clip_torch cmeel-mimalloc   # own venv: torch is no dependency here
    python -m benchmarks.open_clip_step --compare benchmarks/results/train_step_cpu_ti_ctx64.json \
        [--steps 10] [--warmup 3] [--compile] [--out benchmarks/results/open_clip_step_cpu.json]

Builds open_clip's `CLIP` with the architecture of the `--compare` JSON (a
`benchmarks.train_step` result: its resolved config gives the widths, depths, heads, patch,
image size, context length, vocabulary, pooling and batch), and times what an open_clip
training step does on CPU: forward of both towers, `ClipLoss`, backward, gradient clipping
at 1.0 and an AdamW update, on random images and token ids (`optimizer.zero_grad` to
`optimizer.step`, median of `--steps` after `--warmup`). Eager mode, as open_clip trains by
default; `--compile` times `torch.compile` of the model too (open_clip's --torchcompile).

Same conditions as ours: the allocator is the product's (`pretrain.allocator`: the same
re-execution and PRETRAIN_MALLOC choices; mimalloc only where this venv has cmeel-mimalloc,
and a warning when the JSON's run had another allocator: on the Zen 4 EPYC of session 23
open_clip's bf16-autocast step took 2.4-3.0 s with the glibc tunables and 1.26 s with
mimalloc), torch uses every core, and the MFU is the JSON's analytic FLOPs over the JSON's
peak (the JAX-measured 2048^3 f32 matmul rate). The JSON gets both step times and their
ratio, and torch's own 2048^3 matmul rate for reference. Nothing here imports jax, so the
torch venv needs only this repository on the path (run it from the repository root).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from benchmarks import results_io
from benchmarks.train_step import allocator_info, summarise  # numpy only at import: no jax
from pretrain.allocator import ensure_fast_malloc


def parse_args(argv):
    parser = argparse.ArgumentParser('python -m benchmarks.open_clip_step', description=__doc__)
    parser.add_argument('--compare', required=True, help='a benchmarks.train_step JSON')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--compile', action='store_true', help='also time torch.compile')
    parser.add_argument(
        '--amp_bf16',
        action='store_true',
        help="also time eager under torch.autocast('cpu', bfloat16), open_clip's "
        '--precision amp_bf16 (the match for --config.model.matmul_precision=bfloat16)',
    )
    parser.add_argument('--out', default='', help='write the JSON here')
    return parser.parse_args(argv)


def open_clip_model(model_config: dict):
    """open_clip's CLIP with our config's architecture (our MLP: GELU tanh, ratio 4)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    img, txt = model_config['image'], model_config['text']
    if img['width'] % img['heads'] or img.get('pool') not in ('mean', 'cls'):
        raise ValueError(f"no open_clip equivalent of image tower {img}")
    gelu_tanh = {'approximate': 'tanh'}
    vision = CLIPVisionCfg(
        layers=img['depth'],
        width=img['width'],
        head_width=img['width'] // img['heads'],
        mlp_ratio=img['mlp_ratio'],
        patch_size=img['patch'],
        image_size=img['image_size'],
        pool_type='avg' if img['pool'] == 'mean' else 'tok',
        act_kwargs=gelu_tanh,
    )
    text = CLIPTextCfg(
        context_length=txt['context_length'],
        vocab_size=txt['vocab_size'],
        width=txt['width'],
        heads=txt['heads'],
        layers=txt['depth'],
        mlp_ratio=txt['mlp_ratio'],
        act_kwargs=gelu_tanh,
    )
    return CLIP(embed_dim=model_config['embed_dim'], vision_cfg=vision, text_cfg=text)


def matmul_rate(torch, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def time_steps(
    torch, model, batch: int, config: dict, *, steps: int, warmup: int, amp_bf16: bool = False
) -> list:
    from open_clip import ClipLoss

    img, txt = config['model']['image'], config['model']['text']
    size, length, vocab = img['image_size'], txt['context_length'], txt['vocab_size']
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    texts = torch.randint(2, vocab, (batch, length), generator=generator)
    loss_fn = ClipLoss()
    optim = config['optim']
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=optim['lr'],
        betas=(optim['b1'], optim['b2']),
        eps=optim['eps'],
        weight_decay=optim['weight_decay'],
    )
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp_bf16):
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim['clip_norm'])
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def summary(times: list, flops: float, peak: float, batch: int) -> dict:
    """train_step.py's timing summary (median, mean, min, max, all), plus samples/s and MFU."""
    timing = summarise(times)
    median = timing['median_s']
    return {**timing, 'samples_per_s': batch / median, 'mfu': flops / median / peak}


def main(argv=None):
    ensure_fast_malloc()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    with open(args.compare) as f:
        ours = json.load(f)
    config, batch = ours['config'], ours['batch_size']
    flops, peak = ours['flops']['analytic_per_step'], ours['peak']['total_flops']
    ours_median = ours['timing']['step']['median_s']
    allocator, ours_allocator = allocator_info(), ours.get('allocator', {}).get('kind')
    if ours_allocator and allocator['kind'] != ours_allocator:
        print(
            f"warning: ours ran with {ours_allocator}, open_clip runs with {allocator['kind']}: "
            'install cmeel-mimalloc here (or set PRETRAIN_MALLOC alike) to compare like with like',
            file=sys.stderr,
        )
    model = open_clip_model(config['model'])
    results = {
        'eager': time_steps(torch, model, batch, config, steps=args.steps, warmup=args.warmup)
    }
    if args.amp_bf16:
        results['eager_amp_bf16'] = time_steps(
            torch, model, batch, config, steps=args.steps, warmup=args.warmup, amp_bf16=True
        )
    if args.compile:
        compiled = torch.compile(model)
        results['compiled'] = time_steps(
            torch, compiled, batch, config, steps=args.steps, warmup=args.warmup
        )
    report = {
        'benchmark': 'open_clip_step',
        'command': 'python -m benchmarks.open_clip_step ' + ' '.join(sys.argv[1:]),
        'compare': args.compare,
        'batch_size': batch,
        'analytic_flops_per_step': flops,
        'peak_flops_per_s': peak,
        'torch_matmul_flops_per_s': matmul_rate(torch),
        'threads': torch.get_num_threads(),
        'parameters': sum(p.numel() for p in model.parameters()),
        'allocator': allocator,
        'ours_median_s': ours_median,
        'versions': {'torch': torch.__version__, 'python': platform.python_version()},
    }
    for name, times in results.items():
        report[name] = summary(times, flops, peak, batch)
        report[name]['ours_speedup'] = report[name]['median_s'] / ours_median
        print(
            f"open_clip {name}: step {report[name]['median_s']:.3f} s median, "
            f"{report[name]['samples_per_s']:.1f} samples/s, MFU {report[name]['mfu']:.1%}; "
            f"ours {ours_median:.3f} s ({report[name]['ours_speedup']:.2f}x faster)"
        )
    if args.out:
        results_io.write_json(args.out, report)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
