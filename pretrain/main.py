"""Pre-training entry point.

    python -m pretrain.main --config configs/dreamlip.py --workdir /tmp/run
    python -m pretrain.main --config configs/clip.py:b16 --workdir DIR --config.batch_size=4096

`--config.a.b=value` overrides any field of the config (parsed as that field's type); a
new `--config.objectives.NAME.weight=w` adds an objective. A bad key or value stops the run
before its first step with one line.

Rerunning the same command on a workdir with a checkpoint resumes from it. SIGTERM or
Ctrl-C saves a checkpoint and exits 0. On several hosts the same command runs on each
(see launch/); JAX distributed is initialised from the environment.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from pretrain import allocator, compilation_cache

# XLA flags applied unless XLA_FLAGS already sets the same flag; each backend ignores the
# other's.
# - GPU, measured on one H200, CLIP ViT-B/16 at 224, bf16, batch 512
#   (benchmarks/results/train_step_h200_*.json): with XLA's Triton GEMM fusions off, every
#   matmul goes to cuBLAS and the step compiles in 31 s instead of 137 s (Triton's GEMM
#   autotuning); the step ran at 191 ms instead of 252 ms, together with cuDNN attention (the
#   two were not measured apart). MaxText's GPU recipes set the same flag.
# - CPU: XLA's own loops (GELU's tanh, the bf16 roundings, norms, softmax) in 512-bit vectors
#   where the CPU has AVX-512; LLVM prefers 256 bits by default, and without AVX-512 the flag
#   changes nothing. ViT-Ti CLIP with bf16 operands ~2% faster (lower in six of seven
#   alternated pairs) on the AMX Xeon; the DreamLIP tiny step and f32 equal
#   (benchmarks/README.md).
DEFAULT_XLA_FLAGS = ('--xla_gpu_enable_triton_gemm=false', '--xla_cpu_prefer_vector_width=512')


def set_default_xla_flags():
    """Adds DEFAULT_XLA_FLAGS to XLA_FLAGS (before jax starts); a flag the user set is kept."""
    flags = os.environ.get('XLA_FLAGS', '')
    extra = [f for f in DEFAULT_XLA_FLAGS if f.split('=')[0] not in flags]
    if extra:
        os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()


def prepare_process():
    """What every entry point does before importing jax: XLA flags, the compilation cache,
    then the allocator."""
    set_default_xla_flags()
    compilation_cache.set_default()
    allocator.ensure_fast_malloc()


def add_distributed_flags(parser):
    """--coordinator/--num_processes/--process_id (pretrain.distributed)."""
    from pretrain import distributed

    distributed.add_flags(parser)


def parse_args(argv):
    from pretrain import config_cli

    parser = config_cli.argument_parser('python -m pretrain.main', __doc__)
    parser.add_argument(
        '--workdir', required=True, help='where metrics, config.json and checkpoints go'
    )
    add_distributed_flags(parser)
    return config_cli.parse_args(parser, argv)


def maybe_initialize_distributed(args):
    """Multi-process JAX from the flags or the cluster environment (pretrain.distributed).

    Bad settings are a one-line error and exit status 2, as bad config overrides are.
    """
    from pretrain import distributed

    try:
        processes = distributed.initialize(args)
    except distributed.DistributedError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    import jax

    if processes.multi_process and jax.process_index() != 0:
        # Every process logs the same lines; process 0 speaks for the run, the others only
        # warn (and their errors still show, prefixed by the launcher).
        for name in ('pretrain', 'input_pipeline'):
            logging.getLogger(name).setLevel(logging.WARNING)
    return processes


def workdir_problem(workdir: str) -> str | None:
    """Why `workdir` cannot hold a run (created if missing), or None."""
    if '://' in workdir:  # os.makedirs would make a local 'gs:' folder
        return (
            f"workdir '{workdir}' is a URL: metrics, config.json and checkpoints are written "
            'with file I/O; mount the bucket (e.g. gcsfuse) and pass the mount path'
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        return f"cannot create workdir '{workdir}': {e.strerror}"
    try:  # os.access says yes to root even where writes fail (/sys, read-only mounts)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        return f"cannot write in workdir '{workdir}': {e.strerror}"
    return None


def exit_after_failed_restore(error) -> None:
    """Prints `error` and exits 2 at once: orbax leaves the failed reads' coroutines behind,
    and a normal interpreter exit prints each one's traceback after this line."""
    print(f'error: {error}', file=sys.stderr, flush=True)
    os._exit(2)


def main(argv=None) -> int:
    from pretrain import config_cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config = config_cli.build_config(args.config, overrides)
    except config_cli.ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
    logging.getLogger('pretrain').setLevel(logging.INFO)
    logging.getLogger('input_pipeline').setLevel(logging.INFO)
    problem = workdir_problem(args.workdir)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    maybe_initialize_distributed(args)

    from input_pipeline import pipeline
    from pretrain import checkpoint, train, weights

    try:
        train.run(config, args.workdir)
    except checkpoint.CheckpointReadError as e:
        exit_after_failed_restore(e)
    except train.NonFiniteLoss as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except (
        pipeline.InputError,  # wrong data path or field
        weights.WeightsError,  # init weights that do not fit
        config_cli.ConfigError,  # a config value the model rejects
        checkpoint.CheckpointError,  # a damaged checkpoint, or one of another model
    ) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    prepare_process()
    sys.exit(main())
