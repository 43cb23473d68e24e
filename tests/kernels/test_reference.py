"""The XLA reference attention (the kernel's oracle) against plain numpy and T5's bucket values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.kernels import reference


def _numpy_attention(q, k, v, mask, bias=None):
    """float64 softmax attention `[B, T, N, H]` under a `[B, 1, T, S]` mask; empty rows give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits = np.where(mask, logits, -np.inf)
    peak = np.max(logits, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.exp(logits - peak)
    total = weights.sum(-1, keepdims=True)
    probs = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def test_matches_numpy_with_causal_segments_and_bias():
    """Causal + packed segments + bias equals a float64 numpy softmax, empty rows included."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8), np.float32)) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, 3, 9, 9), np.float32))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    out = reference.attention(q, k, v, causal=True, segment_ids=seg, kv_segment_ids=seg, bias=bias)
    causal = np.tril(np.ones((9, 9), bool))[None, None]
    same = (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]) & (
        np.asarray(seg)[:, None, :] != 0
    )
    want = _numpy_attention(q, k, v, causal & same[:, None], bias)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[0, 7:] == 0.0)  # padding rows see no key


def test_relative_position_buckets_match_t5_values():
    """Bucket ids at hand-computed points of T5's bucket function (32 buckets, max distance 128)."""
    rel = jnp.asarray([0, -1, 1, -7, -8, -200, 200, 7], jnp.int32)  # key_pos - query_pos
    bidirectional = reference.relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(bidirectional, [0, 1, 17, 7, 8, 15, 31, 23])
    causal = reference.relative_position_bucket(
        jnp.asarray([0, 5, -3, -15, -16, -1000], jnp.int32),
        bidirectional=False,
        num_buckets=32,
        max_distance=128,
    )
    np.testing.assert_array_equal(causal, [0, 0, 3, 15, 16, 31])


def test_relative_bias_gradient_reaches_table():
    """The materialised relative bias is differentiable in its table (the kernel's target)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 8), np.float32)) for _ in range(3))

    def loss(table):
        rel = reference.RelativePositionBias(table, True, 32, 128)
        return jnp.sum(reference.attention(q, k, v, relative_bias=rel) ** 2)

    grad = jax.grad(loss)(jnp.zeros((32, 2)))
    used = np.unique(np.asarray(reference.relative_position_bucket(
        jnp.arange(5)[None] - jnp.arange(5)[:, None], bidirectional=True, num_buckets=32,
        max_distance=128,
    )))  # fmt: skip
    unused = np.setdiff1d(np.arange(32), used)
    assert np.all(np.asarray(grad)[unused] == 0.0) and np.any(np.asarray(grad)[used] != 0.0)


def test_dropout_mask_scales_kept_probabilities():
    """An all-keep dropout mask only rescales by 1 / (1 - rate); an all-drop mask gives zeros."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 1, 8), np.float32)) for _ in range(3))
    base = reference.attention(q, k, v)
    keep = jnp.ones((1, 1, 4, 4), bool)
    scaled = reference.attention(q, k, v, dropout_rate=0.2, dropout_mask=keep)
    np.testing.assert_allclose(scaled, base / 0.8, rtol=1e-6, atol=1e-7)
    dropped = reference.attention(q, k, v, dropout_rate=0.2, dropout_mask=~keep)
    assert np.all(np.asarray(dropped) == 0.0)


def test_window_and_offset_masks_equal_a_dense_bias():
    """window / q_offset from positions give what an explicit [T, S] bias would (the old path)."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((32, 2)), jnp.float32)
    rel = reference.RelativePositionBias(table, bidirectional=False)
    offset, window = 6, 4
    q_pos = offset + np.arange(5)[:, None]
    k_pos = np.arange(12)[None, :]
    visible = (k_pos <= q_pos) & (k_pos > q_pos - window)
    dense = np.where(visible, 0.0, -1e9)[None, None] + np.asarray(
        table[reference.relative_position_bucket(
            jnp.asarray(k_pos - q_pos), bidirectional=False, num_buckets=32, max_distance=128
        )]
    ).transpose(2, 0, 1)[None]  # fmt: skip
    want = reference.attention(q, k, k, bias=jnp.asarray(dense, jnp.float32))
    for q_offset in (offset, jnp.int32(offset)):
        got = jax.jit(
            lambda q, k, o: reference.attention(
                q, k, k, causal=True, window=window, q_offset=o, relative_bias=rel
            )
        )(q, k, q_offset)
        np.testing.assert_allclose(got, want, atol=1e-6)
