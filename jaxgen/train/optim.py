"""Optimizers and learning-rate schedules from the typed `optim` section."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgen.config import AdafactorConfig, AdamWConfig, OptimConfig

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
    peak, warmup = optim.learning_rate, optim.warmup_steps
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


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled, masked decay) or Adafactor, after global-norm clipping if clip_norm > 0."""
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
    else:
        raise TypeError(f"no optimizer for {type(optim).__name__}")
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), core)
    return core
