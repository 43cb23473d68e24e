"""The device mesh, the one table mapping logical axis names to mesh axes, and shardings from it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Auto axes: shardings are set at jit boundaries and logical constraints; XLA propagates the rest.
AUTO_AXES = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)

# Logical name -> mesh axes. Batches split over data and fsdp; fsdp also shards the embed dimension
# of every parameter (ZeRO-3 style); tensor shards heads and the MLP (Megatron style).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    # Vocabulary rows over tensor x fsdp together, and before embed: flax gives each mesh axis to
    # the first rule that asks for it, so an embedding table's embed dimension stays whole. The
    # 2-D layout P('tensor', 'fsdp') of a tied embedding made XLA's SPMD partitioner (jax 0.10.2,
    # CPU) return wrong gradients on a (2, 2, 2) mesh; this one shards the table as finely and is
    # exact.
    ("vocab", ("tensor", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)
# Used per parameter when it shards more finely: vocabulary unsharded, embed over fsdp (also exact).
FALLBACK_RULES = tuple((name, None if name == "vocab" else axes) for name, axes in LOGICAL_RULES)


def device_platform() -> str:
    """The platform ('tpu', 'gpu' or 'cpu') of the mesh in context, else of the default backend."""
    # The mesh's devices, not the host's: a CPU process builds TPU or GPU steps over compile-only
    # devices (`jaxgen compile`), and their kernels must be the target's.
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


# Device kinds as jax reports them -> TPU generation names (`jax.Device.device_kind`).
_TPU_KINDS = (
    ("TPU v2", "v2"),
    ("TPU v3", "v3"),
    ("TPU v4", "v4"),
    ("TPU v5 lite", "v5e"),
    ("TPU v5e", "v5e"),
    ("TPU v5", "v5p"),
    ("TPU v6 lite", "v6e"),
    ("TPU v6", "v6e"),
    ("TPU7x", "tpu7x"),
)


def tpu_generation() -> str | None:
    """The TPU generation ('v3', 'v5e', ...) of the mesh in context or the default devices."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    kind = device.device_kind if device is not None else jax.devices()[0].device_kind
    if device is None and jax.default_backend() != "tpu":
        return None
    # Longest prefix first: "TPU v5 lite" before "TPU v5".
    for prefix, generation in sorted(_TPU_KINDS, key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return generation
    return None


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) sizes, where one -1 takes the remaining devices.

    mesh_config: a MeshConfig or a {axis: size} mapping.
    """
    mapping = isinstance(mesh_config, Mapping)
    sizes = [int(mesh_config[a] if mapping else getattr(mesh_config, a)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1; got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not divide "
                f"{num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {math.prod(sizes)} devices "
            f"but {num_devices} are "
            "available; set mesh sizes whose product is the device count, or one of them to -1"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices along the physical topology (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=AUTO_AXES, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=AUTO_AXES)


def fit_spec(
    spec: PartitionSpec, shape: tuple[int, ...], sizes: Mapping[str, int]
) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide, so small or odd-sized leaves are replicated."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for name in names:
            if dim % math.prod(sizes[n] for n in kept + [name]) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def shard_count(spec: PartitionSpec, sizes: Mapping[str, int]) -> int:
    """Number of pieces a spec splits an array into on a mesh with these axis sizes."""
    axes = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))]
    return math.prod(sizes[a] for a in axes)


def logical_partition_specs(abstract_tree: Any, sizes: Mapping[str, int]) -> Any:
    """PartitionSpecs for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes, on a mesh
    with these axis sizes (no devices needed, so memory estimates for a pod run anywhere).

    Each leaf gets the rules table's layout, or the fallback one when that shards it over more
    devices (a vocabulary that tensor x fsdp does not divide, e.g. GPT's 50,257, keeps its embed
    dimension over fsdp instead of being replicated). Ties keep the rules table's layout.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    unboxed = strip_boxes(abstract_tree)
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
    candidates = [
        nn.logical_to_mesh(logical_specs, rules) for rules in (LOGICAL_RULES, FALLBACK_RULES)
    ]

    def choose(primary: PartitionSpec | None, fallback: PartitionSpec | None, leaf: Any):
        shape = tuple(getattr(leaf, "shape", ()))
        fitted = [
            fit_spec(PartitionSpec() if spec is None else spec, shape, sizes)
            for spec in (primary, fallback)
        ]
        return max(fitted, key=lambda spec: shard_count(spec, sizes))

    return jax.tree.map(choose, *candidates, unboxed, is_leaf=is_spec)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings on `mesh` for a (possibly boxed) pytree: `logical_partition_specs` placed."""
    specs = logical_partition_specs(abstract_tree, dict(mesh.shape))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def strip_boxes(tree: Any) -> Any:
    """The values of `nn.LogicallyPartitioned` leaves, without `unbox`'s sharding constraint."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data and fsdp; every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that puts a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def axis_rules() -> contextlib.AbstractContextManager:
    """Context manager activating the logical-axis rules (for tracing models with constraints)."""
    return nn.logical_axis_rules(LOGICAL_RULES)


def mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    """The mesh and logical-axis rules that tracing a model needs for its sharding constraints."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(axis_rules())
    return stack
