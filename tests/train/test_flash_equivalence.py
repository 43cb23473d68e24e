"""A train step with attention=flash (Pallas, interpret mode on CPU) equals attention=xla.

Dropout is off: the kernel draws its own dropout mask (its equivalence given the mask is tested in
tests/kernels). Compared: the loss and every parameter gradient, on 1 device and on a (2, 2, 2) mesh
where the kernel runs under shard_map on each device's batch and head shard. Every family is run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.train import optim
from jaxgen.train import step as step_lib

# float32 end to end; the kernel's own tolerance (tests/kernels) is 1e-5 abs / 1e-4 rel.
LOSS_RTOL = 1e-5
GRAD_ATOL = 2e-5
GRAD_RTOL = 1e-3

TINY = {
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.head_dim": 64,
    "model.d_ff": 64,
    "model.vocab_size": 128,
    "model.max_len": 32,
    "model.dropout": 0.0,
    "model.attention_dropout": 0.0,
    "data.seq_len": 16,
    "train.batch_size": 4,
}


def tiny_config(family, attention):
    overrides = dict(TINY)
    if family == "t5":
        overrides.pop("model.max_len")
        overrides["model.num_decoder_layers"] = 1
    if family == "bert":
        overrides["data.max_predictions"] = 3
    items = [f"{k}={v}" for k, v in overrides.items()] + [f"model.attention={attention}"]
    return config_lib.load_config(f"configs/{family}.py:smoke", items)


def batch_for(family, rng):
    """Padded, multi-segment batches so masks matter."""
    b, t, v = 4, 16, 128
    ids = lambda *s: rng.integers(5, v, s).astype(np.int32)
    lengths = np.array([16, 11, 7, 16])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    if family == "bert":
        return dict(
            input_ids=ids(b, t) * mask,
            segment_ids=((np.arange(t)[None] >= 5) & (mask == 1)).astype(np.int32),
            attention_mask=mask,
            masked_positions=np.array([[1, 3, 9], [2, 4, 10], [1, 2, 5], [3, 8, 15]], np.int32),
            masked_ids=ids(b, 3),
            masked_weights=np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], np.float32),
            next_sentence_labels=np.array([0, 1, 1, 0], np.int32),
        )
    if family == "gpt":
        seg = np.where(np.arange(t)[None] < 9, 1, 2).repeat(b, 0).astype(np.int32)
        positions = np.where(seg == 1, np.arange(t), np.arange(t) - 9).astype(np.int32)
        return dict(
            input_ids=ids(b, t), target_ids=ids(b, t), positions=positions, segment_ids=seg,
            weights=np.ones((b, t), np.float32),
        )  # fmt: skip
    d = 6
    dmask = (np.arange(d)[None] < np.array([6, 4, 2, 6])[:, None]).astype(np.int32)
    return dict(
        encoder_input_ids=ids(b, t) * mask, decoder_input_ids=ids(b, d) * dmask,
        decoder_target_ids=ids(b, d) * dmask, encoder_mask=mask, decoder_mask=dmask,
        decoder_weights=dmask.astype(np.float32),
    )  # fmt: skip


def loss_and_grads(family, attention, mesh_shape):
    config = tiny_config(family, attention)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape, strict=True)), devices)
    module = models.build(config.model)
    objective = objectives.get(family)
    batch = batch_for(family, np.random.default_rng(0))
    optimizer = optim.make_optimizer(config.optim, 10)
    state, shardings = step_lib.create_train_state(
        module, objective, optimizer, config.data, 0, mesh
    )

    def loss_fn(params, batch):
        outputs = module.apply({"params": params}, **objective.model_inputs(batch))
        return objectives.objective_value(objective, objective.loss_and_metrics(outputs, batch))

    fn = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(shardings.params, parallel.batch_sharding(mesh)),
    )
    with parallel.mesh_context(mesh):
        loss, grads = fn(state.params, parallel.global_batch(batch, mesh))
    return float(loss), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)], ids=["1dev", "mesh222"])
def test_flash_train_step_equals_xla(family, mesh_shape):
    loss_xla, grads_xla = loss_and_grads(family, "xla", mesh_shape)
    loss_flash, grads_flash = loss_and_grads(family, "flash", mesh_shape)
    assert loss_flash == pytest.approx(loss_xla, rel=LOSS_RTOL)
    flat_xla = jax.tree_util.tree_flatten_with_path(grads_xla)[0]
    flat_flash = jax.tree.leaves(grads_flash)
    for (path, gx), gf in zip(flat_xla, flat_flash, strict=True):
        np.testing.assert_allclose(
            gf, gx, atol=GRAD_ATOL, rtol=GRAD_RTOL, err_msg=jax.tree_util.keystr(path)
        )
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_xla))
    assert np.isfinite(loss_flash)
    assert jnp.all(jnp.isfinite(jnp.asarray(loss_xla)))
