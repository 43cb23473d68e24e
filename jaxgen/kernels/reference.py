"""Plain-XLA attention: the fallback implementation and the oracle the Pallas kernel is tested on.

Shapes use the letters of `jaxgen.models.layers`: B batch, T query length, S key length, N heads,
H head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen.kernels.dropout import attention_keep_mask

# Large but finite so that fully masked rows never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class RelativePositionBias(NamedTuple):
    """A T5 relative-position bias table and the bucket settings that index it."""

    table: jax.Array  # [num_buckets, N]
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """Maps `key_pos - query_pos` to T5 buckets: exact when small, log-spaced up to max_distance."""
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Clamp before the log so that n = 0 never reaches it; the small branch covers those entries.
    n_float = jnp.maximum(n, 1).astype(jnp.float32)
    val_if_large = max_exact + (
        jnp.log(n_float / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


def relative_bias_values(
    rel: RelativePositionBias, q_len: int, kv_len: int, q_offset: int | jax.Array = 0
) -> jax.Array:
    """Materialises a relative-position bias as `[1, N, T, S]` (the reference path only)."""
    context = q_offset + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    memory = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    buckets = relative_position_bucket(
        memory - context,
        bidirectional=rel.bidirectional,
        num_buckets=rel.num_buckets,
        max_distance=rel.max_distance,
    )  # [T, S]
    values = rel.table[buckets]  # [T, S, N]
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)  # [1, N, T, S]


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    window: int | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array | None:
    """Boolean `[B|1, 1, T, S]` mask of visible keys, or None when every key is visible.

    Query i sits at position `q_offset + i`, key j at j. causal: keys after the query are hidden;
    window: keys `window` or more positions before it are hidden (GPT-3's banded layers).
    """
    mask = None
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    if causal:
        mask = (q_pos >= k_pos)[None, None]
    if window is not None:
        band = (k_pos > q_pos - window)[None, None]
        mask = band if mask is None else mask & band
    if segment_ids is not None or kv_segment_ids is not None:
        if segment_ids is None or kv_segment_ids is None:
            raise ValueError(
                "segment_ids and kv_segment_ids must both be given for cross-attention"
            )
        seg = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
            kv_segment_ids[:, None, :] != 0
        )
        seg = seg[:, None]  # [B, 1, T, S]
        mask = seg if mask is None else mask & seg
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    bias: jax.Array | None = None,
    relative_bias: RelativePositionBias | None = None,
    window: int | None = None,
    q_offset: int | jax.Array = 0,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention of q `[B, T, N, H]` over k, v `[B, S, N, H]`; returns `[B, T, N, H]`.

    Accumulates in float32. Rows with no visible key return zeros. Masks and the relative bias
    place query i at position `q_offset + i` (decoding after a prompt); see `attention_mask`.
    `dropout_mask` (`[B, N, T, S]`, True = keep) overrides the mask drawn from `dropout_rng`, so
    tests can feed the kernel's own mask.
    """
    _, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    # Heads-major operands: XLA:CPU runs the two batched products of [B, N, T, H] arrays ~20%
    # faster (forward and backward) than the same einsums over [B, T, N, H] with implicit
    # transposes.
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, len, H]
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if relative_bias is not None:
        logits = logits + relative_bias_values(relative_bias, q_len, kv_len, q_offset)
    mask = attention_mask(
        q_len,
        kv_len,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        window=window,
        q_offset=q_offset,
    )
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S]
    if mask is not None:
        # A row with no visible key would otherwise attend uniformly to masked keys.
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    if dropout_mask is None and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        b, n, t, s = probs.shape  # the flash kernel's mask: one key, one mask, either path
        dropout_mask = attention_keep_mask(dropout_rng, b, n, t, s, dropout_rate)
    if dropout_mask is not None:
        probs = jnp.where(dropout_mask, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(
        "bnts,bnsh->bnth", probs.astype(v.dtype), vh, preferred_element_type=jnp.float32
    )
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
