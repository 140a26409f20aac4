"""A short training run on one or more meshes, reported as JSON (for tests/test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/mesh_run.py --mesh 2,2,2 --mesh 8,1,1 --mesh 2,2,2:2 --steps 8 \\
        [--config.k=v ...]

The device count is fixed when JAX starts, so each device count is its own process; the
tests launch this script with XLA_FLAGS set in the environment. Every `--mesh data,fsdp,tensor`
runs the same thing from scratch in this process: init from the config seed, then `--steps`
steps on the batches of the real training loader (`input_pipeline.pipeline.train_loader`),
with the train step jitted exactly as `pretrain/train.py` does it (in/out shardings from the
mesh, state donated); a `:n` suffix on a mesh sets grad_accum=n. The last stdout line is
`MESH_RUN_JSON {...}` with, per mesh:

  losses, grad_norms     per step, as floats
  batch_digests          sha256 of each batch as the loader made it (same data on every mesh)
  init_digest            sha256 of all initial parameters, gathered (bitwise identity)
  final_digest           the same after the last step
  init_norms, final_norms per-parameter L2 norms ({path: norm}) and 'global'
  compiles               train-step XLA compilations (jax.monitoring backend-compile events)
                         seen during step 1 and during the steps after it; cache_size, the
                         jitted function's cache entries after the last step
  shardings              for a few parameters: spec, global and per-device shard shape
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MARK = 'MESH_RUN_JSON '
CONFIG = 'configs/clip.py'
# Parameters whose placement is reported (paths as '/'.join of the model-state keys).
WATCH = (
    'image/encoder/blocks/0/mlp/fc1/kernel',
    'image/encoder/blocks/0/attn/out/kernel',
    'image/encoder/blocks/0/ln1/scale',
    'text/tok',
    'logit_scale',
)


def _path(path) -> str:
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def _host_params(model_state) -> dict:
    """{path: float64 numpy array} of the model's parameters, gathered to this host."""
    import jax
    import numpy as np
    from flax import nnx

    pure = nnx.to_pure_dict(model_state)
    return {
        _path(p): np.asarray(jax.device_get(v))
        for p, v in jax.tree_util.tree_leaves_with_path(pure)
    }


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = arrays[k]
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _norms(arrays: dict) -> dict:
    import numpy as np

    norms = {k: float(np.linalg.norm(a.astype(np.float64).ravel())) for k, a in arrays.items()}
    norms['global'] = float(np.sqrt(sum(v * v for v in norms.values())))
    return norms


def build_config(
    overrides: list[tuple[str, str]], mesh: tuple[int, int, int], steps: int, grad_accum: int = 0
):
    """configs/clip.py with `overrides`, this mesh, total_steps=steps (and grad_accum if > 0)."""
    from pretrain import config_cli

    config = config_cli.build_config(CONFIG, overrides)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.total_steps = steps
    if grad_accum:
        config.grad_accum = grad_accum
    return config


def run_mesh(config, steps: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from input_pipeline import pipeline
    from pretrain import sharding, step as step_lib, train
    from pretrain.objectives import compose

    mesh = sharding.make_mesh(config.mesh)
    objective = compose.build_objective(config.objectives)
    loader = pipeline.train_loader(config, fields=objective.fields)

    compiles: list[str] = []

    def on_event(event, duration, **kw):
        del duration
        if event == '/jax/core/compile/backend_compile_duration':
            compiles.append(str(kw.get('fun_name', '')))

    out: dict = {
        'mesh': dict(zip(sharding.AXES, (int(s) for s in mesh.devices.shape))),
        'devices': int(mesh.devices.size),
        'grad_accum': int(config.grad_accum),
    }
    with jax.set_mesh(mesh):
        graphdef, state, shardings = train.init_train_state(config, mesh)
        init = _host_params(state[0])
        out['init_digest'] = _digest(init)
        out['init_norms'] = _norms(init)
        flat_state = {
            _path(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state[0]))
        }
        out['shardings'] = {
            k: {
                'spec': [
                    None if a is None else (a if isinstance(a, str) else list(a))
                    for a in flat_state[k].sharding.spec
                ],
                'shape': list(flat_state[k].shape),
                'shard_shape': list(flat_state[k].addressable_shards[0].data.shape),
            }
            for k in WATCH
            if k in flat_state
        }

        train_step = step_lib.jit_train_step(config, graphdef, objective, shardings, mesh)
        treedef, arrays = jax.tree.structure(state), jax.tree.leaves(state)

        losses, grad_norms, digests, times = [], [], [], []
        first_compiles = None
        jax.monitoring.register_event_duration_secs_listener(on_event)
        try:
            data = iter(loader)
            for i in range(steps):
                host_batch = next(data)
                digests.append(_digest({k: np.asarray(v) for k, v in host_batch.items()}))
                batch = sharding.global_batch(host_batch, mesh)
                t0 = time.perf_counter()
                arrays, metrics = train_step(arrays, batch)
                m = jax.device_get({k: metrics[k] for k in ('loss', 'grad_norm')})
                times.append(time.perf_counter() - t0)
                losses.append(float(m['loss']))
                grad_norms.append(float(m['grad_norm']))
                if i == 0:
                    first_compiles = list(compiles)
        finally:
            jax.monitoring.unregister_event_duration_listener(on_event)
            loader.close()
        train_compiles = [n for n in compiles if 'train_step' in n]
        first_train = [n for n in (first_compiles or []) if 'train_step' in n]
        out['compiles'] = {
            'step1': len(first_train),
            'after_step1': len(train_compiles) - len(first_train),
            'all_backend_compiles_in_loop': len(compiles),
            'cache_size': int(train_step._cache_size()),
        }
        state = jax.tree.unflatten(treedef, arrays)
        # The state after the steps keeps the shardings it was pinned to.
        out['state_shardings_kept'] = bool(
            all(
                a.sharding.is_equivalent_to(s, a.ndim)
                for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
            )
        )
        final = _host_params(state[0])
    out.update(
        losses=losses,
        grad_norms=grad_norms,
        batch_digests=digests,
        final_digest=_digest(final),
        final_norms=_norms(final),
        step_s=times,
    )
    return out


def main(argv=None) -> int:
    from pretrain import config_cli

    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = config_cli.parse_overrides(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--mesh',
        action='append',
        required=True,
        help='data,fsdp,tensor sizes (-1 = the rest); repeat for several meshes',
    )
    parser.add_argument('--steps', type=int, default=8)
    args = parser.parse_args(rest)

    import jax

    jax.config.update('jax_platforms', 'cpu')
    report = {'device_count': jax.device_count(), 'runs': []}
    for spec in args.mesh:
        sizes, _, accum = spec.partition(':')
        mesh = tuple(int(s) for s in sizes.split(','))
        if len(mesh) != 3:
            parser.error(f'--mesh wants data,fsdp,tensor[:grad_accum], got {spec!r}')
        config = build_config(overrides, mesh, args.steps, int(accum or 0))
        report['runs'].append(run_mesh(config, args.steps))
    sys.stdout.flush()
    print(MARK + json.dumps(report), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
