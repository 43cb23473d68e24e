"""Counter-based dropout masks: rates, independence, determinism, one mask for both paths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxgen.kernels import dropout, reference
from jaxgen.models.layers import Dropout


def _sigmas(observed: float, p: float, n: int) -> float:
    """How many binomial standard deviations `observed` is from `p` over `n` draws."""
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_fraction_matches_rate(rate):
    """Over 1M elements the kept fraction is 1 - rate within 5 standard deviations."""
    mask = np.asarray(dropout.keep_mask(jax.random.key(0), (32, 128, 256), rate))
    assert mask.shape == (32, 128, 256) and mask.dtype == bool
    assert _sigmas(mask.mean(), 1 - rate, mask.size) < 5


def test_attention_mask_differs_across_seeds_batches_and_heads():
    """The attention keep mask keeps ~(1 - rate) of entries and differs across seeds, batches and
    heads."""
    rate = 0.1
    mask = np.asarray(dropout.attention_keep_mask(jax.random.key(0), 2, 3, 128, 256, rate))
    assert _sigmas(mask.mean(), 1 - rate, mask.size) < 5
    assert not np.array_equal(mask[0, 0], mask[1, 0])
    assert not np.array_equal(mask[0, 0], mask[0, 1])
    other = np.asarray(dropout.attention_keep_mask(jax.random.key(1), 2, 3, 128, 256, rate))
    assert 0.1 < np.mean(mask != other) < 0.3  # independent masks disagree on ~2 * 0.1 * 0.9
    np.testing.assert_array_equal(
        mask, dropout.attention_keep_mask(jax.random.key(0), 2, 3, 128, 256, rate)
    )


def test_neighbours_and_seeds_are_independent():
    """Adjacent columns, adjacent rows and two keys give keep bits that look independent."""
    rate, shape = 0.5, (512, 512)
    mask = np.asarray(dropout.keep_mask(jax.random.key(3), shape, rate))
    other = np.asarray(dropout.keep_mask(jax.random.key(4), shape, rate))
    # Pairs (a, b) of independent fair bits agree with probability 1/2.
    pairs = {
        "columns": (mask[:, :-1], mask[:, 1:]),
        "rows": (mask[:-1], mask[1:]),
        "keys": (mask, other),
        "transposed": (mask, mask.T),
    }
    for name, (a, b) in pairs.items():
        assert _sigmas(np.mean(a == b), 0.5, a.size) < 5, name
    # Each row keeps its own pattern: no two rows of 512 fair bits coincide by chance.
    assert len({row.tobytes() for row in mask}) == shape[0]


def test_same_key_same_mask_and_shape_only_reshapes():
    """A mask is a function of (key, element index): deterministic, and [B, T, D] = [B*T, D]."""
    key = jax.random.key(11)
    a = dropout.keep_mask(key, (4, 8, 16), 0.2)
    np.testing.assert_array_equal(a, dropout.keep_mask(key, (4, 8, 16), 0.2))
    np.testing.assert_array_equal(a.reshape(32, 16), dropout.keep_mask(key, (32, 16), 0.2))
    # An integer seed and a raw uint32[2] key work too (the kernel's seed input).
    np.testing.assert_array_equal(
        dropout.keep_mask(jax.random.key_data(key), (32, 16), 0.2), a.reshape(32, 16)
    )
    assert dropout.keep_mask(5, (3,), 0.5).shape == (3,)


def test_dropout_zeroes_or_scales_and_keeps_the_mean():
    """Every output is 0 or x / (1 - rate); the mean over many elements is unchanged."""
    rate = 0.25
    x = jnp.ones((256, 1024), jnp.float32)
    y = np.asarray(dropout.dropout(x, rate, jax.random.key(1)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / (1 - rate))}
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(rate / (1 - rate) / y.size)
    np.testing.assert_array_equal(dropout.dropout(x, 0.0, jax.random.key(1)), x)
    np.testing.assert_array_equal(dropout.dropout(x, 1.0, jax.random.key(1)), 0 * x)
    half = dropout.dropout(x.astype(jnp.bfloat16), 0.5, jax.random.key(1))
    assert half.dtype == jnp.bfloat16


def test_layer_matches_flax_dropout_interface():
    """The layer passes through when deterministic, needs a 'dropout' rng otherwise, and two
    layers in one module draw different masks from one key."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic):
            return Dropout(0.5)(x, deterministic), Dropout(0.5, deterministic=deterministic)(x)

    x = jnp.ones((8, 64))
    same = Two().apply({}, x, True)
    np.testing.assert_array_equal(same[0], x)
    np.testing.assert_array_equal(same[1], x)
    a, b = Two().apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    assert not np.array_equal(a, b)
    again, _ = Two().apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(a, again)
    with pytest.raises(Exception, match="dropout"):
        Two().apply({}, x, False)


def test_xla_attention_draws_the_flash_kernels_mask():
    """Given a key, the XLA path applies exactly `attention_keep_mask` (the kernel's mask)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, 3, 8), np.float32)) for _ in range(3))
    key, rate = jax.random.key(9), 0.2
    drawn = reference.attention(q, k, v, dropout_rate=rate, dropout_rng=key)
    mask = dropout.attention_keep_mask(key, 2, 3, 24, 24, rate)
    fed = reference.attention(q, k, v, dropout_rate=rate, dropout_mask=mask)
    np.testing.assert_array_equal(drawn, fed)
    plain = reference.attention(q, k, v)
    assert not np.allclose(drawn, plain, atol=1e-3)


def test_sharded_mask_equals_unsharded():
    """Under jit with the output split over 8 devices, each shard holds its slice of the mask."""
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    key = jax.random.key(2)
    sharded = jax.jit(lambda k: dropout.keep_mask(k, (16, 64), 0.3), out_shardings=sharding)(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(sharded, dropout.keep_mask(key, (16, 64), 0.3))
