"""The CI-sized subset of experiments/faults.py: one trial of each fault no other test injects (a
kill in the middle of an asynchronous save, an error in the data pipeline), each survived: the
rerun finishes with the uninterrupted run's parameters bit for bit. tests/train/test_loop.py
covers SIGTERM, a damaged newest checkpoint and a NaN loss (and tests/test_multiprocess.py SIGTERM
on two processes); the experiment runs every fault many times (README, "Faults")."""

from __future__ import annotations

import json

import pytest

from tests.scripts import load_script

SUBSET = ["kill-save", "data-error"]


@pytest.mark.slow
def test_each_fault_is_survived(tmp_path, capsys):
    faults = load_script("faults")
    results = tmp_path / "faults.json"
    argv = ["--trials", "1", "--faults", ",".join(SUBSET), "--base", str(tmp_path / "base"),
            "--results", str(results), "--parallel", "2"]  # fmt: skip
    code = faults.main(argv)
    out = capsys.readouterr().out
    records = json.loads(results.read_text())
    failed = {k: r["problems"] for k, r in records.items() if not r["survived"]}
    assert code == 0 and not failed, failed
    assert sorted(r["fault"] for r in records.values()) == sorted(SUBSET)
    assert f"RESULT faults trials={len(SUBSET)} survived={len(SUBSET)}" in out
    # A survived trial's workdir is removed; the references stay for a rerun.
    assert not any((tmp_path / "base" / "trials").iterdir())
