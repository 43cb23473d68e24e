"""Same 5 steps (dropout on), same losses on every mesh; parameters sharded as the rules say.

Each case builds the state with `step.create_train_state` and the jitted `step.build_train_step`
on a (data, fsdp, tensor) mesh of the first n of the 8 simulated CPU devices, and feeds the same
fixed synthetic batches. Dropout keys come from the step (`TrainState.step_key`) and a keep bit is
a hash of the key and the element's global index (`jaxgen.kernels.dropout`), whatever the sharding,
so the loss must not depend on the mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.train import optim
from jaxgen.train import step as step_lib

# float32 end to end: meshes only change the order of the partial sums of reductions (the
# cross-device psums of the gradient and loss), a few ulps per step; 5 Adam steps stay well
# within 1e-5 relative.
RTOL = 1e-5
NUM_STEPS = 5
BATCH, SEQ, PRED, VOCAB = 8, 16, 4, 512

# Shrunk smoke configs; every sharded dimension (embed 32, heads 8, mlp 64, vocab 512) divides by
# 8, so each mesh axis really splits something. Dropout stays at the smoke rows' 0.1.
SHRINK = [
    "model.num_layers=1",
    "model.d_model=32",
    "model.num_heads=8",
    "model.head_dim=4",
    "model.d_ff=64",
    f"model.vocab_size={VOCAB}",
    "model.max_len=32",
    f"data.seq_len={SEQ}",
    f"train.batch_size={BATCH}",
    "optim.warmup_steps=2",
]
EXTRA = {"bert": [f"data.max_predictions={PRED}"], "gpt": [], "t5": ["model.num_decoder_layers=1"]}
ALL_MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
FAST_MESHES = [(1, 1, 1), (2, 2, 2), (1, 1, 8)]


def tiny_config(family: str):
    """configs/<family>.py:smoke shrunk so that every sharded dimension divides by 8."""
    return config_lib.load_config(f"configs/{family}.py:smoke", SHRINK + EXTRA[family])


def synthetic_batch(family: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One global batch of the objective's spec: valid ids, padding, padding predictions."""
    config = tiny_config(family)
    return objectives.get(family).synthetic_batch(config.model, config.data, BATCH, rng)


def make_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over the first prod(shape) devices."""
    sizes = dict(zip(parallel.MESH_AXES, shape, strict=True))
    return parallel.make_mesh(sizes, jax.devices()[: math.prod(shape)])


def train_losses(family: str, shape: tuple[int, int, int]) -> tuple[list[float], object]:
    """Per-step losses of NUM_STEPS steps on fixed batches, and the final state."""
    config = tiny_config(family)
    mesh = make_mesh(shape)
    module, objective = models.build(config.model), objectives.get(family)
    optimizer = optim.make_optimizer(config.optim, NUM_STEPS)
    schedule = optim.make_schedule(config.optim, NUM_STEPS)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(family, rng) for _ in range(NUM_STEPS)]
    state, shardings = step_lib.create_train_state(
        module, objective, optimizer, config.data, seed=0, mesh=mesh
    )
    train_step = step_lib.build_train_step(module, objective, optimizer, schedule, mesh, shardings)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, parallel.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, state


_reference: dict[str, list[float]] = {}


def reference_losses(family: str) -> list[float]:
    """The single-device run every mesh is compared with (computed once per family)."""
    if family not in _reference:
        _reference[family], _ = train_losses(family, (1, 1, 1))
    return _reference[family]


def assert_same_losses(family: str, shape: tuple[int, int, int]) -> None:
    losses, _ = train_losses(family, shape)
    expected = reference_losses(family)
    assert np.all(np.isfinite(losses))
    assert len(set(losses)) > 1  # the steps really update the parameters
    np.testing.assert_allclose(losses, expected, rtol=RTOL, err_msg=f"{family} mesh {shape}")


def param_specs(state) -> dict[str, P]:
    """{'a/b/kernel': PartitionSpec} of the live parameter arrays."""
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {"/".join(k.key for k in path): leaf.sharding.spec for path, leaf in flat}


def test_bert_loss_is_mesh_independent_on_a_tensor_mesh():
    assert_same_losses("bert", (1, 1, 8))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_bert_loss_is_mesh_independent(shape):
    assert_same_losses("bert", shape)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "t5"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8)])
def test_gpt_and_t5_loss_is_mesh_independent(family, shape):
    assert_same_losses(family, shape)


def test_parameters_are_sharded_as_the_rules_say():
    config = tiny_config("bert")
    module, objective = models.build(config.model), objectives.get("bert")
    optimizer = optim.make_optimizer(config.optim, NUM_STEPS)
    state, _ = step_lib.create_train_state(
        module, objective, optimizer, config.data, seed=0, mesh=make_mesh((2, 2, 2))
    )
    specs = param_specs(state)
    # (vocab, embed) -> ((tensor, fsdp), None); (embed, heads, kv) -> (fsdp, tensor, None).
    assert specs["token_embed/embedding"] == P(("tensor", "fsdp"), None)
    # The arrays really are split: each device holds a quarter of the table's rows.
    leaf = state.params["token_embed"]["embedding"]
    assert leaf.addressable_shards[0].data.shape == (VOCAB // 4, 32)
    assert {d.id for d in leaf.sharding.device_set} == set(range(8))
    block = next(k for k in specs if k.endswith("attention/query/kernel"))
    assert specs[block] == P("fsdp", "tensor", None)
    mlp = next(k for k in specs if k.endswith("wi/kernel"))
    assert specs[mlp] == P("fsdp", "tensor")
    # LayerNorm gains are (embed,): split over fsdp like every embed dimension (ZeRO-3 style).
    assert specs["embed_norm/scale"] == P("fsdp")
    assert specs["nsp/bias"] == P(None)  # no logical name: replicated
