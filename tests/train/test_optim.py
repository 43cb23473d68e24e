"""Learning-rate schedules and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import AdafactorConfig, AdamWConfig, ConfigError
from jaxgen.train import optim


def schedule(**kw):
    base = dict(
        learning_rate=1e-4, schedule="linear", warmup_steps=10, decay_steps=0, final_lr_fraction=0.0
    )
    base.update(kw)
    return optim.make_schedule(AdamWConfig(**base), num_steps=110)


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
        AdafactorConfig(learning_rate=0.01, schedule="rsqrt", warmup_steps=10_000), num_steps=2**19
    )
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(9_999)) == pytest.approx(0.01)
    assert float(s(40_000)) == pytest.approx(1 / np.sqrt(40_000))


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="optim.schedule must be one of linear, cosine, rsqrt"):
        schedule(schedule="step")


def test_decay_mask_skips_biases_and_norm_gains():
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "ln": {"scale": jnp.ones(3)},
    }
    mask = optim.decay_mask(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 256 * 128).reshape(256, 128), "b": jnp.ones(128)}
GRADS = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.5, PARAMS)


def first_update(**settings):
    """(update, state) of one Adafactor step with these settings (constant lr 1e-2)."""
    config = AdafactorConfig(learning_rate=1e-2, schedule="constant", **settings)
    optimizer = optim.make_optimizer(config, 10)
    state = optimizer.init(PARAMS)
    return optimizer.update(GRADS, state, PARAMS)


def leaves_shapes(state):
    return sorted(tuple(x.shape) for x in jax.tree.leaves(state) if hasattr(x, "shape"))


def test_adafactor_reads_every_setting():
    base, base_state = first_update()
    # factored=False keeps the full [256, 128] second moment instead of row and column factors.
    assert (256, 128) not in leaves_shapes(base_state) and (256,) in leaves_shapes(base_state)
    _, unfactored = first_update(factored=False)
    assert (256, 128) in leaves_shapes(unfactored)
    # A matrix below min_dim_size_to_factor is not factored either.
    _, small = first_update(min_dim_size_to_factor=512)
    assert (256, 128) in leaves_shapes(small)
    # momentum adds a first moment of every parameter's shape.
    _, with_momentum = first_update(momentum=0.9)
    assert len(jax.tree.leaves(with_momentum)) > len(jax.tree.leaves(base_state))
    for settings in (
        dict(multiply_by_parameter_scale=False),
        dict(clipping_threshold=0.01),
        dict(weight_decay=0.5),
        dict(epsilon=1e-1),
    ):
        changed, _ = first_update(**settings)
        assert not np.allclose(changed["w"], base["w"]), settings
    # decay_rate shapes the second-moment decay from the second step on.
    config = AdafactorConfig(learning_rate=1e-2, schedule="constant", clipping_threshold=0.0)
    updates = []
    for rate in (0.8, 0.5):
        optimizer = optim.make_optimizer(
            AdafactorConfig(**{**config.to_dict(), "decay_rate": rate}), 10
        )
        state = optimizer.init(PARAMS)
        _, state = optimizer.update(GRADS, state, PARAMS)
        second = jax.tree.map(lambda x: jnp.sin(7.0 * x) - 0.2, PARAMS)
        update, _ = optimizer.update(second, state, PARAMS)
        updates.append(update["w"])
    assert not np.allclose(updates[0], updates[1])


def test_adamw_reads_its_settings():
    def update(**settings):
        config = AdamWConfig(learning_rate=1e-2, schedule="constant", **settings)
        optimizer = optim.make_optimizer(config, 10)
        state = optimizer.init(PARAMS)
        _, state = optimizer.update(GRADS, state, PARAMS)
        second = jax.tree.map(lambda x: jnp.sin(7.0 * x) - 0.2, PARAMS)
        return optimizer.update(second, state, PARAMS)[0]["w"]

    base = update()
    for settings in (dict(b1=0.5), dict(b2=0.5), dict(eps=1.0), dict(weight_decay=0.5),
                     dict(clip_norm=1e-3)):  # fmt: skip
        assert not np.allclose(update(**settings), base), settings


def test_adafactor_updates_each_stacked_layer_as_its_own_leaf():
    """A scanned model's `[L, ...]` leaves get the updates the unrolled layers get: factored
    moments, update clipping and parameter scale per layer, not over the stack."""
    config = AdafactorConfig(learning_rate=1e-2, schedule="constant", clip_norm=1.0)
    optimizer = optim.make_optimizer(config, 10)
    # Layers of different scales, so statistics over the whole stack would differ from each's.
    layers = [PARAMS["w"] * (i + 1) for i in range(3)]
    grads = [jnp.cos(3.0 * w) * (0.5 + i) for i, w in enumerate(layers)]
    unrolled = {f"layers_{i}": {"w": w} for i, w in enumerate(layers)} | {"b": PARAMS["b"]}
    unrolled_grads = {f"layers_{i}": {"w": g} for i, g in enumerate(grads)} | {"b": GRADS["b"]}
    stacked = {"layers": {"w": jnp.stack(layers)}, "b": PARAMS["b"]}
    stacked_grads = {"layers": {"w": jnp.stack(grads)}, "b": GRADS["b"]}
    state, stacked_state = optimizer.init(unrolled), optimizer.init(stacked)
    for _ in range(3):
        want, state = optimizer.update(unrolled_grads, state, unrolled)
        got, stacked_state = optimizer.update(stacked_grads, stacked_state, stacked)
        unrolled = jax.tree.map(jnp.add, unrolled, want)
        stacked = jax.tree.map(jnp.add, stacked, got)
    for i in range(3):
        np.testing.assert_allclose(stacked["layers"]["w"][i], unrolled[f"layers_{i}"]["w"],
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
    np.testing.assert_allclose(stacked["b"], unrolled["b"], rtol=1e-6)
    # The row and column factors are per layer: [3, 256] and [3, 128], not one [256, 128] pair.
    assert (3, 256) in leaves_shapes(stacked_state) and (3, 128) in leaves_shapes(stacked_state)
