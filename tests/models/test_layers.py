"""Shared layers: config, relative-position buckets, norms, banded attention, logical names."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxgen.kernels.attention import relative_position_bucket
from jaxgen.models.layers import LayerNorm, MultiHeadAttention, RMSNorm, layer_norm, rms_norm
from tests.models.tiny_models import F32_ATOL, model

LOGICAL_NAMES = {
    "batch",
    "length",
    "kv_length",
    "embed",
    "heads",
    "kv",
    "mlp",
    "vocab",
    "layers",
    None,
}


@functools.partial(jax.jit, static_argnums=1)
def _buckets(rel: jax.Array, bidirectional: bool) -> jax.Array:
    return relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
    )


def test_bidirectional_buckets_match_hand_computed():
    # 32 buckets split 16/16 by sign; exact below 8, then 8 + floor(log(n/8) / log(128/8) * 8), max
    # 15.
    rel = jnp.array([0, -1, 1, -7, -8, -16, -20, 20, -128, -200, 200])
    want = [0, 1, 17, 7, 8, 10, 10, 26, 15, 15, 31]
    got = _buckets(rel, True)
    np.testing.assert_array_equal(got, want)


def test_causal_buckets_match_hand_computed():
    # Future keys share bucket 0; exact below 16, then 16 + floor(log(n/16) / log(8) * 16), max 31.
    rel = jnp.array([1, 5, 0, -1, -15, -16, -20, -32, -200])
    want = [0, 0, 0, 1, 15, 16, 17, 21, 31]
    got = _buckets(rel, False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_every_param_has_logical_axis_names(family):
    _, params = model(family)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
        assert leaf.value.dtype == jnp.float32


def test_norms_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 3 + 1
    y = LayerNorm(1e-5).apply({"params": {"scale": np.ones(8), "bias": np.zeros(8)}}, x)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, want, atol=F32_ATOL)
    y = RMSNorm(1e-6).apply({"params": {"scale": np.full(8, 2.0)}}, x)
    want = 2 * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, want, atol=F32_ATOL)


def test_norm_gradients_match_autodiff_of_the_formula():
    """The hand-written norm backward passes equal autodiff of the plain expressions, in float64."""

    def plain_layer_norm(x, scale, bias):
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

    def plain_rms_norm(x, scale):
        return x / jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * scale

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 16)) * 3 + 1
    scale, bias, probe = rng.normal(size=16), rng.normal(size=16), rng.normal(size=(2, 5, 16))
    with jax.enable_x64():
        x, scale, bias, probe = (jnp.asarray(a, jnp.float64) for a in (x, scale, bias, probe))
        cases = [
            (lambda *a: layer_norm(*a, 1e-5), plain_layer_norm, (x, scale, bias)),
            (lambda *a: rms_norm(*a, 1e-6), plain_rms_norm, (x, scale)),
        ]
        for ours, plain, args in cases:
            argnums = tuple(range(len(args)))
            got = jax.grad(lambda *a, f=ours: jnp.sum(f(*a) * probe), argnums)(*args)
            want = jax.grad(lambda *a, f=plain: jnp.sum(f(*a) * probe), argnums)(*args)
            np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-12)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def test_local_window_hides_distant_keys():
    layer = MultiHeadAttention(2, 4, q_std=0.5, kv_std=0.5, out_std=0.5, impl="xla", local_window=3)
    x = jax.random.normal(jax.random.key(1), (1, 8, 8))
    params = jax.jit(lambda r: layer.init(r, x, causal=True))(jax.random.key(0, impl="unsafe_rbg"))
    apply = jax.jit(lambda x: layer.apply(params, x, causal=True))
    out, changed = apply(x), apply(x.at[:, 2].add(1.0))
    # Position 2 is visible to queries 2, 3, 4 only (window 3).
    np.testing.assert_allclose(out[:, :2], changed[:, :2], atol=F32_ATOL)
    np.testing.assert_allclose(out[:, 5:], changed[:, 5:], atol=F32_ATOL)
    assert not np.allclose(out[:, 2:5], changed[:, 2:5], atol=1e-3)


def _shapes(jaxpr: jax.extend.core.Jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value a jaxpr and its sub-jaxprs (scan, pjit, pallas, custom_vjp) make."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= _shapes(inner)
    return shapes


def test_banded_attention_builds_no_length_by_length_array():
    """GPT-3's local window reaches the flash kernel as a size: nothing [.., T, S] is built."""
    length = 40  # not a tile size: the kernel's (64, 64) tiles cannot be mistaken for [T, S]
    layer = MultiHeadAttention(
        2, 64, q_std=0.5, kv_std=0.5, out_std=0.5, impl="flash", local_window=8
    )
    x = jnp.zeros((1, length, 16))
    params = layer.init(jax.random.key(0), x, causal=True)

    def loss(params, x):
        return jnp.sum(layer.apply(params, x, causal=True))

    for fn in (loss, jax.grad(loss)):
        shapes = _shapes(jax.make_jaxpr(fn)(params, x).jaxpr)
        assert not {s for s in shapes if s[-2:] == (length, length)}, sorted(shapes)
    # The XLA path does build [B, N, T, S] logits: the check above can fail.
    xla = layer.clone(impl="xla")
    shapes = _shapes(jax.make_jaxpr(lambda p, x: xla.apply(p, x, causal=True))(params, x).jaxpr)
    assert (1, 2, length, length) in shapes
