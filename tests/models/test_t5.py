"""T5: shapes, tied/untied heads, decoder causality, encoder padding, KV-cache equivalence, init."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.models.tiny_models import BF16_RTOL, F32_ATOL, apply_fn, model
from tests.models.tiny_models import module as build_module

B, S, T, V = 2, 8, 5, 100
V11 = {"feed_forward": "gated-gelu", "tie_embeddings": False}


def _inputs():
    enc = jax.random.randint(jax.random.key(1), (B, S), 2, V)
    dec = jax.random.randint(jax.random.key(2), (B, T), 2, V)
    enc_mask = jnp.array([[1] * S, [1] * 6 + [0] * 2], jnp.int32)
    return enc, dec, enc_mask, jnp.ones((B, T), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def cached_logits(module: nn.Module, params, enc, dec, enc_mask) -> jax.Array:
    """Decoder logits `[B, T, V]` computed one token at a time through the KV cache."""
    variables = {"params": nn.meta.unbox(params)}
    encoded = module.apply(variables, enc, enc_mask, method="encode")
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), encoded, dec, enc_mask, decode=True, method="decode")
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def step(cache, t):
        token = jax.lax.dynamic_slice_in_dim(dec, t, 1, axis=1)  # [B, 1]
        logits, mutated = module.apply(
            {**variables, "cache": cache},
            encoded,
            token,
            enc_mask,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return mutated["cache"], logits[:, 0]

    _, logits = jax.lax.scan(step, cache, jnp.arange(dec.shape[1]))  # [T, B, V]
    return jnp.swapaxes(logits, 0, 1)


def test_shapes_heads_and_bfloat16():
    module, params = model("t5")
    enc, dec, enc_mask, dec_mask = _inputs()
    logits = apply_fn(module)(params, enc, dec, enc_mask, dec_mask)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    assert "lm_head" not in params
    got = apply_fn(build_module("t5", dtype="bfloat16"))(params, enc, dec, enc_mask, dec_mask)
    np.testing.assert_allclose(got, logits, atol=BF16_RTOL * float(jnp.max(jnp.abs(logits))))
    _, params11 = model("t5", **V11)
    assert params11["lm_head"]["kernel"].value.shape == (32, V)
    assert set(params11["encoder"]["layers_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}


def test_decoder_is_causal_and_encoder_padding_is_ignored():
    module, params = model("t5")
    enc, dec, enc_mask, dec_mask = _inputs()
    apply = apply_fn(module)
    logits = apply(params, enc, dec, enc_mask, dec_mask)
    changed = apply(params, enc, dec.at[:, 3].set(0), enc_mask, dec_mask)
    np.testing.assert_allclose(logits[:, :3], changed[:, :3], atol=F32_ATOL)
    assert not np.allclose(logits[:, 3], changed[:, 3], atol=1e-4)
    other_pad = apply(params, enc.at[1, 6:].set(7), dec, enc_mask, dec_mask)
    np.testing.assert_allclose(logits, other_pad, atol=F32_ATOL)


@pytest.mark.parametrize("overrides", [{}, V11], ids=["v1.0-tied", "v1.1-untied"])
def test_kv_cache_matches_full_forward(overrides):
    module, params = model("t5", **overrides)
    enc, dec, enc_mask, _ = _inputs()
    want = apply_fn(module)(params, enc, dec, enc_mask)
    got = cached_logits(module, params, enc, dec, enc_mask)
    np.testing.assert_allclose(got, want, atol=F32_ATOL)


def test_mesh_tf_init_scales():
    _, params = model("t5", **V11)
    p = nn.meta.unbox(params)
    d, h, n, f = 32, 16, 2, 64
    attn = p["decoder"]["layers_0"]["self_attention"]
    mlp = p["encoder"]["layers_0"]["mlp"]
    for leaf, std in (
        (attn["query"]["kernel"], (d * h) ** -0.5),
        (attn["key"]["kernel"], d**-0.5),
        (attn["out"]["kernel"], (n * h) ** -0.5),
        (mlp["wi_0"]["kernel"], d**-0.5),
        (mlp["wo"]["kernel"], f**-0.5),
        (p["token_embed"]["embedding"], 1.0),
    ):
        assert float(jnp.std(leaf)) == pytest.approx(std, rel=0.15)
