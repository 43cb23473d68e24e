"""Counter-based dropout masks, one hash for the Pallas kernel, the XLA attention and every layer.

A keep bit is a function of (seed, stream, row, column) only: the lowbias32 integer finaliser
applied to the seed and the element's indices, its top 24 bits compared with
`keep_prob * 2**24`. The Pallas kernel recomputes it per block from indices (nothing of size
T x S is stored); the XLA attention path and the models' `Dropout` layers evaluate the same
function, so one key gives one attention mask whichever implementation runs (on one device).

Why not `jax.random.bernoulli`: threefry costs ~20 rounds per pair of words and the backward pass
recomputes it where XLA fuses the mask into a consumer; on a 2-core CPU it took ~6% of a BERT
train step. The hash costs one mix per element (the per-row part is shared by the whole row).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "DROPOUT_BITS",
    "attention_keep_mask",
    "dropout",
    "keep_bits",
    "keep_mask",
    "mix",
    "seed_of",
]

# The top 24 bits of the hash are compared with keep_prob * 2**24 (signed-safe after the shift).
DROPOUT_BITS = 24


def _to_i32(c: int) -> int:
    """The int32 with the same bits as uint32 constant `c` (kernels use int32 arithmetic)."""
    return c - (1 << 32) if c >= (1 << 31) else c


def mix(x: jax.Array) -> jax.Array:
    """lowbias32 integer finaliser (C. Wellons): a bijection on 32 bits with good avalanche."""
    x = x ^ lax.shift_right_logical(x, jnp.int32(16))
    x = x * jnp.int32(_to_i32(0x7FEB352D))
    x = x ^ lax.shift_right_logical(x, jnp.int32(15))
    x = x * jnp.int32(_to_i32(0x846CA68B))
    return x ^ lax.shift_right_logical(x, jnp.int32(16))


def keep_bits(
    seed: jax.Array, stream: jax.Array, rows: jax.Array, cols: jax.Array, rate: float
) -> jax.Array:
    """Boolean keep mask (True = keep, probability 1 - rate) for int32 index arrays: int32 ops only.

    `stream` separates independent masks under one seed (the kernel uses batch x heads + head);
    the arrays broadcast against each other.
    """
    stream = mix(seed ^ mix((stream + 1) * jnp.int32(_to_i32(0x9E3779B9))))
    x = mix(stream ^ (rows * jnp.int32(_to_i32(0x85EBCA6B))))
    x = mix(x ^ (cols * jnp.int32(_to_i32(0xC2B2AE35))))
    threshold = int(round((1.0 - rate) * (1 << DROPOUT_BITS)))
    return lax.shift_right_logical(x, jnp.int32(32 - DROPOUT_BITS)) < threshold


def seed_of(seed_or_rng: jax.Array | int) -> jax.Array:
    """int32 scalar seed from a PRNG key (typed or raw uint32[2]) or an integer."""
    if isinstance(seed_or_rng, int):
        return jnp.asarray(_to_i32(seed_or_rng & 0xFFFFFFFF), jnp.int32)
    x = jnp.asarray(seed_or_rng)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.ndim >= 1):
        x = jax.random.bits(x, (), jnp.uint32)
    return lax.bitcast_convert_type(x.astype(jnp.uint32), jnp.int32) if x.dtype != jnp.int32 else x


def attention_keep_mask(
    seed_or_rng: jax.Array | int, batch: int, heads: int, q_len: int, kv_len: int, rate: float
) -> jax.Array:
    """The attention keep mask `[B, N, T, S]` (True = keep), as the flash kernel draws it."""
    seed = seed_of(seed_or_rng)
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]
    rows = jnp.arange(q_len, dtype=jnp.int32)[None, None, :, None]
    cols = jnp.arange(kv_len, dtype=jnp.int32)[None, None, None, :]
    return keep_bits(seed, b * heads + h, rows, cols, rate)


def keep_mask(seed_or_rng: jax.Array | int, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A keep mask of any shape: rows are the flattened leading dims, columns the last dim."""
    rows = jnp.arange(math.prod(shape[:-1]), dtype=jnp.int32)[:, None]
    cols = jnp.arange(shape[-1] if shape else 1, dtype=jnp.int32)[None, :]
    return keep_bits(seed_of(seed_or_rng), jnp.int32(0), rows, cols, rate).reshape(shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout of `x`: zero with probability `rate`, else scale by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = keep_mask(rng, x.shape, rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
