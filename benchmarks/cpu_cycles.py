"""Where a CPU train step's cycles go, by kind of code: matmul kernels vs everything else.

    python -m benchmarks.cpu_cycles [--delay 40] [--seconds 10] [--out FILE.json] \
        -- --config configs/clip.py [--config.key=value ...]

`jax.profiler` traces (train_step.py --profile_steps) time ops on the thread that launches
them, so the cycles a parallel op spends on the other cores are not in them. This samples
the whole process with Linux `perf` instead: it starts `benchmarks.train_step` with the
given arguments (and many steps), waits `--delay` seconds for compilation and warmup,
records `perf record -F 999` for `--seconds`, and sums the samples into:
- YNNPACK's dot kernels (`ynn::dot_*`: the matmuls XLA hands to YNNPACK);
- other matmul kernels: Eigen's packing routines, and JIT code that looks like a GEMM
  micro-kernel (>= 50 `vfmadd231ps` and >= 20 `vbroadcastss` in its 4 KB page, read from the
  live process and disassembled with objdump): the dots XLA keeps out of YNNPACK, e.g. the
  weight gradients contracting the B*T rows;
- other JIT code (XLA's element-wise and reduction fusions), YNNPACK's other kernels
  (element-wise parts of its fusions), malloc/free, the kernel, the runtime, the rest.
The benchmark is stopped after sampling. Needs `perf` and `objdump` (binutils) and
permission to profile the child (kernel.perf_event_paranoid <= 2 does, for one's own
processes). Shares are of sampled CPU time, so they hold however many cores run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import results_io

PAGE = 4096
_ROW = re.compile(r'\s*[\d.]+%\s+(\d+)\s+(\S.*?)\s+\[(.)\]\s+(.*)')


def parse_args(argv):
    parser = argparse.ArgumentParser('python -m benchmarks.cpu_cycles', description=__doc__)
    parser.add_argument('--delay', type=float, default=40.0, help='seconds before sampling')
    parser.add_argument('--seconds', type=float, default=10.0, help='seconds sampled')
    parser.add_argument('--out', default='', help='write the JSON here')
    parser.add_argument('train_step_args', nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.train_step_args[:1] == ['--']:
        args.train_step_args = args.train_step_args[1:]
    return args


def perf_rows(data: str) -> list[tuple[float, str, str]]:
    """(percent, dso, symbol) rows of `perf report`, flat.

    Percentages come from the sample counts: perf's own are rounded to 0.01% per row, and
    over ~1,500 rows the rounding adds up to several percent.
    """
    out = subprocess.run(
        ['perf', 'report', '-i', data, '--no-children', '--sort', 'dso,sym', '--stdio', '-n'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = []
    for line in out.splitlines():
        m = _ROW.match(line)
        if m and not line.lstrip().startswith('#'):
            counts.append((int(m.group(1)), m.group(2).strip(), m.group(4).strip()))
    total = sum(c for c, _, _ in counts) or 1
    return [(100.0 * c / total, dso, symbol) for c, dso, symbol in counts]


def looks_like_gemm(pid: int, page: int) -> bool:
    """A JIT page full of broadcast-FMA pairs is a register-blocked matmul micro-kernel."""
    try:
        with open(f'/proc/{pid}/mem', 'rb') as f:
            f.seek(page)
            code = f.read(PAGE)
    except OSError:
        return False
    with tempfile.NamedTemporaryFile(suffix='.bin') as tmp:
        tmp.write(code)
        tmp.flush()
        asm = subprocess.run(
            ['objdump', '-D', '-b', 'binary', '-mi386:x86-64', tmp.name],
            capture_output=True,
            text=True,
        ).stdout
    return asm.count('vfmadd231ps') >= 50 and asm.count('vbroadcastss') >= 20


def classify(rows, pid: int) -> dict[str, float]:
    jit_pages = collections.Counter()
    for percent, _, symbol in rows:
        if symbol.startswith('0x'):
            jit_pages[int(symbol, 16) // PAGE * PAGE] += percent
    gemm_pages = {p for p, share in jit_pages.items() if share >= 0.5 and looks_like_gemm(pid, p)}
    shares = collections.Counter()
    for percent, dso, symbol in rows:
        if symbol.startswith('ynn::dot'):
            kind = 'matmul: YNNPACK dot kernels'
        elif symbol.startswith('0x') and int(symbol, 16) // PAGE * PAGE in gemm_pages:
            kind = 'matmul: JIT GEMM micro-kernels'
        elif 'Eigen' in symbol or 'gemm_pack' in symbol:
            kind = 'matmul: Eigen packing and kernels'
        elif symbol.startswith('0x'):
            kind = 'other JIT code (XLA fusions)'
        elif symbol.startswith('ynn::'):
            kind = 'YNNPACK other kernels'
        elif 'malloc' in symbol or 'free' in symbol:
            kind = 'malloc/free'
        elif dso.startswith('[kernel'):
            kind = 'kernel'
        elif any(s in symbol for s in ('slinky', 'xla::', 'tsl::')):
            kind = 'runtime (XLA, slinky, tsl)'
        else:
            kind = 'other'
        shares[kind] += percent
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, '-m', 'benchmarks.train_step', *args.train_step_args]
    command += ['--steps', '100000', '--warmup', '1', '--out', os.devnull]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        time.sleep(args.delay)
        if child.poll() is not None:
            raise SystemExit(f'error: the benchmark exited early ({child.returncode}): {command}')
        # train_step re-executes itself once (allocator), keeping its pid.
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, 'perf.data')
            subprocess.run(
                ['perf', 'record', '-q', '-F', '999', '-p', str(child.pid), '-o', data, '--',
                 'sleep', str(args.seconds)],
                check=True,
                stderr=subprocess.DEVNULL,
            )
            rows = perf_rows(data)
            shares = classify(rows, child.pid)
    finally:
        child.kill()
        child.wait()
    matmul = sum(v for k, v in shares.items() if k.startswith('matmul'))
    report = {
        'benchmark': 'cpu_cycles',
        'command': 'python -m benchmarks.cpu_cycles ' + ' '.join(sys.argv[1:]),
        'seconds_sampled': args.seconds,
        'percent_of_samples': shares,
        'matmul_percent': matmul,
        'top_symbols': [
            {'percent': p, 'dso': d, 'symbol': s[:120]} for p, d, s in rows[:15]
        ],
    }
    for kind, percent in shares.items():
        print(f'{percent:6.2f}%  {kind}')
    print(f'{matmul:6.2f}%  all matmul kernels')
    if args.out:
        results_io.write_json(args.out, report)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
