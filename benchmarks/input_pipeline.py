"""Input-pipeline throughput: JPEG decode + random resized crop + flip, the loader, shapes.

    python -m benchmarks.input_pipeline [--out benchmarks/results/input_pipeline.json] \
        [--seconds 3] [--repeats 3] [--images 64] [--threads 1,2,4] [--workers 2] [--quiet]

Writes its own test images first: `--images` JPEGs of about 500x375 (a quarter
portrait, 375x500), quality 90, with varied content (smooth colour fields, mid-frequency
texture, ellipses, sensor noise; ~55-65 KB each, like photos of that size), into a
temporary folder that is removed afterwards. Then, each case run `--repeats` times for
about `--seconds` each (the best and the median run are kept):

per core (this thread alone; images/s of wall time and per CPU-second of this process):
  - pillow_draft: Pillow, `draft` (DCT downscale to >= the crop), crop + bilinear resize to
    224 in one `resize(box=...)`, flip: the baseline;
  - pillow_no_draft: the same without `draft`;
  - simplejpeg_cv2: the product's `transforms.DecodeRandomResizedCrop(224)` + `RandomFlip()`
    (libjpeg-turbo at a power-of-two decode scale, OpenCV crop + resize), cv2 on 1 thread;
  - simplejpeg_cv2_cv2threads: the same with OpenCV's default thread pool (cv2 threads =
    cores): does the pool help even a lone caller? (transforms.py sets 1 thread);
  - pillow_draft_2000x1500, simplejpeg_cv2_2000x1500: the first and third on `--images // 4`
    photos of 2000x1500 (the same generator at 4x the size, ~0.9 MB each), where the
    decode-time downscaling applies to most crops;
  - shapes_64: the shapes source rendering whole records (all fields) at 64 px.
loader: `input_pipeline.loader.Loader` over a source that reads the JPEG files, with the
  same two transforms, batch 32, for each `--threads` count (threads only) and each
  `--workers` count (worker processes of one thread each): images/s and the share of the
  machine's cores the process and its workers used (two threads on two free cores near
  1.0 = the GIL is not the limit).
gil: the share of a record's CPU time that holds the GIL (see gil_estimate).

The machine may be shared: every case records `others_cpu_utilisation` (the share of all
cores other processes used meanwhile, from /proc/stat; None under 1 s) and the load
average, and the result has `contended` = any case's others > 0.1. Rates per CPU-second
are less affected by contention than wall-clock rates but not immune (shared caches, SMT).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from benchmarks import results_io
from benchmarks.train_step import _busy_cpu_s, cpu_model
from input_pipeline import loader as loader_lib
from input_pipeline import transforms as T
from input_pipeline.sources import shapes

SCHEMA = 1
CONTENDED_ABOVE = 0.1
SIZE = 224


def parse_args(argv):
    parser = argparse.ArgumentParser(
        'python -m benchmarks.input_pipeline',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--out', default='benchmarks/results/input_pipeline.json')
    parser.add_argument('--seconds', type=float, default=3.0, help='per run of a case')
    parser.add_argument('--repeats', type=int, default=3, help='runs per case')
    parser.add_argument('--images', type=int, default=64, help='distinct JPEGs written')
    parser.add_argument('--threads', default='1,2,4', help='loader thread counts')
    parser.add_argument(
        '--workers',
        default='2',
        help='loader worker-process counts (each on 1 thread); "" for none',
    )
    parser.add_argument('--batch', type=int, default=32, help='loader batch size')
    parser.add_argument('--gil_images', type=int, default=400, help='images of the GIL estimate')
    parser.add_argument('--quiet', action='store_true', help='print only the summary line')
    parser.add_argument('--label', default='', help='free text stored in the JSON')
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(',') if t]
    args.workers = [int(w) for w in args.workers.split(',') if w]
    if args.seconds <= 0 or args.repeats < 1 or args.images < 1 or not args.threads:
        parser.error('--seconds > 0, --repeats >= 1, --images >= 1 and --threads are required')
    return args


# ---------------------------------------------------------------------------------------------
# Test images.


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 image whose JPEG size and decode cost resemble a photo's."""
    base = cv2.resize(
        rng.uniform(0, 255, (6, 8, 3)).astype(np.float32),
        (width, height),
        interpolation=cv2.INTER_CUBIC,
    )
    texture = cv2.resize(
        rng.normal(0, 25, (height // 4, width // 4, 3)).astype(np.float32),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    image = base + texture
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(10, width // 3)), int(rng.integers(10, height // 3)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(folder: str, n: int, seed: int = 0, scale: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        height, width = (500 * scale, 375 * scale) if i % 4 == 3 else (375 * scale, 500 * scale)
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng, height, width)).save(buf, 'JPEG', quality=90)
        path = os.path.join(folder, f'{scale}x_{i:05d}.jpg')
        with open(path, 'wb') as f:
            f.write(buf.getvalue())
        paths.append(path)
    return paths


class JpegFiles:
    """A minimal random-access source: record i = {'image': bytes of file i mod n, 'id': i}.

    It claims `num_records` records, cycling over the files, because the loader's shuffle
    (grain's index_shuffle, one call per example) costs ~2.5 ms per call for 16 records,
    ~0.6 ms for 64 and ~6 us from 10,000 on: a 64-image epoch would measure that, not
    decoding. Real datasets are large.
    """

    def __init__(self, paths: list[str], num_records: int = 100_000):
        self.paths = paths
        self.num_records = num_records

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        with open(self.paths[index % len(self.paths)], 'rb') as f:
            return {'image': f.read(), 'id': index}


# ---------------------------------------------------------------------------------------------
# The per-core cases: each is `fn(i) -> image` for record i.


def pillow_rrc_flip(data: bytes, rng: np.random.Generator, draft: bool) -> np.ndarray:
    """The Pillow baseline: same crop distribution, Pillow's antialiased bilinear resize."""
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    y0, x0, y1, x1 = T.sample_crop_box(rng, height, width)
    if draft:  # Pillow picks the largest 1/2^k DCT scale that keeps >= the requested size
        im.draft('RGB', (math.ceil(width * SIZE / (x1 - x0)), math.ceil(height * SIZE / (y1 - y0))))
    sx, sy = im.size[0] / width, im.size[1] / height
    im = im.convert('RGB').resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    )
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def per_core_cases(datas: list[bytes], large: list[bytes]) -> dict:
    steps = [T.DecodeRandomResizedCrop(SIZE), T.RandomFlip()]

    def ours(images):
        return lambda i: T.apply(steps, {'image': images[i % len(images)]}, rng_key=(0, 0, i))

    def pillow(images, draft):
        return lambda i: pillow_rrc_flip(images[i % len(images)], np.random.default_rng(i), draft)

    source = shapes.ShapesSource('train', seed=0, image_size=64)
    return {
        'pillow_draft': pillow(datas, True),
        'pillow_no_draft': pillow(datas, False),
        'simplejpeg_cv2': ours(datas),
        'simplejpeg_cv2_cv2threads': ours(datas),  # run with cv2's pool on, see run_case
        # 2000x1500 photos (3 MP): here decode-time downscaling applies to most crops.
        'pillow_draft_2000x1500': pillow(large, True),
        'simplejpeg_cv2_2000x1500': ours(large),
        'shapes_64': lambda i: source[i]['image'],
    }


def gil_estimate(datas: list[bytes], count: int = 400) -> dict:
    """Share of the per-image CPU time spent holding the GIL, and what that allows threads.

    simplejpeg's decode and cv2.resize release the GIL; the rest of a transform call
    (rng, crop sampling, dicts, checks) is Python and holds it. CPU time of the whole
    transform minus that of the two GIL-free calls on the same boxes gives the held share
    f, and Amdahl's bound 1 / (f + (1 - f) / n) the best speed-up of n loader threads
    on n free cores (before the loader's own per-record Python, which adds to f).
    """
    steps = [T.DecodeRandomResizedCrop(SIZE), T.RandomFlip()]
    stream = steps[0].rng_stream
    jobs = []
    for i in range(count):
        data = datas[i % len(datas)]
        image_hw = T.image_size(data)
        box = T.sample_crop_box(T.record_rng((0, 0, i), stream), *image_hw)
        jobs.append((data, image_hw, box))

    def whole():
        for i, (data, _, _) in enumerate(jobs):
            T.apply(steps, {'image': data}, rng_key=(0, 0, i))

    def gil_free_parts():
        for data, image_hw, box in jobs:
            min_h, min_w = T.min_decode_size(image_hw, box, SIZE)
            image = simplejpeg.decode_jpeg(data, min_height=min_h, min_width=min_w)
            taken = T.scale_box(box, T.jpeg_scale(image_hw, image.shape[:2]), image.shape[:2])
            cv2.resize(image[taken[0] : taken[2], taken[1] : taken[3]], (SIZE, SIZE))

    def cpu_s(fn):
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best

    whole_s, parts_s = cpu_s(whole), cpu_s(gil_free_parts)
    held = max(0.0, 1 - parts_s / whole_s)
    return {
        'whole_us_per_image': round(whole_s / count * 1e6, 1),
        'gil_free_us_per_image': round(parts_s / count * 1e6, 1),
        'gil_held_share': round(held, 3),
        'amdahl_speedup_2_threads': round(1 / (held + (1 - held) / 2), 2),
        'amdahl_speedup_16_threads': round(1 / (held + (1 - held) / 16), 2),
    }


# ---------------------------------------------------------------------------------------------
# Measuring.


def _descendants_cpu_s() -> float:
    """CPU seconds used so far by the live descendants of this process (worker processes).

    getrusage counts children only once they have exited; the loader's workers run on,
    so read their /proc/<pid>/stat (utime + stime, in clock ticks) instead.
    """
    total, pending, seen = 0.0, [os.getpid()], set()
    while pending:
        pid = pending.pop()
        try:
            for task in os.listdir(f'/proc/{pid}/task'):
                with open(f'/proc/{pid}/task/{task}/children') as f:
                    pending += [int(c) for c in f.read().split() if int(c) not in seen]
        except OSError:
            continue
        if pid != os.getpid():
            seen.add(pid)
            try:
                with open(f'/proc/{pid}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
            except (OSError, ValueError, IndexError):
                pass
    return total


class Window:
    """Wall time, CPU time of this process and its workers, and the others' busy share."""

    def __enter__(self):
        self.r0, self.busy0 = resource.getrusage(resource.RUSAGE_SELF), _busy_cpu_s()
        self.children0 = _descendants_cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        r1, busy1 = resource.getrusage(resource.RUSAGE_SELF), _busy_cpu_s()
        self.cpu = (r1.ru_utime - self.r0.ru_utime) + (r1.ru_stime - self.r0.ru_stime)
        self.cpu += _descendants_cpu_s() - self.children0
        capacity = self.wall * (os.cpu_count() or 1)
        self.cpu_share = self.cpu / capacity
        self.others = (
            None
            if self.busy0 is None or self.wall < 1.0
            else max(0.0, (busy1 - self.busy0 - self.cpu) / capacity)
        )


def summarise(runs: list[dict]) -> dict:
    rates = [r['images_per_s'] for r in runs]
    best = max(runs, key=lambda r: r['images_per_s'])
    others = [r['others_cpu_utilisation'] for r in runs if r['others_cpu_utilisation'] is not None]
    return {
        'images_per_s_best': round(best['images_per_s'], 1),
        'images_per_s_median': round(statistics.median(rates), 1),
        'images_per_cpu_s_best': round(max(r['images_per_cpu_s'] for r in runs), 1),
        'others_cpu_utilisation_max': round(max(others), 3) if others else None,
        'runs': runs,
    }


def run_case(name: str, fn, seconds: float, repeats: int) -> dict:
    cv2_threads = os.cpu_count() if name.endswith('_cv2threads') else 1
    previous = cv2.getNumThreads()
    cv2.setNumThreads(cv2_threads)
    try:
        fn(0)  # warm up (imports, first allocations)
        runs, i = [], 1
        for _ in range(repeats):
            count = 0
            with Window() as w:
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    for _ in range(8):
                        fn(i)
                        i += 1
                    count += 8
            runs.append(
                {
                    'images': count,
                    'wall_s': round(w.wall, 3),
                    'images_per_s': count / w.wall,
                    'images_per_cpu_s': count / max(w.cpu, 1e-9),
                    'others_cpu_utilisation': w.others,
                }
            )
    finally:
        cv2.setNumThreads(previous)
    return {**summarise(runs), 'cv2_threads': cv2_threads}


def run_loader(
    paths: list[str], threads: int, batch: int, seconds: float, repeats: int, workers: int = 0
) -> dict:
    steps = [T.DecodeRandomResizedCrop(SIZE), T.RandomFlip(), T.SelectFields(('image',))]
    loader = loader_lib.Loader(
        JpegFiles(paths),
        steps,
        global_batch_size=batch,
        seed=0,
        num_threads=threads,
        # grain runs at most prefetch batch tasks at once, so more threads need more.
        prefetch=max(2, threads),
        num_workers=workers,
    )
    runs = []
    with loader:
        for _ in range(2):  # start the threads / workers and fill the prefetch buffers
            next(loader)
        for _ in range(repeats):
            count = 0
            with Window() as w:
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    count += len(next(loader)['image'])
            runs.append(
                {
                    'images': count,
                    'wall_s': round(w.wall, 3),
                    'images_per_s': count / w.wall,
                    'images_per_cpu_s': count / max(w.cpu, 1e-9),
                    'process_cpu_share': round(w.cpu_share, 3),
                    'others_cpu_utilisation': w.others,
                }
            )
    out = summarise(runs)
    out['process_cpu_share_median'] = statistics.median(r['process_cpu_share'] for r in runs)
    return {'threads': threads, 'workers': workers, 'batch': batch, **out}


def run(args) -> dict:
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    load_before = os.getloadavg()
    folder = tempfile.mkdtemp(prefix='bench_jpegs_')
    try:
        paths = write_jpegs(folder, args.images)
        datas = [open(p, 'rb').read() for p in paths]
        large = [
            open(p, 'rb').read() for p in write_jpegs(folder, max(args.images // 4, 1), scale=4)
        ]
        per_core = {}
        for name, fn in per_core_cases(datas, large).items():
            per_core[name] = run_case(name, fn, args.seconds, args.repeats)
            log(
                f'{name:28s} {per_core[name]["images_per_s_best"]:8.1f} images/s (best), '
                f'{per_core[name]["images_per_cpu_s_best"]:8.1f} per CPU-s'
            )
        gil = gil_estimate(datas, args.gil_images)
        log(
            f"GIL held {gil['gil_held_share']:.1%} of the per-image CPU time; Amdahl bound "
            f"for 2 threads {gil['amdahl_speedup_2_threads']}x"
        )
        loader = []
        runs = [(threads, 0) for threads in args.threads] + [(1, w) for w in args.workers]
        for threads, workers in runs:
            loader.append(
                run_loader(paths, threads, args.batch, args.seconds, args.repeats, workers)
            )
            log(
                f'loader, {threads} threads {workers} workers {loader[-1]["images_per_s_best"]:8.1f} '
                f'images/s (best), process CPU share {loader[-1]["process_cpu_share_median"]:.2f}'
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    others = [
        c['others_cpu_utilisation_max']
        for c in [*per_core.values(), *loader]
        if c['others_cpu_utilisation_max'] is not None
    ]
    ours, base = per_core['simplejpeg_cv2'], per_core['pillow_draft']
    return {
        'schema': SCHEMA,
        'command': ' '.join(['python -m benchmarks.input_pipeline', *sys.argv[1:]]),
        'label': args.label,
        'settings': {
            'seconds': args.seconds,
            'repeats': args.repeats,
            'output_size': SIZE,
            'jpeg_quality': 90,
        },
        'images': {
            'count': len(datas),
            'mean_bytes': round(float(np.mean([len(d) for d in datas]))),
            'sizes_hw': sorted({tuple(T.image_size(d)) for d in datas}),
            'large_count': len(large),
            'large_mean_bytes': round(float(np.mean([len(d) for d in large]))),
        },
        'per_core': per_core,
        'simplejpeg_cv2_over_pillow_draft': round(
            ours['images_per_cpu_s_best'] / base['images_per_cpu_s_best'], 2
        ),
        'gil': gil,
        'loader': loader,
        'contended': bool(others) and max(others) > CONTENDED_ABOVE,
        'machine': {
            'nproc': os.cpu_count(),
            'sched_affinity': (
                len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
            ),
            'cpu_model': cpu_model(),
            'loadavg_before': [round(x, 2) for x in load_before],
            'loadavg_after': [round(x, 2) for x in os.getloadavg()],
        },
        'versions': {
            'python': platform.python_version(),
            'numpy': np.__version__,
            'opencv': cv2.__version__,
            'pillow': Image.__version__,
            'simplejpeg': simplejpeg.__version__,
        },
    }


def headline(r: dict) -> str:
    pc = r['per_core']
    loader = ', '.join(
        (
            f"{l['workers']} workers {l['images_per_s_best']:.0f}"
            if l['workers']
            else f"{l['threads']} threads {l['images_per_s_best']:.0f}"
        )
        for l in r['loader']
    )
    return (
        f"decode+RRC+flip 224, one core: simplejpeg+cv2 {pc['simplejpeg_cv2']['images_per_s_best']:.0f}"
        f" img/s ({pc['simplejpeg_cv2']['images_per_cpu_s_best']:.0f}/CPU-s), Pillow draft "
        f"{pc['pillow_draft']['images_per_s_best']:.0f} ({pc['pillow_draft']['images_per_cpu_s_best']:.0f}"
        f"/CPU-s); loader {loader} img/s; shapes 64px {pc['shapes_64']['images_per_s_best']:.0f} img/s"
        f"; contended={r['contended']} load={r['machine']['loadavg_after'][0]}"
    )


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    results_io.write_json(args.out, result)
    print(f'{headline(result)} -> {args.out}')
    if result['contended'] and not args.quiet:
        print(
            'warning: other processes used the cores meanwhile; times are inflated', file=sys.stderr
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
