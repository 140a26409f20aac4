"""Exports a training checkpoint's model for finetuning, evaluation or other libraries.

    python -m pretrain.export --workdir /tmp/clip --out /tmp/clip_export
    python -m pretrain.export --workdir DIR --out DST --step 200
    python -m pretrain.export --workdir DIR --out DST --format hf_siglip   # transformers layout

Reads the run's config from DIR/config.json, restores checkpoint --step (default: the
latest) and writes DST/model.safetensors (every model parameter under its dotted NNX path:
image tower, text tower, projections, logit_scale / logit_bias; no optimizer state) and
DST/config.json (the model config, the step and the source). Never pickle.
`pretrain.weights.load_exported(DST)` rebuilds the model; `python -m pretrain.evaluate
--weights DST` evaluates it. --format hf_clip / hf_siglip writes a directory that
transformers' CLIPModel / SiglipModel.from_pretrained loads instead (the model's knobs must
be that layout's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class ExportError(RuntimeError):
    """A missing workdir / config / checkpoint; the message is one line for the user."""


def read_run_config(workdir: str):
    """The resolved config a training run wrote to DIR/config.json, as a ConfigDict."""
    from ml_collections import ConfigDict

    path = os.path.join(workdir, 'config.json')
    if not os.path.isdir(workdir):
        raise ExportError(f"workdir '{workdir}' does not exist")
    if not os.path.isfile(path):
        raise ExportError(f"no config.json in '{workdir}'; is it a training workdir?")
    with open(path) as f:
        return ConfigDict(json.load(f))


def restore_model(config, workdir: str, step: int | None):
    """(model, step): the parameters of checkpoint `step` (latest if None), replicated on the
    local devices whatever mesh the run trained on."""
    import jax
    from flax import nnx

    from pretrain import checkpoint, sharding, train
    from pretrain.evaluate import EvalError, checkpoint_steps

    try:
        steps = checkpoint_steps(workdir)
    except EvalError as e:
        raise ExportError(str(e)) from None
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ExportError(
            f"no checkpoint for step {step} in '{workdir}'; have: {', '.join(map(str, steps))}"
        )
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, abstract_state, _ = train.abstract_train_state(config, mesh)
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
        try:
            state, _ = ckpt.restore(step, abstract_state)
        finally:
            ckpt.close()
        model, _ = nnx.merge(graphdef, state)
    return model, step


def export(workdir: str, out: str, *, step: int | None = None, fmt: str = 'export') -> str:
    from pretrain import weights

    config = read_run_config(workdir)
    model, step = restore_model(config, workdir, step)
    import jax

    if jax.process_index() == 0:
        if fmt == 'export':
            weights.save_exported(
                out,
                weights.flat_params(model),
                config.model,
                step=step,
                source=os.path.abspath(workdir),
            )
        else:
            weights.save_hf(out, model, config.model, fmt)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m pretrain.export',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--workdir', required=True, help='the training workdir')
    parser.add_argument('--out', required=True, help='the directory to write')
    parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
    parser.add_argument(
        '--format',
        default='export',
        choices=('export', 'hf_clip', 'hf_siglip'),
        help='export: this codebase (default); hf_*: transformers CLIPModel / SiglipModel',
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.weights import WeightsError

    try:
        out = export(args.workdir, args.out, step=args.step, fmt=args.format)
    except (ExportError, WeightsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'exported {args.workdir} to {out}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
