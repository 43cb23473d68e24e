"""Layer stacks: remat policies, `nn.scan` over a stack's layers, and the stacked parameter layout.

`model.scan_layers` runs a stack's layers as one `nn.scan` step, traced and compiled once whatever
the depth (T5X reports ~5x faster compiles at base scale). The step is one layer, or one period of
layers that differ: GPT-3's alternating attention scans (dense, local) pairs
(`ModelConfig.layer_period`), because a step's masks are static. The scanned step's parameters and
KV caches are stacked on a new leading axis with the logical name `layers`:

    unrolled: layers_{i}/attention/query/kernel         [D, N, H]
    scanned:  layers/attention/query/kernel             [L, D, N, H]   (period: layers/dense/...,
                                                                        layers/local/... [L/2, ...])

Axis 0, not MaxText's 1: it is the same axis for every leaf whatever its rank (norm gains `[D]`,
the scalar `cache_index` of the KV cache), layer i is `leaf[i]`, the slice a scan step reads is
contiguous, and `layers` maps to no mesh axis (`parallel.LOGICAL_RULES`), so the position of the
stacked axis does not change how the other dimensions shard. `stack_layers` and `unstack_layers`
convert whole parameter trees between the two layouts (checkpoints, HF import/export).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Params = dict[str, Any]

# The outputs `models/layers.py` tags with `jax.ad_checkpoint.checkpoint_name`: the attention
# projections and the MLP's two matmuls (both gated halves are `mlp_wi`).
PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj", "mlp_wi", "mlp_wo")

# model.remat_policy -> what jax.checkpoint keeps of a layer for the backward pass, most memory
# saved first. `full` is jax's default (policy None, the same as `nothing_saveable`): only the
# layer's input is kept and the whole layer runs again in the backward pass.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    # The projections' outputs: the attention core, norms and activations are recomputed.
    "minimal": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    # Every matmul against a weight (no batch dimension): like `minimal`, before the biases.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul, the XLA attention's [B, N, T, S] scores and weighted values too.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

STACKED = "layers"  # the scanned module's name, and the logical name of the stacked axis


class LayerLayoutError(ValueError):
    """Parameters whose layers are not laid out as the model config says (stacked or unrolled)."""


# ------------------------------------------------------------------------------- building models


def remat(block: type[nn.Module], model: ModelConfig, decode: bool = False) -> type[nn.Module]:
    """`block` under `nn.remat` with `model.remat_policy`; `block` itself without remat or when
    decoding (there is no backward pass)."""
    policy = REMAT_POLICIES[model.remat_policy]
    if not model.remat or decode:
        return block
    # The CSE barrier keeps XLA from merging the recomputation back into the forward pass; inside
    # a scan body it is unnecessary and it foils other optimizations, at a high cost on GPU
    # (the jax.checkpoint docstring). MaxText and T5X drop it under scan too.
    return nn.remat(block, policy=policy, prevent_cse=not model.scan_layers)


def scan_steps(depth: int, period: tuple[str, ...], depth_key: str) -> int:
    """How many scanned steps run `depth` layers, one `period` (or one layer) per step."""
    size = len(period) or 1
    if depth % size:
        raise LayerLayoutError(
            f"model.scan_layers=True scans the layers as ({', '.join(period)}) periods of {size}, "
            f"so model.{depth_key} must be a multiple of {size}; got {depth} (or set "
            "model.scan_layers=False)"
        )
    return depth // size


def scan_stack(step: nn.Module, x: jax.Array, *broadcast: Any, length: int) -> jax.Array:
    """x `[B, T, D]` through `length` calls of `step(x, *broadcast) -> x`, each call with its own
    slice of the stacked params and caches and its own dropout key; `broadcast` (masks, segment
    ids, a bias table, the encoder output) is the same for every call."""

    def body(step: nn.Module, carry: jax.Array, *args: Any) -> tuple[jax.Array, None]:
        return step(carry, *args), None

    scanned = nn.scan(
        body,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: STACKED},
    )
    return scanned(step, x, *broadcast)[0]


# ---------------------------------------------------------------------------- parameter layouts


def layer_stacks(model: ModelConfig) -> tuple[tuple[tuple[str, ...], str, int], ...]:
    """(path of the stack in the parameter tree, its depth key, its depth) of each layer stack."""
    if model.family == "t5":
        return (
            (("encoder",), "num_layers", model.num_layers),
            (("decoder",), "num_decoder_layers", model.num_decoder_layers),
        )
    return (((), "num_layers", model.num_layers),)


def _stack_node(params: Params, path: tuple[str, ...]) -> dict[str, Any]:
    node = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise LayerLayoutError(f"the parameters have no {'/'.join(path)!r} stack")
        node = node[key]
    return node


def _copied(params: Params, path: tuple[str, ...]) -> tuple[Params, dict[str, Any]]:
    """A shallow copy of params with fresh dicts along `path`, and the copied node at its end."""
    params = dict(params)
    node = params
    for key in path:
        node[key] = dict(node[key])
        node = node[key]
    return params, node


def _where(path: tuple[str, ...]) -> str:
    return f" of {'/'.join(path)}" if path else ""


def _stack(*leaves: Any) -> Any:
    return (np if isinstance(leaves[0], np.ndarray) else jnp).stack(leaves)


def _check_plain(params: Params) -> None:
    """Raises TypeError for boxed leaves, whose logical names would lose the stacked axis."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    if any(is_box(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_box)):
        raise TypeError("stack_layers/unstack_layers take plain arrays: nn.meta.unbox them first")


def in_stack(path: tuple[Any, ...]) -> bool:
    """Whether a pytree key path (a parameter's, an optimizer moment's or a KV cache's) runs
    through a scanned stack, so its leaf has the stacked `[L, ...]` axis first."""
    return any(str(getattr(entry, "key", entry)) == STACKED for entry in path)


def is_stacked(params: Params, model: ModelConfig) -> bool:
    """Whether `params` hold `model`'s layers stacked (`layers/...`) rather than unrolled
    (`layers_{i}/...`); raises LayerLayoutError when they hold neither."""
    layouts = set()
    for path, _, _ in layer_stacks(model):
        node = _stack_node(params, path)
        if STACKED in node:
            layouts.add(True)
        elif "layers_0" in node:
            layouts.add(False)
        else:
            raise LayerLayoutError(
                f"the parameters{_where(path)} hold neither stacked layers ({STACKED!r}) nor "
                "unrolled ones ('layers_0', ...)"
            )
    if len(layouts) > 1:
        raise LayerLayoutError("the parameters mix stacked and unrolled layer stacks")
    return layouts.pop()


def stack_layers(params: Params, model: ModelConfig) -> Params:
    """Unrolled params (`layers_{i}/...`) -> the scanned layout (`layers/...` `[L, ...]`, or
    `layers/<period name>/...` `[L / period, ...]`); plain numpy or jax arrays, other keys kept."""
    _check_plain(params)
    period = model.layer_period
    size = len(period) or 1
    for path, depth_key, depth in layer_stacks(model):
        scan_steps(depth, period, depth_key)
        params, node = _copied(params, path)
        names = [f"layers_{i}" for i in range(depth)]
        missing = [name for name in names if name not in node]
        if missing:
            found = STACKED if STACKED in node else ", ".join(sorted(node)) or "nothing"
            raise LayerLayoutError(
                f"cannot stack the layers{_where(path)}: model.{depth_key}={depth} needs "
                f"unrolled {names[0]} ... {names[-1]}, but {', '.join(missing[:3])} is missing "
                f"(found {found})"
            )
        layers = [node.pop(name) for name in names]
        if period:  # position k of step j is layer j * size + k
            node[STACKED] = {
                name: jax.tree.map(_stack, *layers[k::size]) for k, name in enumerate(period)
            }
        else:
            node[STACKED] = jax.tree.map(_stack, *layers)
    return params


def unstack_layers(params: Params, model: ModelConfig) -> Params:
    """The scanned layout (see `stack_layers`) -> unrolled params (`layers_{i}/...`)."""
    _check_plain(params)
    period = model.layer_period
    size = len(period) or 1
    for path, depth_key, depth in layer_stacks(model):
        steps = scan_steps(depth, period, depth_key)
        params, node = _copied(params, path)
        if STACKED not in node:
            found = "unrolled layers_0, ..." if "layers_0" in node else "no layers"
            raise LayerLayoutError(
                f"cannot unstack the layers{_where(path)}: there is no {STACKED!r} entry ({found})"
            )
        stacked = node.pop(STACKED)
        parts = [stacked[name] for name in period] if period else [stacked]
        if period and set(stacked) != set(period):
            raise LayerLayoutError(
                f"the stacked layers{_where(path)} hold {sorted(stacked)}; a period of "
                f"{list(period)} was expected"
            )
        for k, part in enumerate(parts):
            for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
                if leaf.shape[:1] != (steps,):
                    name = jax.tree_util.keystr(leaf_path, simple=True, separator="/")
                    raise LayerLayoutError(
                        f"stacked leaf {name}{_where(path)} has shape {leaf.shape}; model."
                        f"{depth_key}={depth} needs a leading axis of {steps}"
                    )
            for j in range(steps):
                node[f"layers_{j * size + k}"] = jax.tree.map(lambda leaf, j=j: leaf[j], part)
    return params


def match_layers(params: Params, model: ModelConfig) -> Params:
    """`params` stacked or unstacked as `model.scan_layers` asks (unchanged when they match)."""
    stacked = is_stacked(params, model)
    if stacked == model.scan_layers:
        return params
    return stack_layers(params, model) if model.scan_layers else unstack_layers(params, model)
