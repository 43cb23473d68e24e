"""Flash attention in Pallas: online-softmax forward, recomputing backward, shared tile math.

Letters as in `jaxgen.models.layers`: B batch, T query length, S key length, N heads, H head dim.
The public function takes q `[B, T, N, H]`, k, v `[B, S, N, H]` like `reference.attention`.

Design (FlashAttention-2, Dao 2023):
- forward: for each q block, an online softmax over the kv blocks, carrying the running max
  `m_i`, the running sum `l_i` and the unnormalised output `acc`. It writes the output and the
  per-row log-sum-exp only: HBM traffic and memory are linear in T and S.
- backward: two kernels recompute the probabilities from the saved log-sum-exp: kv blocks
  reducing over q blocks (dk, dv), and q blocks reducing over kv blocks (dq, the dense bias
  gradient tile by tile, the T5 relative table gradient as per-bucket partial sums).
- masks (causal, a sliding `window`, a query `q_offset`, segment ids, key padding), the T5
  relative-position bias (bucket function + table) and the dropout keep mask
  (`jaxgen.kernels.dropout`: a hash of seed, batch, head, row, column) are recomputed per tile
  from indices, in the forward and in both backward kernels. Nothing of size T x S reaches HBM
  unless the caller passes a dense `bias`, which is T x S already.

Two flavours drive the same tile functions:
- TPU (Mosaic): the reduction axis is the last, sequential ("arbitrary") grid axis. Every operand
  is a `[block, H]` tile that the Pallas pipeline DMAs (double-buffered) and the running state
  lives in VMEM scratch, so VMEM use does not grow with T or S. Causal and windowed tiles outside
  the band are skipped: their grid steps map to the block already resident (no DMA) and do no
  work.
- GPU (Triton): programs cannot carry state across grid steps, so each program loops over the
  reduction axis and loads `pl.ds` slices of whole-sequence operands kept in HBM; the loop covers
  the band only.
On CPU both run in interpret mode (the TPU interpreter for the TPU flavour, the HLO interpreter for
the GPU one): exact but slow.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
# TPU generations whose Mosaic matmul takes float32 operands only (bf16 inputs are upcast).
_F32_MATMUL_TPUS = ("v2", "v3")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query and key axes, for the forward and the two backward kernels."""

    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int

    @classmethod
    def default(cls, backend: str, generation: str | None = None) -> BlockSizes:
        """Defaults per backend and TPU generation (`parallel.tpu_generation`).

        TPU tiles are multiples of the 128-wide MXU. v5e, v5p, v6e and later have 64-128 MiB of
        VMEM per core and take larger forward tiles; v2-v4 (16 MiB) keep 128 x 128. These sizes
        are the ones `tests/kernels/test_flash_compile.py` compiles at 512 to 131,072 tokens;
        they are not tuned for speed on the hardware. Triton gets smaller tiles (shared memory).
        """
        if backend == "tpu":
            if generation in (None, "v2", "v3", "v4"):
                return cls(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)
            return cls(block_q=256, block_kv=512, block_q_bwd=256, block_kv_bwd=256)
        return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: it is a custom_vjp nondiff argument)."""

    backend: str
    interpret: bool
    f32_matmul: bool
    scale: float
    causal: bool
    window: int  # 0: no sliding window
    q_offset: int  # position of the first query when known at trace time
    q_offset_traced: bool  # the offset is a traced input instead (decoding): no tile skipping
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
# Shared block math: one (q block, kv block) tile, whichever flavour drives the loop over tiles.


class _Tile(NamedTuple):
    """One tile's position and per-tile inputs (query-side `[bq, 1]`, key-side `[1, bk]`)."""

    q_start: jax.Array | int  # first query row of the tile (unpadded coordinates)
    k_start: jax.Array | int
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    bias: jax.Array | None  # [bq, bk]
    table: jax.Array | None  # [1, nb_pad] float32
    seed: jax.Array | None
    q_offset: jax.Array | None  # [1, 1] int32 when the offset is traced
    batch_head: jax.Array  # b * heads + h, for the dropout hash


def _dot(
    c: _Static, a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False
) -> jax.Array:
    """2-D matmul with float32 accumulation; transposes folded into the contraction."""
    if c.f32_matmul:  # the v2/v3 MXU path in Mosaic takes float32 operands only
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _unpack(refs: tuple, names: list[str]) -> dict[str, Any]:
    """Names a kernel's positional refs; `names` lists the inputs, outputs and scratch passed."""
    assert len(refs) == len(names), (len(refs), names)
    return dict(zip(names, refs, strict=True))


def _lane(row: jax.Array, j: jax.Array) -> jax.Array:
    """Element j of a `[1, n]` row as a `[1, 1]` value (a masked sum: kernels cannot gather)."""
    lanes = lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lanes == j, row, 0.0), axis=1, keepdims=True)


def _block_logits(c: _Static, q: jax.Array, k: jax.Array, t: _Tile):
    """Scaled, biased logits `[bq, bk]` (float32), the visibility mask (or None), and the local
    rows, the columns and the T5 buckets of the tile."""
    bq, bk = q.shape[0], k.shape[0]
    s = _dot(c, q, k, trans_b=True) * c.scale
    rows = t.q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = t.k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    # Query positions: rows shifted by the offset of the first query (decoding after a prompt).
    pos = rows + (t.q_offset if t.q_offset is not None else c.q_offset)
    if t.bias is not None:
        s = s + t.bias.astype(jnp.float32)
    buckets = None
    if t.table is not None:
        buckets = _buckets(c, pos, cols)
        # A loop over buckets, not a gather (none in Mosaic/Triton); a rolled loop keeps the kernel
        # small, which matters most in interpret mode.
        rel = lax.fori_loop(
            0,
            c.rel_num_buckets,
            lambda j, rel: jnp.where(buckets == j, _lane(t.table, j), rel),
            jnp.zeros((bq, bk), jnp.float32),
        )
        s = s + rel
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if c.causal:
        mask = pos >= cols
    if c.window:
        mask = both(mask, cols > pos - c.window)
    if t.kv_seg is not None:
        mask = both(mask, (t.q_seg == t.kv_seg) & (t.kv_seg != 0))  # [bq, 1] vs [1, bk]
    if c.kv_len != c.kv_len_padded:  # the last kv blocks run past the keys: mask the padding
        mask = both(mask, cols < c.kv_len)
    return s, mask, rows, cols, buckets


def _buckets(c: _Static, pos: jax.Array, cols: jax.Array) -> jax.Array:
    """T5 buckets of (key - query) positions, with the reference's own bucket function."""
    return relative_position_bucket(
        cols - pos,
        bidirectional=c.rel_bidirectional,
        num_buckets=c.rel_num_buckets,
        max_distance=c.rel_max_distance,
    )


def _keep(c: _Static, t: _Tile, rows: jax.Array, cols: jax.Array) -> jax.Array | None:
    """The tile's dropout keep mask (local row and column indices, as the reference), or None."""
    if t.seed is None:
        return None
    return keep_bits(t.seed, t.batch_head, rows, cols, c.dropout_rate)


def _fwd_tile(c: _Static, q, k, v, t: _Tile, acc, m_i, l_i):
    """One online-softmax update of (acc, m, l) with a kv tile."""
    s, mask, rows, cols, _ = _block_logits(c, q, k, t)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a fully masked tile must add nothing, not exp(0) = 1
    alpha = jnp.exp(m_i - m_new)
    l_new = alpha * l_i + jnp.sum(p, axis=1, keepdims=True)
    keep = _keep(c, t, rows, cols)
    if keep is not None:
        p = jnp.where(keep, p * (1.0 / (1.0 - c.dropout_rate)), 0.0)
    acc = alpha * acc + _dot(c, p.astype(v.dtype), v)
    return acc, m_new, l_new


def _fwd_finish(acc, m_i, l_i, o_ref, lse_ref) -> None:
    """Writes the normalised output and the log-sum-exp; rows that saw no key get zeros."""
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, _EMPTY_ROW_LSE, m_i + jnp.log(l_safe))


def _grad_tile(c: _Static, q, k, v, do, lse, delta, t: _Tile):
    """Recomputed dropped probabilities, dlogits and buckets of one tile (FA2 backward)."""
    s, mask, rows, cols, buckets = _block_logits(c, q, k, t)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(c, do, v, trans_b=True)  # [bq, bk] gradient w.r.t. the dropped probabilities
    p_drop = p
    keep = _keep(c, t, rows, cols)
    if keep is not None:
        inv_keep = 1.0 / (1.0 - c.dropout_rate)
        p_drop = jnp.where(keep, p * inv_keep, 0.0)
        dp = jnp.where(keep, dp * inv_keep, 0.0)
    ds = p * (dp - delta)  # delta = rowsum(dO * O) = rowsum(P * dP)
    return p_drop, ds, buckets


def _dkv_tile(c: _Static, q, k, v, do, lse, delta, t: _Tile, dk, dv):
    """Adds one q tile's contribution to a kv block's (dk, dv)."""
    p_drop, ds, _ = _grad_tile(c, q, k, v, do, lse, delta, t)
    dv = dv + _dot(c, p_drop.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(c, ds.astype(q.dtype), q, trans_a=True)
    return dk, dv


def _dq_tile(c: _Static, q, k, v, do, lse, delta, t: _Tile, dq, dtable):
    """Adds one kv tile's contribution to a q block's dq and relative-table gradient; also ds."""
    _, ds, buckets = _grad_tile(c, q, k, v, do, lse, delta, t)
    dq = dq + _dot(c, ds.astype(k.dtype), k)
    if c.has_relative:
        lanes = lax.broadcasted_iota(jnp.int32, dtable.shape, 1)

        def add_bucket(bucket, dtable):  # dtable[bucket] += sum of ds over the bucket's entries
            part = jnp.sum(jnp.where(buckets == bucket, ds, 0.0), axis=1, keepdims=True)
            part = jnp.sum(part, axis=0, keepdims=True)  # [1, 1]
            return dtable + jnp.where(lanes == bucket, part, 0.0)

        dtable = lax.fori_loop(0, c.rel_num_buckets, add_bucket, dtable)
    return dq, dtable, ds


# --------------------------------------------------------------------------------------------------
# Which tiles can hold a visible entry. With the query offset known at trace time, causal and
# windowed masks bound the kv blocks of a q block (and the q blocks of a kv block) to a band; the
# tiles outside it are skipped. A traced offset (decoding) visits every tile, masked.


def _kv_band(c: _Static, i, bq: int, bk: int, nk: int):
    """[first, last] kv blocks that q block i may see (first > last: none)."""
    first, last = 0, nk - 1
    if c.q_offset_traced:
        return first, last
    if c.causal:  # the last query row of the block sees up to its own position
        last = jnp.minimum(last, lax.div(c.q_offset + (i + 1) * bq - 1, bk))
    if c.window:  # the first query row sees back to position - window + 1
        first = jnp.maximum(first, lax.div(jnp.maximum(c.q_offset + i * bq - c.window + 1, 0), bk))
    return first, last


def _q_band(c: _Static, j, bq: int, bk: int, nq: int):
    """[first, last] q blocks that may see kv block j (first > last: none)."""
    first, last = 0, nq - 1
    if c.q_offset_traced:
        return first, last
    if c.causal:  # queries before the block's first key see none of it
        first = jnp.maximum(first, lax.div(jnp.maximum(j * bk - c.q_offset, 0), bq))
    if c.window:  # queries a window past the block's last key see none of it
        reach = (j + 1) * bk - 1 + c.window - 1 - c.q_offset  # last query row that sees the block
        last = jnp.where(reach < 0, -1, jnp.minimum(last, lax.div(jnp.maximum(reach, 0), bq)))
    return first, last


def _clamp(x, band, n: int):
    """x moved into the band, then into [0, n): the block a skipped grid step re-uses (no DMA)."""
    first, last = band
    return jnp.clip(jnp.clip(x, first, last), 0, n - 1)


def _in_band(x, band):
    """Whether block x lies in the band."""
    return (x >= band[0]) & (x <= band[1])


# --------------------------------------------------------------------------------------------------
# Kernels, TPU flavour (Mosaic). The reduction axis is the last grid axis ("arbitrary"): every input
# is a [block, H] tile DMA'd by the pipeline, the running state lives in VMEM scratch, so VMEM use
# is independent of T and S. Skipped grid steps map to the block already resident.


def _tile_of(c: _Static, r: dict, b, h, q_start, k_start, *, q_slice=None, kv_slice=None) -> _Tile:
    """The tile's inputs, read whole from their refs or sliced (the GPU flavour's loops)."""

    def read(name, index):
        if name not in r:
            return None
        return r[name][...] if index is None else r[name][index]

    q_index = None if q_slice is None else (q_slice, slice(None))
    kv_index = None if kv_slice is None else (slice(None), kv_slice)
    if q_slice is not None:
        bias_index = (q_slice, slice(None))
    elif kv_slice is not None:
        bias_index = (slice(None), kv_slice)
    else:
        bias_index = None
    return _Tile(
        q_start=q_start,
        k_start=k_start,
        q_seg=read("q_seg", q_index),
        kv_seg=read("kv_seg", kv_index),
        bias=read("bias", bias_index),
        table=r["table"][...].astype(jnp.float32) if "table" in r else None,
        seed=read("seed", None),
        q_offset=read("q_off", None),
        batch_head=b * c.heads + h,
    )


def _fwd_kernel_tpu(*refs, c: _Static, names: list[str]):
    """Forward, grid (B, N, q blocks, kv blocks): one tile per step into (acc, m, l) scratch."""
    r = _unpack(refs, names)
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk, nk = c.block_q, c.block_kv, pl.num_programs(3)

    @pl.when(j == 0)
    def _():
        r["m_s"][...] = jnp.full(r["m_s"].shape, MASK_VALUE, jnp.float32)
        r["l_s"][...] = jnp.zeros(r["l_s"].shape, jnp.float32)
        r["acc_s"][...] = jnp.zeros(r["acc_s"].shape, jnp.float32)

    @pl.when(_in_band(j, _kv_band(c, i, bq, bk, nk)))
    def _():
        t = _tile_of(c, r, b, h, i * bq, j * bk)
        acc, m_i, l_i = _fwd_tile(
            c, r["q"][...], r["k"][...], r["v"][...], t,
            r["acc_s"][...], r["m_s"][...], r["l_s"][...],
        )  # fmt: skip
        r["acc_s"][...], r["m_s"][...], r["l_s"][...] = acc, m_i, l_i

    @pl.when(j == nk - 1)
    def _():
        _fwd_finish(r["acc_s"][...], r["m_s"][...], r["l_s"][...], r["o"], r["lse"])


def _dkv_kernel_tpu(*refs, c: _Static, names: list[str]):
    """dk/dv, grid (B, N, kv blocks, q blocks): one q tile per step into (dk, dv) scratch."""
    r = _unpack(refs, names)
    b, h, j, i = (pl.program_id(a) for a in range(4))
    bq, bk, nq = c.block_q_bwd, c.block_kv_bwd, pl.num_programs(3)

    @pl.when(i == 0)
    def _():
        r["dk_s"][...] = jnp.zeros(r["dk_s"].shape, jnp.float32)
        r["dv_s"][...] = jnp.zeros(r["dv_s"].shape, jnp.float32)

    @pl.when(_in_band(i, _q_band(c, j, bq, bk, nq)))
    def _():
        t = _tile_of(c, r, b, h, i * bq, j * bk)
        dk, dv = _dkv_tile(
            c, r["q"][...], r["k"][...], r["v"][...], r["do"][...], r["lse"][...],
            r["delta"][...], t, r["dk_s"][...], r["dv_s"][...],
        )  # fmt: skip
        r["dk_s"][...], r["dv_s"][...] = dk, dv

    @pl.when(i == nq - 1)
    def _():
        r["dk"][...] = (r["dk_s"][...] * c.scale).astype(r["dk"].dtype)
        r["dv"][...] = r["dv_s"][...].astype(r["dv"].dtype)


def _dq_kernel_tpu(*refs, c: _Static, names: list[str]):
    """dq (+ dbias tile, dtable partial), grid (B, N, q blocks, kv blocks), scratch accumulators."""
    r = _unpack(refs, names)
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk, nk = c.block_q_bwd, c.block_kv_bwd, pl.num_programs(3)
    visible = _in_band(j, _kv_band(c, i, bq, bk, nk))

    @pl.when(j == 0)
    def _():
        r["dq_s"][...] = jnp.zeros(r["dq_s"].shape, jnp.float32)
        if c.has_relative:
            r["dtable_s"][...] = jnp.zeros(r["dtable_s"].shape, jnp.float32)

    @pl.when(visible)
    def _():
        t = _tile_of(c, r, b, h, i * bq, j * bk)
        dtable = r["dtable_s"][...] if c.has_relative else None
        dq, dtable, ds = _dq_tile(
            c, r["q"][...], r["k"][...], r["v"][...], r["do"][...], r["lse"][...],
            r["delta"][...], t, r["dq_s"][...], dtable,
        )  # fmt: skip
        r["dq_s"][...] = dq
        if c.has_relative:
            r["dtable_s"][...] = dtable
        if c.has_bias:
            r["dbias"][...] = ds.astype(r["dbias"].dtype)

    if c.has_bias:  # every dbias tile is its own output block: skipped ones are zeros

        @pl.when(jnp.logical_not(visible))
        def _():
            r["dbias"][...] = jnp.zeros(r["dbias"].shape, r["dbias"].dtype)

    @pl.when(j == nk - 1)
    def _():
        r["dq"][...] = (r["dq_s"][...] * c.scale).astype(r["dq"].dtype)
        if c.has_relative:
            r["dtable"][...] = r["dtable_s"][...]


# --------------------------------------------------------------------------------------------------
# Kernels, GPU flavour (Triton). Triton programs have no sequential grid axis, so each program
# loops over the reduction axis itself: the reduced-over operands are whole-sequence refs in HBM
# and only the `pl.ds` slices a step reads are loaded (into registers/shared memory).


def _fwd_kernel_gpu(*refs, c: _Static, names: list[str]):
    """Forward, grid (B, N, q blocks): loops over the visible kv blocks; writes o and lse."""
    r = _unpack(refs, names)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q, c.block_kv
    q = r["q"][...]

    def body(j, carry):
        k_start = pl.multiple_of(j * bk, bk)
        rows = pl.ds(k_start, bk)
        t = _tile_of(c, r, b, h, i * bq, k_start, kv_slice=rows)
        return _fwd_tile(c, q, r["k"][rows, :], r["v"][rows, :], t, *carry)

    first, last = _kv_band(c, i, bq, bk, r["k"].shape[0] // bk)
    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m_i, l_i = lax.fori_loop(first, jnp.maximum(first, last + 1), body, init)
    _fwd_finish(acc, m_i, l_i, r["o"], r["lse"])


def _dkv_kernel_gpu(*refs, c: _Static, names: list[str]):
    """dk/dv, grid (B, N, kv blocks): loops over the q blocks that see this kv block."""
    r = _unpack(refs, names)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    k, v = r["k"][...], r["v"][...]

    def body(i, carry):
        q_start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(q_start, bq)
        t = _tile_of(c, r, b, h, q_start, j * bk, q_slice=rows)
        q, do = r["q"][rows, :], r["do"][rows, :]
        lse, delta = r["lse"][rows, :], r["delta"][rows, :]
        return _dkv_tile(c, q, k, v, do, lse, delta, t, *carry)

    first, last = _q_band(c, j, bq, bk, r["q"].shape[0] // bq)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, jnp.maximum(first, last + 1), body, (zeros, zeros))
    r["dk"][...] = (dk * c.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def _dq_kernel_gpu(*refs, c: _Static, names: list[str]):
    """dq (+ dbias strip, dtable partial), grid (B, N, q blocks): loops over visible kv blocks."""
    r = _unpack(refs, names)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    q, do, lse, delta = r["q"][...], r["do"][...], r["lse"][...], r["delta"][...]
    nk = r["k"].shape[0] // bk
    nb_lanes = r["dtable"].shape[-1] if c.has_relative else 1

    def body(j, carry):
        k_start = pl.multiple_of(j * bk, bk)
        cols = pl.ds(k_start, bk)
        t = _tile_of(c, r, b, h, i * bq, k_start, kv_slice=cols)
        dq, dtable, ds = _dq_tile(c, q, r["k"][cols, :], r["v"][cols, :], do, lse, delta, t, *carry)
        if c.has_bias:
            r["dbias"][:, cols] = ds.astype(r["dbias"].dtype)
        return dq, dtable

    first, last = _kv_band(c, i, bq, bk, nk)
    end = jnp.maximum(first, last + 1)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((1, nb_lanes), jnp.float32))
    dq, dtable = lax.fori_loop(first, end, body, init)
    if c.has_bias:
        # Blocks outside the band still need a zero gradient; writing them separately (instead of
        # zero-filling the strip first) keeps every address written once, so no ordering hazards.
        def zero_block(j, carry):
            cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
            r["dbias"][:, cols] = jnp.zeros((bq, bk), r["dbias"].dtype)
            return carry

        lax.fori_loop(0, first, zero_block, 0)
        lax.fori_loop(end, nk, zero_block, 0)
    r["dq"][...] = (dq * c.scale).astype(r["dq"].dtype)
    if c.has_relative:
        r["dtable"][...] = dtable


# --------------------------------------------------------------------------------------------------
# pallas_call plumbing. Kernel layout: q, o [B, N, Tp, Hp]; k, v [B, N, Sp, Hp]; lse, delta
# [B, N, Tp, 1]; q_seg [B, Tp, 1]; kv_seg [B, 1, Sp]; bias [Bb, N, Tp, Sp]; table [N, 1, nb_pad];
# seed, q_off [1, 1].


def _vmem_bytes(shape: tuple, dtype) -> int:
    """Bytes of a VMEM buffer: the last two dims padded to Mosaic's (sublane, 128) tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    dims = [d for d in shape if d is not None] or [1]
    dims = [1] * (2 - len(dims)) + dims
    sublanes = 8 * 4 // min(itemsize, 4)
    lanes = _round_up(dims[-1], 128)
    return math.prod(dims[:-2]) * _round_up(dims[-2], sublanes) * lanes * itemsize


def _compiler_params(c: _Static, semantics: tuple[str, ...], vmem_bytes: int):
    """Mosaic params on TPU (reduction axis sequential), Triton params on GPU."""
    if c.backend == "tpu":
        # Tiles only, so this stays near a few MiB at any length; ask for more than the default
        # scoped limit only when large blocks are requested.
        limit = None
        if vmem_bytes > 12 * 2**20:
            limit = min(int(vmem_bytes * 1.5) + 4 * 2**20, 100 * 2**20)
        return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)
    # Larger head dims mean larger tiles: more warps to hold them.
    return plgpu.CompilerParams(num_warps=4 if c.head_dim <= 64 else 8, num_stages=2)


def _interpret_arg(c: _Static):
    """pallas_call's `interpret`: TPU-semantics interpreter for the TPU flavour, HLO one for GPU."""
    if not c.interpret:
        return False
    return pltpu.InterpretParams() if c.backend == "tpu" else True


def _pallas(
    kernel, c: _Static, grid, inputs: dict, outputs: dict, name: str, scratch: dict | None = None
):
    """Runs `kernel` on `grid`; inputs {name: (array, spec)}, outputs {name: (shape, dtype, spec)},
    scratch {name: (shape, dtype)} (TPU flavour)."""
    scratch = scratch or {}
    names = list(inputs) + list(outputs) + list(scratch)
    # Under shard_map(check_vma=True) pallas outputs must say over which manual axes they vary: all
    # inputs were made to vary alike (`_vary_alike`), so outputs vary like q.
    mat = jax.typeof(inputs["q"][0]).manual_axis_type
    out_shapes = [
        jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        for shape, dtype, _ in outputs.values()
    ]
    # Double-buffered tiles, the scratch, and ~6 float32 [bq, bk] temporaries (s, p, dp, ds, ...).
    tiles = [(spec.block_shape, arr.dtype) for arr, spec in inputs.values()]
    tiles += [(spec.block_shape, dtype) for _, dtype, spec in outputs.values()]
    vmem = 2 * sum(_vmem_bytes(shape, dtype) for shape, dtype in tiles)
    vmem += sum(_vmem_bytes(shape, dtype) for shape, dtype in scratch.values())
    vmem += 6 * _vmem_bytes((c.block_q, c.block_kv), jnp.float32)
    semantics = ("parallel",) * (len(grid) - 1) + ("arbitrary" if scratch else "parallel",)
    return pl.pallas_call(
        functools.partial(kernel, c=c, names=names),
        grid=grid,
        in_specs=[spec for _, spec in inputs.values()],
        out_specs=[spec for _, _, spec in outputs.values()],
        out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch.values()],
        compiler_params=_compiler_params(c, semantics, vmem),
        interpret=_interpret_arg(c),
        name=name,
    )(*[arr for arr, _ in inputs.values()])


class _Layout:
    """Block specs of one kernel: which grid axis walks q blocks and which walks kv blocks.

    TPU: grid (B, N, outer, inner) with the reduction (inner) axis last; a tile's q/kv block index
    comes from the two. GPU: grid (B, N, outer); the reduced-over operand is a whole sequence.
    """

    def __init__(self, c: _Static, *, outer: str, bq: int, bk: int, t_pad: int, s_pad: int):
        self.c, self.outer, self.bq, self.bk = c, outer, bq, bk
        self.tpu = c.backend == "tpu"
        self.nq, self.nk = t_pad // bq, s_pad // bk
        self.t_pad, self.s_pad = t_pad, s_pad

    def grid(self, batch: int, heads: int) -> tuple[int, ...]:
        """The launch grid."""
        outer, inner = (self.nq, self.nk) if self.outer == "q" else (self.nk, self.nq)
        return (batch, heads, outer, inner) if self.tpu else (batch, heads, outer)

    def _blocks(self, *idx):
        """(q block, kv block) indices of a grid point; None for a whole-sequence axis (GPU)."""
        b, h, outer = idx[:3]
        c = self.c
        if self.outer == "q":
            if not self.tpu:
                return b, h, outer, None
            return (
                b,
                h,
                outer,
                _clamp(idx[3], _kv_band(c, outer, self.bq, self.bk, self.nk), self.nk),
            )
        if not self.tpu:
            return b, h, None, outer
        return b, h, _clamp(idx[3], _q_band(c, outer, self.bq, self.bk, self.nq), self.nq), outer

    def q_side(self, hd: int) -> pl.BlockSpec:
        """[B, N, Tp, hd] arrays (q, do, o, dq; lse and delta with hd = 1)."""
        rows = self.bq if self.tpu or self.outer == "q" else self.t_pad

        def index(*idx):
            b, h, i, _ = self._blocks(*idx)
            return b, h, 0 if i is None else i, 0

        return pl.BlockSpec((None, None, rows, hd), index)

    def kv_side(self, hd: int) -> pl.BlockSpec:
        """[B, N, Sp, hd] arrays (k, v, dk, dv)."""
        rows = self.bk if self.tpu or self.outer == "kv" else self.s_pad

        def index(*idx):
            b, h, _, j = self._blocks(*idx)
            return b, h, 0 if j is None else j, 0

        return pl.BlockSpec((None, None, rows, hd), index)

    def q_seg(self) -> pl.BlockSpec:
        """[B, Tp, 1] query segment ids."""
        rows = self.bq if self.tpu or self.outer == "q" else self.t_pad

        def index(*idx):
            b, _, i, _ = self._blocks(*idx)
            return b, 0 if i is None else i, 0

        return pl.BlockSpec((None, rows, 1), index)

    def kv_seg(self) -> pl.BlockSpec:
        """[B, 1, Sp] key segment ids."""
        cols = self.bk if self.tpu or self.outer == "kv" else self.s_pad

        def index(*idx):
            b, _, _, j = self._blocks(*idx)
            return b, 0, 0 if j is None else j

        return pl.BlockSpec((None, 1, cols), index)

    def bias(self, batched: bool, *, output: bool = False) -> pl.BlockSpec:
        """[Bb, N, Tp, Sp] dense bias: batch 0 when it broadcasts. As an output (its gradient) every
        grid step owns its own tile, skipped ones included, so the index is not moved into the
        band."""
        rows = self.bq if self.tpu or self.outer == "q" else self.t_pad
        cols = self.bk if self.tpu or self.outer == "kv" else self.s_pad

        def index(*idx):
            b, h, i, j = self._blocks(*idx)
            if output and self.tpu:
                j = idx[3]
            return b if batched else 0, h, 0 if i is None else i, 0 if j is None else j

        return pl.BlockSpec((None, None, rows, cols), index)

    def per_head(self, shape: tuple[int, ...]) -> pl.BlockSpec:
        """[N, ...] arrays indexed by head only (the relative table)."""
        return pl.BlockSpec((None, *shape), lambda b, h, *_: (h,) + (0,) * len(shape))

    @staticmethod
    def scalar() -> pl.BlockSpec:
        """[1, 1] arrays (the dropout seed, a traced query offset)."""
        return pl.BlockSpec((1, 1), lambda *_: (0, 0))


def _common_inputs(c: _Static, lay: _Layout, q_seg, kv_seg, bias, table, seed, q_off) -> dict:
    """The optional inputs every kernel reads, with their block specs."""
    inputs = {}
    if c.has_segments:
        inputs["q_seg"] = (q_seg, lay.q_seg())
        inputs["kv_seg"] = (kv_seg, lay.kv_seg())
    if c.has_bias:
        inputs["bias"] = (bias, lay.bias(c.bias_batched))
    if c.has_relative:
        inputs["table"] = (table, lay.per_head(table.shape[1:]))
    if c.dropout_rate > 0:
        inputs["seed"] = (seed, lay.scalar())
    if c.q_offset_traced:
        inputs["q_off"] = (q_off, lay.scalar())
    return inputs


def _forward(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed, q_off):
    """Runs the forward kernel on padded kernel-layout arrays; returns o and lse."""
    batch, heads, t_pad, hd = q.shape
    lay = _Layout(c, outer="q", bq=c.block_q, bk=c.block_kv, t_pad=t_pad, s_pad=k.shape[2])
    inputs = {"q": (q, lay.q_side(hd)), "k": (k, lay.kv_side(hd)), "v": (v, lay.kv_side(hd))}
    inputs |= _common_inputs(c, lay, q_seg, kv_seg, bias, table, seed, q_off)
    outputs = {
        "o": (q.shape, q.dtype, lay.q_side(hd)),
        "lse": ((batch, heads, t_pad, 1), jnp.float32, lay.q_side(1)),
    }
    grid = lay.grid(batch, heads)
    if c.backend == "tpu":
        scratch = {
            "acc_s": ((c.block_q, hd), jnp.float32),
            "m_s": ((c.block_q, 1), jnp.float32),
            "l_s": ((c.block_q, 1), jnp.float32),
        }
        return _pallas(_fwd_kernel_tpu, c, grid, inputs, outputs, "jaxgen_flash_fwd", scratch)
    return _pallas(_fwd_kernel_gpu, c, grid, inputs, outputs, "jaxgen_flash_fwd")


def _backward(c: _Static, res, do):
    """Runs the dk/dv and dq kernels; returns gradients for q, k, v, bias and table."""
    q, k, v, q_seg, kv_seg, bias, table, seed, q_off, o, lse = res
    batch, heads, t_pad, hd = q.shape
    s_pad = k.shape[2]
    bq, bk = c.block_q_bwd, c.block_kv_bwd
    tpu = c.backend == "tpu"
    # delta_i = rowsum(dO_i * O_i): [B, N, Tp, 1], linear in T.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    per_row = {"q": q, "do": do, "lse": lse, "delta": delta}

    def row_inputs(lay: _Layout) -> dict:
        inputs = {name: (x, lay.q_side(x.shape[-1])) for name, x in per_row.items()}
        inputs |= {"k": (k, lay.kv_side(hd)), "v": (v, lay.kv_side(hd))}
        return inputs | _common_inputs(c, lay, q_seg, kv_seg, bias, table, seed, q_off)

    # dk, dv: kv blocks outer, q blocks reduced over.
    lay = _Layout(c, outer="kv", bq=bq, bk=bk, t_pad=t_pad, s_pad=s_pad)
    outputs = {
        "dk": (k.shape, k.dtype, lay.kv_side(hd)),
        "dv": (v.shape, v.dtype, lay.kv_side(hd)),
    }
    grid = lay.grid(batch, heads)
    if tpu:
        scratch = {"dk_s": ((bk, hd), jnp.float32), "dv_s": ((bk, hd), jnp.float32)}
        dk, dv = _pallas(
            _dkv_kernel_tpu, c, grid, row_inputs(lay), outputs, "jaxgen_flash_dkv", scratch
        )
    else:
        dk, dv = _pallas(_dkv_kernel_gpu, c, grid, row_inputs(lay), outputs, "jaxgen_flash_dkv")

    # dq (+ bias gradients): q blocks outer, kv blocks reduced over.
    lay = _Layout(c, outer="q", bq=bq, bk=bk, t_pad=t_pad, s_pad=s_pad)
    outputs = {"dq": (q.shape, q.dtype, lay.q_side(hd))}
    if c.has_bias:
        # Per-batch gradients even for a broadcast bias; summed over batch below.
        outputs["dbias"] = ((batch, heads, t_pad, s_pad), jnp.float32, lay.bias(True, output=True))
    if c.has_relative:
        nb = table.shape[-1]
        outputs["dtable"] = (
            (batch, heads, lay.nq, 1, nb),
            jnp.float32,
            pl.BlockSpec((None, None, None, 1, nb), lambda b, h, i, *_: (b, h, i, 0, 0)),
        )
    grid = lay.grid(batch, heads)
    if tpu:
        scratch = {"dq_s": ((bq, hd), jnp.float32)}
        if c.has_relative:
            scratch["dtable_s"] = ((1, table.shape[-1]), jnp.float32)
        outs = _pallas(
            _dq_kernel_tpu, c, grid, row_inputs(lay), outputs, "jaxgen_flash_dq", scratch
        )
    else:
        outs = _pallas(_dq_kernel_gpu, c, grid, row_inputs(lay), outputs, "jaxgen_flash_dq")
    outs = dict(zip(outputs, outs, strict=True))
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
def _flash(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed, q_off):
    """Differentiable flash attention on padded kernel-layout arrays."""
    return _forward(c, q, k, v, q_seg, kv_seg, bias, table, seed, q_off)[0]


def _flash_fwd(c: _Static, q, k, v, q_seg, kv_seg, bias, table, seed, q_off):
    """custom_vjp forward: saves the inputs, the output and the log-sum-exp only."""
    o, lse = _forward(c, q, k, v, q_seg, kv_seg, bias, table, seed, q_off)
    return o, (q, k, v, q_seg, kv_seg, bias, table, seed, q_off, o, lse)


def _flash_bwd(c: _Static, res, do):
    """custom_vjp backward: recomputes attention tile by tile; integer inputs get no cotangent."""
    dq, dk, dv, dbias, dtable = _backward(c, res, do)
    return dq, dk, dv, None, None, dbias, dtable, None, None


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
    window: int | None = None,
    q_offset: int | jax.Array = 0,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | int | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention of q `[B, T, N, H]` over k, v `[B, S, N, H]` → `[B, T, N, H]`.

    Same semantics as `reference.attention`: segment ids `[B, T]` / `[B, S]` (0 = padding; both or
    neither), additive `bias` `[B|1, N, T, S]`, T5 `relative_bias` computed in the kernel, a
    sliding `window` and a query `q_offset` (an int skips the tiles outside the causal/window
    band; a traced scalar, as in decoding, masks them but visits every tile), dropout
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
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (or None); got {window=}")
    offset_traced = not isinstance(q_offset, int | np.integer)
    if not offset_traced and q_offset < 0:
        raise ValueError(f"q_offset must be >= 0; got {q_offset=}")
    platform = parallel.device_platform()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(BACKENDS)}")
    if interpret is None:
        interpret = platform not in ("tpu", "gpu")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    generation = parallel.tpu_generation() if backend == "tpu" else None
    blocks = block_sizes or BlockSizes.default(backend, generation)
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
    q_seg = kv_seg = bias_k = table = seed = q_off = None
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
    if offset_traced:
        q_off = jnp.asarray(q_offset, jnp.int32).reshape(1, 1)
    c = _Static(
        backend=backend,
        interpret=bool(interpret),
        f32_matmul=generation in _F32_MATMUL_TPUS,
        scale=float(scale),
        causal=bool(causal),
        window=int(window or 0),
        q_offset=0 if offset_traced else int(q_offset),
        q_offset_traced=offset_traced,
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
    args = _vary_alike(qk, kk, vk, q_seg, kv_seg, bias_k, table, seed, q_off)
    out = _flash(c, *args)  # [B, N, Tp, Hp]
    return jnp.transpose(out[:, :, :q_len, :head_dim], (0, 2, 1, 3))
