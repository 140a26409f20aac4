"""Runs the configured evaluators on a checkpoint of a training workdir.

    python -m pretrain.evaluate --config configs/clip.py --workdir /tmp/clip
    python -m pretrain.evaluate --config configs/clip.py --workdir DIR --step 200 \\
        --only zeroshot,retrieval --config.evals.zeroshot.num_examples=2048

Loads the latest checkpoint (or --step), runs `config.evals` (or those named in --only),
prints a table and appends a row {"step": N, "eval/<name>/<metric>": value, ...} to
DIR/metrics.jsonl and TensorBoard, next to the training metrics. Pass the same config and
model overrides as the training run: the checkpoint is restored onto that model's shapes.
"""

from __future__ import annotations

import logging
import os
import sys


class EvalError(RuntimeError):
    """A missing workdir / checkpoint / step; the message is one line for the user."""


def parse_args(argv):
    from pretrain import config_cli
    from pretrain.main import add_distributed_flags

    parser = config_cli.argument_parser(
        'python -m pretrain.evaluate',
        __doc__,
        config_help='the training config, e.g. configs/clip.py',
    )
    parser.add_argument('--workdir', required=True, help='the training workdir (checkpoints/)')
    parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
    parser.add_argument('--only', help='comma-separated evaluator names (default: all)')
    add_distributed_flags(parser)
    return config_cli.parse_args(parser, argv)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a checkpoint, read without creating anything in `workdir`."""
    if not os.path.isdir(workdir):
        raise EvalError(f"workdir '{workdir}' does not exist")
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    steps = (
        sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
        if os.path.isdir(ckpt_dir)
        else []
    )
    if not steps:
        raise EvalError(f"no checkpoint in '{ckpt_dir}'; train first (python -m pretrain.main)")
    return steps


def restore_model(config, workdir: str, step: int, mesh):
    """The model of `config` with the parameters of checkpoint `step` (optimizer dropped)."""
    from flax import nnx

    from pretrain import checkpoint, train

    graphdef, abstract_state, _ = train.abstract_train_state(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    try:
        state, _ = ckpt.restore(step, abstract_state)
    except (ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(
            f'checkpoint {step} in {ckpt.directory} does not fit this config '
            f'(pass the training overrides too): {first}'
        ) from None
    finally:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    return model


def format_table(step: int, row: dict) -> str:
    width = max(len(k) for k in row)
    lines = [f'step {step}', f"{'metric':<{width}}  value", '-' * (width + 10)]
    lines += [f'{k:<{width}}  {v:.4f}' for k, v in row.items()]
    return '\n'.join(lines)


def evaluate(config, workdir: str, *, step: int | None = None, only=None) -> dict:
    """Runs the evaluators on checkpoint `step` (latest if None); returns the metrics row."""
    import jax

    from pretrain import metrics as metrics_lib, sharding
    from pretrain.evaluators import build_evaluators, run_evaluators

    steps = checkpoint_steps(workdir)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise EvalError(
            f"no checkpoint for step {step} in '{workdir}'; have: " f"{', '.join(map(str, steps))}"
        )
    try:
        evaluators = build_evaluators(config, only)
    except (ValueError, NotImplementedError) as e:
        raise EvalError(str(e)) from None
    if not evaluators:
        raise EvalError('no evaluators configured (config.evals is empty)')
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model = restore_model(config, workdir, step, mesh)
        row = run_evaluators(evaluators, model)
    if jax.process_index() == 0:
        print(format_table(step, row), flush=True)
    writer = metrics_lib.MetricWriter(workdir)
    writer.write(step, row)
    writer.close()
    return row


def main(argv=None) -> int:
    from pretrain import config_cli
    from pretrain.main import maybe_initialize_distributed

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config = config_cli.build_config(args.config, overrides)
    except config_cli.ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
    try:
        checkpoint_steps(args.workdir)  # fail before JAX starts up
        maybe_initialize_distributed(args)
        only = [n.strip() for n in args.only.split(',') if n.strip()] if args.only else None
        evaluate(config, args.workdir, step=args.step, only=only)
    except EvalError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    from pretrain.main import ensure_fast_malloc

    ensure_fast_malloc()
    sys.exit(main())
