"""GPT and T5 through the one trainer: family metrics in metrics.jsonl and exact resumption."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgen.train import loop
from jaxgen.train.metrics import read_metrics
from tests.tiny_runs import tiny_config
from tests.train.test_loop import losses

METRICS = {"gpt": ("loss", "accuracy", "perplexity"), "t5": ("loss", "accuracy")}
RESUME_RTOL = 1e-5  # float32 on CPU: the resumed run replays the same computation


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token cache for this module's runs."""
    return tmp_path_factory.mktemp("families_cache")


# Each family costs ~35 s of compilation on 2 CPU cores: T5 joins the slow suite to keep the file
# under a minute.
@pytest.fixture(scope="module", params=["gpt", pytest.param("t5", marks=pytest.mark.slow)])
def full_run(request, tmp_path_factory, cache_dir):
    """(family, workdir) of an uninterrupted 6-step tiny run."""
    family = request.param
    workdir = tmp_path_factory.mktemp(f"{family}_full")
    loop.train(tiny_config(family, cache_dir), workdir)
    return family, workdir


def test_metrics_have_the_family_metrics(full_run):
    family, workdir = full_run
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    for row in (train_rows[-1], eval_rows[-1]):
        for key in METRICS[family]:
            assert np.isfinite(row[key]), (family, key)
        assert 0.0 <= row["accuracy"] <= 1.0
    for key in ("learning_rate", "grad_norm", "tokens_per_sec"):
        assert np.isfinite(train_rows[-1][key]), key
    if family == "gpt":
        assert eval_rows[-1]["perplexity"] == pytest.approx(np.exp(eval_rows[-1]["loss"]))
    assert (workdir / "DONE").exists()


def test_resume_continues_exactly(full_run, tmp_path, cache_dir):
    family, workdir = full_run
    # Stop after 3 of 6 steps (same schedule: decay_steps pinned to 6), then rerun the full command.
    stopped = tiny_config(family, cache_dir, "train.num_steps=3", "optim.decay_steps=6")
    loop.train(stopped, tmp_path)
    assert max(losses(tmp_path)) == 3
    loop.train(tiny_config(family, cache_dir, "optim.decay_steps=6"), tmp_path)
    full, resumed = losses(workdir), losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=RESUME_RTOL), (family, step)
    assert losses(tmp_path, "eval")[6] == pytest.approx(losses(workdir, "eval")[6], rel=RESUME_RTOL)
