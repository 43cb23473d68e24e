"""jaxgen.tools.sweep: grid expansion, naming, sweep files, summaries, skip-done and failures.

Points run a tiny fake trainer (no jax) through the injectable `command`, so these tests take a
second; the real 2×2 smoke-config sweep lives with the trainer's tests.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest

from jaxgen import cli
from jaxgen.tools import launch, sweep

FAKE_TRAIN = textwrap.dedent(
    """
    import json, sys, pathlib
    args = sys.argv[1:]
    workdir = pathlib.Path(args[args.index("--workdir") + 1])
    ov = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    print("config", args[args.index("--config") + 1], "overrides", sorted(ov.items()))
    if ov.get("model.num_layers") == "4" and ov.get("optim.learning_rate") == "3e-4":
        print("Traceback (most recent call last):")
        print("FloatingPointError: loss is nan at step 3", file=sys.stderr)
        sys.exit(1)
    lr, layers = float(ov["optim.learning_rate"]), int(ov["model.num_layers"])
    final = 10.0 - lr * 1e4 - layers
    rows = [
        {"step": 1, "split": "train", "loss": 11.0, "accuracy": 0.1, "learning_rate": lr},
        {"step": 2, "split": "train", "loss": final, "accuracy": 0.2, "learning_rate": lr},
        {"step": 2, "split": "eval", "loss": final + 0.5, "accuracy": 0.3},
    ]
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
    (workdir / "DONE").write_text("")
    """
)

GRID = ["optim.learning_rate=1e-4,3e-4", "model.num_layers=2,4"]


@pytest.fixture
def fake_command(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = []

    def command(config, workdir, overrides):
        calls.append((config, workdir, list(overrides)))
        return [sys.executable, str(script), "--config", config, "--workdir", workdir, *overrides]

    command.calls = calls
    return command


def _run(tmp_path, command, **kwargs):
    kwargs.setdefault("validate", False)
    kwargs.setdefault("progress", False)
    return sweep.run_sweep(
        "configs/gpt.py:smoke",
        GRID,
        tmp_path / "sw",
        ["train.num_steps=2"],
        command=command,
        **kwargs,
    )


def test_parse_and_expand_grid():
    assert sweep.parse_sweep("--config.optim.learning_rate=1e-4, 3e-4") == (
        "optim.learning_rate",
        ["1e-4", "3e-4"],
    )
    assert sweep.parse_sweep("train.phases=[1,2],[3]") == ("train.phases", ["[1,2]", "[3]"])
    assert sweep.expand_grid(GRID) == [
        {"optim.learning_rate": "1e-4", "model.num_layers": "2"},
        {"optim.learning_rate": "1e-4", "model.num_layers": "4"},
        {"optim.learning_rate": "3e-4", "model.num_layers": "2"},
        {"optim.learning_rate": "3e-4", "model.num_layers": "4"},
    ]
    assert sweep.expand_grid({"optim.learning_rate": [1e-4], "model.remat": [True, False]}) == [
        {"optim.learning_rate": "0.0001", "model.remat": "true"},
        {"optim.learning_rate": "0.0001", "model.remat": "false"},
    ]
    for bad in ("optim.learning_rate", "optim.learning_rate=", "=1,2", "a=1,,2"):
        with pytest.raises(sweep.SweepError, match="must look like"):
            sweep.parse_sweep(bad)
    with pytest.raises(sweep.SweepError, match="more than once"):
        sweep.expand_grid(["a.b=1", "config.a.b=2"])


def test_point_names():
    assert (
        sweep.point_name({"optim.learning_rate": "1e-4", "model.num_layers": "2"})
        == "optim.learning_rate=0.0001,model.num_layers=2"
    )
    assert sweep.point_name({"optim.learning_rate": "0.0001"}) == "optim.learning_rate=0.0001"
    assert sweep.point_name({"data.corpus": "/data/my corpus.txt"}) == (
        "data.corpus=_data_my_corpus.txt"
    )
    assert sweep.point_name({}) == "default"
    long = sweep.point_name({"data.corpus": "x" * 500})
    assert len(long) == sweep.MAX_NAME_LENGTH
    assert long != sweep.point_name({"data.corpus": "x" * 501})


def test_sweep_file_and_combination(tmp_path):
    path = tmp_path / "my_sweep.py"
    path.write_text(
        "def get_sweep():\n"
        "    return [{'optim.learning_rate': lr, 'train.seed': s}\n"
        "            for lr, s in zip([1e-4, 3e-4], [0, 1])]\n"
    )
    points = sweep.load_sweep_file(path)
    assert points == [
        {"optim.learning_rate": "0.0001", "train.seed": "0"},
        {"optim.learning_rate": "0.0003", "train.seed": "1"},
    ]
    combined = sweep.combine(points, sweep.expand_grid(["model.num_layers=2,4"]))
    assert [sweep.point_name(p) for p in combined] == [
        "optim.learning_rate=0.0001,train.seed=0,model.num_layers=2",
        "optim.learning_rate=0.0001,train.seed=0,model.num_layers=4",
        "optim.learning_rate=0.0003,train.seed=1,model.num_layers=2",
        "optim.learning_rate=0.0003,train.seed=1,model.num_layers=4",
    ]
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(sweep.SweepError, match="get_sweep"):
        sweep.load_sweep_file(tmp_path / "bad.py")


def _write_metrics(workdir: Path, rows):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')


def test_summary_from_metrics_files(tmp_path):
    bert = {"mlm_loss": 6.0, "mlm_accuracy": 0.1, "nsp_loss": 0.7, "nsp_accuracy": 0.5}
    _write_metrics(
        tmp_path / "a",
        [
            {"step": 10, "split": "train", "loss": 7.0, **bert, "grad_norm": 1.0},
            {"step": 10, "split": "eval", "loss": 6.9, **bert},
            {"step": 20, "split": "train", "loss": 6.5, **bert, "grad_norm": 0.5},
        ],
    )
    _write_metrics(
        tmp_path / "b",
        [
            {"step": 20, "split": "train", "loss": 6.8, **bert, "grad_norm": 0.7},
            {"step": 20, "split": "eval", "loss": 6.1, **bert},
        ],
    )
    step, metrics = sweep.read_final_metrics(tmp_path / "a")
    assert step == 20
    assert metrics["train/loss"] == 6.5 and metrics["eval/loss"] == 6.9
    assert metrics["train/grad_norm"] == 0.5 and "eval/grad_norm" not in metrics

    results = []
    for name, lr in (("a", "1e-4"), ("b", "3e-4")):
        step, metrics = sweep.read_final_metrics(tmp_path / name)
        results.append(
            sweep.PointResult(
                name, {"optim.learning_rate": lr}, str(tmp_path / name), "done", metrics, step
            )
        )
    results.append(
        sweep.PointResult("c", {"optim.learning_rate": "1e-3"}, "", "failed", error="boom | x")
    )
    ranked = sweep.sort_results(results, "eval/loss", "min")
    assert [r.name for r in ranked] == ["b", "a", "c"]
    assert [r.name for r in sweep.sort_results(results, "loss", "max")] == ["a", "b", "c"]
    assert [r.name for r in sweep.sort_results(results, "train/loss")] == ["a", "b", "c"]

    header, rows = sweep.summary_rows(ranked)
    assert header == [
        "point", "optim.learning_rate", "status", "step", "time_s",
        "train/loss", "eval/loss", "eval/mlm_accuracy", "eval/mlm_loss", "eval/nsp_accuracy",
        "eval/nsp_loss", "train/grad_norm", "train/mlm_accuracy", "train/mlm_loss",
        "train/nsp_accuracy", "train/nsp_loss", "error",
    ]  # fmt: skip
    assert rows[0][:7] == ["b", "3e-4", "done", 20, "", 6.8, 6.1]
    assert rows[2][:7] == ["c", "1e-3", "failed", "", "", "", ""]
    markdown = sweep.format_markdown(ranked)
    assert markdown.splitlines()[2].startswith("| b | 3e-4 | done | 20 |  | 6.8 | 6.1 |")
    assert markdown.splitlines()[-1].endswith("| boom \\| x |")
    csv_path, md_path = sweep.write_summary(ranked, tmp_path / "sweep")
    with open(csv_path) as f:
        table = list(csv.reader(f))
    assert table[0] == header and [row[0] for row in table[1:]] == ["b", "a", "c"]
    assert md_path.read_text() == markdown


def test_seeds_of_one_setting_are_summarised_as_mean_and_std(tmp_path):
    """Fine-tuning points: the best evaluation (eval_results.json) is read as best/<name>, and the
    points that differ only in train.seed are grouped."""
    results = []
    for lr, seed, score in (("2e-5", 0, 0.80), ("2e-5", 1, 0.84), ("2e-5", 2, 0.88),
                            ("5e-5", 0, 0.70), ("5e-5", 1, 0.72), ("3e-5", 0, 0.9)):  # fmt: skip
        workdir = tmp_path / f"{lr}-{seed}"
        _write_metrics(workdir, [{"step": 9, "split": "eval", "loss": 1.0, "score": 0.1}])
        best = {"step": 3, "split": "eval", "loss": 0.5, "score": score}
        (workdir / sweep.RESULTS_FILE).write_text(json.dumps({"best": best, "best_step": 3}))
        step, metrics = sweep.read_final_metrics(workdir)
        assert metrics["best/score"] == score and metrics["eval/score"] == 0.1
        overrides = {"optim.learning_rate": lr, "train.seed": str(seed)}
        results.append(sweep.PointResult(workdir.name, overrides, str(workdir), "done",
                                         metrics, step))  # fmt: skip
    header, rows = sweep.seed_rows(results)
    assert header == ["optim.learning_rate", "seeds", "eval/loss", "best/loss", "best/score",
                      "eval/score"]  # fmt: skip
    assert rows[0][:2] == ["2e-5", 3] and rows[0][4] == "0.84 ± 0.04"
    assert rows[1][:2] == ["5e-5", 2] and rows[1][4] == "0.71 ± 0.014"
    assert len(rows) == 2  # 3e-5 ran with one seed: nothing to average
    sweep.write_summary(results, tmp_path / "sweep")
    assert "0.84 ± 0.04" in (tmp_path / "sweep" / "seeds.md").read_text()
    assert "mean ± std over seeds" in (tmp_path / "sweep" / "summary.md").read_text()


def test_run_sweep_grid_with_failure_and_resume(tmp_path, fake_command, capsys):
    results = _run(tmp_path, fake_command, parallel=2)
    root = tmp_path / "sw"
    by_name = {r.name: r for r in results}
    assert set(by_name) == {
        "optim.learning_rate=0.0001,model.num_layers=2",
        "optim.learning_rate=0.0001,model.num_layers=4",
        "optim.learning_rate=0.0003,model.num_layers=2",
        "optim.learning_rate=0.0003,model.num_layers=4",
    }
    # Overrides common to every point come first, the point's own after them.
    config, workdir, overrides = fake_command.calls[0]
    assert config == "configs/gpt.py:smoke"
    assert workdir == str(root / "optim.learning_rate=0.0001,model.num_layers=2")
    assert overrides == [
        "--config.train.num_steps=2",
        "--config.optim.learning_rate=1e-4",
        "--config.model.num_layers=2",
    ]
    failed = by_name["optim.learning_rate=0.0003,model.num_layers=4"]
    assert failed.status == "failed"
    assert failed.error == "FloatingPointError: loss is nan at step 3"
    # Best first by eval loss; the failed point is last, the others all finished.
    assert [r.status for r in results] == ["done", "done", "done", "failed"]
    eval_losses = [r.metrics["eval/loss"] for r in results[:3]]
    assert eval_losses == sorted(eval_losses)
    assert results[0].name == "optim.learning_rate=0.0001,model.num_layers=4"
    assert results[0].metrics["train/loss"] == pytest.approx(5.0)
    assert results[0].metrics["eval/accuracy"] == 0.3 and results[0].step == 2
    log = (root / failed.name / "train.log").read_text()
    assert "FloatingPointError" in log and log.startswith("$ ")
    assert (root / "summary.csv").is_file() and (root / "summary.md").is_file()
    assert "FloatingPointError: loss is nan at step 3" in (root / "summary.md").read_text()
    assert json.loads((root / "sweep.json").read_text())["overrides"] == [
        "--config.train.num_steps=2"
    ]
    printed = capsys.readouterr().out
    assert printed.startswith("| point | optim.learning_rate | model.num_layers | status |")

    # Re-run: finished points are skipped (their metrics still summarised), the failed one reruns.
    fake_command.calls.clear()
    again = _run(tmp_path, fake_command)
    assert [c[1] for c in fake_command.calls] == [str(root / failed.name)]
    assert sorted(r.status for r in again) == ["failed"] + ["skipped-done"] * 3
    assert [r.name for r in again] == [r.name for r in results]
    assert again[0].metrics == results[0].metrics


def test_missing_command_and_signals_are_failures(tmp_path):
    results = sweep.run_sweep(
        "c.py:x",
        ["a.b=1"],
        tmp_path,
        command=lambda c, w, o: [str(tmp_path / "no-such-trainer")],
        validate=False,
        progress=False,
    )
    assert results[0].status == "failed" and "no-such-trainer" in results[0].error
    results = sweep.run_sweep(
        "c.py:x",
        ["a.b=2"],
        tmp_path,
        command=lambda c, w, o: [
            sys.executable,
            "-c",
            "import os, signal; os.kill(os.getpid(), 9)",
        ],
        validate=False,
        progress=False,
    )
    assert results[0].status == "failed" and results[0].error == "killed by signal 9"


def test_validation_marks_bad_points_and_rejects_unusable_sweeps(
    tmp_path, fake_command, monkeypatch
):
    from jaxgen import config as config_lib

    def fake_load(spec, overrides):
        if "model.num_layers=4" in overrides:
            raise config_lib.ConfigError("model.num_layers must be at most 3")
        if any(o.startswith("optim.lr=") for o in overrides):
            raise config_lib.ConfigError("unknown config key 'optim.lr'")

    monkeypatch.setattr(config_lib, "load_config", fake_load)
    results = _run(tmp_path, fake_command, validate=True)
    bad = [r for r in results if r.status == "failed"]
    assert len(bad) == 2 and all("at most 3" in r.error for r in bad)
    assert len(fake_command.calls) == 2
    with pytest.raises(sweep.SweepError, match="unknown config key 'optim.lr'"):
        sweep.run_sweep("c.py:x", ["optim.lr=1,2"], tmp_path / "x", progress=False)


def test_dry_run_prints_commands(tmp_path, capsys):
    results = sweep.run_sweep(
        "configs/bert.py:smoke",
        ["optim.learning_rate=1e-4,3e-4"],
        "runs/s",
        ["--config.a.b=1"],
        dry_run=True,
    )
    assert [r.status for r in results] == ["dry-run", "dry-run"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        f"{sys.executable} -m jaxgen train --config configs/bert.py:smoke "
        "--workdir runs/s/optim.learning_rate=0.0003 --config.a.b=1 "
        "--config.optim.learning_rate=3e-4"
    )
    assert not Path("runs/s").exists()


def test_cli_sweep_tpu_dry_run(tmp_path, capsys, monkeypatch):
    config = tmp_path / "cfg.py"
    config.write_text("def get_config(arg):\n    pass\n")
    monkeypatch.setattr(launch, "jax_version", lambda: "0.10.2")
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(
        [
            "sweep", "--config", f"{config}:smoke", "--workdir", "gs://b/sw",
            "--sweep", "optim.learning_rate=1e-4,3e-4", "--launch", "tpu", "--dry-run",
            "--tpu_name", "sw", "--zone", "us-central2-b", "--config.train.num_steps=5",
        ]
    )  # fmt: skip
    assert extra == ["--config.train.num_steps=5"]
    assert args.func(args, extra) == 0
    out = capsys.readouterr().out
    assert "# point 1: optim.learning_rate=0.0003 on TPU VM sw-1" in out
    assert (
        "--workdir gs://b/sw/optim.learning_rate=0.0003 --config.train.num_steps=5 "
        "--config.optim.learning_rate=3e-4 >" in out
    )
    assert "--worker=0" not in out  # a sweep starts points without streaming their logs


def test_cli_rejects_unknown_arguments(tmp_path):
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(
        ["sweep", "--config", "c.py", "--workdir", str(tmp_path), "--sweep", "a=1", "--bogus"]
    )
    with pytest.raises(cli.UsageError, match="--bogus"):
        args.func(args, extra)
