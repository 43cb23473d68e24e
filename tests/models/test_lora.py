"""LoRA adapters: an adapted model starts as its base model, its unmerged output equals the merged
model's, its adapters shard like the kernel they adapt, and only the adapters train."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxgen import models, parallel
from jaxgen.config import ConfigError, LoraConfig
from jaxgen.models import lora, scan
from jaxgen.train import optim
from tests.models.test_scan import _inputs
from tests.models.tiny_models import F32_ATOL, config

EVERY = LoraConfig(rank=4, alpha=8.0, targets=LoraConfig.TARGETS)
FAMILIES = {
    "bert": {},
    "gpt": {},
    "t5": {"num_decoder_layers": 3, "feed_forward": "gated-gelu", "tie_embeddings": False},
}


def _logits(out: Any) -> list[jax.Array]:
    return [out["mlm_logits"], out["nsp_logits"]] if isinstance(out, dict) else [out]


def _init(module: nn.Module, family: str) -> Any:
    rng = jax.random.key(0, impl="unsafe_rbg")
    return nn.meta.unbox(jax.jit(lambda r: module.init(r, **_inputs(family))["params"])(rng))


def _without_adapters(params: Any) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1] not in lora.ADAPTERS}
    )


def _random_b(params: Any) -> Any:
    """The adapters' B matrices made non-zero (after some training they are)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.key(3), len(leaves)))

    def fill(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        key = next(keys)
        if str(getattr(path[-1], "key", "")) == "lora_b":
            return 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapted_model_starts_as_the_base_and_merges_exactly(family, scanned):
    cfg = dataclasses.replace(config(family, **FAMILIES[family]), scan_layers=scanned)
    base, adapted = models.build(cfg), models.build(cfg, EVERY)
    params = _init(adapted, family)
    inputs = _inputs(family)
    # Each compiled once and called twice (eager op-by-op calls of a T5 take seconds each).
    run_base = jax.jit(lambda p: base.apply({"params": p}, **inputs))
    run_adapted = jax.jit(lambda p: adapted.apply({"params": p}, **inputs))
    adapters, total = lora.count(params)
    assert 0 < adapters < total
    # B starts at zero: step-0 outputs are the base model's, bit for bit.
    frozen = _without_adapters(params)
    want = _logits(run_base(frozen))
    got = _logits(run_adapted(params))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)
    # Trained adapters: the unmerged model equals the base model with the adapters folded in.
    trained = _random_b(params)
    unmerged = _logits(run_adapted(trained))
    merged_params = lora.merge(trained, EVERY)
    assert jax.tree.structure(merged_params) == jax.tree.structure(frozen)
    merged = _logits(run_base(merged_params))
    moved = max(float(jnp.max(jnp.abs(u - w))) for u, w in zip(unmerged, want, strict=True))
    assert moved > 1e-3  # the adapters do change the output
    for u, m in zip(unmerged, merged, strict=True):
        np.testing.assert_allclose(m, u, atol=F32_ATOL, rtol=F32_ATOL)


def test_targets_pick_the_kernels_and_default_to_query_and_value():
    params = _init(models.build(config("bert"), LoraConfig(rank=2)), "bert")
    adapted = {k[-2] for k in traverse_util.flatten_dict(params) if k[-1] == "lora_a"}
    assert adapted == {"query", "value"}
    layer = params["layers_0"]["attention"]["query"]
    assert layer["lora_a"].shape == (32, 2) and layer["lora_b"].shape == (2, 2, 16)  # [D,r] [r,N,H]
    assert np.all(layer["lora_b"] == 0) and np.any(layer["lora_a"] != 0)
    assert np.max(np.abs(layer["lora_a"])) <= 32**-0.5  # peft's Kaiming-uniform bound 1/sqrt(in)


def test_adapters_shard_like_the_kernel_they_adapt():
    cfg = config("gpt")
    module = models.build(cfg, EVERY)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **_inputs("gpt"))["params"])
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
    names = {k: tuple(v) for k, v in specs.items()}
    assert names["layers_0/attention/query/kernel"] == ("embed", "heads", "kv")
    assert names["layers_0/attention/query/lora_a"] == ("embed", None)
    assert names["layers_0/attention/query/lora_b"] == (None, "heads", "kv")
    assert names["layers_0/attention/out/lora_a"] == ("heads", "kv", None)
    assert names["layers_0/mlp/wo/lora_b"] == (None, "embed")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = traverse_util.flatten_dict(
        parallel.logical_partition_specs(boxed, dict(mesh.shape)), sep="/"
    )
    assert specs["layers_0/mlp/wi/lora_b"][1:] == specs["layers_0/mlp/wi/kernel"][1:]


def test_only_the_adapters_train_and_the_optimizer_holds_only_theirs():
    cfg = config("gpt", dropout=0.0, attention_dropout=0.0)
    module = models.build(cfg, LoraConfig(rank=2, targets=("query", "value", "wi")))
    params = _init(module, "gpt")
    tokens = _inputs("gpt")["input_ids"]
    tx = optim.adapters_only(optax.adamw(1e-2))
    state = tx.init(params)

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            logits = module.apply({"params": p}, tokens)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for _ in range(3):
        new, state = step(new, state)
    flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
    for key, value in flat_old.items():
        if key[-1] in lora.ADAPTERS:
            if key[-1] == "lora_b":
                assert np.any(flat_new[key] != value), key
        else:
            np.testing.assert_array_equal(flat_new[key], value, err_msg=str(key))  # bit-identical
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
    adapters, total = lora.count(params)
    assert moments == 2 * adapters  # Adam's mu and nu of the adapters, nothing of the base


def test_merge_and_base_loading_name_what_does_not_fit():
    module = models.build(config("bert"), LoraConfig(rank=2))
    fresh = _init(module, "bert")
    base = _without_adapters(_init(models.build(config("bert")), "bert"))
    started = lora.with_base(fresh, base)
    np.testing.assert_array_equal(started["layers_0"]["attention"]["query"]["kernel"],
                                  base["layers_0"]["attention"]["query"]["kernel"])  # fmt: skip
    del base["layers_1"]
    with pytest.raises(lora.LoraError, match="have no layers_1/.*train.init_from"):
        lora.with_base(fresh, base)
    with pytest.raises(ConfigError, match="lora.targets entry must be one of"):
        LoraConfig(rank=2, targets=("qkv",))
    with pytest.raises(ConfigError, match="lora.rank must be 0"):
        LoraConfig(rank=-1)
    stacked = scan.stack_layers(fresh, dataclasses.replace(config("bert"), scan_layers=True))
    assert "lora_a" in stacked["layers"]["attention"]["query"]
