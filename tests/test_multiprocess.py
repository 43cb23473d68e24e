"""Multi-host training on one machine: 2 processes × 4 CPU devices equal 1 process × 8 devices.

Both runs train the tiny BERT smoke config on the same global batches (each of the 2 processes
builds its half of every batch); every logged loss must match the 1-process run. A 2-process run
stopped by SIGTERM on one host resumes from its orbax checkpoint (written by both processes) and
matches the uninterrupted 1-process run. The only expected difference is the order of the
cross-device sums (gloo between two processes vs. within one), so losses agree to rtol 1e-5 rather
than bit for bit (observed: about 1e-7). The 1-process reference trains in the test process, whose
XLA flags (tests/conftest.py) the subprocesses copy, so they compile alike.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgen.config import load_config
from jaxgen.train import loop
from jaxgen.train.metrics import read_metrics
from tests.tiny_runs import TINY

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
NUM_STEPS = 10
PROCESS_TIMEOUT_S = 240  # one 2-process run; a normal one takes well under a minute

TINY_BERT = [
    *TINY["bert"],
    "train.log_every=1",
    "train.eval_every=5",
    "train.checkpoint_every=5",
    "optim.warmup_steps=2",
    # The schedule must not depend on train.num_steps: the first 2-process run stops at 5 steps.
    f"optim.decay_steps={NUM_STEPS}",
]
TRAIN_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "learning_rate")
EVAL_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")


# Runs `python -m jaxgen` with jax's blocking host collectives and its preemption sync point
# wrapped: each call appends "name<TAB>first argument<TAB>calling module" to $HOST_CALLS_DIR/<id>.
HOST_CALLS_PROBE = r"""
import os, runpy, sys
from jax.experimental import multihost_utils

process_id = sys.argv[sys.argv.index("--process_id") + 1]
log = open(os.path.join(os.environ["HOST_CALLS_DIR"], process_id), "a", buffering=1)

def wrap(name):
    inner = getattr(multihost_utils, name)
    def call(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__")
        first = args[0] if args and isinstance(args[0], int) else ""
        log.write(f"{name}\t{first}\t{caller}\n")
        return inner(*args, **kwargs)
    setattr(multihost_utils, name, call)

for name in ("process_allgather", "broadcast_one_to_all", "sync_global_devices",
             "reached_preemption_sync_point"):
    wrap(name)
runpy.run_module("jaxgen", run_name="__main__", alter_sys=True)
"""
SYNC_POINT = "reached_preemption_sync_point"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(
    workdir: Path,
    overrides: list[str],
    num_processes: int,
    log_dir: Path,
    tag: str,
    host_calls: Path | None = None,
) -> tuple[list[subprocess.Popen], list[Path]]:
    """Starts `python -m jaxgen train` as `num_processes` processes of one runtime, 8 CPU devices in
    all; returns the processes and their log files. With `host_calls`, each process records its
    host collectives there (HOST_CALLS_PROBE)."""
    env = dict(os.environ)
    # Tiny programs: XLA's expensive CPU optimisations cost more compile time than they save.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={8 // num_processes} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    entry = ["-m", "jaxgen"]
    if host_calls is not None:
        host_calls.mkdir(parents=True, exist_ok=True)
        env["HOST_CALLS_DIR"] = str(host_calls)
        entry = ["-c", HOST_CALLS_PROBE]
    argv = [sys.executable, *entry, "train", "--config", "configs/bert.py:smoke"]
    argv += ["--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]
    address = f"localhost:{_free_port()}"
    logs = [log_dir / f"{tag}-process{i}.log" for i in range(num_processes)]
    procs: list[subprocess.Popen] = []
    for i, log in enumerate(logs):
        distributed = []
        if num_processes > 1:
            distributed = ["--coordinator_address", address, "--process_id", str(i)]
            distributed += ["--num_processes", str(num_processes)]
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    [*argv, *distributed],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    return procs, logs


def _wait(
    procs: list[subprocess.Popen], logs: list[Path], tag: str, expected_code: int = 0
) -> list[str]:
    """Waits for every process; returns their logs, or fails the test with every log if any
    process exits with another code than `expected_code` (or times out)."""
    start = time.monotonic()
    deadline = start + PROCESS_TIMEOUT_S
    try:
        # If one process dies, the others block in a collective until the coordinator notices:
        # stop waiting as soon as any fails.
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(
                p.poll() not in (None, expected_code) for p in procs
            ):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    print(f"{len(procs)}-process run '{tag}': {time.monotonic() - start:.1f}s after start")
    texts = [log.read_text(errors="replace") for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [expected_code] * len(procs):
        dump = "\n".join(
            f"===== process {i} (exit code {c}) =====\n{t}"
            for i, (c, t) in enumerate(zip(codes, texts, strict=True))
        )
        expected = [expected_code] * len(procs)
        pytest.fail(f"{len(procs)}-process run '{tag}' exited {codes}, not {expected}:\n{dump}")
    return texts


def _train(
    workdir: Path, overrides: list[str], num_processes: int, log_dir: Path, tag: str
) -> list[str]:
    """Runs training as `num_processes` processes to the end; returns their logs."""
    return _wait(*_start(workdir, overrides, num_processes, log_dir, tag), tag)


def _rows(workdir: Path, split: str) -> dict[int, dict]:
    rows = [r for r in read_metrics(workdir) if r["split"] == split]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{split} rows logged twice: {steps}"
    return {r["step"]: r for r in rows}


def _host_calls(path: Path) -> list[tuple[str, str, str]]:
    """(name, first argument, calling module) of every wrapped call one process made, in order."""
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()]


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    common = [*TINY_BERT, f"data.cache_dir={cache}"]

    # The reference: this process's 8 devices. It also fills the shared token and tokenizer cache,
    # so the 2-process runs only load it.
    reference = tmp_path / "one_process"
    assert jax.device_count() == 8 and jax.process_count() == 1
    loop.train(load_config("configs/bert.py:smoke", [*common, f"train.num_steps={NUM_STEPS}"]),
               reference)  # fmt: skip

    workdir = tmp_path / "two_processes"
    _train(workdir, [*common, f"train.num_steps={NUM_STEPS}"], 2, tmp_path, "two")

    # Only process 0 writes metrics and TensorBoard: one row per step, one event file.
    expected, got = _rows(reference, "train"), _rows(workdir, "train")
    assert sorted(got) == sorted(expected) == list(range(1, NUM_STEPS + 1))
    expected_eval, got_eval = _rows(reference, "eval"), _rows(workdir, "eval")
    assert sorted(got_eval) == sorted(expected_eval) == [0, 5, 10]
    worst = 0.0
    for split, want, have, keys in (
        ("train", expected, got, TRAIN_KEYS),
        ("eval", expected_eval, got_eval, EVAL_KEYS),
    ):
        for step in want:
            for key in keys:
                a, b = have[step][key], want[step][key]
                np.testing.assert_allclose(a, b, rtol=RTOL, err_msg=f"{split} {key} at {step}")
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    print(f"largest relative difference from the 1-process run: {worst:.2e}")
    events = [p for p in workdir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1, events
    assert (workdir / "DONE").read_text().strip() == str(NUM_STEPS)
    assert _checkpoint_steps(workdir) == [5, 10]
    assert not list(workdir.glob("tokenizer.tmp*"))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    """A preempted host's SIGTERM must stop every process at one step with one checkpoint (the
    others would otherwise wait forever in the next step's collectives), from which both resume
    to the losses of an uninterrupted 1-process run."""
    workdir = tmp_path / "run"
    common = [
        *TINY["bert"],
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    ]
    host_calls = tmp_path / "host_calls"
    procs, logs = _start(workdir, [*common, "train.num_steps=100000"], 2, tmp_path, "sigterm",
                         host_calls)  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the non-primary process only
    texts = _wait(procs, logs, "sigterm", expected_code=130)

    steps = _checkpoint_steps(workdir)
    assert len(steps) == 1 and steps[0] >= 3, steps
    # jax's preemption notifier took the signal on process 1 only (its C++ warning "SIGTERM caught
    # at ..."; a Python handler would have replaced it), and the coordination service told
    # process 0: both name the same step.
    assert "SIGTERM caught" in texts[1] and "SIGTERM caught" not in texts[0]
    message = "preemption notice (SIGTERM on this or another host) received: saved a checkpoint"
    for text in texts:
        assert f"{message} at step {steps[0]}" in text
    assert max(_rows(workdir, "train")) == steps[0]

    # Neither learnt it through a collective: the loop asked the sync point once a step (a local
    # check), and no blocking host collective ran between its first and last step (no eval or
    # checkpoint step falls there; the final save comes after).
    for i in range(2):
        calls = _host_calls(host_calls / str(i))
        checks = [
            k for k, (name, step, caller) in enumerate(calls)
            if name == SYNC_POINT and caller == "jaxgen.train.loop" and int(step) > 0
        ]  # fmt: skip
        assert [int(calls[k][1]) for k in checks] == list(range(1, steps[0] + 1)), calls
        between = [c for c in calls[checks[0] : checks[-1]] if c[0] != SYNC_POINT]
        assert between == [], f"process {i} ran host collectives between steps: {between}"

    # Both resume from that checkpoint and train 3 more steps, as one process would have.
    longer = [*common, f"train.num_steps={steps[0] + 3}"]
    logs = _train(workdir, longer, 2, tmp_path, "resume")
    for i, text in enumerate(logs):
        assert f"at step {steps[0]}" in text and "resumed from" in text, f"process {i}:\n{text}"
    reference = tmp_path / "one_process"
    loop.train(load_config("configs/bert.py:smoke", longer), reference)
    want, got = _rows(reference, "train"), _rows(workdir, "train")
    assert sorted(got) == sorted(want) == list(range(1, steps[0] + 4))
    for step in want:
        for key in TRAIN_KEYS:
            np.testing.assert_allclose(
                got[step][key], want[step][key], rtol=RTOL, err_msg=f"{key} at {step}"
            )
    assert (workdir / "DONE").read_text().strip() == str(steps[0] + 3)
