"""BERT: shapes, dtypes, the gathered MLM head, padding invariance, remat, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.models.tiny_models import BF16_RTOL, F32_ATOL, apply_fn, model
from tests.models.tiny_models import module as build_module

B, T, V = 2, 8, 100


def _inputs(length: int = T):
    ids = jax.random.randint(jax.random.key(3), (B, length), 5, V)
    segments = jnp.broadcast_to((jnp.arange(length) >= length // 2).astype(jnp.int32), (B, length))
    return ids, segments, jnp.ones((B, length), jnp.int32)


def test_output_shapes_and_dtypes():
    module, params = model("bert")
    ids, segments, mask = _inputs()
    out = apply_fn(module)(params, ids, segments, mask, jnp.zeros((B, 3), jnp.int32))
    assert out["mlm_logits"].shape == (B, 3, V) and out["mlm_logits"].dtype == jnp.float32
    assert out["nsp_logits"].shape == (B, 2) and out["nsp_logits"].dtype == jnp.float32
    out = apply_fn(module)(params, ids, segments, mask)
    assert out["mlm_logits"].shape == (B, T, V)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_masked_head_equals_gathered_full_logits(scan_layers):
    # Given masked positions, an unrolled stack's last layer computes only [CLS] and those rows;
    # a scanned one gathers them after the stack. Both equal the full pass at those rows.
    module, params = model("bert", scan_layers=scan_layers)
    ids, segments, mask = _inputs()
    mask = mask.at[1, 6:].set(0)  # padded keys are still left out of the rows' attention
    positions = jnp.array([[1, 4, 6], [0, 5, 5]], jnp.int32)
    gathered = apply_fn(module)(params, ids, segments, mask, positions)
    full = apply_fn(module)(params, ids, segments, mask)
    want = jnp.take_along_axis(full["mlm_logits"], positions[:, :, None], axis=1)
    np.testing.assert_allclose(gathered["mlm_logits"], want, atol=F32_ATOL)
    np.testing.assert_allclose(gathered["nsp_logits"], full["nsp_logits"], atol=F32_ATOL)


def test_padding_does_not_change_real_tokens():
    module, params = model("bert")
    ids, segments, mask = _inputs()
    real = 5
    mask = mask.at[:, real:].set(0)
    apply = apply_fn(module)
    out = apply(params, ids, segments, mask)
    other_pad = apply(params, ids.at[:, real:].set(0), segments.at[:, real:].set(0), mask)
    unpadded = apply(params, ids[:, :real], segments[:, :real], mask[:, :real])
    for got in (other_pad, unpadded):
        np.testing.assert_allclose(
            out["mlm_logits"][:, :real], got["mlm_logits"][:, :real], atol=F32_ATOL
        )
        np.testing.assert_allclose(out["nsp_logits"], got["nsp_logits"], atol=F32_ATOL)


def test_bfloat16_compute_keeps_float32_params():
    module32, params = model("bert")
    module16 = build_module("bert", dtype="bfloat16")
    ids, segments, mask = _inputs()
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(params))} == {jnp.dtype("float32")}
    want = apply_fn(module32)(params, ids, segments, mask)
    got = apply_fn(module16)(params, ids, segments, mask)
    for key in ("mlm_logits", "nsp_logits"):
        assert got[key].dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(want[key])))
        np.testing.assert_allclose(got[key], want[key], atol=BF16_RTOL * scale)


def test_dropout_needs_rng_and_remat_matches():
    module, params = model("bert")
    remat_module = build_module("bert", remat=True)
    ids, segments, mask = _inputs()
    rngs = {"dropout": jax.random.key(7)}
    apply = jax.jit(
        lambda m, p, r: m.apply(
            {"params": nn.meta.unbox(p)}, ids, segments, mask, deterministic=False, rngs=r
        ),
        static_argnums=0,
    )
    a = apply(module, params, rngs)
    b = apply(remat_module, params, rngs)
    np.testing.assert_allclose(a["mlm_logits"], b["mlm_logits"], atol=F32_ATOL)
    det = apply_fn(module)(params, ids, segments, mask)
    assert not np.allclose(a["mlm_logits"], det["mlm_logits"], atol=1e-3)


def test_too_long_input_raises():
    module, params = model("bert")
    ids, segments, mask = _inputs(length=25)
    with pytest.raises(ValueError, match="exceeds model.max_len=24"):
        module.apply({"params": nn.meta.unbox(params)}, ids, segments, mask)
