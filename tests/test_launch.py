"""Launch: the process group read from flags/SLURM/JobSet/TPU, and the four launchers.

The cluster launchers cannot run here; each is checked for syntax and for what it produces
on a simulated node (the environment pretrain.distributed then reads). The local launcher
runs for real with small stand-in commands (the trainer under it is in test_multiprocess.py).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types

import pytest
import yaml

from conftest import ROOT
from pretrain import distributed

LAUNCH = os.path.join(ROOT, 'launch')


def flags(coordinator=None, num_processes=None, process_id=None):
    return types.SimpleNamespace(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )


# -- pretrain.distributed.resolve ---------------------------------------------------------


def test_explicit_flags():
    p = distributed.resolve(flags('10.0.0.1:1234', 4, 3), {}, tpu=False)
    assert p == distributed.Processes('flags', 4, 3, '10.0.0.1:1234')
    assert p.multi_process


@pytest.mark.parametrize(
    'args, message',
    [
        (flags('10.0.0.1:1234'), 'missing --num_processes, --process_id'),
        (flags(num_processes=2, process_id=0), 'missing --coordinator'),
        (flags('10.0.0.1:1234', 2, 2), 'process id 2 is not in [0, 2)'),
        (flags('10.0.0.1', 2, 0), "coordinator '10.0.0.1' is not host:port"),
    ],
)
def test_bad_flags_are_one_line_errors(args, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.resolve(args, {}, tpu=False)


def test_no_cluster_is_one_process():
    p = distributed.resolve(flags(), {'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}, tpu=False)
    assert p == distributed.Processes('single') and not p.multi_process


def test_environment_of_the_local_launcher_and_indexed_jobs():
    env = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:5000', 'JAX_NUM_PROCESSES': '3'}
    p = distributed.resolve(flags(), {**env, 'JAX_PROCESS_ID': '2'}, tpu=False)
    assert p == distributed.Processes('env', 3, 2, '127.0.0.1:5000')
    # A Kubernetes Indexed Job sets JOB_COMPLETION_INDEX in every pod.
    p = distributed.resolve(flags(), {**env, 'JOB_COMPLETION_INDEX': '1'}, tpu=False)
    assert p.process_id == 1
    # Flags win over the environment.
    assert distributed.resolve(flags('h:1', 2, 0), env).source == 'flags'
    with pytest.raises(distributed.DistributedError, match='missing JAX_PROCESS_ID'):
        distributed.resolve(flags(), env, tpu=False)
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='two'"):
        distributed.resolve(flags(), {**env, 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'})


def slurm_env(nodelist, *, tasks, nodes, procid, localid, job_id='987654'):
    return {
        'SLURM_JOB_ID': job_id,
        'SLURM_STEP_NODELIST': nodelist,
        'SLURM_JOB_NODELIST': nodelist,
        'SLURM_NTASKS': str(tasks),
        'SLURM_STEP_NUM_NODES': str(nodes),
        'SLURM_PROCID': str(procid),
        'SLURM_LOCALID': str(localid),
    }


@pytest.mark.parametrize(
    'nodelist', ['gpu007', 'gpu007,gpu009', 'node[001-004],gpu5', 'node[003,007-015]']
)
def test_slurm_coordinator_matches_jax_own_detection(monkeypatch, nodelist):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = slurm_env(nodelist, tasks=8, nodes=2, procid=5, localid=1)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert SlurmCluster.is_env_present()
    p = distributed.resolve(flags(), env, tpu=False)
    assert p.coordinator == SlurmCluster.get_coordinator_address(None, None)
    assert (p.source, p.num_processes, p.process_id) == ('slurm', 8, 5)


def test_slurm_first_host_and_devices_per_task():
    # Where JAX's parser goes wrong: brackets in several parts of a name (it stops at the
    # first '-': 'rack1'), and a one-host range (it keeps the bracket: 'a9]').
    assert distributed.first_host('rack[1-2]-n[01-04],x') == 'rack1-n01'
    assert distributed.first_host('a[9]') == 'a9'
    assert distributed.first_host('n[10-11]') == 'n10'
    # Job step of 2 nodes x 4 tasks (one per GPU): each task takes its local GPU.
    env = slurm_env('gpu[003-004]', tasks=8, nodes=2, procid=6, localid=2, job_id='4096')
    p = distributed.resolve(flags(), env, tpu=False)
    assert p == distributed.Processes('slurm', 8, 6, 'gpu003:61440', (2,))
    # ... unless srun already bound one GPU to the task, or JAX_LOCAL_DEVICE_IDS is set.
    for extra in ({'CUDA_VISIBLE_DEVICES': '5'}, {'JAX_LOCAL_DEVICE_IDS': '0,1'}):
        assert distributed.resolve(flags(), {**env, **extra}, tpu=False).local_device_ids is None
    p = distributed.resolve(flags(), {**env, 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}, tpu=False)
    assert p.local_device_ids == (2,)
    # One task per node: all of the node's devices (None), not only device SLURM_LOCALID.
    env = slurm_env('gpu[003-004]', tasks=2, nodes=2, procid=1, localid=0)
    assert distributed.resolve(flags(), env, tpu=False).local_device_ids is None
    env['JAX_COORDINATOR_PORT'] = '7777'
    assert distributed.resolve(flags(), env, tpu=False).coordinator == 'gpu003:7777'
    del env['SLURM_STEP_NODELIST'], env['SLURM_JOB_NODELIST']
    with pytest.raises(distributed.DistributedError, match='SLURM_STEP_NODELIST'):
        distributed.resolve(flags(), env, tpu=False)


def test_initialize_passes_what_it_resolved(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, 'process_index', lambda: 0)
    env = slurm_env('gpu[003-004]', tasks=8, nodes=2, procid=6, localid=2, job_id='4096')
    distributed.initialize(flags(), env)
    assert calls[-1] == dict(
        coordinator_address='gpu003:61440',
        num_processes=8,
        process_id=6,
        local_device_ids=[2],
        cluster_detection_method='deactivate',
        heartbeat_timeout_seconds=distributed.HEARTBEAT_TIMEOUT_S,
    )
    # A TPU VM: JAX reads the slice from the TPU metadata itself.
    monkeypatch.setattr(distributed, 'on_tpu_vm', lambda: True)
    distributed.initialize(flags(), {})
    assert calls[-1] == dict(heartbeat_timeout_seconds=distributed.HEARTBEAT_TIMEOUT_S)
    # One process: nothing to start.
    monkeypatch.setattr(distributed, 'on_tpu_vm', lambda: False)
    distributed.initialize(flags(), {})
    assert len(calls) == 2


def test_main_reports_bad_distributed_flags_in_one_line(python, tmp_path):
    proc = python(
        ['-m', 'pretrain.main', '--config', 'configs/clip.py', '--workdir', str(tmp_path)]
        + ['--coordinator', '127.0.0.1:1234', '--num_processes', '2'],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        'error: multi-process flags need --coordinator, --num_processes and --process_id; '
        'missing --process_id'
    )


# -- SLURM --------------------------------------------------------------------------------


def test_slurm_sbatch_syntax_directives_and_dry_run():
    script = os.path.join(LAUNCH, 'slurm.sbatch')
    subprocess.run(['bash', '-n', script], check=True)
    directives = dict(
        (line[len('#SBATCH ') :] + '=').split('=')[:2]
        for line in open(script).read().splitlines()
        if line.startswith('#SBATCH ')
    )
    assert directives['--ntasks-per-node'] == '1' and directives['--signal'] == 'TERM@300'
    assert '--requeue' in directives
    env = dict(
        os.environ,
        DRY_RUN='1',
        PYTHON='/opt/py/bin/python',
        **slurm_env('gpu[003-004]', tasks=2, nodes=2, procid=0, localid=0),
    )
    args = ['--config', 'configs/clip.py:b16', '--workdir', '/shared/my run', '--config.seed=3']
    out = subprocess.run(
        ['bash', script, *args], env=env, capture_output=True, text=True, check=True
    ).stdout
    srun = shlex.split(out.strip().splitlines()[-1])
    assert srun == [
        'srun',
        '--kill-on-bad-exit=1',
        '--label',
        '/opt/py/bin/python',
        '-m',
        'pretrain.main',
        *args,
    ]
    proc = subprocess.run(['bash', script], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and 'usage: sbatch launch/slurm.sbatch' in proc.stderr


# -- TPU VM -------------------------------------------------------------------------------


def test_tpu_vm_script_dry_run_runs_the_command_on_all_workers():
    script = os.path.join(LAUNCH, 'tpu_vm.sh')
    subprocess.run(['bash', '-n', script], check=True)
    command = ['python', '-m', 'pretrain.main', '--config', 'configs/clip.py:b16']
    command += ['--workdir', 'gs://b/run 1', '--config.input.caption_field=a;b']
    out = subprocess.run(
        ['bash', script, '--dry-run', '--copy', '--tpu', 'v5e-32', '--zone', 'us-west4-a']
        + ['--project', 'p', '--', *command],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    scp, ssh = (shlex.split(line) for line in out)
    assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
    assert ssh[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5e-32', '--worker=all']
    assert ssh[ssh.index('--zone') + 1] == 'us-west4-a'
    assert ssh[ssh.index('--project') + 1] == 'p'
    # The remote shell gets one string that splits back into exactly the command.
    remote = shlex.split(ssh[ssh.index('--command') + 1])
    assert remote == ['cd', '~/pretrain', '&&', *command]
    proc = subprocess.run(['bash', script, '--', 'true'], capture_output=True, text=True)
    assert proc.returncode == 2 and 'usage' in proc.stderr
    # On a worker, the process group comes from JAX's TPU detection: no arguments to pass.
    assert distributed.resolve(flags(), {}, tpu=True) == distributed.Processes('tpu')


# -- GKE JobSet ---------------------------------------------------------------------------


def pod_environment(container, labels, annotations):
    """The environment the kubelet gives `container`: fieldRefs, then $(VAR) expansion."""
    env = {}
    for var in container['env']:
        if 'value' in var:
            # $(NAME) expands to a variable defined earlier in the list (Kubernetes rule).
            value = re.sub(r'\$\((\w+)\)', lambda m: env.get(m[1], m[0]), var['value'])
        else:
            path = var['valueFrom']['fieldRef']['fieldPath']
            kind, key = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path).groups()
            value = (labels if kind == 'labels' else annotations)[key]
        env[var['name']] = value
    return env


def test_gke_jobset_gives_each_pod_its_process_id_and_the_coordinator():
    with open(os.path.join(LAUNCH, 'gke_jobset.yaml')) as f:
        jobset = yaml.safe_load(f)
    assert jobset['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and jobset['kind'] == 'JobSet'
    assert jobset['spec']['failurePolicy']['maxRestarts'] >= 1
    [rjob] = jobset['spec']['replicatedJobs']
    job = rjob['template']['spec']
    pod = job['template']['spec']
    [container] = pod['containers']
    assert job['parallelism'] == job['completions'] and job['backoffLimit'] == 0
    assert pod['terminationGracePeriodSeconds'] >= 60  # time to save on SIGTERM
    assert container['command'][:3] == ['python', '-m', 'pretrain.main']
    workdir = container['command'][container['command'].index('--workdir') + 1]
    assert any(workdir.startswith(m['mountPath']) for m in container['volumeMounts'])

    name, n = jobset['metadata']['name'], job['parallelism']
    seen = []
    for index in range(n):
        labels = {
            'jobset.sigs.k8s.io/jobset-name': name,
            'jobset.sigs.k8s.io/replicatedjob-name': rjob['name'],
        }
        annotations = {'batch.kubernetes.io/job-completion-index': str(index)}
        env = pod_environment(container, labels, annotations)
        p = distributed.resolve(flags(), env, tpu=False)
        # Pod 0 of job 0 under the JobSet's headless service (named after the JobSet).
        assert p.coordinator == f"{name}-{rjob['name']}-0-0.{name}:8476"
        assert (p.num_processes, p.process_id) == (n, index)
        seen.append(p.process_id)
        assert int(p.coordinator.rsplit(':')[1]) == container['ports'][0]['containerPort']
    assert seen == list(range(n))


# -- launch/local.py ----------------------------------------------------------------------

PRINT_ENV = (
    "import os; e = os.environ; print(e['JAX_PROCESS_ID'], e['JAX_NUM_PROCESSES'], "
    "e['JAX_COORDINATOR_ADDRESS'], e['JAX_NUM_CPU_DEVICES'])"
)


def local(args, **kw):
    return subprocess.Popen(
        [sys.executable, os.path.join(LAUNCH, 'local.py'), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_local_launcher_sets_each_process_environment_and_prefixes_output():
    proc = local(['-n', '3', '--devices_per_process', '2', '--', sys.executable, '-c', PRINT_ENV])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    rows = sorted(line.split() for line in out.splitlines() if not line.startswith('[launch]'))
    ports = {row[3] for row in rows}
    assert len(ports) == 1 and ports.pop().startswith('127.0.0.1:')
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (f'[{i}]', str(i), '3', '2') for i in range(3)
    ]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent (the launcher, gone) to reap it.
    with open(f'/proc/{pid}/stat') as f:
        return f.read().split(')')[-1].split()[0] != 'Z'


def test_local_launcher_stops_the_others_when_one_fails():
    # Process 1 fails; process 0 ignores SIGTERM (a stuck process) and needs SIGKILL; 2 waits.
    child = (
        "import os, signal, sys, time\n"
        "i = int(os.environ['JAX_PROCESS_ID'])\n"
        "if i == 0: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "if i == 1: time.sleep(1); sys.exit(3)\n"
        "time.sleep(1000)\n"
    )
    start = time.monotonic()
    proc = local(['-n', '3', '--grace_s', '2', '--', sys.executable, '-c', child])
    out, _ = proc.communicate(timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 3, out
    assert took < 30, took
    assert 'process 1 exited with status 3; stopping the others' in out
    assert 'still running after 2s; killing them' in out
    pids = [int(m) for m in re.findall(r'started, pid (\d+)', out)]
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)


def test_local_launcher_forwards_ctrl_c_once():
    child = (
        "import signal, sys, time\n"
        "def stop(sig, frame): print('stopping on', sig, flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(1000)\n"
    )
    proc = local(['-n', '2', '--', sys.executable, '-c', child])
    ready = 0
    while ready < 2:
        line = proc.stdout.readline()
        assert line, 'launcher ended early'
        ready += line.rstrip().endswith('ready')
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f'[0] stopping on {int(signal.SIGINT)}' in out
    assert f'[1] stopping on {int(signal.SIGINT)}' in out


def test_local_launcher_needs_a_command():
    proc = local(['-n', '2'])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and 'no command given' in out
