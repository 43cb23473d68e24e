"""Sharded train and eval steps: `jax.jit` with explicit in/out shardings over the (data, fsdp,
tensor) mesh.

A step is `train_step(state, batch) -> (state, metrics)`: a pure function of the state (which
carries the base rng) and the batch. Objectives return `{name: (sum, weight)}`; the step turns
those into means.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from jaxgen import parallel
from jaxgen.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# Spike guard: skip an update whose loss exceeds this multiple of its running mean (after the
# warmup below).
SPIKE_FACTOR = 3.0
SPIKE_WARMUP_STEPS = 20
EMA_DECAY = 0.98


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of a train step (hashable, so they never trigger retracing by value)."""

    grad_accum: int = 1
    z_loss: float = 0.0
    skip_nonfinite_or_spike: bool = False


def mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    """The mesh and logical-axis rules that tracing a model needs for its sharding constraints."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(parallel.axis_rules())
    return stack


def init_params_fn(module: nn.Module, objective: ModuleType, sample_batch: Batch) -> Callable:
    """A function rng -> boxed params (with logical-axis metadata) for eval_shape or jit."""
    inputs = objective.model_inputs({k: jnp.asarray(v) for k, v in sample_batch.items()})

    def init(rng: jax.Array) -> Any:
        return module.init({"params": rng}, **inputs, deterministic=True)["params"]

    return init


def create_train_state(
    module: nn.Module,
    objective: ModuleType,
    optimizer: optax.GradientTransformation,
    sample_batch: Batch,
    seed: int,
    mesh: Mesh,
) -> tuple[TrainState, TrainState]:
    """Parameters and optimizer state initialised in their shardings: (state, shardings)."""
    init = init_params_fn(module, objective, sample_batch)
    rng = jax.random.key(seed)
    with mesh_context(mesh):
        boxed = jax.eval_shape(init, rng)
        param_shardings = parallel.logical_shardings(boxed, mesh)
        abstract_params = parallel.strip_boxes(boxed)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            optimizer,
            lambda leaf, sharding: NamedSharding(
                mesh, parallel.fit_spec(sharding.spec, leaf.shape, dict(mesh.shape))
            ),
            abstract_opt,
            param_shardings,
            transform_non_params=lambda _: parallel.replicated(mesh),
        )
        rep = parallel.replicated(mesh)
        shardings = TrainState(
            step=rep,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=rep,
            loss_ema=rep,
            skipped=rep,
            nonfinite_step=rep,
        )

        def make(rng: jax.Array) -> TrainState:
            param_rng, state_rng = jax.random.split(rng)
            params = parallel.strip_boxes(init(param_rng))
            return TrainState.create(params, optimizer.init(params), state_rng)

        state = jax.jit(make, out_shardings=shardings)(rng)
    return state, shardings


def _split_micro(batch: Batch, grad_accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...] taking every A-th row: each micro-batch has rows on every shard."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])  # [B/A, A, ...]
        return jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]

    return {k: split(v) for k, v in batch.items()}


def _means(sums: Mapping[str, tuple[jax.Array, jax.Array]]) -> Metrics:
    return {k: s / jnp.maximum(w, 1e-8) for k, (s, w) in sums.items()}


def build_train_step(
    module: nn.Module,
    objective: ModuleType,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    options: StepOptions = StepOptions(),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` with explicit shardings."""

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Any]:
        outputs = module.apply(
            {"params": params},
            **objective.model_inputs(batch),
            deterministic=False,
            rngs={"dropout": rng},
        )
        loss, sums = objective.loss_and_metrics(outputs, batch, z_loss=options.z_loss)
        return loss, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = state.step_key()
        if options.grad_accum == 1:
            (loss, sums), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _split_micro(batch, options.grad_accum)

            def body(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
                grads_acc, loss_acc, sums_acc = carry
                mb, i = xs
                mb = jax.lax.with_sharding_constraint(mb, parallel.batch_sharding(mesh))
                (loss, sums), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                add = lambda a, b: jax.tree.map(jnp.add, a, b)
                return (add(grads_acc, grads), loss_acc + loss, add(sums_acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(lambda: loss_fn(state.params, first, rng)[1])
            sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
            (grads, loss, sums), _ = jax.lax.scan(
                body,
                (zeros, jnp.zeros((), jnp.float32), sums0),
                (micro, jnp.arange(options.grad_accum)),
            )
            grads = jax.tree.map(lambda g: g / options.grad_accum, grads)
            loss = loss / options.grad_accum
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skip = jnp.zeros((), bool)
        if options.skip_nonfinite_or_spike:
            spike = (state.step >= SPIKE_WARMUP_STEPS) & (loss > SPIKE_FACTOR * state.loss_ema)
            skip = ~finite | spike
            keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
            params = keep_old(params, state.params)
            opt_state = keep_old(opt_state, state.opt_state)
        ema = jnp.where(state.step == 0, loss, EMA_DECAY * state.loss_ema + (1 - EMA_DECAY) * loss)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            loss_ema=jnp.where(finite & ~skip, ema, state.loss_ema),
            skipped=state.skipped + skip.astype(jnp.int32),
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
            ),
        )
        metrics = _means(sums)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
            skipped=new_state.skipped.astype(jnp.float32),
        )
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with mesh_context(mesh):
            return jitted(state, batch)

    train_step.jitted = jitted  # type: ignore[attr-defined]
    return train_step


def build_eval_step(
    module: nn.Module,
    objective: ModuleType,
    mesh: Mesh,
    state_shardings: TrainState,
    options: StepOptions = StepOptions(),
) -> Callable[[Any, Batch], dict[str, tuple[jax.Array, jax.Array]]]:
    """Returns the jitted `eval_step(params, batch) -> {name: (sum, weight)}` (no dropout)."""

    def step(params: Any, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
        outputs = module.apply(
            {"params": params}, **objective.model_inputs(batch), deterministic=True
        )
        _, sums = objective.loss_and_metrics(outputs, batch, z_loss=options.z_loss)
        return sums

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings.params, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )

    def eval_step(params: Any, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
        with mesh_context(mesh):
            return jitted(params, batch)

    return eval_step
