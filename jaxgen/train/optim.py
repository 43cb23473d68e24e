"""Optimizers and learning-rate schedules from `config.optim`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "rsqrt", "constant")
# Parameter leaf names that are never weight-decayed: biases and LayerNorm/RMSNorm gains (BERT,
# GPT-1).
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(optim: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then `linear` to 0, `cosine` to final_lr_fraction,
    `rsqrt` or `constant`.

    `rsqrt` is T5's inverse square root: peak / sqrt(max(step, warmup_steps)) *
    sqrt(warmup_steps), i.e. the peak held for warmup_steps (T5 holds 0.01 for 10^4 steps) and
    then decaying as 1/sqrt(step).
    """
    name = optim["schedule"]
    peak = float(optim["learning_rate"])
    warmup = int(optim["warmup_steps"])
    decay_steps = int(optim.get("decay_steps", 0) or num_steps)
    final = float(optim.get("final_lr_fraction", 0.0))
    if name not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if name == "rsqrt":
        floor = max(warmup, 1)
        return lambda step: (
            peak * jnp.sqrt(floor / jnp.maximum(jnp.asarray(step, jnp.float32), floor))
        )
    if name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "linear":
        after = optax.linear_schedule(peak, peak * final, max(decay_steps - warmup, 1))
    else:
        after = optax.cosine_decay_schedule(peak, max(decay_steps - warmup, 1), alpha=final)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: every matrix, not biases and norm gains."""

    def keep(path: tuple[Any, ...], leaf: jax.Array) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in NO_DECAY_NAMES and leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled, masked decay) or Adafactor, after global-norm clipping if clip_norm > 0."""
    schedule = make_schedule(optim, num_steps)
    if optim["name"] == "adamw":
        core = optax.adamw(
            schedule,
            b1=float(optim["b1"]),
            b2=float(optim["b2"]),
            eps=float(optim["eps"]),
            weight_decay=float(optim["weight_decay"]),
            mask=decay_mask,
        )
    elif optim["name"] == "adafactor":
        # T5's settings: factored second moments, no momentum, update clipping 1.0, updates scaled
        # by the parameter's RMS; weight decay is 0 in T5 pretraining.
        core = optax.adafactor(
            schedule,
            decay_rate=0.8,
            clipping_threshold=1.0,
            multiply_by_parameter_scale=True,
            weight_decay_rate=float(optim["weight_decay"]) or None,
            eps=1e-30,
        )
    else:
        raise ValueError(f"unknown optim.name {optim['name']!r}; valid: adamw, adafactor")
    clip = float(optim.get("clip_norm", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
