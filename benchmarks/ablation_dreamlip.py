"""DreamLIP ablation on the shapes world: does the recipe do what the papers say?

    python -m benchmarks.ablation_dreamlip [--steps N] [--only a,d] [--workdir DIR] \
        [--out benchmarks/results/ablation_dreamlip] [--config.k=v ...]

Trains seven variants with the same seed, data order, model, optimizer and number of steps
(the "same CPU budget" of issue 6 is counted in steps of the same batch size, i.e. equal
data; the sub-caption variants cost more per step, and the table says how much):

  (a) clip_alt_text     CLIP on the noisy alt-text           configs/clip.py, caption_field=alt_text
  (b) clip_quality      CLIP on rewritten captions           configs/quality_captions.py
  (e) clip_caption      CLIP on the short accurate captions  configs/clip.py
  (c) clip_multipos     (e) + multi-positive sub-captions    configs/dreamlip.py, grouping_weight=0
  (d) dreamlip          (c) + sub-caption grouping           configs/dreamlip.py (the default)
  (f) dreamlip_alt_text (d) with the alt-text as the global  configs/dreamlip.py,
                        caption (the short caption stays out) caption_field=alt_text
  (g) dreamlip_alt_w1   (f) with multi-positive and grouping  configs/dreamlip.py, alt_text,
                        at weight 1, the paper's equal terms   multipos/grouping_weight=1

(e) -> (c) -> (d) adds one DreamLIP term at a time on the same short captions; (a) vs (d) is
the papers' comparison (CLIP on web alt-text vs DreamLIP on MLLM captions of the same images).

Each variant runs `python -m pretrain.main` in its own process (the product's entry point,
allocator and evaluators), in <workdir>/<variant>; a workdir that already finished is read
back instead of retrained, so an interrupted ablation resumes. The last evaluation row of
each run goes into <out>.json and a markdown table <out>.md: zero-shot (48 classes, shape,
colour), image->text and text->image R@1, the linear probe and dense zero-shot mIoU (with
the object-patch accuracy, which moves before mIoU does).

Extra `--config.k=v` flags go to every variant (e.g. a shorter run for a smoke test).
results/ablation_dreamlip.md is this script's default run (600 steps, the tiny model's conv
stem); results/ablation_dreamlip_patch_stem.md the same at 800 steps with the linear patch
embedding the tiny model had before (`--steps 800 --config.model.image.stem=patch`). Both used
f32 matmuls (`--config.model.matmul_precision=default`); results/ablation_dreamlip_bf16.md is
the default run with the bf16 operands the tiny configs now use on CPUs with AMX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config file, overrides). Everything not listed is the file's tiny default, so the
# variants share model, optimizer, batch, seed and evaluation.
VARIANTS = {
    'a': ('clip_alt_text', 'configs/clip.py', ['--config.input.caption_field=alt_text']),
    'b': ('clip_quality', 'configs/quality_captions.py', []),
    'c': (
        'clip_multipos',
        'configs/dreamlip.py',
        ['--config.objectives.dreamlip.grouping_weight=0.0'],
    ),
    'd': ('dreamlip', 'configs/dreamlip.py', []),
    'e': ('clip_caption', 'configs/clip.py', []),
    'f': ('dreamlip_alt_text', 'configs/dreamlip.py', ['--config.input.caption_field=alt_text']),
    'g': (
        'dreamlip_alt_w1',
        'configs/dreamlip.py',
        [
            '--config.input.caption_field=alt_text',
            '--config.objectives.dreamlip.multipos_weight=1.0',
            '--config.objectives.dreamlip.grouping_weight=1.0',
        ],
    ),
}
# (metric key in metrics.jsonl, column title); multiplied by 100 in the table.
COLUMNS = (
    ('eval/zeroshot/top1', 'zero-shot'),
    ('eval/zeroshot/shape_top1', 'shape'),
    ('eval/zeroshot/colour_top1', 'colour'),
    ('eval/retrieval/i2t_r1', 'i->t R@1'),
    ('eval/retrieval/t2i_r1', 't->i R@1'),
    ('eval/linear_probe/top1', 'probe'),
    ('eval/dense_zeroshot/miou', 'dense mIoU'),
    ('eval/dense_zeroshot/object_patch_acc', 'obj. patch acc'),
)


def read_run(workdir: str) -> dict | None:
    """The last evaluation row and the median logged step time of a finished run, or None."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if 'eval/zeroshot/top1' in r]
    if not evals:
        return None
    times = sorted(r['perf/step_time_s'] for r in rows if 'perf/step_time_s' in r)
    return {
        'step': evals[-1]['step'],
        'metrics': {k: v for k, v in evals[-1].items() if k.startswith('eval/')},
        'median_step_time_s': times[len(times) // 2] if times else None,
        'final_train_loss': rows[-1].get('train/loss'),
    }


def train(config: str, overrides: list[str], workdir: str) -> float:
    """Runs pretrain.main to completion; returns the wall time in seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, '-m', 'pretrain.main', '--config', config, '--workdir', workdir]
    cmd += ['--config.progress=false', *overrides]
    print('$', ' '.join(cmd), flush=True)
    with open(
        os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}.log'), 'w'
    ) as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f'{config} failed with exit {proc.returncode}; log: {log.name}')
    return time.perf_counter() - start


def markdown(results: dict) -> str:
    head = '| variant | ' + ' | '.join(title for _, title in COLUMNS) + ' | s/step |'
    lines = [head, '|' + '---|' * (len(COLUMNS) + 2)]
    for key, r in sorted(results.items()):
        cells = [f"{100 * r['metrics'][m]:.1f}" if m in r['metrics'] else '-' for m, _ in COLUMNS]
        step_time = r['median_step_time_s']
        cells.append(f'{step_time:.2f}' if step_time else '-')
        lines.append(f"| ({key}) {r['name']} | " + ' | '.join(cells) + ' |')
    note = (
        f"\nAll at step {'/'.join(sorted({str(r['step']) for r in results.values()}))}, "
        'seed 0, batch 128; '
        'held-out shapes (48-class zero-shot chance 2.1%, shape 16.7%, colour 12.5%, '
        'R@1 over 512 pairs 0.2%). s/step: median logged step time on a shared 2-core CPU.\n'
    )
    return '\n'.join(lines) + '\n' + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    # 600: configs/dreamlip.py's default (the quick start); the CLIP recipes default to 800.
    parser.add_argument('--steps', type=int, default=600, help='total steps of every variant')
    parser.add_argument('--only', default='a,b,c,d,e,f,g', help='comma-separated variants to run')
    parser.add_argument('--workdir', default='/tmp/ablation_dreamlip')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks/results/ablation_dreamlip'))
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith('--config.')]
    if bad:
        parser.error(f"unknown arguments {bad}; only --config.key=value overrides pass through")
    only = [v.strip() for v in args.only.split(',') if v.strip()]
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")

    common = list(extra)
    if args.steps:
        # Evaluate once, at the end: the table compares final figures.
        common += [f'--config.total_steps={args.steps}', f'--config.eval_every={args.steps}']
    common += ['--config.checkpoint.every=1000000']  # the final step is saved anyway
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for key in only:
        name, config, overrides = VARIANTS[key]
        workdir = os.path.join(args.workdir, name)
        run = read_run(workdir)
        wall = None
        if run is None:
            wall = train(config, [*overrides, *common], workdir)
            run = read_run(workdir)
        results[key] = {
            'name': name,
            'config': config,
            'overrides': overrides + common,
            'wall_s': wall,
            **run,
        }
        print(
            f'({key}) {name}: '
            + ', '.join(
                f"{title} {100 * run['metrics'][m]:.1f}"
                for m, title in COLUMNS
                if m in run['metrics']
            ),
            flush=True,
        )
        write(args.out, args.steps, results)  # after every variant: a long run stays readable
    print(markdown(results))


def write(out: str, steps: int | None, results: dict):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump({'steps': steps, 'host': platform.node(), 'variants': results}, f, indent=2)
    with open(out + '.md', 'w') as f:
        f.write(markdown(results))


if __name__ == '__main__':
    main()
