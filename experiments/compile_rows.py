"""Compiles every published row for its named hardware and tables the compiler's bytes.

    pip install -e '.[tpu-compile]'
    python experiments/compile_rows.py                 # all rows not yet in the results file
    python experiments/compile_rows.py --rows configs/gpt.py:gpt3-175b --force
    python experiments/compile_rows.py --readme        # the table into README.md

Each row runs `jaxgen compile --config ROW --json` in its own process (a 175B compile holds
about 10 GB of host memory; one process per row returns it) with its train and eval steps for the
row's `meta.hardware`. Results accumulate in `experiments/results/compile_rows.json`, one entry
per row, written after every row: an interrupted sweep resumes where it stopped. The table puts
the compiler's peak bytes per device beside `jaxgen configs show`'s estimate (catalog).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from jaxgen import config as config_lib
from jaxgen.tools import catalog

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "experiments" / "results" / "compile_rows.json"
BLOCK = re.compile(r"(<!-- compile-rows:begin -->\n)(.*?)(<!-- compile-rows:end -->)", re.S)
GIB = 2**30


def published_rows() -> list[str]:
    """Every catalog row sized for a TPU slice (the CPU smoke rows are left out)."""
    rows = []
    for name in catalog.list_names():
        if config_lib.load_config(name).meta.hardware != "cpu":
            rows.append(name)
    return rows


def compile_row(name: str, timeout_s: float) -> dict:
    """`jaxgen compile --json` of one row in a fresh process: its report, or the failure."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxgen", "compile", "--config", name, "--json"],
            capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"config": name, "fits": False, "error": f"no result within {timeout_s:.0f} s"}
    seconds = time.perf_counter() - start
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"config": name, "fits": False, "error": tail, "wall_seconds": seconds}
    report["wall_seconds"] = seconds
    return report


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table(results: dict[str, dict], rows: list[str]) -> str:
    """Markdown: per row the target, mesh, compiler bytes, the catalog estimate and the verdict;
    rows of `rows` without a result yet are listed after the table."""
    lines = [
        "| row | hardware | mesh (data, fsdp, tensor) | compiler peak GiB/device | estimate GiB | "
        "HBM GiB | fits | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        estimate = catalog.memory_estimate(config_lib.load_config(name))["total_bytes"]
        mesh = r.get("mesh") or {}
        compile_s = sum(s["lower_seconds"] + s["compile_seconds"] for s in r.get("steps", []))
        verdict = "yes" if r.get("fits") else "**no**"
        lines.append(
            f"| `{name.removeprefix('configs/')}` | {r.get('target', '-')} | "
            f"{', '.join(str(v) for v in mesh.values()) or '-'} | {_gib(r.get('peak_bytes'))} | "
            f"{_gib(estimate)} | {_gib(r.get('hbm_bytes'))} | {verdict} | {compile_s:.0f} |"
        )
    failures = [(n, r["error"]) for n, r in results.items() if r.get("error")]
    if failures:
        lines.append("")
        lines += [f"- `{n}`: {err[:300]}" for n, err in failures]
    missing = [n.removeprefix("configs/") for n in rows if n not in results]
    if missing:
        lines += ["", f"Not compiled yet: {', '.join(f'`{n}`' for n in missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Compiles the rows (resuming), saves the results, optionally writes the README table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: all)")
    parser.add_argument("--force", action="store_true", help="recompile rows already recorded")
    parser.add_argument("--timeout_s", type=float, default=1800.0, help="per row")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    rows = args.rows.split(",") if args.rows else published_rows()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    todo = [r for r in rows if args.force or r not in results]
    for name in tqdm(todo, desc="compile rows", unit="row"):
        results[name] = compile_row(name, args.timeout_s)
        status = "fits" if results[name].get("fits") else results[name].get("error", "")[:120]
        tqdm.write(f"{name}: {status} ({results[name].get('wall_seconds', 0):.0f} s)")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        ordered = {n: results[n] for n in published_rows() if n in results}
        RESULTS.write_text(json.dumps(ordered, indent=1) + "\n")
    ordered = {n: results[n] for n in published_rows() if n in results}
    everything = published_rows()
    print(table(ordered, everything))
    if args.readme:
        text = README.read_text()
        if not BLOCK.search(text):
            raise SystemExit("README.md has no <!-- compile-rows:begin --> ... :end --> block")
        README.write_text(
            BLOCK.sub(lambda m: m.group(1) + table(ordered, everything) + m.group(3), text)
        )
        print(f"updated {README}")
    return 0 if all(results[n].get("fits") for n in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
