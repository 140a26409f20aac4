"""Multi-process JAX: who the processes are, read from flags or the cluster environment.

Every process of a run executes the same command; `initialize(args)` (called from `main()`
only, never at import: grain workers re-import modules) works out the coordinator address,
the number of processes and this process's id, in this order:

  1. flags         --coordinator host:port --num_processes N --process_id I
  2. environment   JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, and JAX_PROCESS_ID or, in a
                   Kubernetes Indexed Job / JobSet, JOB_COMPLETION_INDEX
                   (launch/local.py and launch/gke_jobset.yaml set these)
  3. SLURM         SLURM_NTASKS > 1: SLURM_PROCID, first host of SLURM_STEP_NODELIST (or
                   SLURM_JOB_NODELIST), port from SLURM_JOB_ID as JAX computes it, or
                   JAX_COORDINATOR_PORT
  4. TPU VM        jax.distributed.initialize() with no arguments: JAX reads the slice's
                   worker list from the TPU metadata itself
  5. otherwise     one process, nothing to initialise

CPU runs need nothing more: JAX 0.10.2 uses gloo for cross-process collectives on CPU by
default (`jax_cpu_collectives_implementation`), and the number of CPU devices per process is
`JAX_NUM_CPU_DEVICES` (the `jax_num_cpu_devices` option), which launch/local.py sets.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

# JAX's default is 100 s: a survivor of a dead peer would wait that long in the coordination
# service's shutdown barrier before it is terminated. Heartbeats come from a C++ thread, so a
# long compile or a slow step does not miss them; 30 s keeps "a peer died -> everyone exits"
# well under a minute. Measured with 2 CPU trainer processes, process 1 killed: process 0
# aborted 26 s later (a toy loop: 102 s with JAX's default); process 0 killed: process 1
# within 0.2 s.
HEARTBEAT_TIMEOUT_S = 30


class DistributedError(ValueError):
    """Inconsistent or incomplete multi-process settings; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Processes:
    """The process group of a run, as this process sees it."""

    source: str  # 'flags', 'env', 'slurm', 'tpu' or 'single'
    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None  # host:port of process 0
    local_device_ids: tuple[int, ...] | None = None  # None: all local devices

    @property
    def multi_process(self) -> bool:
        return self.source == 'tpu' or self.num_processes > 1


def add_flags(parser):
    """Explicit multi-process flags; without them the cluster environment is read."""
    parser.add_argument('--coordinator', help='host:port of process 0 (multi-process runs)')
    parser.add_argument('--num_processes', type=int, help='number of processes in the run')
    parser.add_argument('--process_id', type=int, help='this process, 0 .. num_processes-1')


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _checked(p: Processes, where: str) -> Processes:
    if p.num_processes < 1:
        raise DistributedError(f'{where}: number of processes must be >= 1, got {p.num_processes}')
    if not 0 <= p.process_id < p.num_processes:
        raise DistributedError(
            f'{where}: process id {p.process_id} is not in [0, {p.num_processes})'
        )
    if p.coordinator is not None and not re.fullmatch(r'.+:\d+', p.coordinator):
        raise DistributedError(f"{where}: coordinator {p.coordinator!r} is not host:port")
    return p


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,017],cpu1' -> 'gpu003'.

    A bracket may appear in any part of a name ('rack[1-2]-n[01-04]' -> 'rack1-n01').
    """
    first = re.split(r',(?![^\[]*\])', nodelist.strip(), maxsplit=1)[0]
    if not first:
        raise DistributedError(f'empty SLURM node list {nodelist!r}')
    return re.sub(r'\[([^\],-]+)[^\]]*\]', r'\1', first)


def slurm_port(environ: Mapping[str, str]) -> int:
    """JAX_COORDINATOR_PORT, else JAX's choice: an ephemeral port derived from the job id."""
    if environ.get('JAX_COORDINATOR_PORT'):
        return _int(environ, 'JAX_COORDINATOR_PORT')
    # The same formula as jax._src.clusters.slurm_cluster, so a job mixing our launch and
    # JAX's own detection agrees on the port.
    return _int(environ, 'SLURM_JOB_ID') % 2**12 + (65535 - 2**12 + 1)


def _from_slurm(environ: Mapping[str, str]) -> Processes:
    nodelist = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST')
    if not nodelist:
        raise DistributedError(
            'SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set'
        )
    num_tasks = _int(environ, 'SLURM_NTASKS')
    node_vars = ('SLURM_STEP_NUM_NODES', 'SLURM_JOB_NUM_NODES', 'SLURM_NNODES')
    nodes_var = next((v for v in node_vars if v in environ), None)
    num_nodes = _int(environ, nodes_var) if nodes_var else num_tasks
    # One task per accelerator: each task takes the device of its local rank (as JAX's own
    # SLURM support does). One task per node: it takes all of the node's devices (JAX's
    # detection would give it only device SLURM_LOCALID = 0, hence our own resolution).
    # Not when the task already sees a single GPU (srun --gpus-per-task=1 binds one and
    # numbers it 0) or JAX_LOCAL_DEVICE_IDS says which (JAX reads it itself).
    bound = len(environ.get('CUDA_VISIBLE_DEVICES', ',').split(',')) == 1
    local_ids = None
    if (
        num_tasks > num_nodes
        and 'SLURM_LOCALID' in environ
        and not bound
        and 'JAX_LOCAL_DEVICE_IDS' not in environ
    ):
        local_ids = (_int(environ, 'SLURM_LOCALID'),)
    return Processes(
        source='slurm',
        num_processes=num_tasks,
        process_id=_int(environ, 'SLURM_PROCID'),
        coordinator=f'{first_host(nodelist)}:{slurm_port(environ)}',
        local_device_ids=local_ids,
    )


def on_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu installed and TPU chips attached (JAX's own test)."""
    if importlib.util.find_spec('libtpu') is None:
        return False
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def resolve(args=None, environ: Mapping[str, str] | None = None, *, tpu=None) -> Processes:
    """This process's place in the run, from `args` (the flags) or `environ`.

    `tpu` overrides the TPU VM test (for tests); by default `on_tpu_vm()` decides.
    """
    environ = os.environ if environ is None else environ
    flags = {k: getattr(args, k, None) for k in ('coordinator', 'num_processes', 'process_id')}
    if any(v is not None for v in flags.values()):
        missing = [f'--{k}' for k, v in flags.items() if v is None]
        if missing and not (flags['num_processes'] == 1 and flags['coordinator'] is None):
            raise DistributedError(
                f"multi-process flags need --coordinator, --num_processes and --process_id; "
                f"missing {', '.join(missing)}"
            )
        return _checked(
            Processes(
                'flags',
                num_processes=flags['num_processes'] or 1,
                process_id=flags['process_id'] or 0,
                coordinator=flags['coordinator'],
            ),
            'flags',
        )

    if environ.get('JAX_COORDINATOR_ADDRESS') or environ.get('JAX_NUM_PROCESSES'):
        id_var = (
            'JOB_COMPLETION_INDEX'
            if 'JAX_PROCESS_ID' not in environ and 'JOB_COMPLETION_INDEX' in environ
            else 'JAX_PROCESS_ID'
        )
        missing = [
            v
            for v in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', id_var)
            if not environ.get(v)
        ]
        if missing:
            raise DistributedError(
                'multi-process environment needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                f"JAX_PROCESS_ID (or JOB_COMPLETION_INDEX); missing {', '.join(missing)}"
            )
        return _checked(
            Processes(
                'env',
                num_processes=_int(environ, 'JAX_NUM_PROCESSES'),
                process_id=_int(environ, id_var),
                coordinator=environ['JAX_COORDINATOR_ADDRESS'],
            ),
            'environment',
        )

    if (
        'SLURM_PROCID' in environ
        and 'SLURM_NTASKS' in environ
        and _int(environ, 'SLURM_NTASKS') > 1
    ):
        return _checked(_from_slurm(environ), 'SLURM')

    if on_tpu_vm() if tpu is None else tpu:
        return Processes('tpu')  # JAX fills in the rest from the TPU metadata
    return Processes('single')


def initialize(args=None, environ: Mapping[str, str] | None = None) -> Processes:
    """Starts JAX's multi-controller runtime when the run has several processes.

    Must run before any JAX computation (the CPU client reads it at start).
    """
    import jax

    p = resolve(args, environ)
    if p.source == 'tpu':
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    elif p.multi_process:
        jax.distributed.initialize(
            coordinator_address=p.coordinator,
            num_processes=p.num_processes,
            process_id=p.process_id,
            local_device_ids=list(p.local_device_ids) if p.local_device_ids else None,
            # Everything is resolved above: JAX's own SLURM detection would otherwise fill
            # local_device_ids with SLURM_LOCALID even for one task per node.
            cluster_detection_method='deactivate',
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    if p.multi_process:
        log.info(
            'JAX distributed (%s): process %d of %d, %d local / %d global devices',
            p.source,
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return p
