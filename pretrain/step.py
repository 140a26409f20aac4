"""The jitted train step: loss and grads (optionally over micro-batches), optimizer update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pretrain import optim, sharding


def microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B/n, ...), micro-batch i holding rows i, i+n, i+2n, ...

    Strided rather than contiguous so that every micro-batch is spread over all devices of
    the (data, fsdp) axes: each device keeps working on its own rows.
    """

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f'batch of {x.shape[0]} does not split into {n} micro-batches')
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, objective, *, lr_schedule, seed: int, grad_accum: int = 1):
    """Returns `train_step(state, batch) -> (state, metrics)`, a pure function to jit.

    `state` is `nnx.state((model, optimizer))`. The per-step RNG is fold_in(seed, step), so a
    resumed run draws exactly the numbers an uninterrupted one does.

    With grad_accum > 1 the gradient is the mean of the micro-batch gradients. That equals
    the full-batch gradient for losses that average over examples; batch-contrastive losses
    (CLIP, SigLIP) then see only each micro-batch's negatives.
    """
    base_key = jax.random.key(seed)

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        step = optimizer.step[...]
        rng = jax.random.fold_in(base_key, step)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, batch, rng):
            m = nnx.merge(model_def, params, rest)
            loss, metrics = objective(m, batch, rng=rng, train=True)
            return loss, metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
        else:

            def accumulate(carry, xs):
                i, micro = xs
                out = grad_fn(params, micro, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, out), None

            micro = microbatches(batch, grad_accum)
            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng),
            )
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            (loss, metrics), grads = jax.tree.map(lambda x: x / grad_accum, total)

        optimizer.update(model, grads)
        metrics = {
            **metrics,
            'loss': loss,
            'grad_norm': optax.tree.norm(grads),
            'lr': lr_schedule(step),
        }
        return nnx.split((model, optimizer))[1], metrics

    return train_step


def jit_train_step(config, graphdef, objective, shardings, mesh):
    """The train step of `config` over the state's arrays, jitted with the shardings of `mesh`.

    Returns `train_step(arrays, batch) -> (arrays, metrics)`, where `arrays` is the state's
    flat list of arrays, `jax.tree.leaves(state)` (`jax.tree.unflatten(
    jax.tree.structure(state), arrays)` gives the state back). A list crosses the jit
    boundary in C++; an `nnx.State` rebuilds its ~900 Variables in Python on every call.
    With the State, a CLIP B/16 step took 10-25 ms to dispatch on CPU (15 ms to unflatten
    the returned state alone), ~5 ms with the list, and an H100 idled 19 ms between
    blocked steps (benchmarks/README.md, session 22).

    The output state is pinned to its input shardings: under an Auto mesh GSPMD may hand
    replicated leaves back with another sharding and step 2 would recompile (DESIGN.md).
    The state is donated, so params and optimizer moments are updated in place.
    """
    step_fn = make_train_step(
        graphdef,
        objective,
        lr_schedule=optim.schedule(config.optim, config.total_steps),
        seed=config.seed,
        grad_accum=config.grad_accum,
    )
    treedef = jax.tree.structure(shardings)  # the state's: shardings mirror it leaf by leaf
    array_shardings = jax.tree.leaves(shardings)

    def train_step(arrays, batch):
        state, metrics = step_fn(jax.tree.unflatten(treedef, arrays), batch)
        if jax.tree.structure(state) != treedef:  # at trace time: the leaves would misalign
            raise ValueError('the train step returned a state of another structure')
        return jax.tree.leaves(state), metrics

    return jax.jit(
        train_step,
        in_shardings=(array_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(array_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
