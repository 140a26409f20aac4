"""Top ops of a `jax.profiler` trace: where a step's device time goes, as JSON.

    python -m benchmarks.trace_summary TRACE_DIR [--steps N] [--top 25]

Reads the Perfetto JSON that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(`plugins/profile/<run>/perfetto_trace.json.gz`, the newest run under TRACE_DIR), so no
TensorBoard profile plugin is needed. Complete events ('X') are summed by name:
- on accelerators, over the device processes ('/device:GPU:0', ...): the kernels and the
  XLA ops they belong to (a fusion's name, e.g. 'fusion.123', or a cuBLAS/cuDNN kernel);
- on CPU, where there is no device process, over the XLA worker threads of '/host:CPU'
  (names starting 'tf_XLA'), which run the compiled ops; Python threads and the runtime's
  own spans ('ThunkExecutor::Execute', which enclose the ops) are left out.
`top_kinds` sums the same times over names with their numeric suffix removed
('loop_multiply_fusion.12' -> 'loop_multiply_fusion'), which groups XLA's numbered fusions
and kernels of one kind. Per-step figures divide by --steps (the steps traced). Events on parallel streams or
threads overlap, so shares are of summed op time, not of wall time.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys


def newest_trace(trace_dir: str) -> str:
    found = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
    if not found:
        raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
    return max(found, key=os.path.getmtime)


def op_times(events: list[dict]) -> tuple[dict[str, float], str]:
    """{op name: summed microseconds} over the device processes, or the CPU XLA threads."""
    process_names, thread_names = {}, {}
    for e in events:
        if e.get('ph') == 'M' and e.get('name') == 'process_name':
            process_names[e['pid']] = e['args']['name']
        elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
            thread_names[(e['pid'], e['tid'])] = e['args']['name']
    devices = {pid for pid, name in process_names.items() if name.startswith('/device:')}
    if devices:
        keep, where = (lambda e: e.get('pid') in devices), 'device processes'
    else:
        # '::' names are the runtime's own spans (ThunkExecutor::Execute ...), which
        # enclose the ops rather than being ones.
        keep = lambda e: (
            thread_names.get((e.get('pid'), e.get('tid')), '').startswith('tf_XLA')
            and '::' not in e['name']
        )
        where = 'CPU XLA threads'
    times: dict[str, float] = {}
    for e in events:
        if e.get('ph') == 'X' and keep(e):
            times[e['name']] = times.get(e['name'], 0.0) + float(e.get('dur', 0.0))
    return times, where


def op_kind(name: str) -> str:
    return re.sub(r'([._]\d+)+$', '', name)


def ranked(times: dict[str, float], *, steps: int, top: int) -> list[dict]:
    total = sum(times.values())
    return [
        {'name': name, 'ms_per_step': us / 1e3 / steps, 'share': us / total if total else 0.0}
        for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]
    ]


def summarise(trace_dir: str, *, steps: int = 1, top: int = 25) -> dict:
    path = newest_trace(trace_dir)
    with gzip.open(path, 'rt') as f:
        data = json.load(f)
    events = data['traceEvents'] if isinstance(data, dict) else data
    times, where = op_times(events)
    kinds: dict[str, float] = {}
    for name, us in times.items():
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + us
    return {
        'trace': path,
        'summed_over': where,
        'steps': steps,
        'op_ms_per_step': sum(times.values()) / 1e3 / steps,
        'top_ops': ranked(times, steps=steps, top=top),
        'top_kinds': ranked(kinds, steps=steps, top=top),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('python -m benchmarks.trace_summary', description=__doc__)
    parser.add_argument('trace_dir')
    parser.add_argument('--steps', type=int, default=1, help='steps the trace holds')
    parser.add_argument('--top', type=int, default=25)
    args = parser.parse_args(argv)
    print(json.dumps(summarise(args.trace_dir, steps=args.steps, top=args.top), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
