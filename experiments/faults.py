"""Fault injection: tiny BERT trainings (and `jaxgen prepare`) killed, preempted, corrupted,
poisoned and failed at random points, then run again with the same command.

    python experiments/faults.py                                # 12 trials of each fault (108)
    python experiments/faults.py --trials 2 --faults kill-save,corrupt
    python experiments/faults.py --readme                       # the table into README.md

Each trial runs `jaxgen` in subprocesses, in its own workdir, and injects one fault (`JAXGEN_FAULT`,
see `jaxgen/train/faults.py`, or a signal or damage from outside):

    kill-anywhere  SIGKILL at a uniformly random moment of the run (start-up and compiles too)
    kill-save      SIGKILL while a checkpoint is being written
    kill-eval      SIGKILL in the middle of an evaluation
    term           SIGTERM after a random step (a preemption notice)
    corrupt        SIGTERM after a random step, then bytes flipped in or the second half cut
                   off one array file of the newest checkpoint
    nan            a NaN loss at a random step: the run stops; the rerun is without the NaN
    nan-skip       the same NaN with train.skip_nonfinite_or_spike=true: the run goes on
    data-error     the data pipeline raises at a random step
    kill-prepare   SIGKILL at a random moment of `jaxgen prepare` (8 shards, 2 workers)

and then runs the same command again (the nan and data-error reruns without the fault, as after
a fixed bug). A trial survives when: the rerun finishes; no finished step is lost beyond the last
checkpoint interval (two for `corrupt`, which loses a checkpoint); the final parameters equal an
uninterrupted run's bit for bit (the prepared files equal an uninterrupted prepare's), except for
nan-skip, whose skipped update changes them (it must finish with finite parameters and one skipped
step); a fault that ends a run does so with one line naming it; and no output has a traceback.
`corrupt` also checks that `jaxgen checkpoints verify` names the damaged step.

Results accumulate in experiments/results/faults.json, one entry per trial; rerunning skips the
trials already there (`--force` redoes them). Prints the table and
`RESULT faults trials=<n> survived=<n>`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen.train.faults import ENV as FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "faults.json"
BLOCK = re.compile(r"(<!-- faults:begin -->\n)(.*?)(<!-- faults:end -->)", re.S)

NUM_STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 12, 3, 6
# The tiny BERT of tests/tiny_runs.py: one layer, 32 wide, well under a second a step.
TRAIN_OVERRIDES = [
    "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=16",
    "model.d_ff=64", "model.vocab_size=1000", "model.max_len=32", "data.seq_len=32",
    "data.max_predictions=5", "data.eval_fraction=0", "data.eval_documents=12",
    "train.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
    f"train.num_steps={NUM_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
    f"train.eval_every={EVAL_EVERY}",
]  # fmt: skip
PREPARE_OVERRIDES = ["model.vocab_size=1000", "data.seq_len=32", "data.max_predictions=5"]
FAULTS = ("kill-anywhere", "kill-save", "kill-eval", "term", "corrupt", "nan", "nan-skip",
          "data-error", "kill-prepare")  # fmt: skip
TIMEOUT_S = 600
# Steps a SIGKILL may cost: the interval since the newest checkpoint, plus the steps run while it
# was still being written (saves are asynchronous; a kill then falls back to the one before).
# The tiny model runs a whole interval during one save, so that is a second interval.
KILL_LIMIT = 2 * CHECKPOINT_EVERY


# ------------------------------------------------------------------------------------ processes


class Env:
    """Where the trials run: a shared data cache, jax's compilation cache and the references."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cache = base / "cache"
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "",  # one CPU device, whatever the calling shell simulates
            "JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop(FAULT_ENV, None)

    def train_cmd(self, workdir: Path, *extra: str) -> list[str]:
        """The `jaxgen train` command of the tiny run in `workdir`."""
        overrides = [*TRAIN_OVERRIDES, f"data.cache_dir={self.cache}", *extra]
        return [sys.executable, "-m", "jaxgen", "train", "--config", "configs/bert.py:smoke",
                *(f"--config.{o}" for o in overrides), "--workdir", str(workdir)]  # fmt: skip

    def prepare_cmd(self, output: Path) -> list[str]:
        """The `jaxgen prepare` command of the built-in corpus into `output`."""
        return [sys.executable, "-m", "jaxgen", "prepare", "--config", "configs/bert.py:smoke",
                *(f"--config.{o}" for o in PREPARE_OVERRIDES), "--input", "builtin",
                "--output", str(output), "--num_shards", "8", "--workers", "2"]  # fmt: skip

    def run(self, cmd: list[str], fault: str | None = None) -> Run:
        """Runs `cmd` to its end (with JAXGEN_FAULT=fault)."""
        env = {**self.env, FAULT_ENV: fault} if fault else self.env
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)  # fmt: skip
        return Run(proc.returncode, proc.stderr, time.perf_counter() - start)

    def run_and_kill(self, cmd: list[str], after_s: float) -> Run:
        """Runs `cmd` and SIGKILLs it `after_s` seconds in (if it is still running)."""
        start = time.perf_counter()
        # A session of its own: the kill reaches its worker processes too, as a machine's loss does.
        pipe = subprocess.PIPE
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=pipe, stderr=pipe, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=after_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
        return Run(proc.returncode, stderr, time.perf_counter() - start)


class Run:
    """One finished process: exit code, stderr, seconds."""

    def __init__(self, code: int, stderr: str, seconds: float) -> None:
        self.code, self.stderr, self.seconds = code, stderr, seconds

    def messages(self) -> list[str]:
        """The stderr lines that are neither log records nor progress bars."""
        lines = [ln.strip() for ln in re.split(r"[\r\n]", self.stderr)]
        noise = re.compile(
            r"^(\d{4}-\d\d-\d\d [\d:,]+ \w+ |train bert|step \d+: eval loss|WARNING: |E0000 "
            r"|W0000 |=== |learning/|Failed to find host bounds)"
        )
        return [ln for ln in lines if ln and not noise.match(ln)]

    def tracebacks(self) -> bool:
        """Whether the output holds a traceback or an ignored-exception report."""
        return "Traceback (most recent call last)" in self.stderr or "Exception ignored" in (
            self.stderr
        )

    def resumed_step(self) -> int:
        """The checkpoint step this run resumed from (0 for a fresh start)."""
        found = re.findall(r"resumed from .* at step (\d+)", self.stderr)
        return int(found[-1]) if found else 0


# ------------------------------------------------------------------------------------- checking


def progress(workdir: Path) -> int:
    """The last train step the run logged (every step is logged)."""
    from jaxgen.train.metrics import read_metrics

    if not (workdir / "metrics.jsonl").exists():
        return 0
    steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
    return max(steps, default=0)


READ_LOCK = threading.Lock()  # one checkpoint read at a time in this process (orbax, threads)


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    """The flattened parameters of the run's last checkpoint."""
    from flax import traverse_util

    from jaxgen.train import checkpoint

    with READ_LOCK:
        _, params = checkpoint.load_params(workdir)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
    """None when both hold the same arrays bit for bit, else the first difference."""
    if sorted(a) != sorted(b):
        return f"parameter names differ: {sorted(set(a) ^ set(b))[:3]}"
    for key in sorted(a):
        if not np.array_equal(a[key], b[key]):
            return f"{key} differs by up to {float(np.max(np.abs(a[key] - b[key]))):.3g}"
    return None


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (the COMPLETED marker, which holds the
    time it was written, by its presence)."""
    return {
        str(p.relative_to(root)): "present"
        if p.name == "COMPLETED"
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Outcome:
    """What a trial found: problems (none = survived), steps redone, a short note."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.lost = 0
        self.note = ""

    def require(self, ok: bool, problem: str) -> None:
        """Records `problem` unless `ok`."""
        if not ok:
            self.problems.append(problem)

    def one_line(self, run: Run, pattern: str) -> None:
        """The faulted run ended with exactly one message, matching `pattern`, no traceback."""
        messages = run.messages()
        self.require(not run.tracebacks(), f"traceback in the faulted run's output: {messages}")
        self.require(
            len(messages) == 1 and re.search(pattern, messages[0]) is not None,
            f"expected one line matching {pattern!r}, got {messages}",
        )


def finish(env: Env, workdir: Path, out: Outcome, before: int, limit: int, first: Run) -> Run:
    """Reruns the command and checks the rerun: it finishes cleanly, redoes at most `limit` of the
    `before` steps already done, and ends with the reference's parameters."""
    rerun = env.run(env.train_cmd(workdir))
    out.require(rerun.code == 0, f"rerun exited {rerun.code}: {rerun.messages()[-3:]}")
    out.require(not rerun.tracebacks(), "traceback in the rerun's output")
    out.require(not first.tracebacks(), "traceback in the faulted run's output")
    out.lost = max(before - rerun.resumed_step(), 0)
    out.require(out.lost <= limit, f"{out.lost} steps redone, more than {limit}")
    out.require((workdir / "DONE").exists(), "no DONE marker after the rerun")
    return rerun


# --------------------------------------------------------------------------------------- trials


def _flip_or_cut(workdir: Path, rng: np.random.Generator) -> tuple[int, str]:
    """Damages one array file of the newest checkpoint; returns (its step, what was done)."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    newest = workdir / "checkpoints" / str(steps[-1])
    files = sorted(p for p in (newest / "state").glob("**/d/*") if p.is_file())
    # Picked by size, as a bad sector would: the arrays' data, mostly. Some small files are
    # b-tree nodes that a merge of the processes' databases superseded; damage there is harmless.
    sizes = np.array([p.stat().st_size for p in files], np.float64)
    target = files[rng.choice(len(files), p=sizes / sizes.sum())]
    data = bytearray(target.read_bytes())
    if rng.random() < 0.5:
        for i in rng.choice(len(data), size=max(1, len(data) // 50), replace=False):
            data[i] ^= 0xFF
        what = "flipped bytes in"
    else:
        data = data[: len(data) // 2]
        what = "cut in half"
    target.write_bytes(bytes(data))
    return steps[-1], f"{what} {target.relative_to(workdir)}"


def trial(env: Env, fault: str, index: int, seed: int, refs: dict[str, Any]) -> dict[str, Any]:
    """Runs one trial of `fault`; returns its record."""
    rng = np.random.default_rng([seed, FAULTS.index(fault), index])
    workdir = env.base / "trials" / f"{fault}-{index}"
    shutil.rmtree(workdir, ignore_errors=True)
    out = Outcome()
    start = time.perf_counter()
    cmd = env.train_cmd(workdir)
    if fault == "kill-anywhere":
        # Over the time an uninterrupted run takes (start-up, data, compiles and steps).
        at = float(rng.uniform(0, refs["train_seconds"]))
        first = env.run_and_kill(cmd, at)
        before = progress(workdir)
        out.note = f"killed at {at:.1f} s, step {before}"
        finish(env, workdir, out, before, KILL_LIMIT, first)
    elif fault in ("kill-save", "kill-eval"):
        point = fault.removeprefix("kill-")
        every = CHECKPOINT_EVERY if point == "save" else EVAL_EVERY
        step = int(rng.choice(range(every if point == "save" else 0, NUM_STEPS + 1, every)))
        first = env.run(cmd, f"kill@{point}:{step}")
        out.require(first.code == -signal.SIGKILL, f"the fault did not land (exit {first.code})")
        before = progress(workdir)
        out.note = f"killed in the {point} of step {step}"
        finish(env, workdir, out, before, KILL_LIMIT, first)
    elif fault == "term":
        step = int(rng.integers(1, NUM_STEPS))
        first = env.run(cmd, f"term@step:{step}")
        out.require(first.code == 130, f"SIGTERM: exit {first.code}, not 130")
        out.one_line(first, rf"SIGTERM received: saved a checkpoint at step {step} ")
        out.note = f"SIGTERM after step {step}"
        finish(env, workdir, out, progress(workdir), 0, first)
    elif fault == "corrupt":
        step = int(rng.integers(CHECKPOINT_EVERY + 1, NUM_STEPS))
        # Stopped by SIGTERM, so that the newest checkpoint is complete (a SIGKILL right after a
        # save can leave the tiny run with none; kill-save covers that case).
        first = env.run(cmd, f"term@step:{step}")
        before = progress(workdir)
        damaged, what = _flip_or_cut(workdir, rng)
        verify = env.run([sys.executable, "-m", "jaxgen", "checkpoints", "verify", "--workdir",
                          str(workdir)])  # fmt: skip
        # Some files of a checkpoint are no longer read (b-tree nodes superseded when the
        # processes' databases were merged): damage there is harmless, and verify says so.
        harmless = verify.code == 0
        rerun = finish(env, workdir, out, before, 2 * CHECKPOINT_EVERY, first)
        skipped = re.search(rf"skipping checkpoint step {damaged} .*moved it to", rerun.stderr)
        set_aside = (workdir / "checkpoints_damaged" / str(damaged)).is_dir()
        if harmless:
            out.require(skipped is None and not set_aside, "verify missed damage the run found")
        else:
            out.require(verify.code == 1, f"checkpoints verify exited {verify.code}")
            out.require(skipped is not None, f"no warning naming step {damaged}")
            out.require(set_aside, f"step {damaged} was not moved to checkpoints_damaged/")
            what += f"; verify: step {damaged} damaged"
        out.note = f"stopped after step {step}; {what}"
    elif fault in ("nan", "data-error"):
        step = int(rng.integers(1, NUM_STEPS + 1))
        spec, pattern = {
            "nan": (f"nan@loss:{step}", rf"^jaxgen: NonFiniteLossError: .* at step {step};"),
            "data-error": (f"raise@data:{step}", rf"^jaxgen: InjectedFault: .* at step {step}$"),
        }[fault]
        first = env.run(cmd, spec)
        out.require(first.code == 1, f"exit {first.code}, not 1")
        out.one_line(first, pattern)
        out.note = f"{spec}"
        finish(env, workdir, out, progress(workdir), CHECKPOINT_EVERY, first)
    elif fault == "nan-skip":
        step = int(rng.integers(1, NUM_STEPS + 1))
        run = env.run(env.train_cmd(workdir, "train.skip_nonfinite_or_spike=true"),
                      f"nan@loss:{step}")  # fmt: skip
        from jaxgen.train.metrics import read_metrics

        out.require(run.code == 0, f"exit {run.code}: {run.messages()[-3:]}")
        out.require(not run.tracebacks(), "traceback in the output")
        rows = [r for r in read_metrics(workdir) if r["split"] == "train"] if run.code == 0 else []
        out.require(bool(rows) and rows[-1]["skipped"] == 1, "not exactly one skipped update")
        finite = run.code == 0 and all(
            np.all(np.isfinite(v)) for v in final_params(workdir).values()
        )
        out.require(finite, "non-finite final parameters")
        out.note = f"nan@loss:{step} skipped"
    elif fault == "kill-prepare":
        output = workdir / "prepared"
        at = float(rng.uniform(0, refs["prepare_seconds"]))
        first = env.run_and_kill(env.prepare_cmd(output), at)
        rerun = env.run(env.prepare_cmd(output))
        out.require(rerun.code == 0, f"rerun exited {rerun.code}: {rerun.messages()[-3:]}")
        out.require(not (first.tracebacks() or rerun.tracebacks()), "traceback in the output")
        if rerun.code == 0:
            got = tree_hashes(output)
            differ = sorted(
                k for k in set(got) | set(refs["prepared"]) if got.get(k) != refs["prepared"].get(k)
            )
            out.require(not differ, f"prepared files differ from the reference: {differ[:3]}")
        out.note = f"killed at {at:.1f} s"
    else:
        raise ValueError(f"unknown fault {fault!r}; faults: {', '.join(FAULTS)}")
    if fault not in ("nan-skip", "kill-prepare") and (workdir / "DONE").exists():
        differ = same_params(final_params(workdir), refs["params"])
        out.require(differ is None, f"final parameters differ from the reference: {differ}")
    record = {"fault": fault, "trial": index, "survived": not out.problems, "lost": out.lost,
              "note": out.note, "problems": out.problems,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if not out.problems:
        shutil.rmtree(workdir, ignore_errors=True)  # a failed trial's workdir is kept to look at
    return record


def references(env: Env, faults: list[str]) -> dict[str, Any]:
    """An uninterrupted run (and, for kill-prepare, an uninterrupted prepare), made once per base
    directory and kept there."""
    saved = env.base / "references.json"
    refs = json.loads(saved.read_text()) if saved.exists() else {}
    workdir = env.base / "reference"
    if "train_seconds" not in refs:
        shutil.rmtree(workdir, ignore_errors=True)
        if "kill-anywhere" in faults:  # timed warm: with the data and compilation caches filled
            env.run(env.train_cmd(workdir))
            shutil.rmtree(workdir)
        run = env.run(env.train_cmd(workdir))
        if run.code:
            raise SystemExit(f"the reference run failed:\n{run.stderr[-2000:]}")
        np.savez(env.base / "reference-params.npz", **final_params(workdir))
        refs["train_seconds"] = run.seconds
    if "kill-prepare" in faults and "prepared" not in refs:
        output = env.base / "prepared-reference"
        shutil.rmtree(output, ignore_errors=True)
        prep = env.run(env.prepare_cmd(output))
        if prep.code:
            raise SystemExit(f"the reference prepare failed:\n{prep.stderr[-2000:]}")
        refs.update(prepare_seconds=prep.seconds, prepared=tree_hashes(output))
    saved.write_text(json.dumps(refs, indent=1))
    return {**refs, "params": dict(np.load(env.base / "reference-params.npz"))}


# ---------------------------------------------------------------------------------------- report


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per fault, trials, survived, and the steps redone (mean and max)."""
    lines = ["| fault | trials | survived | steps redone (mean / max) |", "|---|---|---|---|"]
    for fault in FAULTS:
        rows = [r for r in records if r["fault"] == fault]
        if not rows:
            continue
        lost = [r["lost"] for r in rows]
        redone = "n/a" if fault in ("nan-skip", "kill-prepare") else (
            f"{np.mean(lost):.1f} / {max(lost)}")  # fmt: skip
        survived = sum(r["survived"] for r in rows)
        lines.append(f"| {fault} | {len(rows)} | {survived} | {redone} |")
    total, survived = len(records), sum(r["survived"] for r in records)
    lines.append(f"| **all** | **{total}** | **{survived}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the trials not yet recorded, prints the table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="trials at once")
    parser.add_argument("--base", type=Path, default=REPO / "experiments" / "results" / "faults",
                        help="scratch directory (caches, references, trial workdirs)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--force", action="store_true", help="redo recorded trials")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; faults: {', '.join(FAULTS)}")
    args.base.mkdir(parents=True, exist_ok=True)
    env = Env(args.base.absolute())
    refs = references(env, faults)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    todo = [(f, i) for f in faults for i in range(args.trials)
            if args.force or f"{f}/{i}" not in results]  # fmt: skip
    lock = threading.Lock()

    def one(job: tuple[str, int]) -> dict[str, Any]:
        record = trial(env, job[0], job[1], args.seed, refs)
        with lock:
            results[f"{job[0]}/{job[1]}"] = record
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
        mark = "ok" if record["survived"] else "FAILED " + "; ".join(record["problems"])
        print(f"{job[0]} #{job[1]}: {mark} ({record['note']}, {record['seconds']} s)", flush=True)
        return record

    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        list(pool.map(one, todo))
    records = [results[f"{f}/{i}"] for f in faults for i in range(args.trials)]
    print(table(records))
    survived = sum(r["survived"] for r in records)
    print(f"RESULT faults trials={len(records)} survived={survived}")
    if args.readme:
        readme = REPO / "README.md"
        text = readme.read_text()
        if not BLOCK.search(text):
            raise SystemExit("README.md has no <!-- faults:begin --> ... :end --> block")
        everything = [r for key, r in results.items()]
        readme.write_text(BLOCK.sub(lambda m: m[1] + table(everything) + "\n" + m[3], text))
    return 0 if survived == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
