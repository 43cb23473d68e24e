"""Sampling: GPT with a KV cache, T5 decoding, BERT Gibbs sampling; determinism and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import sample
from tests.models.tiny_models import apply_fn, model

PROMPT = np.array([[5, 17, 42], [9, 3, 77]], np.int32)
MASK_ID = M = 4


def test_choose_tokens_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 64)
    pick = jax.jit(
        jax.vmap(
            lambda k, x, p, kk: sample.choose_tokens(k, x[None], 1.0, kk, p)[0],
            in_axes=(0, 0, None, None),
        )
    )
    assert set(np.asarray(pick(keys, logits, 1.0, 2))) <= {0, 1}
    assert set(np.asarray(pick(keys, logits, 0.7, 0))) <= {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(np.asarray(pick(keys, logits, 0.5, 0))) == {0}
    assert set(np.asarray(pick(keys, logits, 1.0, 0))) == {0, 1, 2, 3}
    greedy = sample.choose_tokens(keys[0], logits[:2], 0.0, 0, 1.0)
    np.testing.assert_array_equal(greedy, [0, 0])


def test_gpt_greedy_is_argmax_of_full_forward_and_deterministic():
    module, params = model("gpt")
    out = sample.sample_gpt(module, params, PROMPT, max_new_tokens=5, temperature=0.0)
    assert out.shape == (2, 8) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :3], PROMPT)
    logits = apply_fn(module)(params, out)
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], axis=-1))
    again = sample.sample_gpt(module, params, PROMPT, max_new_tokens=5, temperature=0.0)
    np.testing.assert_array_equal(out, again)
    top1 = sample.sample_gpt(module, params, PROMPT, max_new_tokens=5, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(out, top1)


def test_gpt_sampling_seeds_and_eos():
    module, params = model("gpt")
    kwargs = dict(max_new_tokens=5, temperature=1.5, top_p=0.95)
    a = sample.sample_gpt(module, params, PROMPT, seed=1, **kwargs)
    b = sample.sample_gpt(module, params, PROMPT, seed=1, **kwargs)
    c = sample.sample_gpt(module, params, PROMPT, seed=2, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    eos = int(a[0, 5])
    d = sample.sample_gpt(module, params, PROMPT, seed=1, eos_id=eos, **kwargs)
    np.testing.assert_array_equal(d[0, :6], a[0, :6])
    assert np.all(np.asarray(d[0, 5:]) == eos)


def test_gpt_errors():
    module, params = model("gpt")
    with pytest.raises(ValueError, match="prompt is empty"):
        sample.sample_gpt(module, params, np.zeros((1, 0), np.int32), max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds the model's context max_len=24"):
        sample.sample_gpt(module, params, np.zeros((1, 20), np.int32), max_new_tokens=5)
    with pytest.raises(ValueError, match=r"ids outside \[0, 100\)"):
        sample.sample_gpt(module, params, PROMPT + 50, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        sample.sample_gpt(module, params, PROMPT, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample.sample_gpt(module, params, PROMPT, max_new_tokens=3, top_p=0.0)


def test_t5_greedy_matches_full_forward_and_sampling_is_seeded():
    module, params = model("t5")
    enc = np.array([[8, 9, 10, 11, 12, 1, 0, 0], [20, 21, 22, 23, 24, 25, 26, 1]], np.int32)
    mask = (enc != 0).astype(np.int32)
    out = sample.decode_t5(module, params, enc, mask, max_decode_len=5, eos_id=None, temperature=0)
    assert out.shape == (2, 5) and out.dtype == jnp.int32
    dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), out[:, :-1]], axis=1)
    logits = apply_fn(module)(params, enc, dec_in, mask, jnp.ones_like(dec_in))
    np.testing.assert_array_equal(out, jnp.argmax(logits, axis=-1))
    kwargs = dict(max_decode_len=5, temperature=1.0, eos_id=None)
    a = sample.decode_t5(module, params, enc, mask, seed=3, **kwargs)
    np.testing.assert_array_equal(a, sample.decode_t5(module, params, enc, mask, seed=3, **kwargs))
    eos = int(out[0, 1])
    e = sample.decode_t5(module, params, enc, mask, max_decode_len=5, eos_id=eos, temperature=0)
    assert e[0, 1] == eos and np.all(np.asarray(e[0, 2:]) == 0)


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_bert_gibbs_fills_only_free_positions(order):
    module, params = model("bert")
    ids = np.array([[2, M, M, 30, M, 3, 0, 0], [2, M, M, M, M, M, M, 3]])
    kwargs = dict(mask_id=MASK_ID, order=order, num_sweeps=2, top_k=10, banned_ids=(0, 2, 3))
    out = np.asarray(sample.gibbs_bert(module, params, ids, seed=0, **kwargs))
    free = ids == MASK_ID
    np.testing.assert_array_equal(out[~free], ids[~free])
    assert not np.isin(out[free], [MASK_ID, 0, 2, 3]).any()
    again = sample.gibbs_bert(module, params, ids, seed=0, **kwargs)
    np.testing.assert_array_equal(out, again)


def test_bert_gibbs_greedy_sequential_is_argmax_and_errors():
    module, params = model("bert")
    # One free position: every sweep puts the argmax of its MLM distribution there.
    ids = np.array([[2, 8, M, 9, 10, 11, 12, 3]] * 2)
    out = sample.gibbs_bert(module, params, ids, mask_id=M, num_sweeps=2, temperature=0.0)
    zeros, ones = np.zeros_like(ids), np.ones_like(ids)
    logits = apply_fn(module)(params, ids, zeros, ones)["mlm_logits"]
    np.testing.assert_array_equal(out[:, 2], jnp.argmax(logits[:, 2].at[:, M].set(-jnp.inf), -1))
    with pytest.raises(ValueError, match="exceeds the model's max_len=24"):
        sample.gibbs_bert(module, params, np.full((1, 30), MASK_ID), mask_id=MASK_ID)
    with pytest.raises(ValueError, match="order"):
        sample.gibbs_bert(module, params, ids, mask_id=MASK_ID, order="random")
