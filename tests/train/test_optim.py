"""Learning-rate schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.train import optim


def schedule(**kw):
    base = dict(
        learning_rate=1e-4, schedule="linear", warmup_steps=10, decay_steps=0, final_lr_fraction=0.0
    )
    base.update(kw)
    return optim.make_schedule(base, num_steps=110)


def test_bert_linear_warmup_then_linear_decay_to_zero():
    s = schedule()
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-5)
    assert float(s(10)) == pytest.approx(1e-4)
    assert float(s(60)) == pytest.approx(5e-5)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-12)


def test_cosine_decays_to_final_fraction():
    s = schedule(schedule="cosine", final_lr_fraction=0.1)
    assert float(s(10)) == pytest.approx(1e-4)
    assert float(s(60)) == pytest.approx(0.55e-4, rel=1e-4)
    assert float(s(110)) == pytest.approx(1e-5, rel=1e-4)


def test_t5_inverse_square_root():
    s = optim.make_schedule(
        dict(learning_rate=0.01, schedule="rsqrt", warmup_steps=10_000), num_steps=2**19
    )
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(9_999)) == pytest.approx(0.01)
    assert float(s(40_000)) == pytest.approx(1 / np.sqrt(40_000))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="valid: linear, cosine, rsqrt, constant"):
        schedule(schedule="step")


def test_decay_mask_skips_biases_and_norm_gains():
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "ln": {"scale": jnp.ones(3)},
    }
    mask = optim.decay_mask(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}
