"""Tiny model configs and once-per-session params shared by the model and sampling tests."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxgen.models import ModelConfig, build

F32_ATOL = 1e-5  # same float32 computation, different order of operations (cache vs. full pass)
BF16_RTOL = 5e-2  # bfloat16 keeps 8 mantissa bits; errors accumulate over a few layers

COMMON = dict(
    vocab_size=100,
    num_layers=2,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    max_len=24,
    dropout=0.1,
    attention_dropout=0.1,
    attention="xla",
)


def config(family: str, **overrides: Any) -> ModelConfig:
    """A tiny ModelConfig of `family` with `overrides`."""
    return ModelConfig.from_mapping({"family": family, **COMMON, **overrides})


def example_inputs(family: str, batch: int = 2, length: int = 8) -> tuple:
    """Positional apply() inputs of the right shapes for `family`."""
    ids = jnp.ones((batch, length), jnp.int32)
    if family == "bert":
        return (ids, jnp.zeros_like(ids), ids, jnp.zeros((batch, 3), jnp.int32))
    if family == "gpt":
        return (ids,)
    return (ids, ids[:, : length // 2 + 1], ids, ids[:, : length // 2 + 1])


def module(family: str, **overrides: Any) -> nn.Module:
    """The tiny module without params (remat or bf16 variants share the params of `model`)."""
    return build(config(family, **overrides))


@functools.cache
def model(family: str, **overrides: Any) -> tuple[nn.Module, Any]:
    """(module, boxed params) for a tiny config, initialised once per test session."""
    module = build(config(family, **overrides))
    # unsafe_rbg: compiles several times faster than threefry on CPU; the values only need to be
    # random.
    rng = jax.random.key(0, impl="unsafe_rbg")
    params = jax.jit(lambda rng: module.init(rng, *example_inputs(family))["params"])(rng)
    return module, params


@functools.cache
def apply_fn(module: nn.Module) -> Any:
    """A jitted `module.apply` taking (params, *args, **static kwargs)."""
    return jax.jit(
        lambda params, *args, **kwargs: module.apply(
            {"params": nn.meta.unbox(params)}, *args, **kwargs
        ),
        static_argnames=("deterministic",),
    )
