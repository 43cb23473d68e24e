"""GPT: shapes, causal mask, packed documents, KV-cache equivalence, init scaling, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.models.tiny_models import BF16_RTOL, F32_ATOL, apply_fn, model
from tests.models.tiny_models import module as build_module

B, T, V = 2, 8, 100


def _ids(length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(5), (B, length), 0, V)


@functools.partial(jax.jit, static_argnums=(0, 3))
def cached_logits(module: nn.Module, params, ids: jax.Array, prefill: int) -> jax.Array:
    """Logits `[B, T, V]` through the KV cache: `prefill` tokens at once, then one per step."""
    params = nn.meta.unbox(params)
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, positions, decode=True))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def run(cache, tokens, pos):
        logits, mutated = module.apply(
            {"params": params, "cache": cache}, tokens, pos, decode=True, mutable=["cache"]
        )
        return mutated["cache"], logits

    cache, first = run(cache, ids[:, :prefill], positions[:, :prefill])

    def step(cache, t):
        tokens = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)  # [B, 1]
        cache, logits = run(cache, tokens, jnp.full((batch, 1), t))
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, jnp.arange(prefill, length))  # [T - prefill, B, V]
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)


def test_output_shape_dtype_and_bfloat16():
    module, params = model("gpt")
    ids = _ids()
    logits = apply_fn(module)(params, ids)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    got = apply_fn(build_module("gpt", dtype="bfloat16"))(params, ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, logits, atol=BF16_RTOL * float(jnp.max(jnp.abs(logits))))


def test_changing_a_future_token_never_changes_earlier_logits():
    module, params = model("gpt")
    ids = _ids()
    logits = apply_fn(module)(params, ids)
    for j in (3, 7):
        changed = apply_fn(module)(params, ids.at[:, j].set((ids[:, j] + 1) % V))
        np.testing.assert_allclose(logits[:, :j], changed[:, :j], atol=F32_ATOL)
        assert not np.allclose(logits[:, j], changed[:, j], atol=1e-4)


def test_packed_documents_do_not_see_each_other():
    module, params = model("gpt")
    ids = _ids()
    segments = jnp.array([[1] * 5 + [2] * 3] * B, jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(3))] * B, jnp.int32)
    packed = apply_fn(module)(params, ids, positions, segments)
    # Each document alone, padded to the same length (segment 0 = padding).
    alone_a = apply_fn(module)(params, ids, positions, jnp.where(segments == 1, 1, 0))
    second = jnp.concatenate([ids[:, 5:], ids[:, :5]], axis=1)
    alone_b = apply_fn(module)(
        params,
        second,
        jnp.broadcast_to(jnp.arange(T), (B, T)),
        (jnp.arange(T) < 3)[None].repeat(B, 0),
    )
    np.testing.assert_allclose(packed[:, :5], alone_a[:, :5], atol=F32_ATOL)
    np.testing.assert_allclose(packed[:, 5:], alone_b[:, :3], atol=F32_ATOL)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_position": "post"}, {"sparse_attention": "alternating", "local_window": 3}],
    ids=["pre", "post", "alternating"],
)
def test_kv_cache_matches_full_forward(overrides):
    _, params = model("gpt", **({"norm_position": "post"} if "norm_position" in overrides else {}))
    module = build_module("gpt", **overrides)
    ids = _ids()
    want = apply_fn(module)(params, ids)
    got = cached_logits(module, params, ids, 3)
    np.testing.assert_allclose(got, want, atol=F32_ATOL)


def test_residual_projection_init_scaled_for_pre_ln():
    for norm_position, factor in (("pre", 0.5), ("post", 1.0)):  # 1/sqrt(2 * 2 layers)
        _, params = model("gpt", **({} if norm_position == "pre" else {"norm_position": "post"}))
        layer = nn.meta.unbox(params)["layers_1"]
        for kernel in (layer["attention"]["out"]["kernel"], layer["mlp"]["wo"]["kernel"]):
            assert float(jnp.std(kernel)) == pytest.approx(0.02 * factor, rel=0.15)
        assert float(jnp.std(layer["attention"]["query"]["kernel"])) == pytest.approx(
            0.02, rel=0.15
        )


def test_validation_errors():
    module, params = model("gpt")
    variables = {"params": nn.meta.unbox(params)}
    with pytest.raises(ValueError, match="exceeds model.max_len=24"):
        module.apply(variables, jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be"):
        module.apply(variables, jnp.zeros((1, 4), jnp.int32), None, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        module.apply(variables, jnp.zeros((1, 4), jnp.int32), decode=True, mutable=["cache"])
