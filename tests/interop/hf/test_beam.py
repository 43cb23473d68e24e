"""Beam search gives HF `generate(num_beams=4)`'s tokens on converted GPT-2 and T5 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxgen import models, sample
from jaxgen.interop import hf
from tests.interop.hf.conftest import save, t5_model
from tests.interop.hf.test_names import _long

torch.set_grad_enabled(False)


def _hf_beams(reference, **inputs) -> np.ndarray:
    """HF's beam search without length normalisation (t5x's alpha 0)."""
    return reference.generate(**inputs, num_beams=4, do_sample=False, length_penalty=0.0,
                              early_stopping=False).numpy()  # fmt: skip


@pytest.mark.parametrize("eos", [None, "frequent"])
def test_gpt_beam_search_equals_hf(gpt_dir, eos):
    path, reference = gpt_dir
    config, params = hf.load(path)
    module = models.build(config.model)
    prompt = np.random.default_rng(5).integers(0, 99, (3, 4)).astype(np.int32)
    greedy = np.asarray(
        sample.sample_gpt(module, params, prompt, max_new_tokens=12, temperature=0.0)
    )
    # An end token some beams reach: the most frequent greedy continuation token.
    eos_id = None if eos is None else int(np.bincount(greedy[:, 4:].ravel()).argmax())
    # pad 98, not 0: HF fills finished beams with `pad_token_id or eos_token_id`, and 0 is falsy.
    kwargs = {} if eos_id is None else {"eos_token_id": eos_id, "pad_token_id": 98}
    want = _hf_beams(reference, input_ids=_long(prompt),
                     attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                     max_new_tokens=12, **kwargs)  # fmt: skip
    got = np.asarray(sample.beam_search_gpt(module, params, prompt, max_new_tokens=12,
                                            num_beams=4, eos_id=eos_id, pad_id=98))  # fmt: skip
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == 98).all()
    assert eos_id is None or (want == eos_id).any()  # the end token did end beams


def test_t5_beam_search_equals_hf(tmp_path):
    reference = t5_model("v1.1", seed=1)  # a seed whose beams end at different lengths
    config, params = hf.load(save(reference, tmp_path / "hf"))
    module = models.build(config.model)
    rng = np.random.default_rng(6)
    enc = rng.integers(2, 99, (3, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 7], np.int32)
    enc[1, 5:] = 0
    # use_cache=False: transformers' T5 cache breaks when the two stacks differ in depth.
    want = _hf_beams(reference, input_ids=_long(enc), attention_mask=_long(mask),
                     max_new_tokens=10, use_cache=False, pad_token_id=98)[:, 1:]  # fmt: skip
    got = sample.beam_search_t5(module, params, enc, mask, max_decode_len=10, num_beams=4,
                                decoder_start_id=0, eos_id=1, pad_id=98)  # fmt: skip
    got = np.asarray(got)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == 98).all()
    assert (want == 1).any() and (want == 98).any()  # a beam ended with eos before the last step


def test_one_beam_is_greedy_and_bad_settings_are_named(gpt_dir):
    path, _ = gpt_dir
    config, params = hf.load(path)
    module = models.build(config.model)
    prompt = np.array([[5, 6, 7]], np.int32)
    greedy = sample.sample_gpt(module, params, prompt, max_new_tokens=6, temperature=0.0)
    beam = sample.beam_search_gpt(module, params, prompt, max_new_tokens=6, num_beams=1)
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        sample.beam_search_gpt(module, params, prompt, max_new_tokens=6, num_beams=0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        sample.beam_search_gpt(module, params, prompt, max_new_tokens=6, alpha=-1.0)


def test_brevity_penalty_is_t5xs():
    import jax.numpy as jnp

    np.testing.assert_allclose(sample.brevity(jnp.array([1, 7]), 0.6), [1.0, 2.0**0.6], rtol=1e-6)
    np.testing.assert_allclose(sample.brevity(jnp.array([3]), 0.0), [1.0])


def test_scanned_model_beams_as_the_unrolled_one(gpt_dir):
    """The cache reorder takes beams along the rows axis of stacked caches too."""
    import dataclasses

    from jaxgen.models import scan

    path, _ = gpt_dir
    config, params = hf.load(path)
    scanned = dataclasses.replace(config.model, scan_layers=True)
    prompt = np.random.default_rng(7).integers(0, 99, (2, 4)).astype(np.int32)
    want = sample.beam_search_gpt(models.build(config.model), params, prompt, max_new_tokens=8)
    got = sample.beam_search_gpt(models.build(scanned), scan.stack_layers(params, scanned), prompt,
                                 max_new_tokens=8)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
