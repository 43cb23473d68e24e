"""The one attention entry point used by every model: validates shapes and picks an implementation."""

from __future__ import annotations

import jax

from jaxgen.kernels import reference
from jaxgen.kernels.reference import RelativePositionBias, relative_position_bucket

__all__ = ["IMPLS", "RelativePositionBias", "attention", "relative_position_bucket", "resolve_impl"]

IMPLS = ("xla", "flash", "auto")


def resolve_impl(impl: str) -> str:
    """Returns the concrete implementation for `impl`: 'auto' is flash on TPU and GPU, xla on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "flash" if jax.default_backend() in ("tpu", "gpu") else "xla"
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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Attention of q `[B, T, N, H]` over k, v `[B, S, N, H]` → `[B, T, N, H]`.

    segment ids are `[B, T]` / `[B, S]` int32 with 0 = padding; for self-attention `kv_segment_ids`
    defaults to `segment_ids`. `bias` is additive `[B|1, N, T, S]`; `scale` defaults to 1/sqrt(H).
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
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    if resolve_impl(impl) == "flash":
        from jaxgen.kernels import flash_attention

        return flash_attention.flash_attention(q, k, v, **kwargs)
    return reference.attention(q, k, v, **kwargs)
