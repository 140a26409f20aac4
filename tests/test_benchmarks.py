"""benchmarks/train_step.py on a tiny model: it runs, and its JSON is sane (no timing asserts)."""

import gzip
import json
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from pretrain import config_cli, flops

if ROOT not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, ROOT)
from benchmarks import train_step as bench  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402

# One block of width 32 per tower, batch 8, 32 px images and 32-token captions.
TINY_BENCH = ['--config.batch_size=8', *TINY_MODEL]


def test_train_step_benchmark_writes_sane_json(python, tmp_path):
    out = tmp_path / 'bench.json'
    python(
        [
            '-m',
            'benchmarks.train_step',
            '--config',
            'configs/clip.py',
            *TINY_BENCH,
            '--steps',
            '2',
            '--warmup',
            '1',
            '--profile_steps',
            '1',
            '--hlo_out',
            str(tmp_path / 'hlo.txt.gz'),
            '--out',
            str(out),
        ],
        timeout=120,
        env={'PRETRAIN_MALLOC': 'auto'},
    )
    r = json.loads(out.read_text())
    t, f = r['timing'], r['flops']
    assert len(t['step']['all_s']) == 2
    assert 0 < t['step']['min_s'] <= t['step']['median_s'] <= t['step']['max_s']
    assert t['step']['mean_s'] > 0 and t['samples_per_s'] > 0 and t['compile_s'] > 0
    assert len(t['step_pipelined']['all_s']) == 2 and t['samples_per_s_pipelined'] > 0
    assert r['batch_shapes'] == {'image': [[8, 32, 32, 3], 'uint8'], 'text': [[8, 32], 'int32']}
    # Analytic model FLOPs (matmuls only) against XLA's count of the whole compiled step.
    assert f['analytic_per_step'] > 0 and f['xla_cost_analysis_per_step'] > 0
    assert 0.5 < f['analytic_over_xla'] < 2, f
    assert 0.5 < f['analytic_over_hlo_dot'] < 2, f
    assert r['peak']['per_device_flops'] > 0 and r['peak']['source']
    assert 0 < r['mfu'] < 1.5 and 0 < r['mfu_pipelined'] < 1.5
    assert r['memory']['process_peak_rss_bytes'] > 0
    assert r['memory']['xla']['temp_size_in_bytes'] >= 0
    assert r['model']['image']['width'] == 32 and r['model']['text']['depth'] == 1
    assert r['versions']['jax'] == jax.__version__
    # One traced step, summed over XLA's CPU worker threads: real op names, shares that add up.
    p = r['profile']
    assert p['summed_over'] == 'CPU XLA threads' and p['steps'] == 1 and p['op_ms_per_step'] > 0
    assert p['top_ops'] and all('::' not in o['name'] for o in p['top_ops'])
    assert sum(o['share'] for o in p['top_kinds']) <= 1 + 1e-9
    # Fusions name the model's source lines they come from, out of the HLO kept beside.
    assert any('.py:' in o.get('source', '') for o in p['top_ops']), p['top_ops']
    with gzip.open(tmp_path / 'hlo.txt.gz', 'rt') as f:
        assert f.read().startswith('HloModule')
    # The product's XLA flags are in force (GPU-only flags; XLA CPU ignores them).
    assert 'xla_gpu_enable_triton_gemm' in r['env'].get('XLA_FLAGS', '')
    # The product's allocator choice: the entry point re-executed itself with the tunables.
    assert 'GLIBC_TUNABLES' in r['allocator']['env'] or r['allocator']['preloaded_libs'], r[
        'allocator'
    ]
    assert np.isfinite(r['last_metrics']['loss'])


def test_accelerator_peaks_come_from_the_device_kind():
    def peak(kind):
        return flops.peak_flops_per_device(SimpleNamespace(platform='gpu', device_kind=kind))

    assert peak('NVIDIA H100 80GB HBM3') == (989e12, 'H100 bf16 dense datasheet peak')
    assert peak('NVIDIA B200')[0] == 2250e12
    assert peak('NVIDIA GB200')[0] == 2500e12  # not B200's, which its name contains
    assert peak('TPU v5 lite')[0] == 197e12
    rate, source = peak('Some Future Chip')
    assert np.isnan(rate) and 'Some Future Chip' in source


def test_allocator_info_names_what_is_in_force(monkeypatch):
    if bench.allocator_info()['preloaded_libs']:
        pytest.skip('this pytest process runs with a preloaded allocator')
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.mmap_threshold=4294967296')
    assert bench.allocator_info()['kind'] == 'glibc malloc with GLIBC_TUNABLES (tuned)'
    monkeypatch.delenv('GLIBC_TUNABLES')
    info = bench.allocator_info()
    assert info['kind'] == 'glibc malloc, defaults (system)' and 'GLIBC_TUNABLES' not in info['env']


def test_synthetic_batch_matches_the_pipeline_layout():
    config = config_cli.build_config('configs/dreamlip.py', [])
    inp = config.input
    batch = bench.synthetic_batch(config, ('image', 'text', 'texts', 'texts_valid'), rows=4)
    assert batch['image'].shape == (4, inp.image_size, inp.image_size, 3)
    assert batch['image'].dtype == np.uint8
    assert batch['text'].shape == (4, inp.context_length) and batch['text'].dtype == np.int32
    k, l_sub = inp.num_subcaptions, inp.subcaption_context_length
    assert batch['texts'].shape == (4, k, l_sub) and batch['texts'].dtype == np.int32
    assert batch['texts_valid'].shape == (4, k) and batch['texts_valid'].dtype == bool
    for row in [*batch['text'], *batch['texts'].reshape(-1, l_sub)]:
        eos = int(np.argmax(row == 1))  # bytes, one EOS, then padding only
        assert (row[:eos] >= 2).all() and (row[eos + 1 :] == 0).all()


def test_hlo_dot_flops_counts_plain_and_batched_matmuls():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    hlo = jax.jit(lambda x, y: jnp.tanh(x @ y)).lower(a, b).compile().as_text()
    assert bench.hlo_dot_flops(hlo) == 2 * 64 * 32 * 16
    q = jnp.ones((2, 5, 8))
    hlo = jax.jit(lambda x: jnp.einsum('bqk,bsk->bqs', x, x)).lower(q).compile().as_text()
    assert bench.hlo_dot_flops(hlo) == 2 * 2 * 5 * 5 * 8


def write_trace(path, events):
    import gzip

    path.mkdir(parents=True)
    with gzip.open(path / 'perfetto_trace.json.gz', 'wt') as f:
        json.dump({'traceEvents': events}, f)


def test_hlo_sources_names_the_lines_a_fusion_comes_from():
    from benchmarks import trace_summary

    def f(x):
        y = jnp.tanh(x) * 3.0 + 1.0  # the fused line
        return y @ y.T

    hlo = jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text()
    line = f.__code__.co_firstlineno + 1
    sources = trace_summary.hlo_sources(hlo)
    fused = [k for k, v in sources.items() if f'test_benchmarks.py:{line} ' in v]
    assert fused, sources
    # A fusion of one op (the matmul here) has only its ROOT line to go by.
    assert any(f'test_benchmarks.py:{line + 1} ' in v for v in sources.values()), sources
    # A GPU kernel is named like its fusion with '_' for the last '.'.
    ops = [{'name': '_'.join(fused[0].rsplit('.', 1))}, {'name': 'nvjet_gemm'}]
    trace_summary.annotate(ops, sources)
    assert ops[0]['source'] == sources[fused[0]] and 'source' not in ops[1]


def test_trace_summary_sums_device_kernels_by_name_and_kind(tmp_path):
    from benchmarks import trace_summary

    meta = lambda pid, name: {'ph': 'M', 'pid': pid, 'name': 'process_name', 'args': {'name': name}}
    op = lambda pid, name, dur: {'ph': 'X', 'pid': pid, 'tid': 1, 'name': name, 'dur': dur}
    events = [
        meta(1, '/host:CPU'),
        meta(7, '/device:GPU:0'),
        op(1, 'host work, not a kernel', 10_000.0),
        op(7, 'fusion.1', 300.0),
        op(7, 'fusion.2', 100.0),
        op(7, 'nvjet_gemm', 350.0),
        op(7, 'fusion.1', 50.0),
        {'ph': 'i', 'pid': 7, 'name': 'instant', 'ts': 0},
    ]
    write_trace(tmp_path / 'plugins' / 'profile' / 'run1', events)
    s = trace_summary.summarise(str(tmp_path), steps=2, top=10)
    assert s['summed_over'] == 'device processes'
    assert s['op_ms_per_step'] == pytest.approx(0.4)  # 800 us over 2 steps, host left out
    assert [(o['name'], o['ms_per_step']) for o in s['top_ops']] == [
        ('fusion.1', pytest.approx(0.175)),
        ('nvjet_gemm', pytest.approx(0.175)),
        ('fusion.2', pytest.approx(0.05)),
    ]
    assert s['top_kinds'][0] == {'name': 'fusion', 'ms_per_step': 0.225, 'share': 0.5625}
    with pytest.raises(FileNotFoundError, match='no perfetto_trace.json.gz'):
        trace_summary.summarise(str(tmp_path / 'empty'))


def test_cpu_cycles_sorts_samples_into_matmul_and_the_rest():
    import ctypes
    import mmap
    import os
    import shutil

    from benchmarks import cpu_cycles

    # A page of this process that holds a GEMM-like instruction stream (one broadcast, three
    # FMAs, repeated), and a page of zeros: only the first is a matmul micro-kernel.
    broadcast = bytes.fromhex('62f27d481818')  # vbroadcastss (%rax), %zmm3
    fmas = bytes.fromhex('627265 48b8c0 62e26548b8c1 62626548b8c2'.replace(' ', ''))
    code = (broadcast + fmas) * (mmap.PAGESIZE // 24)
    pages = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    pages.write(code)
    gemm_page = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    zero_page = gemm_page + mmap.PAGESIZE
    rows = [
        (40.0, 'libjax_common.so', 'ynn::dot_fp32_5x64x1_1x16x1_avx512'),
        (20.0, '[JIT] tid 1', hex(gemm_page + 64)),
        (5.0, 'libjax_common.so', 'Eigen::internal::gemm_pack_colmajor_block<float>'),
        (15.0, '[JIT] tid 1', hex(zero_page + 8)),
        (10.0, 'libjax_common.so', 'ynn::multiply_fp32_x86_avx512f_avx512bw'),
        (6.0, 'libc.so.6', '_int_malloc'),
        (3.0, '[kernel.kallsyms]', 'clear_page_erms'),
        (1.0, 'libpython3.11.so', '_PyEval_EvalFrameDefault'),
    ]
    if shutil.which('objdump') is None or not os.path.exists('/proc/self/mem'):
        pytest.skip('needs objdump and /proc')
    shares = cpu_cycles.classify(rows, os.getpid())
    del pages
    assert shares == {
        'matmul: YNNPACK dot kernels': 40.0,
        'matmul: JIT GEMM micro-kernels': 20.0,
        'other JIT code (XLA fusions)': 15.0,
        'YNNPACK other kernels': 10.0,
        'malloc/free': 6.0,
        'matmul: Eigen packing and kernels': 5.0,
        'kernel': 3.0,
        'other': 1.0,
    }


def test_supervised_shape_diagnostic_learns_and_writes_its_curve(tmp_path):
    """benchmarks/supervised_shape.py: the tiny tower with a linear head, trained on a shapes
    label. 30 steps on colour (learnt first, DESIGN.md) already beat chance (12.5%)."""
    from benchmarks import supervised_shape

    out = tmp_path / 'curve.json'
    args = ['--stem', 'conv', '--label', 'colour_label', '--steps', '30', '--eval_every', '15']
    result = supervised_shape.main([*args, '--out', str(out)])
    assert json.loads(out.read_text()) == result
    assert [c['step'] for c in result['curve']] == [15, 30] and result['chance'] == 12.5
    assert result['curve'][-1]['eval_accuracy'] > 2 * result['chance'], result['curve']


def test_dreamlip_ablation_tabulates_its_variants_and_reads_finished_runs_back(python, tmp_path):
    """Two variants for 3 steps at batch 16 with small evaluations: every table column is
    filled from the run's own final evaluation, and a rerun reads the finished workdirs back
    instead of training them again."""
    from benchmarks import ablation_dreamlip as ablation

    out = tmp_path / 'abl'
    small_runs = [  # and the tiny towers, which both variants' texts fit at 64 px
        *[arg for arg in TINY_MODEL if 'context_length' not in arg and 'image_size' not in arg],
        '--config.batch_size=16',
        '--config.evals.zeroshot.num_examples=64',
        '--config.evals.retrieval.num_examples=64',
        '--config.evals.linear_probe.num_train=64',
        '--config.evals.linear_probe.num_val=32',
        '--config.evals.linear_probe.num_test=32',
        '--config.evals.dense_zeroshot.num_examples=16',
    ]
    args = ['-m', 'benchmarks.ablation_dreamlip', '--only', 'a,d', '--steps', '3']
    args += ['--workdir', str(tmp_path / 'runs'), '--out', str(out), *small_runs]
    python(args, timeout=300)
    first = json.loads((tmp_path / 'abl.json').read_text())
    assert first['steps'] == 3 and sorted(first['variants']) == ['a', 'd']
    for key, run in first['variants'].items():
        assert run['name'] == ablation.VARIANTS[key][0] and run['step'] == 3
        assert run['wall_s'] > 0  # trained in this call
        for metric, _ in ablation.COLUMNS:
            assert 0 <= run['metrics'][metric] <= 1, (key, metric)
    table = (tmp_path / 'abl.md').read_text()
    assert '| (a) clip_alt_text |' in table and '| (d) dreamlip |' in table
    assert 'All at step 3' in table

    python(args, timeout=120)
    again = json.loads((tmp_path / 'abl.json').read_text())
    for key, run in again['variants'].items():
        assert run['wall_s'] is None  # read back, not retrained
        assert run['metrics'] == first['variants'][key]['metrics']


def test_cpu_matmul_forms_times_each_form_and_computes_the_same_products(monkeypatch, tmp_path):
    from benchmarks import cpu_matmul_forms

    monkeypatch.setattr(cpu_matmul_forms, 'SHAPES', [(64, 16, 48)])
    monkeypatch.setattr(cpu_matmul_forms.flops, 'measured_matmul_flops', lambda **kw: 1e9)
    out = tmp_path / 'forms.json'
    result = cpu_matmul_forms.main(['--out', str(out), '--repeats', '1'])
    assert json.loads(out.read_text())['layers'] == result['layers']
    (row,) = result['layers']
    assert set(row) == {'n', 'd_in', 'd_out', 'f32', 'bf16_plain', 'bf16_layers'}
    for form in ('f32', 'bf16_plain', 'bf16_layers'):
        assert row[form]['forward_gflops'] > 0 and row[form]['forward_backward_gflops'] > 0
    # The three forms compute the same product (to bf16 rounding), so the rates compare.
    x, w = jnp.ones((8, 16)) / 3, jnp.ones((16, 4)) / 7
    want = np.asarray(x @ w)
    for mm, precision in cpu_matmul_forms.forms().values():
        with jax.default_matmul_precision(precision):
            np.testing.assert_allclose(jax.jit(mm)(x, w), want, rtol=1e-2)


def test_gpu_kernels_times_what_this_backend_runs_and_records_the_rest(tmp_path):
    from benchmarks import gpu_kernels

    out = tmp_path / 'kernels.json'
    gpu_kernels.main(['--batch', '2', '--iters', '1', '--out', str(out)])
    r = json.loads(out.read_text())
    rows = {row['name']: row for row in r['attention'] + r['layer_norm']}
    assert len(rows) == 11  # 9 attention variants, 2 LayerNorms
    for row in rows.values():  # each row is timed or says why not
        timed = row.get('forward_ms', 0) > 0 and (
            row.get('forward_backward_ms', 0) > 0 or row.get('backward_ms', 0) > 0
        )
        assert timed != ('error' in row), row
    assert 'error' not in rows['image xla 197'] and 'error' not in rows['text xla causal 77']
    assert 'error' not in rows['layernorm xla (normalize)']
    if jax.default_backend() == 'cpu':  # cuDNN and Pallas' GPU kernels are GPU-only
        assert 'cuDNN' in rows['image cudnn 198 unmasked']['error']
        assert 'error' in rows['layernorm pallas triton']
