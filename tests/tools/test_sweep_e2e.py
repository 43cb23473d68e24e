"""A real local sweep: a 2-point grid of tiny BERT runs through `jaxgen train`, summary, re-run
and failures.

tests/test_sweep.py covers the sweep logic with a fake trainer; this one trains for real (a few
steps each, sequentially, one shared tokenizer/token cache) to show the pieces fit together.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from jaxgen.tools import sweep
from tests.tiny_runs import tiny_shapes

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/bert.py:smoke"
# Two axes (names list both), two points: tests/test_sweep.py covers larger grids without training.
GRID = ["optim.learning_rate=1e-3,3e-3", "model.num_layers=1"]
TINY_BERT = [
    *tiny_shapes("bert"),
    "train.num_steps=3",
    "train.log_every=1",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "optim.warmup_steps=1",
]
# Point 1 names a corpus that does not exist: valid to the config loader, so it starts and fails in
# the trainer. Point 2 fails config validation and never starts. Point 3 is new and must still run.
SWEEP_FILE = textwrap.dedent(
    """
    def get_sweep():
        return [
            {"optim.learning_rate": 1e-3, "model.num_layers": 1, "data.corpus": "/no/such/x.txt"},
            {"optim.learning_rate": 1e-3, "model.num_layers": 0},
            {"optim.learning_rate": 1e-3, "model.num_layers": 1, "train.seed": 1},
            {"optim.learning_rate": 1e-3, "model.num_layers": 1},
            {"optim.learning_rate": 3e-3, "model.num_layers": 1},
        ]
    """
)


def _env() -> dict[str, str]:
    """The environment of the point subprocesses: one CPU device (faster on few cores)."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # Tiny programs: XLA's expensive CPU optimisations cost more compile time than they save
    # (about 40% of each point's wall time here).
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_sweep_summary_rerun_and_failures(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config path is relative to the repository, as on the command line
    workdir = tmp_path / "sweep"
    common = [*TINY_BERT, f"data.cache_dir={tmp_path / 'cache'}"]
    out = io.StringIO()
    start = time.monotonic()
    results = sweep.run_sweep(
        CONFIG, GRID, workdir, common, parallel=2, progress=False, env=_env(), out=out
    )
    print(f"2-point sweep: {time.monotonic() - start:.1f}s")

    assert [r.status for r in results] == ["done"] * 2, [(r.name, r.error) for r in results]
    names = {r.name for r in results}
    assert names == {
        f"optim.learning_rate={lr},model.num_layers={n}" for lr in ("0.001", "0.003") for n in (1,)
    }
    for r in results:
        point = Path(r.workdir)
        assert (point / "DONE").exists() and (point / "train.log").exists()
        saved = json.loads((point / "config.json").read_text())
        assert saved["model"]["num_layers"] == int(r.overrides["model.num_layers"])
        assert saved["optim"]["learning_rate"] == float(r.overrides["optim.learning_rate"])
        assert r.step == 3
        for key in ("train/loss", "train/mlm_accuracy", "eval/loss", "eval/nsp_loss"):
            assert key in r.metrics, (r.name, sorted(r.metrics))

    # Best first by eval/loss, in the returned list, summary.csv and summary.md alike.
    eval_losses = [r.metrics["eval/loss"] for r in results]
    assert eval_losses == sorted(eval_losses)
    rows = _read_csv(workdir / "summary.csv")
    assert [row["point"] for row in rows] == [r.name for r in results]
    assert [float(row["eval/loss"]) for row in rows] == pytest.approx(eval_losses)
    assert {"optim.learning_rate", "model.num_layers", "status", "train/loss"} <= set(rows[0])
    markdown = (workdir / "summary.md").read_text()
    positions = [markdown.index(f"| {r.name} |") for r in results]
    assert positions == sorted(positions)
    assert out.getvalue().startswith(markdown)

    # Re-running the same sweep starts no training at all: every point is already done.
    started = []

    def command(config, point_workdir, overrides):
        started.append(point_workdir)
        return sweep.train_command(config, point_workdir, overrides)

    again = sweep.run_sweep(
        CONFIG, GRID, workdir, common, command=command, progress=False, out=io.StringIO()
    )
    assert started == []
    assert [r.status for r in again] == ["skipped-done"] * 2
    assert [r.name for r in again] == [r.name for r in results]
    assert [r.metrics for r in again] == [r.metrics for r in results]

    # A sweep file with two bad points: each is reported failed with its error, and the points
    # after them still run (or are skipped as done).
    sweep_file = tmp_path / "sweep_points.py"
    sweep_file.write_text(SWEEP_FILE)
    start = time.monotonic()
    mixed = sweep.run_sweep(
        CONFIG,
        (),
        workdir,
        common,
        points=sweep.load_sweep_file(sweep_file),
        progress=False,
        env=_env(),
        out=io.StringIO(),
    )
    print(f"sweep file with failing points: {time.monotonic() - start:.1f}s")
    by_status = {r.name: r.status for r in mixed}
    assert list(by_status.values()).count("failed") == 2, by_status
    done = [r for r in mixed if r.status != "failed"]
    assert sorted(r.status for r in done) == ["done", "skipped-done", "skipped-done"]
    assert [r.status for r in mixed[-2:]] == ["failed", "failed"]  # no metric: ranked last
    bad_corpus, bad_layers = sorted(
        (r for r in mixed if r.status == "failed"), key=lambda r: "data.corpus" not in r.overrides
    )
    assert "/no/such/x.txt" in bad_corpus.error, bad_corpus.error
    assert (Path(bad_corpus.workdir) / "train.log").exists()
    assert "num_layers" in bad_layers.error, bad_layers.error
    assert not Path(bad_layers.workdir).exists()  # rejected before starting
    rows = _read_csv(workdir / "summary.csv")
    assert [row["status"] for row in rows][-2:] == ["failed", "failed"]
    assert all(row["error"] for row in rows[-2:])
