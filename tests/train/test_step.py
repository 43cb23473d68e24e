"""The train step's pieces: exact gradient accumulation per family, and the guarded update.

Accumulation divides every micro-batch's loss sums by the weights of the whole global batch, so 4
micro-batches give the loss and gradient of the full batch, even when they hold different numbers
of real targets (BERT's masked positions, padding). Dropout is off so that both runs compute the
same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import models, objectives
from jaxgen.train import optim
from jaxgen.train import step as step_lib
from jaxgen.train.state import TrainState

# float32: 4 partial sums instead of 1 reorder the additions, a few ulps of each gradient entry.
RTOL, ATOL = 1e-5, 1e-7
BATCH, ACCUM = 8, 4
SHRINK = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=16",
          "model.d_ff=64", "model.vocab_size=128", "model.max_len=32", "data.seq_len=16",
          "model.dropout=0.0", "model.attention_dropout=0.0",
          f"train.batch_size={BATCH}"]  # fmt: skip
EXTRA = {"bert": ["data.max_predictions=6"], "gpt": [], "t5": ["model.num_decoder_layers=1"]}


def setup(family: str, z_loss: float = 0.0, overrides: tuple[str, ...] = (), trained=None):
    """(objective, grad_fn, params, batch) of a tiny model and a padded synthetic batch."""
    run = config_lib.load_config(
        f"configs/{family}.py:smoke", SHRINK + EXTRA[family] + [*overrides]
    )
    module, objective = models.build(run.model, run.lora), objectives.get(family)
    params = jax.jit(step_lib.init_params_fn(module, objective, run.data))(jax.random.key(0))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))  # fmt: skip
    batch = objective.synthetic_batch(run.model, run.data, BATCH, np.random.default_rng(1))
    return objective, step_lib.make_grad_fn(module, objective, z_loss, trained), params, batch


def micro_weights(objective, batch, accum: int) -> list[dict[str, float]]:
    """The loss-term weights of each micro-batch (rows i, i + accum, ... as the step splits)."""
    out = []
    for i in range(accum):
        rows = {k: v[i::accum] for k, v in batch.items()}
        out.append({k: float(v) for k, v in objective.loss_weights(rows).items()})
    return out


# The step's accumulation reads only the objective's loss weights; BERT (masked positions and
# NSP) and GPT (padded windows) differ in how real targets fall among micro-batches, T5's decoder
# weights as GPT's do, and tests/objectives/test_contract.py reduces every family's metrics.
@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_accumulated_gradients_equal_the_full_batch(family):
    objective, grad_fn, params, batch = setup(family, z_loss=1e-3)
    # The micro-batches really hold different numbers of real targets.
    first_term = objective.LOSS_TERMS[0]
    assert len({w[first_term] for w in micro_weights(objective, batch, ACCUM)}) > 1

    def run(accum):
        weights = objective.loss_weights(batch)
        grads, sums = step_lib.accumulate_gradients(
            grad_fn, params, batch, jax.random.key(3), accum, weights
        )
        return grads, sums, objectives.objective_value(objective, sums, weights)

    run = jax.jit(run, static_argnums=0)
    full_grads, full_sums, full_loss = run(1)
    grads, sums, loss = run(ACCUM)
    np.testing.assert_allclose(loss, full_loss, rtol=RTOL)
    for (path, g), f in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(full_grads), strict=True
    ):
        np.testing.assert_allclose(g, f, rtol=1e-4, atol=ATOL, err_msg=jax.tree_util.keystr(path))
    for name, (s, w) in full_sums.items():
        np.testing.assert_allclose(sums[name][0], s, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(sums[name][1], w, rtol=RTOL, err_msg=name)

    # Averaging the micro-batches' own mean losses (what accumulation did before) is not the
    # full batch's loss when their weights differ: the test would fail on that method.
    own_means = []
    for i in range(ACCUM):
        rows = {k: v[i::ACCUM] for k, v in batch.items()}
        (_, micro_sums), _ = grad_fn(params, rows, jax.random.key(3), objective.loss_weights(rows))
        own_means.append(objectives.objective_value(objective, micro_sums))
    assert abs(float(np.mean(own_means)) - float(full_loss)) > 10 * RTOL * float(full_loss)


def test_train_step_with_accumulation_logs_the_full_batch_loss():
    """The jitted step at grad_accum 4 and 1 on one batch: the same metrics and parameters."""
    from jaxgen import parallel

    run = config_lib.load_config("configs/gpt.py:smoke", SHRINK)
    module, objective = models.build(run.model), objectives.get("gpt")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    batch = objective.synthetic_batch(run.model, run.data, BATCH, np.random.default_rng(2))
    results = []
    for accum in (1, ACCUM):
        optimizer = optim.make_optimizer(run.optim, 10)
        state, shardings = step_lib.create_train_state(
            module, objective, optimizer, run.data, 0, mesh
        )
        step = step_lib.build_train_step(
            module, objective, optimizer, optim.make_schedule(run.optim, 10), mesh, shardings,
            step_lib.StepOptions(grad_accum=accum),
        )  # fmt: skip
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m4, p4) = results
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_guarded_update_skips_nonfinite_and_records_the_step():
    params = {"w": jnp.ones(3)}
    optimizer = optim.make_optimizer(config_lib.AdamWConfig(learning_rate=0.1), 10)
    state = TrainState.create(params, optimizer.init(params), jax.random.key(0))
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
    skipped, _ = step_lib.guarded_update(state, bad, jnp.float32(1.0), optimizer, True)
    assert int(skipped.skipped) == 1 and int(skipped.nonfinite_step) == 0
    np.testing.assert_array_equal(skipped.params["w"], params["w"])  # update not applied
    applied, _ = step_lib.guarded_update(state, bad, jnp.float32(1.0), optimizer, False)
    assert int(applied.skipped) == 0 and int(applied.nonfinite_step) == 0
    assert not np.isfinite(np.asarray(applied.params["w"])).all()
    good, norm = step_lib.guarded_update(
        state, {"w": jnp.ones(3)}, jnp.float32(1.0), optimizer, True
    )
    assert int(good.skipped) == 0 and int(good.nonfinite_step) == -1 and int(good.step) == 1
    assert float(norm) == pytest.approx(np.sqrt(3.0))


def test_lora_grad_fn_differentiates_only_the_trained_parameters():
    """With `trained`, the adapters' (and heads') gradients equal the full gradient's; the frozen
    weights get exact zeros, though their full gradient is not zero."""
    from jaxgen.models import lora

    rank = ("lora.rank=2",)
    objective, full, params, batch = setup("bert", overrides=rank)
    partial = setup("bert", overrides=rank, trained=lora.trained)[1]
    # lora_b starts at zero, which would zero lora_a's gradient: give it values.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 0.1) if str(p[-1].key) == "lora_b" else x, params
    )
    weights = objective.loss_weights(batch)
    (loss_full, _), grads_full = jax.jit(full)(params, batch, jax.random.key(3), weights)
    (loss, _), grads = jax.jit(partial)(params, batch, jax.random.key(3), weights)
    np.testing.assert_allclose(loss, loss_full, rtol=RTOL)
    kinds, frozen_moved = set(), False
    for (path, g), f in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_full), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if lora.trained(path):
            kinds.add("adapter" if lora.is_adapter(path) else "head")
            np.testing.assert_allclose(g, f, rtol=1e-4, atol=ATOL, err_msg=name)
            assert np.any(g != 0), name
        else:
            assert not np.any(g), name
            assert g.shape == f.shape and g.dtype == f.dtype, name
            frozen_moved |= bool(np.any(f != 0))
    assert kinds == {"adapter"} and frozen_moved  # the pretraining model has no task head
