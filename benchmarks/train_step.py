"""Train-step throughput and MFU of a config, on synthetic batches (no input pipeline).

    python -m benchmarks.train_step --config configs/clip.py [--config.k=v ...] \
        [--steps 10] [--warmup 2] [--out benchmarks/results/train_step_cpu.json] \
        [--compare_malloc] [--breakdown] [--profile_steps 3 [--profile_dir DIR]]

The model, objective, train state and jitted step are built as `pretrain.train.run` builds
them (same mesh, shardings, donation and pinned output shardings); only the batches differ:
random uint8 images and int32 token ids of the configured shapes, placed once with
`pretrain.sharding.global_batch`, so the figures are the step alone.

What is measured, all written to --out as JSON (see benchmarks/README.md):
- lower and compile time, apart from the steps;
- `--steps` steps after `--warmup` (block_until_ready on each step's output): median,
  mean, min, max seconds, samples/s, page faults and CPU time per step, and the share of
  the machine's cores this process and all others used meanwhile (others > 0.1: the run
  was contended and is flagged `contended`);
- then `--steps` more steps pipelined as `pretrain.train.run` runs them, each dispatched
  before the previous one is waited for (`step_pipelined`, `samples_per_s_pipelined`,
  `mfu_pipelined`): the host's per-step work then overlaps the device's, as in training;
- model FLOPs per step counted analytically (pretrain.flops.train_step_flops), next to
  XLA's count for the compiled step (cost_analysis 'flops', which also counts element-wise
  ops and the optimizer) and to the matmul FLOPs read from the `dot` ops of the optimised HLO;
- MFU = analytic FLOPs / median step / peak, the peak from pretrain.flops (on CPU the
  2048^3 f32 matmul rate, measured here, before and after the steps; the higher is used);
- XLA's buffer sizes (memory_analysis) and the process's peak resident memory;
- device, jax/flax versions, the resolved config and the allocator in force;
- with --profile_steps N: N more steps under `jax.profiler.trace`, and the trace's top ops
  per step (benchmarks/trace_summary.py), each fusion with the source lines of its ops;
  `--hlo_out` keeps the optimised HLO those fusions are defined in.

The XLA flags and allocator are the product's: `pretrain.main.prepare_process()` sets
`DEFAULT_XLA_FLAGS` and re-executes the process with its allocator (pretrain/allocator.py:
mimalloc, or glibc's tunables) unless PRETRAIN_MALLOC=system. `--compare_malloc` reruns the
same benchmark in a subprocess with the other setting and records both.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import results_io, trace_summary
from pretrain import host

SCHEMA = 1
CONTENDED_ABOVE = 0.1  # share of the cores other processes used during the timed steps


def parse_args(argv):
    from pretrain import config_cli

    parser = config_cli.argument_parser('python -m benchmarks.train_step', __doc__)
    parser.add_argument('--steps', type=int, default=10, help='timed steps')
    parser.add_argument(
        '--warmup',
        type=int,
        default=2,
        help='untimed steps after compile (at least 1: the first step is timed '
        'apart as first_step_s)',
    )
    parser.add_argument('--out', default='benchmarks/results/train_step_cpu.json')
    parser.add_argument(
        '--compare_malloc',
        action='store_true',
        help='also run with the other PRETRAIN_MALLOC setting (a subprocess) ' 'and record both',
    )
    parser.add_argument(
        '--breakdown',
        action='store_true',
        help='also time the forward pass and forward+backward without the update',
    )
    parser.add_argument('--label', default='', help='free text stored in the JSON')
    parser.add_argument(
        '--profile_steps',
        type=int,
        default=0,
        help='trace this many more steps with jax.profiler and record the top ops',
    )
    parser.add_argument(
        '--profile_dir', default='', help='keep the trace here (default: a temporary folder)'
    )
    parser.add_argument(
        '--hlo_out',
        default='',
        help="write the compiled step's optimised HLO here, gzipped (the fusions a profile's "
        'kernel names refer to)',
    )
    args, overrides = config_cli.parse_args(parser, argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error('--steps and --warmup must be >= 1')
    return args, overrides


# ---------------------------------------------------------------------------------------------
# Environment facts.


def allocator_info() -> dict:
    """Which malloc the process runs with: env knobs and any preloaded allocator library."""
    libs = set()
    try:
        with open('/proc/self/maps') as f:
            for line in f:
                name = os.path.basename(line.split()[-1]) if '/' in line else ''
                if re.match(r'lib(jemalloc|tcmalloc|mimalloc)', name):
                    libs.add(name)
    except OSError:
        pass
    env = {
        k: os.environ.get(k)
        for k in (
            'PRETRAIN_MALLOC',
            'PRETRAIN_MALLOC_SET',
            'GLIBC_TUNABLES',
            'LD_PRELOAD',
            'MALLOC_CONF',
            'MIMALLOC_PURGE_DELAY',
        )
    }
    if libs:
        kind = 'preloaded ' + ', '.join(sorted(libs))
    elif env['GLIBC_TUNABLES'] and 'mmap_threshold' in env['GLIBC_TUNABLES']:
        kind = 'glibc malloc with GLIBC_TUNABLES (tuned)'
    else:
        kind = 'glibc malloc, defaults (system)'
    return {
        'kind': kind,
        'preloaded_libs': sorted(libs),
        'env': {k: v for k, v in env.items() if v is not None},
    }


def cpu_model() -> str | None:
    return host.cpuinfo('model name')


def proc_status_kib(field: str) -> int | None:
    """A `VmHWM`-style line of /proc/self/status, in KiB (None off Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Batches and FLOPs.


def _tokens(rng, shape, length: int) -> np.ndarray:
    """Byte tokens (2..257) of random length, one EOS (1), then padding (0): the tokenizer's
    layout, so EOS pooling and padding masks see what real captions give them."""
    tokens = rng.integers(2, 258, (*shape, length), dtype=np.int32)
    eos = rng.integers(length // 2, length, shape)[..., None]
    cols = np.arange(length)
    tokens = np.where(cols == eos, 1, tokens)
    return np.where(cols > eos, 0, tokens).astype(np.int32)


def synthetic_batch(config, fields, *, rows: int, seed: int = 0) -> dict:
    """Random host arrays of the shapes and dtypes the input pipeline emits for `fields`.

    image (rows, S, S, 3) uint8; text (rows, L) int32; texts (rows, K, L_sub) int32 and
    texts_valid (rows, K) bool (DreamLIP sub-captions), as input_pipeline/pipeline.py
    documents them; the packed fields from those texts, as captions.PackTexts builds them.
    """
    from input_pipeline import captions

    rng = np.random.default_rng(seed)
    inp = config.input
    batch = {}
    for field in fields:
        if field == 'image':
            size = inp.image_size
            batch[field] = rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)
        elif field == 'text':
            batch[field] = _tokens(rng, (rows,), inp.context_length)
        elif field == 'texts':
            batch[field] = _tokens(rng, (rows, inp.num_subcaptions), inp.subcaption_context_length)
        elif field == 'texts_valid':
            batch[field] = np.ones((rows, inp.num_subcaptions), bool)
        elif field not in captions.PACKED_FIELDS:
            raise ValueError(
                f"the benchmark cannot synthesise batch field '{field}'; it "
                f"knows image, text, texts, texts_valid, {', '.join(captions.PACKED_FIELDS)}"
            )
    if set(captions.PACKED_FIELDS) & set(fields):  # from the texts above, as the pipeline does
        pack = captions.PackTexts(inp.packed_length)
        keys = ('text', 'texts', 'texts_valid')
        packed = [pack({k: batch[k][i] for k in keys}) for i in range(rows)]
        for key in (*captions.PACKED_FIELDS, 'texts_valid'):
            batch[key] = np.stack([p[key] for p in packed])
    return batch


_INSTR = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([a-z][\w\-]*)\((.*)$'
)


def hlo_dot_flops(hlo_text: str) -> float:
    """2 * (output elements) * (contracted size) summed over the `dot` ops of optimised HLO.

    Operand shapes are looked up by instruction name (names are unique in a module); dots
    inside fusions are found in the fused computations. A dot inside a while loop (the
    grad_accum scan) is counted once, so this undercounts when grad_accum > 1.
    """
    shapes, dots = {}, []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dims, op, rest = m.groups()
        shapes[name] = [int(d) for d in dims.split(',') if d]
        if op == 'dot':
            dots.append((shapes[name], rest))
    total = 0.0
    for out_dims, rest in dots:
        lhs = re.match(r'\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)', rest)
        contract = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
        if not lhs or not contract or lhs.group(1) not in shapes:
            continue
        lhs_dims = shapes[lhs.group(1)]
        k = int(np.prod([lhs_dims[int(i)] for i in contract.group(1).split(',') if i]))
        total += 2.0 * float(np.prod(out_dims)) * k
    return total


def op_histogram(hlo_text: str, top: int = 15) -> dict:
    """Counts of HLO opcodes in the optimised module (a coarse picture of what XLA emits)."""
    counts: dict[str, int] = {}
    for m in re.finditer(r'=\s*\S+\s+([a-z][a-z0-9-]*)\(', hlo_text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def cost_flops(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # not every backend implements it
        return {'error': repr(e)}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {k: float(cost[k]) for k in ('flops', 'transcendentals', 'bytes accessed') if k in cost}


def memory_info(compiled) -> dict:
    try:
        mem = compiled.memory_analysis()
    except Exception as e:
        return {'error': repr(e)}
    if mem is None:
        return {}
    names = (
        'temp_size_in_bytes',
        'argument_size_in_bytes',
        'output_size_in_bytes',
        'alias_size_in_bytes',
        'generated_code_size_in_bytes',
        'peak_memory_in_bytes',
    )
    return {n: int(getattr(mem, n)) for n in names if getattr(mem, n, None) is not None}


def _busy_cpu_s() -> float | None:
    """Seconds of CPU the whole machine has spent busy since boot (Linux /proc/stat)."""
    try:
        with open('/proc/stat') as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def timed(fn, n: int) -> tuple[list[float], dict]:
    """Seconds of each of n calls of fn() (which blocks), and what the CPU did meanwhile.

    cpu_utilisation: this process's CPU time / (wall time x cores). others_cpu_utilisation:
    the rest of the machine's busy time on the same scale; well above 0 means other
    processes took cores and the step times are not the machine's (None: unknown, or a
    window under a second).
    """
    r0, busy0, w0 = resource.getrusage(resource.RUSAGE_SELF), _busy_cpu_s(), time.perf_counter()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    r1, busy1 = resource.getrusage(resource.RUSAGE_SELF), _busy_cpu_s()
    wall = time.perf_counter() - w0
    capacity = wall * (os.cpu_count() or 1)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    # /proc/stat counts in clock ticks (10 ms): over less than a second it says nothing.
    others = None if busy0 is None or wall < 1.0 else max(0.0, (busy1 - busy0 - cpu) / capacity)
    return times, {
        'minor_faults_per_step': (r1.ru_minflt - r0.ru_minflt) / n,
        'cpu_s_per_step': cpu / n,
        'sys_s_per_step': (r1.ru_stime - r0.ru_stime) / n,
        'cpu_utilisation': cpu / capacity,
        'others_cpu_utilisation': others,
    }


def summarise(times: list[float]) -> dict:
    return {
        'median_s': float(np.median(times)),
        'mean_s': float(np.mean(times)),
        'min_s': float(np.min(times)),
        'max_s': float(np.max(times)),
        'all_s': [round(t, 5) for t in times],
    }


# ---------------------------------------------------------------------------------------------
# The benchmark.


def build(config):
    """(mesh, objective, graphdef, state, shardings, jitted step), as pretrain.train.run does."""
    import jax
    from pretrain import sharding, train
    from pretrain.objectives import compose

    mesh = sharding.make_mesh(config.mesh)
    objective = compose.build_objective(config.objectives)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = train.init_train_state(config, mesh)
        train_step = train.make_train_step(config, graphdef, objective, shardings, mesh)
    return mesh, objective, graphdef, state, shardings, train_step


def breakdown(graphdef, objective, state, batch, mesh, *, steps: int, warmup: int) -> dict:
    """Forward-only and forward+backward (no optimizer) times of the same loss."""
    import jax
    from flax import nnx

    def loss(params, rest, batch):
        model = nnx.merge(model_def, params, rest)
        return objective(model, batch, rng=jax.random.key(0), train=True)[0]

    model, _ = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    out = {}
    with jax.set_mesh(mesh):
        for name, fn in (
            ('forward', jax.jit(loss)),
            ('forward_backward', jax.jit(jax.value_and_grad(loss))),
        ):
            compiled = fn.lower(params, rest, batch).compile()
            run = lambda: jax.block_until_ready(compiled(params, rest, batch))
            for _ in range(warmup):
                run()
            times, _ = timed(run, steps)
            out[name] = {**summarise(times), 'xla_flops': cost_flops(compiled).get('flops')}
    return out


def profile_steps(one_step, args) -> dict:
    """Runs --profile_steps steps under jax.profiler.trace; the trace's top ops per step."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.profile_dir or tmp
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.profile_steps):
                one_step()
        return trace_summary.summarise(trace_dir, steps=args.profile_steps)


def run_benchmark(args, overrides) -> dict:
    import flax
    import jax
    from pretrain import config_cli, flops, sharding

    config = config_cli.build_config(args.config, overrides)
    t0 = time.perf_counter()
    mesh, objective, graphdef, state, shardings, train_step = build(config)
    # The step takes the state as its list of arrays, as pretrain.train.run passes it.
    treedef, arrays = jax.tree.structure(state), jax.tree.leaves(state)
    del state
    init_s = time.perf_counter() - t0

    rows = config.batch_size // jax.process_count()
    host_batch = synthetic_batch(
        config, objective.fields, rows=rows, seed=config.seed + jax.process_index()
    )
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(host_batch, mesh)
        t0 = time.perf_counter()
        lowered = train_step.lower(arrays, batch)
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0

        precision = config.model.get('matmul_precision', 'default')
        peak_before, peak_source = flops.peak_flops_per_device(matmul_precision=precision)

        # The compiled executable itself runs the steps: a sharding mismatch between the
        # returned and the donated arrays would raise here rather than silently recompile.
        metrics = None

        def one_step():
            nonlocal arrays, metrics
            arrays, metrics = compiled(arrays, batch)
            jax.block_until_ready((arrays, metrics))

        t0 = time.perf_counter()
        one_step()  # slower (first page-in of buffers, runtime warm-up): timed apart, as warmup
        first_step_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            one_step()
        load_before = os.getloadavg()
        times, usage = timed(one_step, args.steps)
        load_after = os.getloadavg()

        def pipelined_steps(n: int) -> list[float]:
            # As pretrain.train.run steps: the next step is dispatched before the host waits
            # for the one before, so the host's per-step work overlaps the device's (blocked,
            # an H100 idled 19 ms between CLIP B/16 steps of 162 kernel-ms: the state's
            # flattening and the dispatch; session 22). Each time: from one step's completion
            # to the next's.
            nonlocal arrays, metrics
            arrays, metrics = compiled(arrays, batch)
            out, last = [], time.perf_counter()
            for _ in range(n):
                previous = metrics
                arrays, metrics = compiled(arrays, batch)
                jax.block_until_ready(previous)
                now = time.perf_counter()
                out.append(now - last)
                last = now
            jax.block_until_ready((arrays, metrics))
            return out

        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        # After the step-13 metrics that earlier runs' losses compare with.
        times_pipelined = pipelined_steps(args.steps)

        profile = profile_steps(one_step, args) if args.profile_steps > 0 else None
        peak_after, _ = flops.peak_flops_per_device(matmul_precision=precision)
        parts = (
            breakdown(
                graphdef,
                objective,
                jax.tree.unflatten(treedef, arrays),
                batch,
                mesh,
                steps=args.steps,
                warmup=args.warmup,
            )
            if args.breakdown
            else None
        )

    step, step_pipelined = summarise(times), summarise(times_pipelined)
    n_dev = jax.device_count()
    dev = jax.devices()[0]
    # On CPU the measured matmul rate is the whole host's (one XLA CPU device already uses
    # every core), so virtual devices (xla_force_host_platform_device_count) share it: count
    # it once per process. Accelerator peaks are per chip.
    peak_units = jax.process_count() if dev.platform == 'cpu' else n_dev
    peak = max(peak_before, peak_after) * peak_units
    analytic = flops.train_step_flops(config, objective.fields)
    # The compiled module is one device's SPMD program: scale its counts to the whole mesh.
    xla = {k: v * n_dev for k, v in cost_flops(compiled).items() if isinstance(v, float)}
    hlo = compiled.as_text()
    if args.hlo_out:
        with gzip.open(args.hlo_out, 'wt') as f:
            f.write(hlo)
    if profile:
        trace_summary.annotate(profile['top_ops'], trace_summary.hlo_sources(hlo))
    dots = hlo_dot_flops(hlo) * n_dev
    med, med_pipelined = step['median_s'], step_pipelined['median_s']
    result = {
        'benchmark': 'train_step',
        'schema': SCHEMA,
        'label': args.label,
        'command': ' '.join(getattr(sys, 'orig_argv', sys.argv)),
        'config_file': args.config,
        'overrides': [f'--config.{k}={v}' for k, v in overrides],
        'objectives': list(config.objectives.keys()),
        'batch_size': config.batch_size,
        'batch_shapes': {k: [list(v.shape), str(v.dtype)] for k, v in host_batch.items()},
        'timing': {
            'init_s': init_s,
            'lower_s': lower_s,
            'compile_s': compile_s,
            'first_step_s': first_step_s,
            'warmup_steps': args.warmup,
            'steps': args.steps,
            'step': step,
            'samples_per_s': config.batch_size / med,
            'step_pipelined': step_pipelined,
            'samples_per_s_pipelined': config.batch_size / med_pipelined,
            **usage,
            'loadavg_1min_before_after': [load_before[0], load_after[0]],
        },
        'flops': {
            'analytic_per_step': analytic,
            'xla_cost_analysis_per_step': xla.get('flops'),
            'xla_transcendentals_per_step': xla.get('transcendentals'),
            'xla_bytes_accessed_per_step': xla.get('bytes accessed'),
            'hlo_dot_per_step': dots,
            'analytic_over_xla': analytic / xla['flops'] if xla.get('flops') else None,
            'analytic_over_hlo_dot': analytic / dots if dots else None,
            'how': 'analytic: pretrain.flops.train_step_flops(config, fields), matmuls only, '
            '2mkn each, backward = 2x forward, attention T^2 terms counted in full (also '
            'causal), no element-wise ops, no optimizer. xla: compiled.cost_analysis() '
            'of the whole step (all ops) x devices. hlo_dot: 2 * output elements * '
            'contracted size over the dot ops of the optimised HLO x devices',
        },
        'peak': {
            'per_device_flops': max(peak_before, peak_after),
            'per_device_flops_before': peak_before,
            'per_device_flops_after': peak_after,
            'source': peak_source,
            'devices': n_dev,
            'peak_units': peak_units,
            'total_flops': peak,
        },
        'contended': (usage['others_cpu_utilisation'] or 0) > CONTENDED_ABOVE,
        'mfu': analytic / med / peak,
        'mfu_pipelined': analytic / med_pipelined / peak,
        'hlo_flops_utilisation': dots / med / peak,
        'achieved_flops_per_s': analytic / med,
        'memory': {
            'xla': memory_info(compiled),
            'process_peak_rss_bytes': (proc_status_kib('VmHWM') or 0) * 1024 or None,
            'ru_maxrss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        'hlo_op_histogram': op_histogram(hlo),
        'last_metrics': last_metrics,
        'breakdown': parts,
        'profile': profile,
        'allocator': allocator_info(),
        'device': {
            'platform': dev.platform,
            'kind': dev.device_kind,
            'count': n_dev,
            'process_count': jax.process_count(),
            'mesh': dict(mesh.shape),
            'cpu_model': cpu_model(),
            'cpu_count': os.cpu_count(),
            'machine': platform.machine(),
        },
        'versions': {
            'jax': jax.__version__,
            'jaxlib': _jaxlib_version(),
            'flax': flax.__version__,
            'python': platform.python_version(),
        },
        'env': {k: v for k, v in os.environ.items() if k.startswith(('XLA_', 'JAX_'))},
        'model': config.model.to_dict(),
        # model.remat='auto': the policy its first call chose, and why (pretrain/auto_remat.py)
        'remat': getattr(train_step, 'remat', None) or config.model.get('remat'),
        'remat_report': getattr(train_step, 'report', None),
        'config': json.loads(config.to_json_best_effort()),
    }
    return result


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def compare_malloc(argv: list[str]) -> dict:
    """Runs this benchmark again with the other allocator setting and returns its JSON.

    From a run with the product's allocator (PRETRAIN_MALLOC auto / mimalloc / glibc) the
    other is PRETRAIN_MALLOC=system (glibc defaults); from a system run, 'auto'.
    """
    from pretrain import allocator

    tuned_now = allocator.choice() != 'system'
    ours = {allocator.REEXEC_MARK, 'GLIBC_TUNABLES', *allocator.MIMALLOC_ENV}
    if os.environ.get('LD_PRELOAD') == allocator.mimalloc_library():
        ours.add('LD_PRELOAD')
    with tempfile.TemporaryDirectory() as tmp:
        sub_out = os.path.join(tmp, 'other.json')
        cmd = [sys.executable, '-m', 'benchmarks.train_step', *_strip(argv), '--out', sub_out]
        env = {k: v for k, v in os.environ.items() if k not in ours}
        env['PRETRAIN_MALLOC'] = 'system' if tuned_now else 'auto'
        subprocess.run(cmd, env=env, check=True)
        with open(sub_out) as f:
            return json.load(f)


def _strip(argv):
    """argv without --out/--compare_malloc (the subprocess gets its own --out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == '--out':
            skip = True
        elif a.startswith('--out=') or a == '--compare_malloc':
            continue
        else:
            out.append(a)
    return out


def headline(r: dict) -> str:
    t, f = r['timing'], r['flops']
    ratio = f['analytic_over_xla']
    return (
        f"{r['allocator']['kind']}: step {t['step']['median_s']:.3f} s median "
        f"({t['step']['mean_s']:.3f} mean), {t['samples_per_s']:.1f} samples/s, "
        f"MFU {100 * r['mfu']:.1f}% of {r['peak']['total_flops'] / 1e9:.0f} GFLOP/s "
        f"({r['peak']['source']}); pipelined as training runs: step "
        f"{t['step_pipelined']['median_s']:.3f} s, MFU {100 * r['mfu_pipelined']:.1f}%; "
        f"{f['analytic_per_step'] / 1e9:.1f} GFLOP analytic vs "
        f"{(f['xla_cost_analysis_per_step'] or float('nan')) / 1e9:.1f} XLA "
        f"(ratio {ratio if ratio is None else round(ratio, 3)}), compile {t['compile_s']:.1f} s, "
        f"{t['minor_faults_per_step']:.0f} page faults/step, "
        f"CPU: this process {t['cpu_utilisation']:.2f}, others "
        f"{t['others_cpu_utilisation'] or 0:.2f}"
    )


def main(argv=None) -> int:
    from pretrain import config_cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config_cli.build_config(args.config, overrides)  # fail fast on a bad override
    except config_cli.ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    result = run_benchmark(args, overrides)
    print(headline(result), flush=True)
    if result['contended']:
        print(
            f"warning: other processes used {100 * result['timing']['others_cpu_utilisation']:.0f}% "
            'of the CPU during the timed steps: these times are not the machine\'s',
            file=sys.stderr,
            flush=True,
        )
    if args.compare_malloc:
        other = compare_malloc(argv)
        med, other_med = result['timing']['step']['median_s'], other['timing']['step']['median_s']
        result['malloc_comparison'] = {
            'this_run': result['allocator']['kind'],
            'other_run': other['allocator']['kind'],
            'other': {k: other[k] for k in ('timing', 'mfu', 'peak', 'memory', 'allocator')},
            'other_over_this_step_time': other_med / med,
        }
        print(
            f"{other['allocator']['kind']}: step {other_med:.3f} s median, "
            f'{other_med / med:.2f}x this run',
            flush=True,
        )
    results_io.write_json(args.out, result)
    print(f'wrote {args.out}', flush=True)
    return 0


if __name__ == '__main__':
    from pretrain import main as pretrain_main

    # Compile time is one of the figures: no persistent compilation cache (the product's
    # default, pretrain.compilation_cache) to load the step from instead.
    os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
    pretrain_main.prepare_process()  # the product's XLA flags and allocator (re-execs once)
    sys.exit(main())
