"""The Pallas flash-attention kernel against the XLA reference, in interpret mode on CPU.

The issue's full grid (causal x segments x bias x self/cross x 5 lengths x 2 head dims x 2 dtypes,
times both kernel flavours) would be 960 compiled cases at ~4 s each here, so `CASES` is a pairwise
covering array: every value of every axis appears, and so does every pair of values of two axes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgen.kernels import dropout, reference
from jaxgen.kernels import flash_attention as fa

# (atol, rtol) on max |kernel - reference| relative to max |reference|, from each dtype's epsilon:
# float32 allows ~1000 eps of reordered accumulation over up to 513 keys; bfloat16 allows ~8 eps
# because both paths round probabilities and cotangents to bfloat16 at different points.
TOLERANCES = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 3e-2)}

AXES = {
    "causal": (False, True),
    "segments": (False, True),
    "bias": ("none", "dense", "relative"),
    "cross": (False, True),
    "length": (1, 7, 128, 200, 513),
    "head_dim": (64, 128),
    "dtype": ("float32", "bfloat16"),
    "backend": ("gpu", "tpu"),
}
# Key length for cross-attention: a different length from the same list.
CROSS_LENGTH = {1: 7, 7: 200, 128: 1, 200: 513, 513: 128}


def _pairwise(axes: dict[str, tuple]) -> list[dict]:
    """A deterministic greedy pairwise covering array over `axes` (every value pair appears)."""
    names = list(axes)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in axes[a]
        for vb in axes[b]
    }
    cases = []
    while uncovered:
        # Seed each case with the first uncovered pair, then fill the other axes greedily.
        a, va, b, vb = min(uncovered, key=lambda p: (names.index(p[0]), names.index(p[2]), str(p)))
        case = {a: va, b: vb}
        for name in names:
            if name in case:
                continue
            case[name] = max(
                axes[name],
                key=lambda v, name=name: sum(
                    (x, case[x], name, v) in uncovered or (name, v, x, case[x]) in uncovered
                    for x in case
                ),
            )
        cases.append({name: case[name] for name in names})
        uncovered -= {(x, case[x], y, case[y]) for x, y in itertools.combinations(names, 2)}
    return cases


CASES = _pairwise(AXES)
# A _Static to vary in tests of the tile bookkeeping (no kernel runs).
_STATIC = fa._Static(
    backend="tpu", interpret=True, f32_matmul=False, scale=1.0, causal=False, window=0,
    q_offset=0, q_offset_traced=False, has_segments=False, has_bias=False, bias_batched=False,
    has_relative=False, rel_bidirectional=False, rel_num_buckets=0, rel_max_distance=0,
    dropout_rate=0.0, heads=1, head_dim=64, q_len=256, kv_len=256, kv_len_padded=256,
    block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=16,
)  # fmt: skip
FAST = 4  # the first cases run in every test session; the rest are marked slow


def _case_id(case: dict) -> str:
    """Short readable pytest id."""
    return "-".join(f"{k}={v}" for k, v in case.items())


def _segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Packed-document segment ids 1..3 with trailing padding (0) on some rows."""
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length - int(rng.integers(0, max(1, length // 4) + 1))
        cuts = np.sort(rng.integers(0, max(used, 1), size=2))
        ids[b, :used] = 1 + (np.arange(used)[:, None] >= cuts[None]).sum(-1)
    return ids


def _inputs(case: dict, batch: int = 1, heads: int = 2, seed: int = 0) -> dict:
    """Random q, k, v, segment ids, bias and cotangent for one grid case."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case["dtype"])
    q_len = case["length"]
    kv_len = CROSS_LENGTH[q_len] if case["cross"] else q_len
    hd = case["head_dim"]

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    out = dict(
        q=normal(batch, q_len, heads, hd).astype(dtype),
        k=normal(batch, kv_len, heads, hd).astype(dtype),
        v=normal(batch, kv_len, heads, hd).astype(dtype),
        do=normal(batch, q_len, heads, hd).astype(dtype),
        kwargs=dict(causal=case["causal"]),
        bias=None,
        table=None,
    )
    if case["segments"]:
        q_seg = _segments(rng, batch, q_len)
        kv_seg = _segments(rng, batch, kv_len) if case["cross"] else q_seg
        out["kwargs"].update(segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    if case["bias"] == "dense":
        out["bias"] = normal(batch, heads, q_len, kv_len).astype(dtype)
    if case["bias"] == "relative":
        out["table"] = normal(32, heads)
    return out


def _run(fn, x: dict, **extra):
    """Output and (dq, dk, dv, dbias, dtable) of `fn` under the cotangent `x['do']`, jitted."""
    static = {key: val for key, val in x["kwargs"].items() if not isinstance(val, jax.Array)}
    arrays = {key: val for key, val in x["kwargs"].items() if isinstance(val, jax.Array)}
    bidirectional = not static["causal"]

    @jax.jit
    def run(q, k, v, bias, table, do, arrays):
        def f(q, k, v, bias, table):
            kwargs = dict(static, **arrays, **extra)
            if bias is not None:
                kwargs["bias"] = bias
            if table is not None:
                kwargs["relative_bias"] = reference.RelativePositionBias(
                    table, bidirectional, 32, 128
                )
            return fn(q, k, v, **kwargs)

        out, vjp = jax.vjp(f, q, k, v, bias, table)
        return out, vjp(do)

    return run(x["q"], x["k"], x["v"], x["bias"], x["table"], x["do"], arrays)


def _assert_close(name: str, got, want, dtype) -> None:
    """max |got - want| <= atol + rtol * max |want|, with the dtype's tolerances."""
    if want is None:
        assert got is None, name
        return
    atol, rtol = TOLERANCES[jnp.dtype(dtype).type]
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want), initial=0.0))
    bound = atol + rtol * float(np.max(np.abs(want), initial=0.0))
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _check(x: dict, dtype, **flash_kwargs) -> None:
    """Compares the kernel's output and all gradients with the reference's."""
    kernel = functools.partial(fa.flash_attention, **flash_kwargs)
    out, grads = _run(kernel, x)
    ref_out, ref_grads = _run(reference.attention, x)
    assert out.dtype == x["q"].dtype and out.shape == x["q"].shape
    _assert_close("out", out, ref_out, dtype)
    for name, g, r in zip(("dq", "dk", "dv", "dbias", "dtable"), grads, ref_grads, strict=True):
        _assert_close(name, g, r, dtype)


def _params(cases: list[dict]) -> list:
    """pytest params: the first FAST cases unmarked, the rest slow."""
    return [
        pytest.param(c, id=_case_id(c), marks=() if i < FAST else pytest.mark.slow)
        for i, c in enumerate(cases)
    ]


def test_covering_array_covers_every_pair():
    """The grid really is pairwise: every pair of values of two axes occurs in some case."""
    for a, b in itertools.combinations(AXES, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)


@pytest.mark.parametrize("case", _params(CASES))
def test_matches_reference(case):
    """Forward and every gradient match the reference on one grid case."""
    _check(_inputs(case), case["dtype"], backend=case["backend"])


@pytest.mark.slow
def test_batched_bias_and_small_blocks():
    """A per-batch dense bias with blocks smaller than the lengths (several blocks each way)."""
    case = dict(causal=True, segments=True, bias="dense", cross=False, length=200,
                head_dim=64, dtype="float32")  # fmt: skip
    x = _inputs(case, batch=2, heads=1, seed=1)
    blocks = fa.BlockSizes(block_q=32, block_kv=16, block_q_bwd=16, block_kv_bwd=32)
    _check(x, jnp.float32, block_sizes=blocks)


# Sliding windows and query offsets (GPT-3's banded layers, decoding after a prompt): a window
# narrower than a block and one spanning several, a prompt offset known at trace time (tiles
# outside the band skipped) and the same offset traced (every tile visited, masked).
WINDOW_CASES = {
    "window-3": dict(length=104, cross=False, window=3, q_offset=0),
    "window-40": dict(length=104, cross=False, window=40, q_offset=0),
    "offset": dict(length=7, cross=True, window=None, q_offset=193),
    "offset+window": dict(length=7, cross=True, window=30, q_offset=193),
    "traced-offset+window": dict(length=7, cross=True, window=30, q_offset="traced"),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_and_query_offset_match_reference(name, backend):
    """Banded and offset causal masks from indices equal the reference's, forward and gradients."""
    spec = WINDOW_CASES[name]
    case = dict(causal=True, segments=True, bias="relative", head_dim=64, dtype="float32")
    case.update(length=spec["length"], cross=spec["cross"])
    x = _inputs(case)
    offset = spec["q_offset"]
    # A jax.Array keyword reaches the jitted function as an argument: traced, as when decoding.
    x["kwargs"].update(
        window=spec["window"], q_offset=jnp.int32(193) if offset == "traced" else offset
    )
    blocks = fa.BlockSizes(block_q=16, block_kv=32, block_q_bwd=32, block_kv_bwd=16)
    _check(x, jnp.float32, backend=backend, block_sizes=blocks)


def test_tiles_outside_the_band_are_not_visited():
    """A static window bounds the kv range of each q block: banded work is linear in length."""
    c = dataclasses.replace(_STATIC, causal=True, window=40)
    bands = [tuple(int(x) for x in fa._kv_band(c, i, 16, 16, 16)) for i in range(16)]
    assert bands[0] == (0, 0) and bands[8] == (5, 8) and bands[15] == (12, 15)
    assert all(last - first + 1 <= 4 for first, last in bands)  # ceil(40 / 16) + 1 blocks
    q_bands = [tuple(int(x) for x in fa._q_band(c, j, 16, 16, 16)) for j in range(16)]
    # kv block j is seen by q blocks j (diagonal) .. j + 3 (the window reaches 39 rows past it).
    assert q_bands[0] == (0, 3) and q_bands[14] == (14, 15)
    traced = dataclasses.replace(c, q_offset_traced=True)
    assert tuple(int(x) for x in fa._kv_band(traced, 3, 16, 16, 16)) == (0, 15)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    """Query rows whose segment has no key (and padding rows) output zeros with finite gradients."""
    case = dict(causal=False, segments=False, bias="dense", cross=True, length=7, head_dim=64,
                dtype="float32")  # fmt: skip
    x = _inputs(case)
    q_seg = jnp.asarray([[1, 1, 3, 3, 0, 2, 0]], jnp.int32)  # 3 and 0 have no key
    kv_seg = jnp.asarray([[1] * 100 + [2] * 90 + [0] * 10], jnp.int32)
    x["kwargs"].update(segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, grads = _run(fa.flash_attention, x)
    dead = np.asarray(q_seg[0] == 0) | np.asarray(q_seg[0] == 3)
    assert np.all(np.asarray(out)[0, dead] == 0.0)
    assert np.any(np.asarray(out)[0, ~dead] != 0.0)
    for g in grads[:4]:
        assert np.all(np.isfinite(np.asarray(g)))
    dq, dbias = np.asarray(grads[0]), np.asarray(grads[3])
    assert np.all(dq[0, dead] == 0.0) and np.all(dbias[0, :, dead] == 0.0)
    ref_out, ref_grads = _run(reference.attention, x)
    _assert_close("out", out, ref_out, jnp.float32)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads[:4], ref_grads[:4], strict=True):
        _assert_close(name, g, r, jnp.float32)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    head_dim=st.sampled_from([8, 40, 64]),
    causal=st.booleans(),
    segments=st.booleans(),
    bias=st.sampled_from(["none", "dense", "relative"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_masks(
    batch, heads, q_len, kv_len, head_dim, causal, segments, bias, seed
):
    """Random shapes (head dims that need padding too), masks and biases match the reference."""
    rng = np.random.default_rng(seed)
    case = dict(causal=causal, segments=False, bias=bias, cross=False, length=q_len,
                head_dim=head_dim, dtype="float32")  # fmt: skip
    x = _inputs(case, batch=batch, heads=heads, seed=seed)
    x["k"] = jnp.asarray(rng.standard_normal((batch, kv_len, heads, head_dim), np.float32))
    x["v"] = jnp.asarray(rng.standard_normal((batch, kv_len, heads, head_dim), np.float32))
    if bias == "dense":
        x["bias"] = jnp.asarray(rng.standard_normal((1, heads, q_len, kv_len), np.float32))
    if segments:
        x["kwargs"].update(
            segment_ids=jnp.asarray(rng.integers(0, 3, (batch, q_len)), jnp.int32),
            kv_segment_ids=jnp.asarray(rng.integers(0, 3, (batch, kv_len)), jnp.int32),
        )
    _check(x, jnp.float32)


DROPOUT_CASE = dict(causal=True, segments=True, bias="relative", cross=False, length=40,
                    head_dim=64, dtype="float32")  # fmt: skip


def test_dropout_matches_reference_given_kernel_mask():
    """With dropout, the kernel equals the reference fed the same keep mask (output and grads)."""
    x = _inputs(DROPOUT_CASE, batch=2, heads=2, seed=3)
    rate, rng = 0.25, jax.random.key(7)
    mask = dropout.attention_keep_mask(rng, 2, 2, 40, 40, rate)
    kernel = functools.partial(fa.flash_attention, dropout_rate=rate, dropout_rng=rng)
    oracle = functools.partial(reference.attention, dropout_rate=rate, dropout_mask=mask)
    out, grads = _run(kernel, x)
    ref_out, ref_grads = _run(oracle, x)
    _assert_close("out", out, ref_out, jnp.float32)
    for name, g, r in zip(("dq", "dk", "dv", "dbias", "dtable"), grads, ref_grads, strict=True):
        _assert_close(name, g, r, jnp.float32)
    # Dropout really changed something.
    assert not np.allclose(out, _run(reference.attention, x)[0], atol=1e-2)


def test_dropout_mask_does_not_depend_on_block_sizes():
    """The hash uses global (row, col) indices: other tilings give the same dropped output."""
    x = _inputs(dict(DROPOUT_CASE, bias="none", length=40), batch=1, heads=2, seed=4)

    def run(blocks):
        return fa.flash_attention(
            x["q"], x["k"], x["v"], dropout_rate=0.5, dropout_rng=3, block_sizes=blocks,
            **x["kwargs"],
        )  # fmt: skip

    big, small = run(None), run(fa.BlockSizes(16, 16, 16, 16))
    # Only the summation order differs; a different mask would change outputs at O(1).
    np.testing.assert_allclose(big, small, atol=1e-5)


def test_dropout_expectation_matches_no_dropout():
    """Averaged over many seeds, dropout attention is unbiased: it matches no-dropout attention."""
    x = _inputs(dict(DROPOUT_CASE, bias="none", segments=False, length=24), batch=1, heads=1)
    rate, seeds = 0.3, 512

    def one(seed):
        return fa.flash_attention(
            x["q"], x["k"], x["v"], dropout_rate=rate, dropout_rng=seed, **x["kwargs"]
        )

    outs = np.asarray(jax.jit(jax.vmap(one))(jnp.arange(seeds, dtype=jnp.int32)))
    want = np.asarray(reference.attention(x["q"], x["k"], x["v"], **x["kwargs"]))
    stderr = outs.std(axis=0) / math.sqrt(seeds)
    # 5 standard errors per element (the first row has one key and no variance at all).
    assert np.all(np.abs(outs.mean(axis=0) - want) <= 5 * stderr + 1e-5)


@pytest.mark.slow
def test_runs_inside_shard_map_on_local_shards():
    """Under shard_map over batch and heads each device runs the kernel on its shard, same result.

    The relative table is sharded over heads and replicated over batch, so its gradient needs the
    psum that `_vary_alike` makes autodiff insert.
    """
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    case = dict(causal=True, segments=True, bias="relative", cross=False, length=33, head_dim=64,
                dtype="float32")  # fmt: skip
    x = _inputs(case, batch=2, heads=2, seed=5)
    seg = x["kwargs"]["segment_ids"]
    qkv = P("data", None, "tensor")

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, P(None, "tensor"), P("data")),
        out_specs=qkv,
    )
    def sharded(q, k, v, table, seg):
        rel = reference.RelativePositionBias(table, False, 32, 128)
        return fa.flash_attention(
            q, k, v, causal=True, segment_ids=seg, kv_segment_ids=seg, relative_bias=rel
        )

    def unsharded(q, k, v, table, seg):
        rel = reference.RelativePositionBias(table, False, 32, 128)
        return reference.attention(
            q, k, v, causal=True, segment_ids=seg, kv_segment_ids=seg, relative_bias=rel
        )

    def loss(fn, *args):
        return jnp.sum(fn(*args, seg) * x["do"])

    args = (x["q"], x["k"], x["v"], x["table"])
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), (0, 1, 2, 3)))(*args)
    l2, g2 = jax.value_and_grad(functools.partial(loss, unsharded), (0, 1, 2, 3))(*args)
    _assert_close("loss", l1, l2, jnp.float32)
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), g1, g2, strict=True):
        _assert_close(name, g, r, jnp.float32)


def test_rejects_bad_shapes():
    """Shape errors name the offending shapes."""
    q = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError, match="k and v"):
        fa.flash_attention(q, jnp.zeros((1, 8, 3, 64)), jnp.zeros((1, 8, 3, 64)))
    with pytest.raises(ValueError, match="bias"):
        fa.flash_attention(q, q, q, bias=jnp.zeros((1, 2, 8, 9)))
    with pytest.raises(ValueError, match="dropout_rng"):
        fa.flash_attention(q, q, q, dropout_rate=0.1)
    with pytest.raises(ValueError, match="backend"):
        fa.flash_attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_with_mosaic_and_triton(platform):
    """Forward+backward lower to Mosaic (TPU) and Triton (GPU) IR, every feature on, no device."""
    q = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)
    table = jax.ShapeDtypeStruct((32, 2), jnp.float32)
    bias = jax.ShapeDtypeStruct((1, 2, 200, 200), jnp.float32)
    backend = "tpu" if platform == "tpu" else "gpu"

    def loss(q, k, v, seg, table, bias):
        out = fa.flash_attention(
            q, k, v, causal=True, segment_ids=seg, kv_segment_ids=seg, bias=bias,
            relative_bias=reference.RelativePositionBias(table, False), dropout_rate=0.1,
            dropout_rng=3, backend=backend, interpret=False,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5)))
    # Triton kernels are opaque custom calls with no serialisation guarantee; lowering is the point.
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(grad, platforms=[platform], disabled_checks=checks)
    text = exported(q, q, q, seg, table, bias).mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text


@pytest.mark.parametrize(
    ("platform", "device_kind", "custom_call"),
    [("tpu", "TPU v5 lite", "tpu_custom_call"), ("cuda", "H100", "__gpu$xla.gpu.triton")],
)
def test_the_kernel_flavour_follows_the_mesh_not_the_host(
    platform: str, device_kind: str, custom_call: str
) -> None:
    from jaxgen.kernels.attention import resolve_impl

    mesh = jax.sharding.AbstractMesh(
        (1,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind=device_kind, num_cores=None, platform=platform
        ),
    )
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)
    step = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True))
    assert resolve_impl("auto") == "xla"  # this host is a CPU
    with jax.sharding.use_abstract_mesh(mesh):
        assert resolve_impl("auto") == "flash"
        # Exported for the target (lowering only: no TPU or GPU compiler runs here), the kernel
        # is the target's real one, not the interpreter the host would pick for itself.
        exported = jax.export.export(
            step,
            platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, q, q)
    text = exported.mlir_module()
    assert custom_call in text
    other = {"tpu_custom_call", "__gpu$xla.gpu.triton"} - {custom_call}
    assert not any(name in text for name in other)
