"""Runs the configured evaluators on a checkpoint of a training workdir, or on an export.

    python -m pretrain.evaluate --workdir /tmp/clip
    python -m pretrain.evaluate --workdir DIR --step 200 --only zeroshot,retrieval \\
        --config.evals.zeroshot.num_examples=2048
    python -m pretrain.evaluate --weights /tmp/clip_export --config configs/clip.py
    python -m pretrain.evaluate --config configs/clip.py --workdir DIR   # another config

Loads the latest checkpoint (or --step), runs `config.evals` (or those named in --only),
prints a table and appends a row {"step": N, "eval/<name>/<metric>": value, ...} to
DIR/metrics.jsonl and TensorBoard, next to the training metrics.

The config is the run's own (DIR/config.json, as training resolved it, overrides included)
unless --config names one; `--config.k=v` overrides apply on top of either. --weights DST
evaluates a directory written by `python -m pretrain.export` instead of a checkpoint: the
model comes from DST (its own config), the evaluators from --config or --workdir's config,
and the row goes to --workdir's metrics if one is given, else only to the screen.
"""

from __future__ import annotations

import logging
import os
import sys


class EvalError(RuntimeError):
    """A missing workdir / checkpoint / step; the message is one line for the user."""


def parse_args(argv):
    import argparse

    from pretrain import config_cli
    from pretrain.main import add_distributed_flags

    parser = argparse.ArgumentParser(
        prog='python -m pretrain.evaluate',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        '--config', help="config file[:variant] (default: the workdir's config.json)"
    )
    parser.add_argument('--workdir', help='the training workdir (checkpoints/, config.json)')
    parser.add_argument('--weights', help='an export directory (python -m pretrain.export)')
    parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
    parser.add_argument('--only', help='comma-separated evaluator names (default: all)')
    add_distributed_flags(parser)
    args, overrides = config_cli.parse_args(parser, argv)
    if not args.workdir and not args.weights:
        parser.error('give --workdir (a training run) or --weights (an export), or both')
    if args.weights and args.step is not None:
        parser.error('--step picks a checkpoint; an export has one step')
    return args, overrides


def resolve_config(args, overrides):
    """--config with overrides, else the workdir's config.json with overrides (locked)."""
    import json

    from ml_collections import ConfigDict

    from pretrain import config_cli

    if args.config:
        return config_cli.build_config(args.config, overrides)
    path = os.path.join(args.workdir or '', 'config.json')
    if args.workdir and not os.path.isdir(args.workdir):
        raise EvalError(f"workdir '{args.workdir}' does not exist")
    if not args.workdir or not os.path.isfile(path):
        where = f"'{args.workdir}' has no config.json" if args.workdir else 'no --workdir'
        raise EvalError(f'{where}: pass --config (the training config) to say what to evaluate')
    with open(path) as f:
        config = ConfigDict(json.load(f))
    config.lock()
    for key, value in overrides:
        config_cli.apply_override(config, key, value)
    return config


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
    except checkpoint.CheckpointReadError:
        raise  # main exits at once (pretrain.main.exit_after_failed_restore)
    except checkpoint.CheckpointError as e:
        raise EvalError(str(e)) from None
    finally:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    return model


def format_table(step: int, row: dict) -> str:
    width = max(len(k) for k in row)
    lines = [f'step {step}', f"{'metric':<{width}}  value", '-' * (width + 10)]
    lines += [f'{k:<{width}}  {v:.4f}' for k, v in row.items()]
    return '\n'.join(lines)


def load_weights(path: str):
    """(model, step) of an export directory; step is the checkpoint it came from (0 if none)."""
    import json

    from pretrain import weights

    try:
        _, model = weights.load_exported(path)
    except weights.WeightsError as e:
        raise EvalError(str(e)) from None
    with open(os.path.join(path, 'config.json')) as f:
        return model, int(json.load(f).get('step', 0))


def evaluate(
    config,
    workdir: str | None,
    *,
    step: int | None = None,
    only=None,
    weights: str | None = None,
) -> dict:
    """Runs the evaluators on checkpoint `step` (latest if None) of `workdir`, or on the
    export `weights`; returns the metrics row (also written to `workdir`'s metrics if any)."""
    import jax

    from pretrain import metrics as metrics_lib, sharding, train
    from pretrain.evaluators import build_evaluators, run_evaluators

    if weights is None:
        steps = checkpoint_steps(workdir)
        step = steps[-1] if step is None else step
        if step not in steps:
            raise EvalError(
                f"no checkpoint for step {step} in '{workdir}'; have: "
                f"{', '.join(map(str, steps))}"
            )
    try:
        evaluators = build_evaluators(config, only)
    except (ValueError, NotImplementedError) as e:
        raise EvalError(str(e)) from None
    if not evaluators:
        raise EvalError('no evaluators configured (config.evals is empty)')
    with train.config_errors('mesh'):  # a mesh that does not fit this machine's devices
        mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        if weights is None:
            model = restore_model(config, workdir, step, mesh)
        else:
            model, step = load_weights(weights)
        row = run_evaluators(evaluators, model)
    if jax.process_index() == 0:
        print(format_table(step, row), flush=True)
    if workdir:
        writer = metrics_lib.MetricWriter(workdir)
        writer.write(step, row)
        writer.close()
    return row


def main(argv=None) -> int:
    from pretrain import checkpoint, config_cli
    from pretrain.main import exit_after_failed_restore, maybe_initialize_distributed

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config = resolve_config(args, overrides)
    except (config_cli.ConfigError, EvalError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
    try:
        if args.weights is None:
            checkpoint_steps(args.workdir)  # fail before JAX starts up
        elif not os.path.isfile(os.path.join(args.weights, 'config.json')):
            raise EvalError(f"'{args.weights}' is not an export: no config.json in it")
        maybe_initialize_distributed(args)
        only = [n.strip() for n in args.only.split(',') if n.strip()] if args.only else None
        evaluate(config, args.workdir, step=args.step, only=only, weights=args.weights)
    except checkpoint.CheckpointReadError as e:
        exit_after_failed_restore(e)
    except (config_cli.ConfigError, EvalError) as e:  # ConfigError: a model the config rejects
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    from pretrain.main import prepare_process

    prepare_process()
    sys.exit(main())
