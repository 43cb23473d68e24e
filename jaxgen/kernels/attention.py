"""The one attention entry point used by every model: validates shapes, picks an implementation."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from jaxgen import parallel
from jaxgen.kernels import reference
from jaxgen.kernels.reference import RelativePositionBias, relative_position_bucket

__all__ = ["IMPLS", "RelativePositionBias", "attention", "relative_position_bucket", "resolve_impl"]

IMPLS = ("xla", "flash", "auto")


def resolve_impl(impl: str) -> str:
    """The concrete implementation of `impl`: 'auto' is flash on a TPU or GPU mesh, xla on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "flash" if parallel.device_platform() in ("tpu", "gpu") else "xla"
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    bias: jax.Array | None = None,
    relative_bias: RelativePositionBias | None = None,
    window: int | None = None,
    q_offset: int | jax.Array = 0,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: str = "auto",
    partition: PartitionSpec | None = None,
) -> jax.Array:
    """Attention of q `[B, T, N, H]` over k, v `[B, S, N, H]` → `[B, T, N, H]`.

    segment ids are `[B, T]` / `[B, S]` int32 with 0 = padding; for self-attention `kv_segment_ids`
    defaults to `segment_ids`. `bias` is additive `[B|1, N, T, S]`; `scale` defaults to 1/sqrt(H).
    `window` hides keys `window` or more positions before the query; query i sits at position
    `q_offset + i` (an int, or a traced scalar when decoding) for masks and the relative bias.
    `partition` is how q is sharded over the current mesh (`[B, T, N, H]` mesh axes): the flash
    kernel cannot be partitioned by XLA, so it runs under `shard_map` on each device's batch and
    head shard.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, len, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, head_dim):
        raise ValueError(
            f"k and v must be [{batch}, S, {heads}, {head_dim}]; got {k.shape=} {v.shape=}"
        )
    kv_len = k.shape[1]
    if segment_ids is not None and kv_segment_ids is None:
        if kv_len != q_len:
            raise ValueError(
                f"cross-attention with segment_ids needs kv_segment_ids ({q_len=}, {kv_len=})"
            )
        kv_segment_ids = segment_ids
    if segment_ids is not None and segment_ids.shape != (batch, q_len):
        raise ValueError(f"segment_ids must be [{batch}, {q_len}]; got {segment_ids.shape}")
    if kv_segment_ids is not None and kv_segment_ids.shape != (batch, kv_len):
        raise ValueError(f"kv_segment_ids must be [{batch}, {kv_len}]; got {kv_segment_ids.shape}")
    if bias is not None and (bias.ndim != 4 or bias.shape[1:] != (heads, q_len, kv_len)):
        raise ValueError(f"bias must be [B|1, {heads}, {q_len}, {kv_len}]; got {bias.shape}")
    kwargs = dict(
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        bias=bias,
        relative_bias=relative_bias,
        window=window,
        q_offset=q_offset,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    if resolve_impl(impl) == "flash":
        from jaxgen.kernels import flash_attention

        mesh = jax.sharding.get_abstract_mesh()
        if partition is None or mesh.empty or mesh.size == 1:
            return flash_attention.flash_attention(q, k, v, **kwargs)
        return _sharded_flash(q, k, v, partition, mesh, kwargs)
    return reference.attention(q, k, v, **kwargs)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_flash(q, k, v, partition: PartitionSpec, mesh, kwargs: dict) -> jax.Array:
    """Runs the flash kernel on each device's (batch, heads) shard; lengths, head_dim stay whole."""
    from jaxgen.kernels import flash_attention

    entries = tuple(partition) + (None,) * (4 - len(partition))
    # Axes that do not divide the batch or head count leave that dimension replicated, as for
    # parameters.
    fitted = parallel.fit_spec(
        PartitionSpec(entries[0], None, entries[2], None), q.shape, dict(mesh.shape)
    )
    b, h = fitted[0], fitted[2]
    qkv = PartitionSpec(b, None, h, None)
    bias, rel, rng = kwargs.pop("bias"), kwargs.pop("relative_bias"), kwargs.pop("dropout_rng")
    seg, kv_seg = kwargs.pop("segment_ids"), kwargs.pop("kv_segment_ids")
    args = [q, k, v, seg, kv_seg, bias, rel.table if rel is not None else None, rng]
    specs = [
        qkv,
        qkv,
        qkv,
        PartitionSpec(b, None),
        PartitionSpec(b, None),
        PartitionSpec(b if bias is not None and bias.shape[0] > 1 else None, h, None, None),
        PartitionSpec(None, h),
        PartitionSpec(),
    ]
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs: jax.Array) -> jax.Array:
        full: list = [None] * len(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        q, k, v, seg, kv_seg, bias, table, rng = full
        if rng is not None:
            # The kernel hashes local batch/head indices: fold the shard's position in so that
            # every shard draws a different dropout mask.
            for axis in _axes(b) + _axes(h):
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
        relative = rel._replace(table=table) if rel is not None else None
        return flash_attention.flash_attention(
            q, k, v, segment_ids=seg, kv_segment_ids=kv_seg, bias=bias, relative_bias=relative,
            dropout_rng=rng, **kwargs,
        )  # fmt: skip

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(specs[i] for i in present),
        out_specs=qkv,
        # jax 0.10.2's Pallas interpreter drops the varying-axes type of its loop carries on meshes
        # with three axes; the gradients (the replicated T5 table's included) are checked against
        # the XLA path on a (2, 2, 2) mesh in tests/train/test_flash_equivalence.py.
        check_vma=False,
    )(*(args[i] for i in present))
