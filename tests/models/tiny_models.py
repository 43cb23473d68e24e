"""Tiny models from the real configs: each family's smoke row shrunk, with params built once.

Shared by the model and sampling tests (`tests/tiny_runs.py` holds the tiny *training* runs).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from jaxgen import config as config_lib
from jaxgen import objectives
from jaxgen.models import ModelConfig, build

F32_ATOL = 1e-5  # same float32 computation, different order of operations (cache vs. full pass)
BF16_RTOL = 5e-2  # bfloat16 keeps 8 mantissa bits; errors accumulate over a few layers

# What the smoke rows are shrunk to.
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


@functools.cache
def _smoke_model(family: str) -> dict[str, Any]:
    return config_lib.load_config(f"configs/{family}.py:smoke").model.to_dict()


def config(family: str, **overrides: Any) -> ModelConfig:
    """configs/<family>.py:smoke's model at the COMMON sizes, with `overrides`."""
    return ModelConfig.from_mapping({**_smoke_model(family), **COMMON, **overrides})


def example_inputs(family: str, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """apply() keyword inputs of the family's batch spec (objective.model_inputs of a batch)."""
    objective = objectives.get(family)
    data = objective.Data(seq_len=length)
    spec = objective.batch_spec(data, batch)
    ones = {k: np.ones(s.shape, s.dtype) for k, s in spec.items()}
    return objective.model_inputs(ones)


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
    inputs = example_inputs(family)
    params = jax.jit(lambda rng: module.init(rng, **inputs)["params"])(rng)
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
