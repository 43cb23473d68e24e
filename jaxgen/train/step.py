"""Sharded train and eval steps: `jax.jit` with explicit in/out shardings over the (data, fsdp,
tensor) mesh.

A step is `train_step(state, batch) -> (state, metrics)`: a pure function of the state (which
carries the base rng) and the batch. Objectives return `{name: (sum, weight)}`; the step divides
every micro-batch's loss sums by the weights of the whole global batch, so accumulating any number
of micro-batches gives the full batch's loss and gradient exactly, however the real targets
(masked positions, padding, packed documents) fall among them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from jaxgen import objectives, parallel
from jaxgen.config import DataConfig
from jaxgen.objectives import StepObjective
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
    # Which parameters the step differentiates, a predicate of their key path (LoRA:
    # `lora.trained`); the others get zero gradients. None: every parameter.
    trained: Callable[[tuple[Any, ...]], bool] | None = None


def init_params_fn(module: nn.Module, objective: StepObjective, data: DataConfig) -> Callable:
    """A function rng -> boxed params (with logical-axis metadata), from the objective's batch spec
    (nothing is read from data), for eval_shape or jit."""
    spec = objective.batch_spec(data, 1)

    def init(rng: jax.Array) -> Any:
        batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items()}
        inputs = objective.model_inputs(batch)
        return module.init({"params": rng}, **inputs, deterministic=True)["params"]

    return init


def abstract_params(module: nn.Module, objective: StepObjective, data: DataConfig) -> Any:
    """The boxed parameter tree as ShapeDtypeStructs (no memory, no devices)."""
    return jax.eval_shape(init_params_fn(module, objective, data), jax.random.key(0))


def create_train_state(
    module: nn.Module,
    objective: StepObjective,
    optimizer: optax.GradientTransformation,
    data: DataConfig,
    seed: int,
    mesh: Mesh,
) -> tuple[TrainState, TrainState]:
    """Parameters and optimizer state initialised in their shardings: (state, shardings).

    On a mesh of compile-only devices the state is ShapeDtypeStructs carrying those shardings.
    """
    init = init_params_fn(module, objective, data)
    rng = jax.random.key(seed)
    with parallel.mesh_context(mesh):
        boxed = jax.eval_shape(init, rng)
    # Outside the mesh context: optax.tree_map_params runs optimizer.init eagerly on placeholders,
    # and under jax.set_mesh eager ops run on the mesh's devices, which may be compile-only.
    param_shardings = parallel.logical_shardings(boxed, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, parallel.strip_boxes(boxed))
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)  # another branch's leaves

    def shard_like_param(leaf: Any, sharding: NamedSharding) -> Any:
        if masked(leaf):
            return leaf
        return NamedSharding(mesh, parallel.fit_spec(sharding.spec, leaf.shape, dict(mesh.shape)))

    opt_shardings = optax.tree_map_params(
        optimizer,
        shard_like_param,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: parallel.replicated(mesh),
        is_leaf=masked,
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

    with parallel.mesh_context(mesh):
        init_state = jax.jit(make, out_shardings=shardings)
        # Compile-only devices (`jaxgen compile`) run nothing: there the state is its abstract
        # shapes in their shardings, which is all lowering a step needs.
        if mesh.devices.flat[0].client.runtime_type == "compile_only_runtime":
            return jax.eval_shape(init_state, rng), shardings
        return init_state(rng), shardings


def _split_micro(batch: Batch, grad_accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...] taking every A-th row: each micro-batch has rows on every shard."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])  # [B/A, A, ...]
        return jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]

    return {k: split(v) for k, v in batch.items()}


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


# (params, batch, rng, weights) -> ((loss, sums), grads)
GradFn = Callable[[Any, Batch, jax.Array, Mapping[str, jax.Array]], tuple[tuple[Any, Any], Any]]


def accumulate_gradients(
    grad_fn: GradFn,
    params: Any,
    batch: Batch,
    rng: jax.Array,
    grad_accum: int,
    weights: Mapping[str, jax.Array],
    constrain: Callable[[Batch], Batch] = lambda b: b,
) -> tuple[Any, dict[str, tuple[jax.Array, jax.Array]]]:
    """(gradient of the global batch's loss, summed metric sums) over `grad_accum` micro-batches.

    `weights` are the loss terms' weights in the whole batch: each micro-batch's loss is its sums
    over them, so the micro-batch gradients add up to the full batch's. Micro-batch i draws its
    dropout from fold_in(rng, i); `constrain` shards a micro-batch like a batch.
    """
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, batch, rng, weights)
        return grads, sums
    micro = _split_micro(batch, grad_accum)

    def body(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
        grads_acc, sums_acc = carry
        mb, i = xs
        (_, sums), grads = grad_fn(params, constrain(mb), jax.random.fold_in(rng, i), weights)
        return (_add(grads_acc, grads), _add(sums_acc, sums)), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, sums_shape = jax.eval_shape(lambda: grad_fn(params, first, rng, weights))[0]
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    start = (jax.tree.map(jnp.zeros_like, params), zeros(sums_shape))
    (grads, sums), _ = jax.lax.scan(body, start, (micro, jnp.arange(grad_accum)))
    return grads, sums


def guarded_update(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    optimizer: optax.GradientTransformation,
    skip_nonfinite_or_spike: bool,
) -> tuple[TrainState, jax.Array]:
    """The state after one optimizer update, and the gradient norm.

    A NaN/Inf loss or gradient is recorded in `nonfinite_step`; with `skip_nonfinite_or_spike`
    such an update, or one whose loss exceeds SPIKE_FACTOR x its running mean, is skipped (params
    and optimizer state kept) and counted in `skipped`.
    """
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skip = jnp.zeros((), bool)
    if skip_nonfinite_or_spike:
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
    return new_state, grad_norm


def means(
    objective: StepObjective, sums: Mapping[str, tuple[jax.Array, jax.Array]]
) -> dict[str, jax.Array]:
    """Each metric's sum over its weight, and `loss`: the sum of the LOSS_TERMS means."""
    out = {k: s / jnp.maximum(w, 1e-8) for k, (s, w) in sums.items()}
    out["loss"] = sum(out[t] for t in objective.LOSS_TERMS)
    return out


def make_grad_fn(
    module: nn.Module,
    objective: StepObjective,
    z_loss: float,
    trained: Callable[[tuple[Any, ...]], bool] | None = None,
) -> GradFn:
    """(params, batch, rng, weights) -> ((loss, sums), grads) of the model with dropout on;
    with `trained`, only the parameters whose key path it accepts get nonzero gradients."""

    def loss_fn(params: Any, batch: Batch, rng: jax.Array, weights: Any) -> tuple[Any, Any]:
        outputs = module.apply(
            {"params": params},
            **objective.model_inputs(batch),
            deterministic=False,
            rngs={"dropout": rng},
        )
        sums = objective.loss_and_metrics(outputs, batch, z_loss=z_loss)
        return objectives.objective_value(objective, sums, weights), sums

    if trained is None:
        return jax.value_and_grad(loss_fn, has_aux=True)

    def loss_of_trained(params: Any, batch: Batch, rng: jax.Array, weights: Any) -> Any:
        # Frozen leaves behind stop_gradient have no tangent: their weight-gradient matmuls (a
        # third of a layer's FLOPs) and the embedding tables' scatter-adds leave the step.
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x if trained(path) else jax.lax.stop_gradient(x), params
        )
        return loss_fn(params, batch, rng, weights)

    return jax.value_and_grad(loss_of_trained, has_aux=True)


def build_train_step(
    module: nn.Module,
    objective: StepObjective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    options: StepOptions = StepOptions(),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` with explicit shardings.

    Metrics: every objective metric's mean over the global batch, `loss`, `grad_norm`,
    `learning_rate` and `skipped`. Each global batch size compiles once.
    """
    grad_fn = make_grad_fn(module, objective, options.z_loss, options.trained)
    sharding = parallel.batch_sharding(mesh)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        weights = objective.loss_weights(batch)
        grads, sums = accumulate_gradients(
            grad_fn,
            state.params,
            batch,
            state.step_key(),
            options.grad_accum,
            weights,
            lambda mb: jax.lax.with_sharding_constraint(mb, sharding),
        )
        loss = objectives.objective_value(objective, sums, weights)
        new_state, grad_norm = guarded_update(
            state, grads, loss, optimizer, options.skip_nonfinite_or_spike
        )
        metrics = means(objective, sums)
        metrics.update(
            grad_norm=grad_norm,
            learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
            skipped=new_state.skipped.astype(jnp.float32),
        )
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, sharding),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with parallel.mesh_context(mesh):
            return jitted(state, batch)

    train_step.jitted = jitted  # type: ignore[attr-defined]
    return train_step


def build_eval_step(
    module: nn.Module,
    objective: StepObjective,
    mesh: Mesh,
    state_shardings: TrainState,
    options: StepOptions = StepOptions(),
    predict_outputs: Callable[[Any, Batch], jax.Array] | None = None,
) -> Callable[[Any, Batch], Any]:
    """Returns the jitted `eval_step(params, batch) -> {name: (sum, weight)}` (no dropout); with
    `predict_outputs(outputs, batch)`, `-> ({name: (sum, weight)}, predictions)` of one forward."""

    def step(params: Any, batch: Batch) -> Any:
        outputs = module.apply(
            {"params": params}, **objective.model_inputs(batch), deterministic=True
        )
        sums = objective.loss_and_metrics(outputs, batch, z_loss=options.z_loss)
        return sums if predict_outputs is None else (sums, predict_outputs(outputs, batch))

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings.params, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )

    def eval_step(params: Any, batch: Batch) -> Any:
        with parallel.mesh_context(mesh):
            return jitted(params, batch)

    eval_step.jitted = jitted  # type: ignore[attr-defined]
    return eval_step
