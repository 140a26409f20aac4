"""The training loop: init or restore, step, log, checkpoint, stop cleanly.

Nothing here knows which objective runs: the config names them, `compose` builds them, and
the loop only sees `train_step(arrays, batch) -> (arrays, metrics)`, over the state's flat
list of arrays (`step.jit_train_step` says why a list). Periodic work is a list
of hooks with an `every`, so the loop body stays short.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable

import jax
from flax import nnx

from input_pipeline import pipeline
from pretrain import auto_remat, checkpoint, config_cli, flops, metrics as metrics_lib, optim
from pretrain import sharding
from pretrain import step as step_lib
from pretrain import weights
from pretrain.evaluators import build_evaluators, run_evaluators
from pretrain.models.towers import ImageTextModel
from pretrain.objectives import compose

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf; no checkpoint was written after it."""


@dataclasses.dataclass
class Hook:
    """Runs `fn(step)` every `every` steps and at the last step when `at_end`; 0 = never.

    `fn` may return a dict of metrics; the loop writes one row per step from all of them.
    """

    name: str
    every: int
    fn: Callable[[int], None]
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        if self.every <= 0:  # switched off
            return False
        return step % self.every == 0 or (self.at_end and step == last)


@contextlib.contextmanager
def config_errors(section: str):
    """A ValueError from building `config.<section>` becomes a one-line ConfigError."""
    try:
        yield
    except config_cli.ConfigError:
        raise
    except (ValueError, NotImplementedError) as e:
        message = str(e)  # most already start with the section name
        where = 'config.' if message.startswith(section) else f'config.{section}: '
        raise config_cli.ConfigError(where + message) from None


def check_run_config(config, mesh) -> None:
    """The run's own numbers, which no builder checks: a bad one is a ConfigError up front."""
    for key in ('total_steps', 'batch_size', 'grad_accum'):
        if int(config[key]) < 1:
            raise config_cli.ConfigError(f'config.{key} must be >= 1, got {config[key]}')
    batch, accum = config.batch_size, config.grad_accum
    if batch % accum:
        raise config_cli.ConfigError(
            f'config.batch_size {batch} does not split into grad_accum={accum} micro-batches'
        )
    shards = mesh.shape['data'] * mesh.shape['fsdp']
    if batch % shards:
        raise config_cli.ConfigError(
            f'config.batch_size {batch} is not divisible by the {shards} batch shards of the '
            f"mesh (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})"
        )


def create_model_and_optimizer(config):
    with config_errors('model'):  # a bad value (pool, remat, attention, ...): one line
        model = ImageTextModel(config.model, rngs=nnx.Rngs(config.seed))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optim.make_optimizer(config.optim, params, config.total_steps)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(config, mesh):
    """(graphdef, abstract state, shardings) of `config`'s model and optimizer on `mesh`.

    Traced with eval_shape, so nothing is allocated: restoring a checkpoint needs only this.
    """
    with nnx.use_eager_sharding(False), nnx.logical_axis_rules(config.mesh.rules):
        model_and_opt = nnx.eval_shape(lambda: create_model_and_optimizer(config))
    graphdef, abstract_state = nnx.split(model_and_opt)
    shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.rules)
    return graphdef, checkpoint.abstract_like(abstract_state, shardings), shardings


def init_train_state(config, mesh):
    """(graphdef, state, shardings): the state created directly in its sharded layout.

    Creation is jitted with the shardings read from the logical axes, so no host ever holds
    the full parameters. The same seed gives the same parameters whatever the mesh.
    """
    graphdef, _, shardings = abstract_train_state(config, mesh)
    create = lambda: nnx.split(create_model_and_optimizer(config))[1]
    return graphdef, jax.jit(create, out_shardings=shardings)(), shardings


def make_train_step(config, graphdef, objective, shardings, mesh, *, say=log.info):
    """The jitted train step (step.jit_train_step), or with `model.remat='auto'` one that
    picks its remat policy at its first call (auto_remat), each candidate built as its own
    model: remat changes the graph, not the parameters, so the state serves them all."""
    if config.model.get('remat') != 'auto':
        return step_lib.jit_train_step(config, graphdef, objective, shardings, mesh)

    def build(remat: str):
        if remat == 'none':  # 'auto' built the model as 'none' already
            return step_lib.jit_train_step(config, graphdef, objective, shardings, mesh)
        remat_config = config.copy_and_resolve_references()
        remat_config.model.remat = remat
        remat_graphdef = abstract_train_state(remat_config, mesh)[0]
        return step_lib.jit_train_step(remat_config, remat_graphdef, objective, shardings, mesh)

    return auto_remat.AutoRematStep(build, say=say)


def _finite(host_metrics: dict) -> bool:
    return all(math.isfinite(float(host_metrics[k])) for k in ('loss', 'grad_norm'))


def run(config, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns a summary."""
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    config_json = json.loads(config.to_json_best_effort())
    if is_main:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(config_json, f, indent=2)

    with config_errors('mesh'):
        mesh = sharding.make_mesh(config.mesh)
    check_run_config(config, mesh)
    with config_errors('objectives'):
        objective = compose.build_objective(config.objectives)
    with config_errors('evals'):
        evaluators = build_evaluators(config)  # cheap: eval data loads at the first eval
    loader = pipeline.train_loader(
        config,
        fields=objective.fields,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    writer = metrics_lib.MetricWriter(workdir)
    with config_errors('checkpoint'):
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    stop = checkpoint.StopSignal()
    total = config.total_steps

    with jax.set_mesh(mesh):
        start = ckpt.latest_step() or 0
        if start:
            graphdef, abstract_state, shardings = abstract_train_state(config, mesh)
            try:
                state, data_state = ckpt.restore(start, abstract_state)
            except checkpoint.CheckpointError:
                ckpt.close()  # stops orbax's threads before the error reaches the user
                raise
            loader.set_state(data_state)
            log.info('resumed from step %d (%s)', start, ckpt.directory)
        else:
            graphdef, state, shardings = init_train_state(config, mesh)
            state = weights.maybe_load_init(config, state, shardings)  # config.init, if set
        last_good = start or None
        # With model.remat='auto' its report comes at the first step, above the bar.
        say = lambda line: bar.write(line) if is_main else None
        train_step = make_train_step(config, graphdef, objective, shardings, mesh, say=say)
        # The loop carries the state as its list of arrays; hooks rebuild the nnx.State.
        treedef, arrays = jax.tree.structure(state), jax.tree.leaves(state)
        del state
        as_state = lambda: jax.tree.unflatten(treedef, arrays)

        peak, peak_source = flops.peak_flops_per_device(
            matmul_precision=config.model.get('matmul_precision', 'default')
        )
        throughput = metrics_lib.Throughput(
            batch_size=config.batch_size,
            flops_per_step=flops.train_step_flops(config, objective.fields),
            # On CPU the measured matmul rate is the whole host's, whatever the number of
            # virtual devices; accelerator peaks are per chip.
            peak_flops=peak
            * (jax.process_count() if jax.default_backend() == 'cpu' else jax.device_count()),
        )
        watcher = metrics_lib.StepWatcher(throughput.finished)
        bar = metrics_lib.progress_bar(
            start=start, total=total, enabled=is_main and config.progress
        )
        last_metrics: dict = {}

        input_bound_said = False

        def log_metrics(step):
            nonlocal input_bound_said
            row = {f'train/{k}': v for k, v in last_metrics.items()}
            row.update(throughput(step))
            row['data/skipped'] = data.skipped
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
            line = metrics_lib.input_bound_line(step, row)
            if line and is_main and not input_bound_said:  # once: the row has it every time
                bar.write(line)
                input_bound_said = True
            return row

        def save(step):
            nonlocal last_good
            # The prefetcher's state counts the batches consumed, not those placed ahead.
            ckpt.save(step, as_state(), data.get_state(), config_json, force=True)
            last_good = step

        def evaluate(step):
            # Every process runs this: the predict functions span the global mesh. It blocks
            # until the results are on the host, so the next step may donate the arrays.
            model, _ = nnx.merge(graphdef, as_state())
            row = run_evaluators(evaluators, model)
            if is_main:
                bar.write(metrics_lib.eval_line(step, row))  # above the bar, which stays
            return row

        hooks = [
            Hook('log', config.log_every, log_metrics),
            Hook('eval', config.eval_every if evaluators else 0, evaluate),
            Hook('checkpoint', config.checkpoint.every, save),
        ]
        p0, pn = config.profile.start_step, config.profile.num_steps
        profiling, tracing = is_main and p0 > 0, False

        agreement = checkpoint.StopAgreement(stop, mesh)
        # Places the next batches on the mesh while the step runs; 0 = when asked for.
        data = sharding.MeshPrefetcher(loader, mesh, size=config.input.get('device_prefetch', 2))
        pending = None  # device metrics of the previous step, checked one step late
        t_start, step = time.perf_counter(), start
        status = 'completed' if start < total else 'already complete'
        try:
            for step in range(start + 1, total + 1):
                if profiling and step == p0:
                    jax.profiler.start_trace(os.path.join(workdir, 'profile'))
                    tracing = True
                with throughput.waiting_for_data():
                    batch = next(data)
                arrays, device_metrics = train_step(arrays, batch)
                watcher.watch(throughput.dispatched(), device_metrics)
                stopping = agreement.poll()  # the same answer on every process
                if tracing and step == p0 + pn:
                    jax.profiler.stop_trace()
                    tracing = False
                if step == start + 1:  # throughput excludes compilation
                    jax.block_until_ready(device_metrics)
                    throughput(step)
                # Reading the previous step's metrics overlaps it with this step's compute: the
                # host never waits for the step it just dispatched, yet a NaN is caught one step
                # late at most, and always before a checkpoint of it is written.
                if pending is not None:
                    _check(*pending, last_good, ckpt)
                pending = (step, device_metrics)
                bar.update(1)
                due = [h for h in hooks if h.due(step, total)]
                if due or stopping:
                    _check(*pending, last_good, ckpt)
                    last_metrics = jax.device_get(device_metrics)
                    pending = None
                    row = {}
                    for hook in due:
                        row.update(hook.fn(step) or {})
                    if row:  # one metrics row per step, whichever hooks ran
                        writer.write(step, row)
                if stopping:
                    if not any(h.name == 'checkpoint' for h in due):
                        save(step)
                    status = f'stopped by signal {stopping}'
                    break
            if pending is not None:
                _check(*pending, last_good, ckpt)
        finally:
            # On every exit, an exception's included: the input side first (its thread reads
            # from the loader), then the loader, whose worker processes and the batches they
            # hold in shared memory go with it.
            data.close()
            loader.close()
        if tracing:  # the run ended inside the profiled window
            jax.profiler.stop_trace()
        bar.close()

    watcher.close()
    ckpt.close()
    writer.close()
    stop.restore()
    summary = {
        'status': status,
        'step': step,
        'steps_run': step - start,
        'wall_s': time.perf_counter() - t_start,
        'loss': float(last_metrics['loss']) if last_metrics else float('nan'),
        'checkpoint': ckpt.directory,
        'mfu_peak': peak_source,
    }
    if is_main and start >= total:
        print(
            f'nothing to run: the checkpoint in {ckpt.directory} is at step {start} of {total} '
            '(a larger --config.total_steps continues it, on the schedule of the new total)',
            flush=True,
        )
    elif is_main:
        print(
            f"{status}: step {step}/{total}, {summary['steps_run']} steps in "
            f"{summary['wall_s']:.0f}s, loss {summary['loss']:.4f}, "
            f"checkpoints in {ckpt.directory}",
            flush=True,
        )
    return summary


def _check(step, device_metrics, last_good, ckpt):
    host = jax.device_get({k: device_metrics[k] for k in ('loss', 'grad_norm')})
    if not _finite(host):
        ckpt.wait()  # let the last good save finish committing before we stop
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (loss={float(host['loss'])}, "
            f"grad_norm={float(host['grad_norm'])}); last good checkpoint: "
            + (f'step {last_good} in {ckpt.directory}' if last_good else 'none written')
        )
