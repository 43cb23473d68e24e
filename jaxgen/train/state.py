"""The training state: one pytree holding all a resumed run needs besides the data iterator."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class TrainState(struct.PyTreeNode):
    """Step counter, parameters, optimizer state, the run's base rng and the spike-guard statistics.

    `rng` is raw key data (uint32) so that checkpoints hold a plain array; each step derives its own
    keys by folding in the step number, which makes a resumed run draw exactly the same dropout
    masks.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    loss_ema: jax.Array  # running mean of the loss for the spike guard
    skipped: jax.Array  # number of updates skipped by the guard
    nonfinite_step: jax.Array  # first step whose loss was NaN/Inf, or -1

    @classmethod
    def create(cls, params: Any, opt_state: Any, rng: jax.Array) -> TrainState:
        """A fresh state at step 0."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
            loss_ema=jnp.zeros((), jnp.float32),
            skipped=jnp.zeros((), jnp.int32),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    def step_key(self, step: jax.Array | int | None = None) -> jax.Array:
        """A typed PRNG key unique to a step."""
        key = jax.random.wrap_key_data(self.rng)
        return jax.random.fold_in(key, self.step if step is None else step)
