"""Compiles the flash kernel (forward + every gradient) for real TPU and GPU targets, no device.

    pip install -e '.[tpu-compile]'                       # libtpu: Mosaic for v3 ... v6e
    python experiments/compile_kernel.py                  # the whole matrix, a table per target
    python experiments/compile_kernel.py --targets v5e --lengths 32768 --readme

The TPU compiler runs on compile-only devices from libtpu; the GPU one (Triton, `--targets h100`)
needs `pip install -e '.[gpu-compile]'`. Each case is one head of a `[1, T, 2, H]` call: causal
and bidirectional, plain, with "features" (segment ids + T5 relative bias + dropout) and with a
2048-token sliding window. A case fails when the compiler rejects it (a VMEM or shared-memory
overflow, an unsupported operand) and the row prints its message. `--readme` writes the summary
between the README's kernel-compile markers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; never open a real one

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxgen.kernels import flash_attention as fa
from jaxgen.kernels import reference

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- kernel-compile:begin -->\n)(.*?)(<!-- kernel-compile:end -->)", re.S)
# One small slice per TPU generation, and one H100 host (`jaxgen compile` target names).
TARGETS = {
    "v3": "v3-8",
    "v4": "v4-8",
    "v5e": "v5e-4",
    "v5p": "v5p-8",
    "v6e": "v6e-4",
    "h100": "h100x8",
}
DEFAULT_TARGETS = ("v3", "v4", "v5e", "v5p", "v6e")
FEATURES = ("plain", "features", "window")
LENGTHS = (512, 2048, 8192, 32768, 131072)


def target_mesh(target: str) -> Mesh:
    """A one-device mesh of compile-only devices of `target` ('v5e', ..., 'h100')."""
    from jaxgen.tools import compile as aot

    if target not in TARGETS:
        raise SystemExit(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    devices = aot.target_devices(aot.parse_target(TARGETS[target]))
    return Mesh(devices[:1], ("data",))


def compile_case(
    mesh: Mesh, length: int, head_dim: int, dtype: str, causal: bool, feature: str
) -> jax.stages.Compiled:
    """Compiles forward + gradients (q, k, v, relative table) of one flash call on `mesh`."""
    q = jax.ShapeDtypeStruct((1, length, 2, head_dim), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
    table = jax.ShapeDtypeStruct((32, 2), jnp.float32)

    def loss(q, k, v, seg, table):
        extra = {}
        if feature == "features":
            extra = dict(
                segment_ids=seg, kv_segment_ids=seg, dropout_rate=0.1, dropout_rng=3,
                relative_bias=reference.RelativePositionBias(table, not causal),
            )  # fmt: skip
        elif feature == "window":
            extra = dict(window=2048)
        return jnp.sum(fa.flash_attention(q, k, v, causal=causal, **extra).astype(jnp.float32))

    with jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))
        return grad.lower(q, q, q, seg, table).compile()


def _first_error(err: Exception) -> str:
    """The compiler's one-line reason."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    keys = ("Oom", "OOM", "exceeded", "Unsupported", "rror")
    return next((line for line in lines if any(k in line for k in keys)), lines[0])[:200]


def run(targets, lengths, head_dims, dtypes) -> list[dict]:
    """Compiles every case; returns one row per case (ok, seconds, temp bytes or the error)."""
    rows = []
    cases = list(itertools.product(lengths, head_dims, dtypes, (True, False), FEATURES))
    for target in targets:
        mesh = target_mesh(target)
        for length, head_dim, dtype, causal, feature in cases:
            start = time.perf_counter()
            row = dict(target=target, length=length, head_dim=head_dim, dtype=dtype,
                       causal=causal, feature=feature)  # fmt: skip
            try:
                compiled = compile_case(mesh, length, head_dim, dtype, causal, feature)
                row.update(ok=True, temp=compiled.memory_analysis().temp_size_in_bytes)
            except Exception as err:  # noqa: BLE001 - every compiler failure is a result here
                row.update(ok=False, error=_first_error(err))
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            status = f"temp {row['temp'] / 2**20:.0f} MiB" if row["ok"] else row["error"]
            print(
                f"{target:5} T={length:<6} H={head_dim:<3} {dtype:8} "
                f"{'causal' if causal else 'bidir':6} {feature:8} "
                f"{'ok  ' if row['ok'] else 'FAIL'} {status} ({row['seconds']:.1f} s)",
                flush=True,
            )
    return rows


def summary(rows: list[dict]) -> str:
    """Markdown: per target, cases compiled / cases tried, lengths, and the failures."""
    out = [
        "| target | compiled | lengths | head dims | dtypes | longest compile |",
        "|---|---|---|---|---|---|",
    ]
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        ok = sum(r["ok"] for r in mine)
        lengths = sorted({r["length"] for r in mine})
        out.append(
            f"| {target} | {ok} / {len(mine)} | {lengths[0]:,} - {lengths[-1]:,} | "
            f"{', '.join(map(str, sorted({r['head_dim'] for r in mine})))} | "
            f"{', '.join(sorted({r['dtype'] for r in mine}))} | "
            f"{max(r['seconds'] for r in mine):.1f} s |"
        )
    failures = [r for r in rows if not r["ok"]]
    if failures:
        out.append("")
    for r in failures:
        out.append(
            f"\nFAIL {r['target']} T={r['length']} H={r['head_dim']} {r['dtype']}: {r['error']}"
        )
    return "\n".join(out) + "\n"


def _target_of(line: str) -> str | None:
    """The target a summary line is about: a table row's first cell or a FAIL line's second word."""
    if line.startswith("| ") and not line.startswith("| target"):
        return line.split("|")[1].strip()
    if line.startswith("FAIL "):
        return line.split()[1]
    return None


def merge(old: str, new: str) -> str:
    """The new summary plus the old one's lines for targets not run this time (TPU and GPU need
    different extras, so they are measured in two runs)."""
    ran = {_target_of(line) for line in new.splitlines()} - {None}
    lines = [line for line in new.splitlines() if _target_of(line)]
    lines += [line for line in old.splitlines() if _target_of(line) not in ran | {None}]
    order = {name: i for i, name in enumerate(TARGETS)}
    rank = lambda line: order.get(_target_of(line), len(order))  # noqa: E731
    rows = sorted((line for line in lines if line.startswith("| ")), key=rank)
    fails = sorted((line for line in lines if line.startswith("FAIL ")), key=rank)
    header = new.splitlines()[:2]
    return "\n".join(header + rows + ([""] + fails if fails else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Runs the matrix; exit status 1 when any case fails to compile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=", ".join(TARGETS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--head_dims", default="64,128")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--readme", action="store_true", help="write the summary into README.md")
    args = parser.parse_args(argv)
    rows = run(
        args.targets.split(","),
        [int(x) for x in args.lengths.split(",")],
        [int(x) for x in args.head_dims.split(",")],
        args.dtypes.split(","),
    )
    table = summary(rows)
    print(table)
    if args.readme:
        text = README.read_text()
        if not BLOCK.search(text):
            raise SystemExit("README.md has no <!-- kernel-compile:begin --> ... :end --> block")
        README.write_text(
            BLOCK.sub(lambda m: m.group(1) + merge(m.group(2), table) + m.group(3), text)
        )
        print(f"updated {README}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
