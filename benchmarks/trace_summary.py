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


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    """The module text's FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
            current = tables.setdefault(line, {})
        elif current is not None and (m := re.match(r'(\d+) (.*)', line)):
            current[int(m.group(1))] = m.group(2)
        elif line.startswith(('%', 'ENTRY', 'HloModule')) and tables:
            current = None
    return tables


def hlo_sources(hlo_text: str, *, lines: int = 3) -> dict[str, str]:
    """{fusion name: the Python lines its ops come from}, from an optimised HLO module's text.

    Each instruction's metadata ends with a stack_frame_id, which the module's StackFrames,
    FileLocations and FileNames tables resolve to a file and line. A fusion gets the lines
    of the ops fused into it, the most frequent first ('layers.py:292 <lambda> x17,
    layers.py:101 Dense.__call__ x2'). This is what tells a profile's 'fusion_1641' apart
    from its neighbours. A module without those tables gives {}.
    """
    tables = _tables(hlo_text)

    def field(text: str, key: str) -> int:  # -1 where the table lacks the key
        m = re.search(rf'{key}=(\d+)', text)
        return int(m.group(1)) if m else -1

    names = {i: v.strip('"').rsplit('/', 1)[-1] for i, v in tables.get('FileNames', {}).items()}
    functions = {i: v.strip('"') for i, v in tables.get('FunctionNames', {}).items()}

    def where(frame_id: int) -> str | None:
        frame = tables.get('StackFrames', {}).get(frame_id)
        location = frame and tables['FileLocations'].get(field(frame, 'file_location_id'))
        if not location:
            return None
        file, line = names.get(field(location, 'file_name_id'), '?'), field(location, 'line')
        function = functions.get(field(location, 'function_name_id'), '')
        return f'{file}:{line} {function}'.strip()

    counts: dict[str, dict[str, int]] = {}  # computation -> {file:line: ops}
    calls: dict[str, str] = {}  # fusion instruction -> the computation it calls
    body = None
    for line in hlo_text.splitlines():
        if m := re.match(r'^(?:ENTRY )?%(\S+) .*\{$', line):
            body = counts.setdefault(m.group(1), {})
            continue
        if body is None or not line.startswith(('  %', '  ROOT %')):
            continue
        if (m := re.match(r'\s+(?:ROOT )?%(\S+) = .* fusion\(.*calls=%([^,\s]+)', line)):
            calls[m.group(1)] = m.group(2)
        frame = re.search(r'stack_frame_id=(\d+)', line)
        if frame and (w := where(int(frame.group(1)))):
            body[w] = body.get(w, 0) + 1
    out = {}
    for fusion, computation in calls.items():
        ranked_lines = sorted(counts.get(computation, {}).items(), key=lambda kv: -kv[1])
        if ranked_lines:
            out[fusion] = ', '.join(f'{w} x{n}' for w, n in ranked_lines[:lines])
    return out


def annotate(ops: list[dict], sources: dict[str, str]) -> list[dict]:
    """Adds 'source' (hlo_sources) to each profile op whose name is one of the fusions; a
    GPU kernel is named like its fusion with '_' for the last '.' ('fusion_12')."""
    for op in ops:
        name = op['name']
        found = sources.get(name) or sources.get(re.sub(r'_(\d+)$', r'.\1', name))
        if found:
            op['source'] = found
    return ops


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
