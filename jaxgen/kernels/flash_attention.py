"""Flash attention in Pallas: online-softmax forward, recomputing backward, one kernel body.

Letters as in `jaxgen.models.layers`: B batch, T query length, S key length, N heads, H head dim.
The public function takes q `[B, T, N, H]`, k, v `[B, S, N, H]` like `reference.attention`.

Design (FlashAttention-2, Dao 2023):
- forward: grid (B, N, T / block_q); each program keeps its q block resident and loops over kv
  blocks, carrying the running max `m_i`, the running sum `l_i` and the unnormalised output `acc`.
  It writes the output and the per-row log-sum-exp only: memory is linear in T and S.
- backward: two kernels recompute the probabilities from the saved log-sum-exp: a grid over kv
  blocks looping over q blocks (dk, dv), and a grid over q blocks looping over kv blocks (dq, the
  dense bias gradient strip by strip, the T5 relative table gradient as per-bucket partial sums).
- masks (causal, segment ids, key padding), the T5 relative-position bias (bucket function + table)
  and the dropout keep mask (`jaxgen.kernels.dropout`: a hash of seed, batch, head, row, column)
  are recomputed per block from indices, in the forward and in both backward kernels. Nothing of
  size T x S reaches HBM unless the caller passes a dense `bias`, which is T x S already.

The same kernel bodies lower with Mosaic on TPU (`pltpu.CompilerParams`) and with Triton on GPU
(`plgpu.CompilerParams`); on CPU they run in interpret mode (the HLO interpreter for the GPU
flavour, the TPU interpreter for the TPU flavour): exact but slow.

Sharding: the kernel sees whole arrays, so under `shard_map` it runs on each device's local shard.
Batch and heads may be sharded freely (every (batch, head) pair is independent); lengths and
head_dim may not. Works with `check_vma=True`. The dropout hash uses *local* batch/head indices,
so inside `shard_map` fold `lax.axis_index` of the sharded axes into `dropout_rng` to decorrelate
the shards' masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from jaxgen import parallel
from jaxgen.kernels.dropout import keep_bits, seed_of
from jaxgen.kernels.reference import MASK_VALUE, RelativePositionBias, relative_position_bucket

__all__ = ["BACKENDS", "BlockSizes", "flash_attention"]

BACKENDS = ("tpu", "gpu")
# Smallest block: Triton's dot needs every dimension >= 16, Mosaic wants sublane multiples of 8.
_MIN_BLOCK = 16
# lse of a row with no visible key: exp(s - lse) underflows to 0 for every finite s.
_EMPTY_ROW_LSE = -MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query and key axes, for the forward and the two backward kernels."""

    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int

    @classmethod
    def default(cls, backend: str) -> BlockSizes:
        """Per-backend defaults: 128 x 128 tiles for TPU's MXU, smaller tiles for Triton."""
        if backend == "tpu":
            return cls(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)
        return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: it is a custom_vjp nondiff argument)."""

    backend: str
    interpret: bool
    scale: float
    causal: bool
    has_segments: bool
    has_bias: bool
    bias_batched: bool
    has_relative: bool
    rel_bidirectional: bool
    rel_num_buckets: int
    rel_max_distance: int
    dropout_rate: float
    heads: int
    head_dim: int  # padded
    q_len: int  # unpadded lengths: columns >= kv_len are padding and masked
    kv_len: int
    kv_len_padded: int
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int


# --------------------------------------------------------------------------------------------------
# Shared block math.


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with float32 accumulation; transposes folded into the contraction."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _unpack(refs: tuple, names: list[str]) -> dict[str, Any]:
    """Names a kernel's positional refs; `names` lists the inputs and outputs actually passed."""
    assert len(refs) == len(names), (len(refs), names)
    return dict(zip(names, refs, strict=True))


def _table_values(r: dict, c: _Static) -> jax.Array | None:
    """The head's relative-bias table row `[1, nb_pad]` (float32), or None."""
    if not c.has_relative:
        return None
    return r["table"][...].astype(jnp.float32)


def _lane(row: jax.Array, j: jax.Array) -> jax.Array:
    """Element j of a `[1, n]` row as a `[1, 1]` value (a masked sum: kernels cannot gather)."""
    lanes = lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lanes == j, row, 0.0), axis=1, keepdims=True)


def _buckets(c: _Static, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """T5 buckets of (key - query) positions, with the reference's own bucket function."""
    return relative_position_bucket(
        cols - rows,
        bidirectional=c.rel_bidirectional,
        num_buckets=c.rel_num_buckets,
        max_distance=c.rel_max_distance,
    )


def _block_logits(
    c: _Static,
    q: jax.Array,
    k: jax.Array,
    q_start: jax.Array,
    k_start: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    bias: jax.Array | None,
    table: jax.Array | None,
):
    """Scaled, biased logits `[bq, bk]` (float32), the visibility mask (or None) and the buckets."""
    bq, bk = q.shape[0], k.shape[0]
    s = _dot(q, k, trans_b=True) * c.scale
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    buckets = None
    if table is not None:
        buckets = _buckets(c, rows, cols)
        # A loop over buckets, not a gather (none in Mosaic/Triton); a rolled loop keeps the kernel
        # small, which matters most in interpret mode.
        rel = lax.fori_loop(
            0,
            c.rel_num_buckets,
            lambda j, rel: jnp.where(buckets == j, _lane(table, j), rel),
            jnp.zeros((bq, bk), jnp.float32),
        )
        s = s + rel
    mask = None
    if c.causal:
        mask = rows >= cols
    if kv_seg is not None:
        seg = (q_seg == kv_seg) & (kv_seg != 0)  # [bq, 1] vs [1, bk]
        mask = seg if mask is None else mask & seg
    if c.kv_len != c.kv_len_padded:  # the last kv blocks run past the keys: mask the padding
        pad = cols < c.kv_len
        mask = pad if mask is None else mask & pad
    return s, mask, rows, cols, buckets


def _kv_blocks_visible(c: _Static, q_block: jax.Array, bq: int, bk: int, num_kv_blocks: int):
    """Number of kv blocks a q block must visit: all, or up to the diagonal when causal."""
    if not c.causal:
        return num_kv_blocks
    return jnp.minimum(num_kv_blocks, lax.div((q_block + 1) * bq + bk - 1, bk))


# --------------------------------------------------------------------------------------------------
# Kernels. Refs are [block, H] tiles or whole [len, H] sequences of one (batch, head); row vectors
# are kept 2-D ([bq, 1] / [1, bk]) so that the same body lowers on Mosaic and Triton.


def _fwd_kernel(*refs, c: _Static, names: list[str]):
    """Forward: one q block against every visible kv block; writes o and lse."""
    r = _unpack(refs, names)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q, c.block_kv
    q_start = i * bq
    q = r["q"][...]
    q_seg = r["q_seg"][...] if c.has_segments else None
    table = _table_values(r, c)
    seed = r["seed"][...] if c.dropout_rate > 0 else None
    num_kv_blocks = r["k"].shape[0] // bk

    def body(j, carry):
        acc, m_i, l_i = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(k_start, bk), :]
        v = r["v"][pl.ds(k_start, bk), :]
        kv_seg = r["kv_seg"][:, pl.ds(k_start, bk)] if c.has_segments else None
        bias = r["bias"][:, pl.ds(k_start, bk)] if c.has_bias else None
        s, mask, rows, cols, _ = _block_logits(
            c, q, k, q_start, k_start, q_seg, kv_seg, bias, table
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a fully masked block must add nothing, not exp(0) = 1
        alpha = jnp.exp(m_i - m_new)
        l_new = alpha * l_i + jnp.sum(p, axis=1, keepdims=True)
        if seed is not None:
            keep = keep_bits(seed, b * c.heads + h, rows, cols, c.dropout_rate)
            p = jnp.where(keep, p * (1.0 / (1.0 - c.dropout_rate)), 0.0)
        acc = alpha * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    acc = jnp.zeros(q.shape, jnp.float32)
    m_i = jnp.full((bq, 1), MASK_VALUE, jnp.float32)
    l_i = jnp.zeros((bq, 1), jnp.float32)
    upper = _kv_blocks_visible(c, i, bq, bk, num_kv_blocks)
    acc, m_i, l_i = lax.fori_loop(0, upper, body, (acc, m_i, l_i))
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    r["o"][...] = (acc / l_safe).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, _EMPTY_ROW_LSE, m_i + jnp.log(l_safe))


def _probs_and_dlogits(c, s, mask, lse, do, v, delta, keep):
    """Recomputed probabilities, dropped probabilities and dlogits for one tile (FA2 backward)."""
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, trans_b=True)  # [bq, bk] gradient w.r.t. the dropped probabilities
    p_drop = p
    if keep is not None:
        inv_keep = 1.0 / (1.0 - c.dropout_rate)
        p_drop = jnp.where(keep, p * inv_keep, 0.0)
        dp = jnp.where(keep, dp * inv_keep, 0.0)
    ds = p * (dp - delta)  # delta = rowsum(dO * O) = rowsum(P * dP)
    return p_drop, ds


def _dkv_kernel(*refs, c: _Static, names: list[str]):
    """Backward for one kv block: loops over the q blocks that see it; writes dk and dv."""
    r = _unpack(refs, names)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    k_start = j * bk
    k = r["k"][...]
    v = r["v"][...]
    kv_seg = r["kv_seg"][...] if c.has_segments else None
    table = _table_values(r, c)
    seed = r["seed"][...] if c.dropout_rate > 0 else None
    num_q_blocks = r["q"].shape[0] // bq

    def body(i, carry):
        dk, dv = carry
        q_start = pl.multiple_of(i * bq, bq)
        q = r["q"][pl.ds(q_start, bq), :]
        do = r["do"][pl.ds(q_start, bq), :]
        lse = r["lse"][pl.ds(q_start, bq), :]
        delta = r["delta"][pl.ds(q_start, bq), :]
        q_seg = r["q_seg"][pl.ds(q_start, bq), :] if c.has_segments else None
        bias = r["bias"][pl.ds(q_start, bq), :] if c.has_bias else None
        s, mask, rows, cols, _ = _block_logits(
            c, q, k, q_start, k_start, q_seg, kv_seg, bias, table
        )
        keep = None
        if seed is not None:
            keep = keep_bits(seed, b * c.heads + h, rows, cols, c.dropout_rate)
        p_drop, ds = _probs_and_dlogits(c, s, mask, lse, do, v, delta, keep)
        dv = dv + _dot(p_drop.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    # Causal: q blocks entirely above the diagonal never see this kv block.
    lower = lax.div(k_start, bq) if c.causal else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
    r["dk"][...] = (dk * c.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def _dq_kernel(*refs, c: _Static, names: list[str]):
    """Backward for one q block, looping over visible kv blocks: dq, dbias strip, dtable part."""
    r = _unpack(refs, names)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    q_start = i * bq
    q = r["q"][...]
    do = r["do"][...]
    lse = r["lse"][...]
    delta = r["delta"][...]
    q_seg = r["q_seg"][...] if c.has_segments else None
    table = _table_values(r, c)
    seed = r["seed"][...] if c.dropout_rate > 0 else None
    num_kv_blocks = r["k"].shape[0] // bk
    nb_lanes = r["dtable"].shape[-1] if c.has_relative else 0

    def body(j, carry):
        dq, dtable = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(k_start, bk), :]
        v = r["v"][pl.ds(k_start, bk), :]
        kv_seg = r["kv_seg"][:, pl.ds(k_start, bk)] if c.has_segments else None
        bias = r["bias"][:, pl.ds(k_start, bk)] if c.has_bias else None
        s, mask, rows, cols, buckets = _block_logits(
            c, q, k, q_start, k_start, q_seg, kv_seg, bias, table
        )
        keep = None
        if seed is not None:
            keep = keep_bits(seed, b * c.heads + h, rows, cols, c.dropout_rate)
        _, ds = _probs_and_dlogits(c, s, mask, lse, do, v, delta, keep)
        dq = dq + _dot(ds.astype(k.dtype), k)
        if c.has_bias:
            r["dbias"][:, pl.ds(k_start, bk)] = ds.astype(r["dbias"].dtype)
        if c.has_relative:
            lanes = lax.broadcasted_iota(jnp.int32, (1, nb_lanes), 1)

            def add_bucket(bucket, dtable):  # dtable[bucket] += sum of ds over the bucket's entries
                part = jnp.sum(jnp.where(buckets == bucket, ds, 0.0), axis=1, keepdims=True)
                part = jnp.sum(part, axis=0, keepdims=True)  # [1, 1]
                return dtable + jnp.where(lanes == bucket, part, 0.0)

            dtable = lax.fori_loop(0, c.rel_num_buckets, add_bucket, dtable)
        return dq, dtable

    upper = _kv_blocks_visible(c, i, bq, bk, num_kv_blocks)
    dtable = jnp.zeros((1, max(nb_lanes, 1)), jnp.float32)
    dq, dtable = lax.fori_loop(0, upper, body, (jnp.zeros(q.shape, jnp.float32), dtable))
    if c.has_bias and c.causal:
        # Blocks above the diagonal still need a zero gradient; writing them separately (instead of
        # zero-filling the strip first) keeps every address written once, so no ordering hazards.
        def zero_block(j, carry):
            k_start = pl.multiple_of(j * bk, bk)
            r["dbias"][:, pl.ds(k_start, bk)] = jnp.zeros((bq, bk), r["dbias"].dtype)
            return carry

        lax.fori_loop(upper, num_kv_blocks, zero_block, 0)
    r["dq"][...] = (dq * c.scale).astype(r["dq"].dtype)
    if c.has_relative:
        r["dtable"][...] = dtable


# --------------------------------------------------------------------------------------------------
# pallas_call plumbing. Kernel layout: q, o [B, N, Tp, Hp]; k, v [B, N, Sp, Hp]; lse, delta
# [B, N, Tp, 1]; q_seg [B, Tp, 1]; kv_seg [B, 1, Sp]; bias [Bb, N, Tp, Sp]; table [N, 1, nb_pad];
# seed [1, 1].


def _compiler_params(c: _Static, vmem_bytes: int):
    """Mosaic params on TPU (parallel grid, room for whole-sequence k/v), Triton params on GPU."""
    if c.backend == "tpu":
        limit = None
        if vmem_bytes > 12 * 2**20:  # above Mosaic's default scoped limit: ask for more
            limit = min(int(vmem_bytes * 1.5) + 4 * 2**20, 100 * 2**20)
        return pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"), vmem_limit_bytes=limit
        )
    # Larger head dims mean larger tiles: more warps to hold them.
    return plgpu.CompilerParams(num_warps=4 if c.head_dim <= 64 else 8, num_stages=2)


def _interpret_arg(c: _Static):
    """pallas_call's `interpret`: TPU-semantics interpreter for the TPU flavour, HLO one for GPU."""
    if not c.interpret:
        return False
    return pltpu.InterpretParams() if c.backend == "tpu" else True


def _pallas(kernel, c: _Static, grid, inputs: dict, out_shapes: dict, out_specs: dict, name: str):
    """Runs `kernel` on `grid`; inputs {name: (array, spec)}, outputs {name: (shape, dtype)}."""
    names = list(inputs) + list(out_shapes)
    # Under shard_map(check_vma=True) pallas outputs must say over which manual axes they vary: all
    # inputs were made to vary alike (`_vary_alike`), so outputs vary like q.
    mat = jax.typeof(inputs["q"][0]).manual_axis_type
    out_shapes = {
        key: jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        for key, (shape, dtype) in out_shapes.items()
    }
    vmem = 2 * sum(
        math.prod(d for d in spec.block_shape if d is not None) * arr.dtype.itemsize
        for arr, spec in inputs.values()
    )
    return pl.pallas_call(
        functools.partial(kernel, c=c, names=names),
        grid=grid,
        in_specs=[spec for _, spec in inputs.values()],
        out_specs=list(out_specs.values()),
        out_shape=list(out_shapes.values()),
        compiler_params=_compiler_params(c, vmem),
        interpret=_interpret_arg(c),
        name=name,
    )(*[arr for arr, _ in inputs.values()])


def _common_inputs(c, q_seg, kv_seg, table, seed, *, q_block, kv_block, q_index, kv_index):
    """Specs of the optional per-(b, h) inputs; q_block/kv_block: segment-id block lengths."""
    inputs = {}
    if c.has_segments:
        inputs["q_seg"] = (q_seg, pl.BlockSpec((None, q_block, 1), q_index))
        inputs["kv_seg"] = (kv_seg, pl.BlockSpec((None, 1, kv_block), kv_index))
    if c.has_relative:
        nb = table.shape[-1]
        inputs["table"] = (table, pl.BlockSpec((None, 1, nb), lambda b, h, i: (h, 0, 0)))
    if c.dropout_rate > 0:
        inputs["seed"] = (seed, pl.BlockSpec((1, 1), lambda b, h, i: (0, 0)))
    return inputs


def _bias_index(c: _Static, q_map, kv_map):
    """Index map for the dense bias: batch 0 when it broadcasts over batch."""
    return lambda b, h, i: (b if c.bias_batched else 0, h, q_map(i), kv_map(i))


def _forward(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed):
    """Runs the forward kernel on padded kernel-layout arrays; returns o and lse."""
    batch, heads, t_pad, hd = q.shape
    s_pad = k.shape[2]
    bq = c.block_q
    seq = lambda b, h, i: (b, h, 0, 0)
    blk = lambda b, h, i: (b, h, i, 0)
    inputs = {
        "q": (q, pl.BlockSpec((None, None, bq, hd), blk)),
        "k": (k, pl.BlockSpec((None, None, s_pad, hd), seq)),
        "v": (v, pl.BlockSpec((None, None, s_pad, hd), seq)),
    }
    if c.has_bias:
        spec = pl.BlockSpec((None, None, bq, s_pad), _bias_index(c, lambda i: i, lambda i: 0))
        inputs["bias"] = (bias, spec)
    inputs |= _common_inputs(
        c, q_seg, kv_seg, table, seed, q_block=bq, kv_block=s_pad,
        q_index=lambda b, h, i: (b, i, 0), kv_index=lambda b, h, i: (b, 0, 0),
    )  # fmt: skip
    out_shapes = {
        "o": (q.shape, q.dtype),
        "lse": ((batch, heads, t_pad, 1), jnp.float32),
    }
    out_specs = {
        "o": pl.BlockSpec((None, None, bq, hd), blk),
        "lse": pl.BlockSpec((None, None, bq, 1), blk),
    }
    grid = (batch, heads, t_pad // bq)
    o, lse = _pallas(_fwd_kernel, c, grid, inputs, out_shapes, out_specs, "jaxgen_flash_fwd")
    return o, lse


def _backward(c: _Static, res, do):
    """Runs the dk/dv and dq kernels; returns gradients for q, k, v, bias and table."""
    q, k, v, q_seg, kv_seg, bias, table, seed, o, lse = res
    batch, heads, t_pad, hd = q.shape
    s_pad = k.shape[2]
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    # delta_i = rowsum(dO_i * O_i): [B, N, Tp, 1], linear in T.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    seq = lambda b, h, i: (b, h, 0, 0)
    blk = lambda b, h, i: (b, h, i, 0)

    # dk, dv: grid over kv blocks, whole q/do/lse/delta sequences resident.
    inputs = {
        "q": (q, pl.BlockSpec((None, None, t_pad, hd), seq)),
        "k": (k, pl.BlockSpec((None, None, bk, hd), blk)),
        "v": (v, pl.BlockSpec((None, None, bk, hd), blk)),
        "do": (do, pl.BlockSpec((None, None, t_pad, hd), seq)),
        "lse": (lse, pl.BlockSpec((None, None, t_pad, 1), seq)),
        "delta": (delta, pl.BlockSpec((None, None, t_pad, 1), seq)),
    }
    if c.has_bias:
        spec = pl.BlockSpec((None, None, t_pad, bk), _bias_index(c, lambda j: 0, lambda j: j))
        inputs["bias"] = (bias, spec)
    inputs |= _common_inputs(
        c, q_seg, kv_seg, table, seed, q_block=t_pad, kv_block=bk,
        q_index=lambda b, h, j: (b, 0, 0), kv_index=lambda b, h, j: (b, 0, j),
    )  # fmt: skip
    out_shapes = {"dk": (k.shape, k.dtype), "dv": (v.shape, v.dtype)}
    out_specs = {
        "dk": pl.BlockSpec((None, None, bk, hd), blk),
        "dv": pl.BlockSpec((None, None, bk, hd), blk),
    }
    grid = (batch, heads, s_pad // bk)
    dk, dv = _pallas(_dkv_kernel, c, grid, inputs, out_shapes, out_specs, "jaxgen_flash_dkv")

    # dq (+ bias gradients): grid over q blocks, whole k/v sequences resident.
    inputs = {
        "q": (q, pl.BlockSpec((None, None, bq, hd), blk)),
        "k": (k, pl.BlockSpec((None, None, s_pad, hd), seq)),
        "v": (v, pl.BlockSpec((None, None, s_pad, hd), seq)),
        "do": (do, pl.BlockSpec((None, None, bq, hd), blk)),
        "lse": (lse, pl.BlockSpec((None, None, bq, 1), blk)),
        "delta": (delta, pl.BlockSpec((None, None, bq, 1), blk)),
    }
    if c.has_bias:
        spec = pl.BlockSpec((None, None, bq, s_pad), _bias_index(c, lambda i: i, lambda i: 0))
        inputs["bias"] = (bias, spec)
    inputs |= _common_inputs(
        c, q_seg, kv_seg, table, seed, q_block=bq, kv_block=s_pad,
        q_index=lambda b, h, i: (b, i, 0), kv_index=lambda b, h, i: (b, 0, 0),
    )  # fmt: skip
    num_q_blocks = t_pad // bq
    out_shapes = {"dq": (q.shape, q.dtype)}
    out_specs = {"dq": pl.BlockSpec((None, None, bq, hd), blk)}
    if c.has_bias:
        # Per-batch strips even for a broadcast bias; summed over batch below.
        out_shapes["dbias"] = ((batch, heads, t_pad, s_pad), jnp.float32)
        out_specs["dbias"] = pl.BlockSpec((None, None, bq, s_pad), blk)
    if c.has_relative:
        nb = table.shape[-1]
        out_shapes["dtable"] = ((batch, heads, num_q_blocks, 1, nb), jnp.float32)
        out_specs["dtable"] = pl.BlockSpec(
            (None, None, None, 1, nb), lambda b, h, i: (b, h, i, 0, 0)
        )
    grid = (batch, heads, num_q_blocks)
    outs = _pallas(_dq_kernel, c, grid, inputs, out_shapes, out_specs, "jaxgen_flash_dq")
    outs = dict(zip(out_shapes, outs, strict=True))
    dbias = dtable = None
    if c.has_bias:
        dbias = outs["dbias"]
        if not c.bias_batched:
            dbias = jnp.sum(dbias, axis=0, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    if c.has_relative:
        dtable = jnp.sum(outs["dtable"], axis=(0, 2)).astype(table.dtype)  # [N, 1, nb]
    return outs["dq"], dk, dv, dbias, dtable


def _vary_alike(*xs):
    """Makes every array vary over the union of the inputs' shard_map manual axes (no-op outside).

    Inside `shard_map(check_vma=True)` a replicated input (the relative table, a broadcast bias, the
    seed) meeting sharded q/k/v is cast to varying here, outside the custom_vjp, so that autodiff
    inserts the psum that its gradient needs.
    """
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs if x is not None))

    def cast(x):
        missing = axes - jax.typeof(x).manual_axis_type.varying
        return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return [None if x is None else cast(x) for x in xs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed):
    """Differentiable flash attention on padded kernel-layout arrays."""
    return _forward(c, q, k, v, q_seg, kv_seg, bias, table, seed)[0]


def _flash_fwd(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed):
    """custom_vjp forward: saves the inputs, the output and the log-sum-exp only."""
    o, lse = _forward(c, q, k, v, q_seg, kv_seg, bias, table, seed)
    return o, (q, k, v, q_seg, kv_seg, bias, table, seed, o, lse)


def _flash_bwd(c: _Static, res, do):
    """custom_vjp backward: recomputes attention blockwise; integer inputs get no cotangent."""
    dq, dk, dv, dbias, dtable = _backward(c, res, do)
    return dq, dk, dv, None, None, dbias, dtable, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------------
# Public entry point.


def _block(requested: int, length: int) -> int:
    """Effective block: the requested one, or the smallest power of two >= 16 covering `length`."""
    return min(requested, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _round_up(x: int, m: int) -> int:
    """x rounded up to a multiple of m."""
    return -(-x // m) * m


def _padded_head_dim(head_dim: int) -> int:
    """64 and 128 natively; others padded with zeros to the next power of two (at least 64)."""
    return max(64, pl.next_power_of_2(head_dim))


def flash_attention(
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
    dropout_rng: jax.Array | int | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention of q `[B, T, N, H]` over k, v `[B, S, N, H]` → `[B, T, N, H]`.

    Same semantics as `reference.attention`: segment ids `[B, T]` / `[B, S]` (0 = padding; both or
    neither), additive `bias` `[B|1, N, T, S]`, T5 `relative_bias` computed in the kernel, dropout
    from `dropout_rng` (a PRNG key or int seed; mask: `dropout.attention_keep_mask`). `backend`
    'tpu' (Mosaic) or 'gpu' (Triton) picks the kernel flavour (default: that of the mesh in
    context, else of the default backend; the GPU flavour on CPU); `interpret` defaults to True
    on CPU. Differentiable in q, k, v, bias and the relative table.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, len, N, H]; got {q.shape=} {k.shape=} {v.shape=}")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, head_dim):
        raise ValueError(
            f"k and v must be [{batch}, S, {heads}, {head_dim}]; got {k.shape=} {v.shape=}"
        )
    if (segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("segment_ids and kv_segment_ids must be given together")
    if segment_ids is not None and segment_ids.shape != (batch, q_len):
        raise ValueError(f"segment_ids must be [{batch}, {q_len}]; got {segment_ids.shape=}")
    if kv_segment_ids is not None and kv_segment_ids.shape != (batch, kv_len):
        raise ValueError(f"kv_segment_ids must be [{batch}, {kv_len}]; got {kv_segment_ids.shape=}")
    if bias is not None and (
        bias.ndim != 4
        or bias.shape[0] not in (1, batch)
        or bias.shape[1:] != (heads, q_len, kv_len)
    ):
        raise ValueError(f"bias must be [B|1, {heads}, {q_len}, {kv_len}]; got {bias.shape=}")
    if relative_bias is not None and relative_bias.table.shape != (
        relative_bias.num_buckets,
        heads,
    ):
        raise ValueError(
            f"relative table must be [{relative_bias.num_buckets}, {heads}]; "
            f"got {relative_bias.table.shape=}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{dropout_rate=} must be in [0, 1)")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    platform = parallel.device_platform()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(BACKENDS)}")
    if interpret is None:
        interpret = platform not in ("tpu", "gpu")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    blocks = block_sizes or BlockSizes.default(backend)
    bq, bk = _block(blocks.block_q, q_len), _block(blocks.block_kv, kv_len)
    bq_bwd, bk_bwd = _block(blocks.block_q_bwd, q_len), _block(blocks.block_kv_bwd, kv_len)
    # Pad lengths to a multiple of every block so that all three kernels share one padded layout.
    t_pad = _round_up(q_len, math.lcm(bq, bq_bwd))
    s_pad = _round_up(kv_len, math.lcm(bk, bk_bwd))
    hd_pad = _padded_head_dim(head_dim)

    def to_kernel(x, length, padded):  # [B, L, N, H] -> [B, N, Lp, Hp]
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, hd_pad - head_dim)))

    qk = to_kernel(q, q_len, t_pad)
    kk = to_kernel(k, kv_len, s_pad)
    vk = to_kernel(v, kv_len, s_pad)
    q_seg = kv_seg = bias_k = table = seed = None
    if segment_ids is not None:
        # Padded queries get segment 0 too; their rows are sliced away.
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - q_len)))[:, :, None]
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - kv_len)))[:, None]
    if bias is not None:
        bias_k = jnp.pad(bias, ((0, 0), (0, 0), (0, t_pad - q_len), (0, s_pad - kv_len)))
    rel = relative_bias
    if rel is not None:
        nb_pad = pl.next_power_of_2(rel.num_buckets)
        table = jnp.pad(rel.table.astype(jnp.float32).T, ((0, 0), (0, nb_pad - rel.num_buckets)))
        table = table[:, None, :]  # [N, 1, nb_pad]
    if dropout_rate > 0.0:
        seed = seed_of(dropout_rng).reshape(1, 1)
    c = _Static(
        backend=backend,
        interpret=bool(interpret),
        scale=float(scale),
        causal=bool(causal),
        has_segments=segment_ids is not None,
        has_bias=bias is not None,
        bias_batched=bias is not None and bias.shape[0] == batch and batch > 1,
        has_relative=rel is not None,
        rel_bidirectional=bool(rel.bidirectional) if rel is not None else False,
        rel_num_buckets=rel.num_buckets if rel is not None else 0,
        rel_max_distance=rel.max_distance if rel is not None else 0,
        dropout_rate=float(dropout_rate),
        heads=heads,
        head_dim=hd_pad,
        q_len=q_len,
        kv_len=kv_len,
        kv_len_padded=s_pad,
        block_q=bq,
        block_kv=bk,
        block_q_bwd=bq_bwd,
        block_kv_bwd=bk_bwd,
    )
    args = _vary_alike(qk, kk, vk, q_seg, kv_seg, bias_k, table, seed)
    out = _flash(c, *args)  # [B, N, Tp, Hp]
    return jnp.transpose(out[:, :, :q_len, :head_dim], (0, 2, 1, 3))
