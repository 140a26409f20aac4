"""Runs one command as N JAX processes on this machine, as a cluster would run them.

    python launch/local.py -n 2 -- python -m pretrain.main --config configs/clip.py --workdir DIR
    python launch/local.py -n 2 --devices_per_process 4 -- python -m pretrain.main ...

Each process gets the environment pretrain.distributed reads (JAX_COORDINATOR_ADDRESS on
127.0.0.1 at a free port, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and JAX_NUM_CPU_DEVICES, so the
command itself is unchanged from a single-process run. Output lines are prefixed with `[i]`.

Failure: when a process exits non-zero the others get SIGTERM, then SIGKILL after
--grace_s seconds, and the launcher exits with that process's status. Ctrl-C (SIGINT) or
SIGTERM to the launcher is forwarded once to every process (they save a checkpoint and exit);
a second one is forwarded too, which makes the trainer quit at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    # The port is free now; the coordinator binds it a second later. Another program taking
    # it in between is possible but unlikely on a test machine, and fails loudly.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices_per_process: int | None) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
        PYTHONUNBUFFERED='1',  # lines reach the prefixer as they are printed
    )
    if devices_per_process:
        env['JAX_NUM_CPU_DEVICES'] = str(devices_per_process)
    return env


def _pump(i: int, stream, out, lock: threading.Lock):
    for line in iter(stream.readline, b''):
        with lock:
            out.write(f'[{i}] '.encode() + line.rstrip(b'\r\n') + b'\n')
            out.flush()
    stream.close()


class Launcher:

    def __init__(self, command, n, *, devices_per_process=1, grace_s=20.0, port=None, out=None):
        self.command, self.n, self.grace_s = list(command), n, grace_s
        self.devices_per_process = devices_per_process
        self.port = port or free_port()
        self.out = out or sys.stdout.buffer
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.signals_received = 0

    def say(self, message: str):
        with self.lock:
            self.out.write(f'[launch] {message}\n'.encode())
            self.out.flush()

    def start(self):
        for i in range(self.n):
            proc = subprocess.Popen(
                self.command,
                env=process_env(i, self.n, self.port, self.devices_per_process),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches the launcher only, which
                # forwards it once; and SIGKILL can take a process's children with it.
                start_new_session=True,
            )
            self.procs.append(proc)
            pump = threading.Thread(
                target=_pump, args=(i, proc.stdout, self.out, self.lock), daemon=True
            )
            pump.start()
            self.pumps.append(pump)
            self.say(f'process {i} started, pid {proc.pid}')

    def _signal_all(self, sig, only_running=True):
        for proc in self.procs:
            if proc.poll() is None or not only_running:
                try:
                    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def forward(self, signum, frame):
        del frame
        self.signals_received += 1
        self.say(f'got signal {signum}, forwarding it to all processes')
        self._signal_all(signum)

    def stop_others(self, failed: int, code: int):
        self.say(f'process {failed} exited with status {code}; stopping the others')
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            self.say(f'still running after {self.grace_s:.0f}s; killing them')
            self._signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """Waits for all processes; returns the launcher's exit status."""
        while True:
            codes = [p.poll() for p in self.procs]
            failed = next((i for i, c in enumerate(codes) if c is not None and c != 0), None)
            if failed is not None:
                self.stop_others(failed, codes[failed])
                status = codes[failed]
                break
            if all(c == 0 for c in codes):
                status = 0
                break
            time.sleep(0.1)
        for pump in self.pumps:
            pump.join(timeout=5)
        # A process killed by a signal has a negative status; exit like a shell would.
        return 128 - status if status < 0 else status


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='python launch/local.py',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('-n', '--num_processes', type=int, required=True)
    parser.add_argument(
        '--devices_per_process',
        type=int,
        default=1,
        help='CPU devices per process (JAX_NUM_CPU_DEVICES); 0 leaves it unset',
    )
    parser.add_argument(
        '--grace_s',
        type=float,
        default=20.0,
        help='seconds between SIGTERM and SIGKILL when a process failed',
    )
    parser.add_argument('--port', type=int, help='coordinator port (default: a free one)')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command to run')
    args = parser.parse_args(argv)
    if args.command[:1] == ['--']:
        args.command = args.command[1:]
    if not args.command:
        parser.error('no command given; usage: python launch/local.py -n N -- COMMAND ...')
    if args.num_processes < 1:
        parser.error(f'-n must be >= 1, got {args.num_processes}')
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(
        args.command,
        args.num_processes,
        devices_per_process=args.devices_per_process,
        grace_s=args.grace_s,
        port=args.port,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, launcher.forward)
    launcher.start()
    return launcher.wait()


if __name__ == '__main__':
    sys.exit(main())
