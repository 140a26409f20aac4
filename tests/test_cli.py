"""The training command as a user runs it: workdir contents, errors, resume, signals, NaN."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, read_metrics

MAIN = ['-m', 'pretrain.main']


def losses(workdir):
    return {row['step']: row['train/loss'] for row in read_metrics(workdir)}


def test_training_writes_metrics_tensorboard_config_and_checkpoints(python, tmp_path):
    wd = str(tmp_path / 'run')
    proc = python(
        MAIN
        + [
            '--config',
            'configs/clip.py',
            '--workdir',
            wd,
            *TINY,
            '--config.total_steps=40',
            '--config.log_every=5',
            '--config.checkpoint.every=10',
            '--config.checkpoint.keep=2',
            '--config.checkpoint.keep_every=20',
            '--config.eval_every=40',
            '--config.evals.dense_zeroshot.num_examples=16',
        ]
    )
    rows = read_metrics(wd)
    assert [r['step'] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in (
        'train/loss',
        'train/loss_clip',
        'train/lr',
        'train/grad_norm',
        'perf/samples_per_s',
        'perf/mfu',
        'perf/data_wait_frac',
        'data/skipped',
    ):
        assert key in rows[-1], key
    assert 0 <= rows[-1]['perf/data_wait_frac'] < 1
    # Evaluators share the step's row: zero-shot, retrieval, linear probe and dense.
    for key in (
        'eval/zeroshot/top1',
        'eval/retrieval/i2t_r1',
        'eval/linear_probe/top1',
        'eval/dense_zeroshot/miou',
    ):
        assert key in rows[-1] and key not in rows[-2], key
    # Saved at 10, 20, 30, 40: the last two are kept, plus every 20th step.
    assert sorted(os.listdir(os.path.join(wd, 'checkpoints')), key=int) == ['20', '30', '40']
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(wd, 'tb')))
    with open(os.path.join(wd, 'config.json')) as f:
        assert json.load(f)['total_steps'] == 40
    assert 'completed: step 40/40' in proc.stdout
    # The terminal shows each evaluation's headline figures as it runs.
    line = next(x for x in proc.stdout.splitlines() if x.startswith('step 40 eval ('))
    assert 'zeroshot/top1' in line and 'retrieval/i2t_r1' in line and 'dense_zeroshot/miou' in line


@pytest.mark.parametrize(
    'args, message',
    [
        (
            ['--config', 'configs/clip.py', '--config.optim.lrr=1'],
            "unknown config key 'optim.lrr'; did you mean optim.lr",
        ),
        (
            ['--config', 'configs/clip.py', '--config.model.imag.width=1'],
            "unknown config key 'model.imag.width'; did you mean model.image.width",
        ),
        (['--config', 'configs/nope.py'], "config file 'configs/nope.py' does not exist"),
        (['--config', 'configs/clip.py:b61'], "unknown variant 'b61'; valid: tiny, b16"),
        (['--config', 'configs/clip.py', '--config.batch_size=many'], "config key 'batch_size'"),
        (
            ['--config', 'configs/clip.py', '--config.model.attention=flash'],
            "config.model: unknown attention implementation 'flash'; valid: auto, xla, cudnn",
        ),
    ],
)
def test_bad_config_is_one_line_error(python, tmp_path, args, message):
    proc = python(MAIN + args + ['--workdir', str(tmp_path)], check=False, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.mesh.data=3', "config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
        ('--config.total_steps=-5', 'config.total_steps must be >= 1, got -5'),
        ('--config.batch_size=0', 'config.batch_size must be >= 1, got 0'),
        ('--config.grad_accum=3', 'config.batch_size 128 does not split into grad_accum=3'),
        ('--config.checkpoint.keep=0', 'config.checkpoint.keep must be >= 1, got 0'),
        ('--config.model.dtype=float64', "config.model: unknown dtype 'float64'; valid: float32"),
        ('--config.model.embed_dim=0', 'config.model: embed_dim must be >= 1, got 0'),
        (
            '--config.objectives.dreamlip.multipos_form=x',
            "config.objectives: dreamlip multipos_form 'x'; valid:",
        ),
        ('--config.evals.zeroshot.tasks=("foo",)', 'config.evals.zeroshot.tasks: unknown'),
        ('--config.input.source=foo', "unknown input.source 'foo'; valid: shapes, mixture"),
        (
            '--config.model.text.context_length=10',
            'input.context_length 26 > model.text.context_length 10',
        ),
        ('--config.input.packed_length=10', 'input.packed_length 10 < input.context_length 26'),
    ],
)
def test_bad_run_value_is_one_line_error_before_training(capsys, tmp_path, override, message):
    """Values that pass the config parser but cannot run: caught before the first step."""
    from pretrain import main

    argv = ['--config', 'configs/dreamlip.py', '--workdir', str(tmp_path), override]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / 'checkpoints' / '1')


def test_batch_that_does_not_shard_over_the_mesh_is_a_config_error():
    from types import SimpleNamespace

    from configs import dreamlip
    from pretrain import config_cli, train

    mesh = SimpleNamespace(shape={'data': 4, 'fsdp': 2, 'tensor': 1})
    config = dreamlip.get_config()
    config.batch_size = 100
    with pytest.raises(config_cli.ConfigError, match=r'100 is not divisible by the 8 batch shards'):
        train.check_run_config(config, mesh)
    config.batch_size = 128
    train.check_run_config(config, mesh)


@pytest.mark.parametrize(
    'workdir, message',
    [
        ('gs://bucket/run', "workdir 'gs://bucket/run' is a URL"),
        ('/proc/no/such', "cannot create workdir '/proc/no/such'"),
    ],
)
def test_unusable_workdir_is_one_line_error(capsys, workdir, message):
    from pretrain import main

    assert main.main(['--config', 'configs/dreamlip.py', '--workdir', workdir]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_throughput_reports_the_share_of_time_the_devices_waited_for_data(monkeypatch):
    from pretrain import metrics

    # perf_counter, call by call: throughput(0); three waits for a batch; throughput(2), (3).
    clock = iter([10.0, 10.5, 11.5, 12.0, 12.5, 13.0, 13.5, 14.0, 16.0])
    monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
    throughput = metrics.Throughput(batch_size=8, flops_per_step=1e9, peak_flops=1e10)
    assert throughput(0) == {}  # t = 10
    with throughput.waiting_for_data():  # 10.5 -> 11.5, nothing dispatched yet: 1 s idle
        pass
    first = throughput.dispatched()
    throughput.finished(first, 12.2)  # step 1 ran until 12.2
    with throughput.waiting_for_data():  # 12.0 -> 12.5: idle only after 12.2, 0.3 s
        pass
    second = throughput.dispatched()
    with throughput.waiting_for_data():  # 13.0 -> 13.5; when step 2 ends is not known yet
        pass
    row = throughput(2)  # t = 14: 4 s for 2 steps, 1.3 s of them idle for data
    assert row['perf/step_time_s'] == 2.0 and row['perf/samples_per_s'] == 4.0
    assert row['perf/mfu'] == 1e9 / 2.0 / 1e10
    assert row['perf/data_wait_frac'] == pytest.approx(1.3 / 4.0)
    # Over 30% idle: one terminal line says the input pipeline sets the pace.
    assert 'waited 33% of the time' in metrics.input_bound_line(2, row)
    assert metrics.input_bound_line(2, {**row, 'perf/data_wait_frac': 0.05}) is None
    throughput.finished(second, 13.1)  # step 2 ended 0.4 s before its successor's batch came
    assert throughput(3)['perf/data_wait_frac'] == pytest.approx(0.4 / 2.0)


def test_step_watcher_reports_when_each_step_is_ready():
    import jax.numpy as jnp

    from pretrain import metrics

    seen = []
    watcher = metrics.StepWatcher(lambda index, t: seen.append((index, t)))
    x = jnp.ones((64, 64))
    for i in range(3):
        x = x @ x / 64  # each depends on the last, so they finish in order
        watcher.watch(i, x)
    watcher.close()
    assert [i for i, _ in seen] == [0, 1, 2]
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))


def test_eval_line_shows_each_evaluators_headline_figures():
    from pretrain import metrics

    row = {
        'train/loss': 1.0,
        'eval/zeroshot/top1': 0.367,
        'eval/zeroshot/top5': 0.9,
        'eval/zeroshot/shape_top1': 0.363,
        'eval/zeroshot/seconds': 1.5,
        'eval/retrieval/i2t_r1': 0.383,
        'eval/retrieval/i2t_r5': 0.7,
        'eval/linear_probe/top1': 0.327,
        'eval/linear_probe/val_top1': 0.33,
        'eval/dense_zeroshot/miou': 0.068,
        'eval/dense_zeroshot/miou_ceiling': 0.6,
        'eval/dense_zeroshot/seconds': 2.0,
    }
    assert metrics.eval_line(400, row) == (
        'step 400 eval (3.5 s): zeroshot/top1 36.7 | zeroshot/shape_top1 36.3 | '
        'retrieval/i2t_r1 38.3 | linear_probe/top1 32.7 | dense_zeroshot/miou 6.8'
    )


def test_resume_logs_the_losses_of_an_uninterrupted_run(python, tmp_path):
    args = [
        '--config',
        'configs/clip.py',
        *TINY,
        '--config.total_steps=8',
        '--config.log_every=1',
        '--config.checkpoint.every=4',
    ]
    # As a user runs it, with the persistent compilation cache on (conftest turns it off) in
    # its default folder, here under XDG_CACHE_HOME; the tiny step compiles in under the 1 s
    # that JAX caches by default. The reruns run the step the first run compiled.
    cache = tmp_path / 'cache'
    env = {
        'JAX_ENABLE_COMPILATION_CACHE': 'true',
        'XDG_CACHE_HOME': str(cache),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_LOG_COMPILES': '1',
    }
    straight, resumed = str(tmp_path / 'a'), str(tmp_path / 'b')
    python(MAIN + args + ['--workdir', straight], env=env)
    (folder,) = (cache / 'pretrain' / 'jax').iterdir()  # one per CPU type
    names = [f.name for f in folder.iterdir()]
    assert any(n.startswith('jit_train_step-') for n in names), names
    # Bounded (compilation_cache.MAX_BYTES): JAX's eviction keeps each entry's last use.
    assert any(n.endswith('-atime') for n in names), names
    python(MAIN + args + ['--workdir', resumed], env=env)
    # Rewind the second run to its step-4 checkpoint, as if it had died right after it.
    shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))
    os.remove(os.path.join(resumed, 'metrics.jsonl'))
    proc = python(MAIN + args + ['--workdir', resumed], env=env)
    assert "Persistent compilation cache hit for 'jit_train_step'" in proc.stderr
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert 'completed: step 8/8, 4 steps' in proc.stdout
    # The same command again: nothing left to run, and nothing written.
    proc = python(MAIN + args + ['--workdir', resumed], env=env)
    assert 'nothing to run: the checkpoint in' in proc.stdout and 'step 8 of 8' in proc.stdout
    assert losses(resumed) == got


def test_checkpoint_of_another_model_or_damaged_is_one_line_error(python, tmp_path):
    args = ['--config', 'configs/clip.py', *TINY, '--config.checkpoint.every=2']
    workdir = str(tmp_path / 'run')
    python(MAIN + args + ['--config.total_steps=4', '--workdir', workdir])

    # Resumed with another model: named from the checkpoint's metadata, nothing read.
    other = ['--config.model.embed_dim=48', '--config.total_steps=6', '--workdir', workdir]
    proc = python(MAIN + args + other, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and 'holds another model than this config' in err[0], err
    assert re.search(r'proj\.kernel\.value is \(\d+, \d+\) there, \(\d+, 48\) here', err[0]), err

    # A damaged checkpoint: the newest has empty array files.
    data = os.path.join(workdir, 'checkpoints', '4', 'state', 'ocdbt.process_0', 'd')
    for name in os.listdir(data):
        open(os.path.join(data, name), 'w').close()
    proc = python(MAIN + args + ['--config.total_steps=6', '--workdir', workdir], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) < 5 and err[-1].startswith('error: checkpoint 4 in'), err
    assert 'cannot be read' in err[-1] and 'aside to resume from 2' in err[-1]

    # Moved aside as the message says, the run resumes from step 2 and loses nothing else.
    shutil.move(os.path.join(workdir, 'checkpoints', '4'), str(tmp_path / 'damaged-4'))
    proc = python(MAIN + args + ['--config.total_steps=6', '--workdir', workdir])
    assert 'completed: step 6/6, 4 steps' in proc.stdout
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']


def start_training(args, workdir, **popen_options) -> subprocess.Popen:
    """`python -m pretrain.main args` started, returned once it has logged 3 steps."""
    env = dict(os.environ)
    env.pop('XLA_FLAGS', None)
    proc = subprocess.Popen(
        [sys.executable, *MAIN, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_options,
    )
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.05)
    return proc


def test_sigterm_saves_exits_zero_and_resumes_exactly(python, tmp_path):
    args = [
        '--config',
        'configs/clip.py',
        *TINY,
        '--config.total_steps=150',
        '--config.log_every=1',
        '--config.checkpoint.every=1000',
    ]
    straight, stopped = str(tmp_path / 'a'), str(tmp_path / 'b')
    python(MAIN + args + ['--workdir', straight])

    proc = start_training(args + ['--workdir', stopped], stopped)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - sent < 30
    saved = [int(d) for d in os.listdir(os.path.join(stopped, 'checkpoints')) if d.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 150, saved
    assert f'stopped by signal {int(signal.SIGTERM)}: step {saved[0]}/150' in out

    python(MAIN + args + ['--workdir', stopped])
    want, got = losses(straight), losses(stopped)
    assert max(got) == 150
    for step in range(saved[0] + 1, 151):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_ctrl_c_in_a_terminal_saves_and_stops_the_input_workers_quietly(tmp_path):
    """Ctrl-C signals the terminal's whole process group, input worker processes included:
    they leave it to the trainer, which saves, closes them and exits 0. (Workers that died
    of it printed KeyboardInterrupt tracebacks and left 'leaked shared_memory' warnings.)"""
    workdir = str(tmp_path / 'run')
    args = ['--config', 'configs/clip.py', *TINY, '--config.total_steps=1000']
    args += ['--config.log_every=1', '--config.input.num_workers=2', '--workdir', workdir]
    # Its own process group, as a terminal's foreground job.
    proc = start_training(args, workdir, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert f'stopped by signal {int(signal.SIGINT)}: step' in out
    for noise in ('Traceback', 'KeyboardInterrupt', 'leaked'):
        assert noise not in err, err[-3000:]


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(python, tmp_path):
    wd = str(tmp_path / 'run')
    args = MAIN + [
        '--config',
        'configs/clip.py',
        '--workdir',
        wd,
        *TINY,
        '--config.total_steps=6',
        '--config.checkpoint.every=1',
        '--config.log_every=1',
    ]
    # Step 1 runs at lr 0 (warmup starts at 0); from step 2 on an lr of 1e30 overflows.
    proc = python(args + ['--config.optim.lr=1e30'], check=False)
    assert proc.returncode == 1
    assert 'non-finite loss at step 3' in proc.stderr or 'non-finite loss at step 2' in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith('error: non-finite loss') and 'last good checkpoint: step' in line
    good = int(line.split('last good checkpoint: step ')[1].split()[0])
    saved = sorted(int(d) for d in os.listdir(os.path.join(wd, 'checkpoints')) if d.isdigit())
    assert saved[-1] == good


def test_compilation_cache_folder_is_per_cpu_type_unless_off_or_set(monkeypatch, tmp_path):
    from pretrain import compilation_cache

    # set_default writes os.environ itself: it gets a copy, so nothing leaks into later tests.
    monkeypatch.setattr(os, 'environ', dict(os.environ))
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    compilation_cache.set_default()  # off (conftest): no folder
    assert 'JAX_COMPILATION_CACHE_DIR' not in os.environ and not os.listdir(tmp_path)
    monkeypatch.setenv('JAX_ENABLE_COMPILATION_CACHE', 'true')
    compilation_cache.set_default()
    folder, tag = os.environ['JAX_COMPILATION_CACHE_DIR'], compilation_cache.host_cpu_tag()
    assert folder == str(tmp_path / 'pretrain' / 'jax' / tag) and len(tag) == 12, folder
    assert os.path.isdir(folder)
    assert os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] == str(compilation_cache.MAX_BYTES)
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', '/proc/no_such_folder')  # cannot be made: no cache
    compilation_cache.set_default()
    assert 'JAX_COMPILATION_CACHE_DIR' not in os.environ
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/elsewhere')
    monkeypatch.delenv('JAX_COMPILATION_CACHE_MAX_SIZE')
    compilation_cache.set_default()
    assert os.environ['JAX_COMPILATION_CACHE_DIR'] == '/elsewhere'
    assert 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ  # the user's folder, the user's call


def test_default_xla_flags_keep_what_the_user_set(monkeypatch):
    from pretrain import main

    monkeypatch.delenv('XLA_FLAGS', raising=False)
    main.set_default_xla_flags()
    assert os.environ['XLA_FLAGS'] == ' '.join(main.DEFAULT_XLA_FLAGS)
    mine = (
        '--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true'
        ' --xla_cpu_prefer_vector_width=256'
    )
    monkeypatch.setenv('XLA_FLAGS', mine)
    main.set_default_xla_flags()
    assert os.environ['XLA_FLAGS'] == mine
