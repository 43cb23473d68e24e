"""Low-rank adapters on a parameter tree: which leaves are adapters, merging them into their
kernels, and starting an adapted model from a base model's parameters.

An adapted Dense holds `kernel [*in, *out]`, `lora_a [*in, r]` and `lora_b [r, *out]` (each with a
leading `[L]` when the layers are scanned) and computes `x @ kernel + alpha/r * x @ lora_a @
lora_b` (`jaxgen.models.layers.Dense`); merging folds the second term into the kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxgen.config import LoraConfig

ADAPTERS = ("lora_a", "lora_b")
# Task heads: trained beside the adapters and saved with them (peft's `modules_to_save`); new
# heads a base model lacks start from their fresh initialisation.
HEADS = ("classifier", "score", "span")


class LoraError(ValueError):
    """Parameters that do not fit the adapters asked for (a missing base leaf, no targets)."""


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether a parameter path (jax key path or tuple of names) ends in an adapter leaf."""
    last = path[-1]
    return str(getattr(last, "key", last)) in ADAPTERS


def is_head(path: tuple[Any, ...]) -> bool:
    """Whether a parameter path lies in a task head (`HEADS`)."""
    return str(getattr(path[0], "key", path[0])) in HEADS


def trained(path: tuple[Any, ...]) -> bool:
    """Whether a LoRA run trains (and saves) a parameter: the adapters and the task heads."""
    return is_adapter(path) or is_head(path)


def labels(params: Any) -> Any:
    """ "adapter" for the adapters and task heads, "frozen" for the rest (multi_transform
    labels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "adapter" if trained(path) else "frozen", params
    )


def count(params: Any) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    adapters = sum(int(leaf.size) for path, leaf in flat if is_adapter(path))
    return adapters, sum(int(leaf.size) for _, leaf in flat)


def merge(params: Any, lora: LoraConfig) -> Any:
    """The base model's parameters with every adapter folded into its kernel, in float32:
    `kernel + alpha/r * lora_a @ lora_b`; the adapter leaves are gone."""
    flat = traverse_util.flatten_dict(params)
    merged = {}
    for path, value in flat.items():
        if path[-1] in ADAPTERS:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a = jnp.asarray(flat[path[:-1] + ("lora_a",)], jnp.float32)
            b = jnp.asarray(flat[path[:-1] + ("lora_b",)], jnp.float32)
            kernel = jnp.asarray(value, jnp.float32)
            if a.ndim + b.ndim - 2 == kernel.ndim:
                delta = jnp.tensordot(a, b, axes=1)
            else:  # scanned: one [L] leading axis on all three
                delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
            value = kernel + lora.scale * delta
        merged[path] = value
    return traverse_util.unflatten_dict(merged)


def with_base(fresh: Any, base: Any) -> Any:
    """`fresh` (a model's initial parameters) with every leaf taken from `base` (a saved model's)
    but the adapters, and the task heads `base` does not have."""
    flat_base = traverse_util.flatten_dict(base)
    out = {}
    for path, value in traverse_util.flatten_dict(fresh).items():
        if path[-1] in ADAPTERS or (is_head(path) and path not in flat_base):
            out[path] = value
        elif path in flat_base and tuple(flat_base[path].shape) == tuple(value.shape):
            out[path] = flat_base[path]
        elif path in flat_base:
            raise LoraError(
                f"the saved parameter {'/'.join(path)} is {tuple(flat_base[path].shape)}, the "
                f"model's is {tuple(value.shape)}: train.init_from must hold a model of "
                "the same shapes"
            )
        else:
            raise LoraError(
                f"the saved parameters have no {'/'.join(path)}: train.init_from must hold a "
                "model of this one's family and shapes (a new task head, or adapters, may be "
                "missing from it; nothing else)"
            )
    return traverse_util.unflatten_dict(out)


def adapters(params: Any) -> Any:
    """Only the adapter and task-head leaves of a tree (what a LoRA run's checkpoints hold)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if trained(k)})


def with_adapters(params: Any, saved: Any) -> Any:
    """`params` (an adapted model's, or its base's without adapters) with the adapter leaves of
    `saved` (a LoRA checkpoint's)."""
    flat, new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(saved)
    kernels = {k[:-1] for k in flat if k[-1] == "kernel"}
    stray = sorted("/".join(k) for k in new if k[:-1] not in kernels)
    if stray:
        raise LoraError(f"adapters {stray[:3]} adapt no kernel of this model (another model?)")
    return traverse_util.unflatten_dict({**flat, **new})
