"""Benchmarks jaxgen's Pallas flash attention against XLA and jax's shipped Pallas kernel.

On a TPU or GPU: times forward and forward+backward (median of `--iters` runs after a warm-up) and
records peak device memory for lengths 512..32768 (causal, head_dim 128, bfloat16 by default):

    python experiments/bench_attention.py
    python experiments/bench_attention.py --lengths 8192 --batch 4 --heads 16

On CPU, where interpret-mode timings mean nothing, it compiles forward+backward of the kernel and
of the reference for growing lengths and reports XLA's compiled temporary memory, showing the
kernel's linear growth against the reference's quadratic growth:

    JAX_PLATFORMS=cpu python experiments/bench_attention.py

The last line starts with RESULT.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgen.kernels import flash_attention, reference


def _inputs(batch: int, length: int, heads: int, head_dim: int, dtype) -> tuple[jax.Array, ...]:
    """Random q, k, v `[B, T, N, H]`."""
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in keys)


def _shipped(causal: bool, scale: float) -> Callable | None:
    """jax's own Pallas flash attention for this platform, in jaxgen's `[B, T, N, H]` layout."""
    platform = jax.default_backend()
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

        def run(q, k, v):
            t = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # upstream wants [B, N, T, H]
            return t(tpu_fa.flash_attention(t(q), t(k), t(v), causal=causal, sm_scale=scale))

        return run
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu import attention as gpu_fa

        return lambda q, k, v: gpu_fa.mha(q, k, v, None, sm_scale=scale, causal=causal)
    return None


def _fwd_bwd(fn: Callable) -> Callable:
    """jit of the gradient of sum(fn(q, k, v)) with respect to q, k and v."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))


def _time(fn: Callable, args: tuple, iters: int) -> float:
    """Median wall time in ms of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_memory_mb(fn: Callable, args: tuple) -> float:
    """Compiled temp + output bytes of `fn(*args)` in MiB (XLA's memory analysis)."""
    stats = fn.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def bench_accelerator(args: argparse.Namespace) -> str:
    """Times every implementation at every length; returns the RESULT line."""
    dtype = jnp.dtype(args.dtype)
    scale = 1.0 / math.sqrt(args.head_dim)
    impls = {
        "jaxgen_flash": lambda q, k, v: flash_attention.flash_attention(
            q, k, v, causal=args.causal
        ),
        "xla_reference": lambda q, k, v: reference.attention(q, k, v, causal=args.causal),
    }
    shipped = _shipped(args.causal, scale)
    if shipped is not None:
        impls["jax_pallas"] = shipped
    print(f"device: {jax.devices()[0].device_kind}  batch={args.batch} heads={args.heads} "
          f"head_dim={args.head_dim} dtype={args.dtype} causal={args.causal}")  # fmt: skip
    print(f"{'length':>7} {'impl':>14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    results: dict[tuple[int, str], float] = {}
    for length in args.lengths:
        x = _inputs(args.batch, length, args.heads, args.head_dim, dtype)
        for name, fn in impls.items():
            try:
                fwd, both = jax.jit(fn), _fwd_bwd(fn)
                fwd_ms = _time(fwd, x, args.iters)
                both_ms = _time(both, x, args.iters)
                mem = _peak_memory_mb(both, x)
                results[(length, name)] = both_ms
                row = f"{fwd_ms:>9.2f} {both_ms:>11.2f} {mem:>9.0f}"
            except Exception as err:  # noqa: BLE001 - OOM or an unsupported shape is a table entry
                row = f"{'failed: ' + type(err).__name__:>31}"
            print(f"{length:>7} {name:>14} {row}", flush=True)
    target = 8192 if 8192 in args.lengths else args.lengths[-1]
    ours = results.get((target, "jaxgen_flash"))
    if ours is None:
        return f"RESULT: jaxgen flash failed at length {target}"
    parts = [f"RESULT: length {target} fwd+bwd jaxgen {ours:.2f} ms"]
    for name in ("jax_pallas", "xla_reference"):
        if (target, name) in results:
            parts.append(f"{results[(target, name)] / ours:.2f}x vs {name}")
    return ", ".join(parts)


def bench_cpu_memory(args: argparse.Namespace) -> str:
    """Compiled fwd+bwd temporary memory of kernel vs reference as length doubles."""
    dtype = jnp.dtype(args.dtype)
    kernel = lambda q, k, v: flash_attention.flash_attention(q, k, v, causal=args.causal)
    ref = lambda q, k, v: reference.attention(q, k, v, causal=args.causal)
    print(
        f"CPU (interpret mode): compiled temp memory of fwd+bwd, batch={args.batch} "
        f"heads={args.heads} head_dim={args.head_dim} dtype={args.dtype} causal={args.causal}"
    )
    print(f"{'length':>7} {'kernel MiB':>11} {'reference MiB':>14} {'ref / kernel':>13}")
    rows = []
    for length in args.lengths:
        x = jax.eval_shape(lambda length=length: _inputs(
            args.batch, length, args.heads, args.head_dim, dtype))  # fmt: skip
        sizes = []
        for fn in (kernel, ref):
            stats = _fwd_bwd(fn).lower(*x).compile().memory_analysis()
            sizes.append(stats.temp_size_in_bytes / 2**20)
        rows.append((length, *sizes))
        print(f"{length:>7} {sizes[0]:>11.2f} {sizes[1]:>14.2f} {sizes[1] / sizes[0]:>13.1f}",
              flush=True)  # fmt: skip
    (l0, k0, r0), (l1, k1, r1) = rows[0], rows[-1]
    growth = l1 / l0
    # Exponent p in memory ~ length**p from the first and last rows: ~1 linear, ~2 quadratic.
    p_kernel = math.log(k1 / k0) / math.log(growth)
    p_ref = math.log(r1 / r0) / math.log(growth)
    return (
        f"RESULT: from length {l0} to {l1} kernel memory grows as length^{p_kernel:.2f} "
        f"({k0:.1f} -> {k1:.1f} MiB), reference as length^{p_ref:.2f} ({r0:.1f} -> {r1:.1f} MiB)"
    )


def main() -> None:
    """Parses flags and runs the accelerator or the CPU benchmark."""
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[256, 512, 1024, 2048, 4096] if on_cpu
                        else [512, 1024, 2048, 4096, 8192, 16384, 32768])  # fmt: skip
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2 if on_cpu else 16)
    parser.add_argument("--head_dim", type=int, default=64 if on_cpu else 128)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    print(bench_cpu_memory(args) if on_cpu else bench_accelerator(args))


if __name__ == "__main__":
    main()
