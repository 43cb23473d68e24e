"""`add_vocab_bias`: same value and gradients as `logits + bias`, its custom VJP notwithstanding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.layers import add_vocab_bias
from tests.models.tiny_models import F32_ATOL


def test_add_vocab_bias_matches_plain_add() -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(keys[0], (2, 3, 37))  # [B, P, V]
    bias = jax.random.normal(keys[1], (37,))  # [V]
    probe = jax.random.normal(keys[2], (2, 3, 37))  # a non-uniform upstream gradient

    def loss(add):
        return lambda x, b: jnp.sum(jnp.sin(add(x, b)) * probe)

    want_value, want_grads = jax.value_and_grad(loss(jnp.add), argnums=(0, 1))(logits, bias)
    got_value, got_grads = jax.jit(jax.value_and_grad(loss(add_vocab_bias), argnums=(0, 1)))(
        logits, bias
    )
    np.testing.assert_allclose(got_value, want_value, atol=F32_ATOL)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=F32_ATOL)
