"""Multi-host training on one machine: 2 processes × 4 CPU devices equal 1 process × 8 devices.

Both runs train the tiny BERT smoke config on the same global batches (each of the 2 processes
builds its half of every batch). The 2-process run stops at step 5 and resumes from its orbax
checkpoint (written by both processes) to step 10; every logged loss must match the uninterrupted
1-process run. The only expected difference is the order of the cross-device sums (gloo between
two processes vs. within one), so losses agree to rtol 1e-5 rather than bit for bit (observed:
about 1e-7). All runs are subprocesses with the same XLA flags, so they compile alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxgen.train.metrics import read_metrics
from tests.tiny import TINY

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(
    workdir: Path, overrides: list[str], num_processes: int, log_dir: Path, tag: str
) -> list[str]:
    """Runs `python -m jaxgen train` as `num_processes` processes of one runtime, 8 CPU devices in
    all; returns their logs and fails the test with every log if any process fails."""
    env = dict(os.environ)
    # Tiny programs: XLA's expensive CPU optimisations cost more compile time than they save.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={8 // num_processes} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "jaxgen", "train", "--config", "configs/bert.py:smoke"]
    argv += ["--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]
    address = f"localhost:{_free_port()}"
    logs = [log_dir / f"{tag}-process{i}.log" for i in range(num_processes)]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
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
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        # If one process dies, the others block in a collective until the coordinator notices:
        # stop waiting as soon as any fails.
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    print(f"{num_processes}-process run '{tag}': {time.monotonic() - start:.1f}s")
    texts = [log.read_text(errors="replace") for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [0] * num_processes:
        dump = "\n".join(
            f"===== process {i} (exit code {c}) =====\n{t}"
            for i, (c, t) in enumerate(zip(codes, texts, strict=True))
        )
        pytest.fail(f"{num_processes}-process run '{tag}' failed (exit codes {codes}):\n{dump}")
    return texts


def _rows(workdir: Path, split: str) -> dict[int, dict]:
    rows = [r for r in read_metrics(workdir) if r["split"] == split]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{split} rows logged twice: {steps}"
    return {r["step"]: r for r in rows}


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
    cache = tmp_path / "cache"
    common = [*TINY_BERT, f"data.cache_dir={cache}"]

    # The reference: 1 process with 8 devices. It also fills the shared token and tokenizer cache,
    # so the 2-process runs only load it.
    reference = tmp_path / "one_process"
    _train(reference, [*common, f"train.num_steps={NUM_STEPS}"], 1, tmp_path, "reference")

    workdir = tmp_path / "two_processes"
    _train(workdir, [*common, "train.num_steps=5"], 2, tmp_path, "first")
    assert _checkpoint_steps(workdir) == [5]
    logs = _train(workdir, [*common, f"train.num_steps={NUM_STEPS}"], 2, tmp_path, "resume")
    for i, text in enumerate(logs):
        assert "resumed from" in text and "at step 5" in text, (
            f"process {i} did not resume:\n{text}"
        )

    # Only process 0 writes metrics and TensorBoard: one row per step, one event file per run.
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
    assert len(events) == 2, events
    assert (workdir / "DONE").read_text().strip() == str(NUM_STEPS)
    assert _checkpoint_steps(workdir) == [5, 10]
    assert not list(workdir.glob("tokenizer.tmp*"))
