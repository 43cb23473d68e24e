"""Optimizers and learning-rate schedules from the typed `optim` section."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgen.config import AdafactorConfig, AdamWConfig, OptimConfig
from jaxgen.models import lora, scan

# Parameter leaf names that are never weight-decayed: biases and LayerNorm/RMSNorm gains (BERT,
# GPT-1).
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(optim: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then `linear` to final_lr_fraction, `cosine` to
    final_lr_fraction, `rsqrt` or `constant`.

    `rsqrt` is T5's inverse square root: peak / sqrt(max(step, warmup_steps)) *
    sqrt(warmup_steps), i.e. the peak held for warmup_steps (T5 holds 0.01 for 10^4 steps) and
    then decaying as 1/sqrt(step).
    """
    peak = optim.learning_rate
    warmup = optim.warmup_steps or int(optim.warmup_ratio * num_steps)
    decay_steps = optim.decay_steps or num_steps
    if optim.schedule == "rsqrt":
        floor = max(warmup, 1)
        return lambda step: (
            peak * jnp.sqrt(floor / jnp.maximum(jnp.asarray(step, jnp.float32), floor))
        )
    if optim.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(
            peak, peak * optim.final_lr_fraction, max(decay_steps - warmup, 1)
        )
    else:
        after = optax.cosine_decay_schedule(
            peak, max(decay_steps - warmup, 1), alpha=optim.final_lr_fraction
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: every matrix, not biases and norm gains."""

    def keep(path: tuple[Any, ...], leaf: jax.Array) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in NO_DECAY_NAMES and leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(keep, params)


def stacked_labels(params: Any) -> Any:
    """ "stacked" for the leaves of scanned layer stacks (`[L, ...]`, under a `layers` key), else
    "other"."""

    return jax.tree_util.tree_map_with_path(
        lambda path, _: "stacked" if scan.in_stack(path) else "other", params
    )


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to each layer of every stacked leaf on its own, as on the unrolled model."""

    # A model without stacked leaves hands this branch an empty tree, which vmap cannot map.
    def init(params: Any) -> Any:
        return jax.vmap(inner.init)(params) if jax.tree.leaves(params) else inner.init(params)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not jax.tree.leaves(updates):
            return inner.update(updates, state, params)
        return jax.vmap(inner.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled, masked decay) or Adafactor, after global-norm clipping if clip_norm > 0.

    Adafactor is not elementwise: its factored second moments, update clipping and parameter
    scale are statistics of a whole leaf. On a scanned model's stacked `[L, ...]` leaves it runs
    per layer, so scanning changes no update (AdamW's are elementwise already).
    """
    schedule = make_schedule(optim, num_steps)
    if isinstance(optim, AdamWConfig):
        core = optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    elif isinstance(optim, AdafactorConfig):
        core = optax.adafactor(
            schedule,
            min_dim_size_to_factor=optim.min_dim_size_to_factor,
            decay_rate=optim.decay_rate,
            multiply_by_parameter_scale=optim.multiply_by_parameter_scale,
            clipping_threshold=optim.clipping_threshold or None,
            momentum=optim.momentum or None,
            weight_decay_rate=optim.weight_decay or None,
            eps=optim.epsilon,
            factored=optim.factored,
        )
        core = optax.multi_transform({"stacked": per_layer(core), "other": core}, stacked_labels)
    else:
        raise TypeError(f"no optimizer for {type(optim).__name__}")
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), core)
    return core


def adapters_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on the LoRA adapters; every other parameter frozen (zero updates, no optimizer
    state), so only the adapters' moments take memory."""
    return optax.multi_transform({"adapter": inner, "frozen": optax.set_to_zero()}, lora.labels)
