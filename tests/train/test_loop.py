"""End-to-end tiny-config training: metrics, eval, checkpoints, resume, preemption and errors."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxgen import config as config_lib
from jaxgen.data import prepare
from jaxgen.data.corpus import CorpusError
from jaxgen.data.source import DataSource
from jaxgen.objectives import DataError
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import loop
from jaxgen.train.metrics import read_metrics
from tests.tiny_runs import TINY, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token cache for the whole session: training a vocabulary is the slow part."""
    return tmp_path_factory.mktemp("cache")


def losses(workdir, split="train"):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == split}


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, cache_dir):
    """An uninterrupted 6-step tiny BERT run, shared by the tests that compare against it."""
    workdir = tmp_path_factory.mktemp("bert_full")
    loop.train(tiny_config("bert", cache_dir), workdir)
    return workdir


def test_run_writes_metrics_config_checkpoints_and_done(bert_run):
    rows = read_metrics(bert_run)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    for key in (
        "loss",
        "mlm_loss",
        "mlm_accuracy",
        "nsp_loss",
        "nsp_accuracy",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
    ):
        assert key in train_rows[-1], key
        assert np.isfinite(train_rows[-1][key])
    assert {"loss", "mlm_loss", "nsp_accuracy"} <= set(eval_rows[-1])
    assert json.loads((bert_run / "config.json").read_text())["model"]["family"] == "bert"
    assert sorted(
        int(p.name) for p in (bert_run / "checkpoints").iterdir() if p.name.isdigit()
    ) == [3, 6]
    assert (bert_run / "DONE").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in bert_run.iterdir())
    assert (bert_run / "tokenizer").is_dir()


def test_same_seed_gives_bit_identical_losses(bert_run, tmp_path, cache_dir):
    loop.train(tiny_config("bert", cache_dir), tmp_path)
    assert losses(tmp_path) == losses(bert_run)


def test_resume_continues_exactly(bert_run, tmp_path, cache_dir):
    # Stop after 3 of 6 steps (same schedule: decay_steps pinned to 6), then rerun the full command.
    loop.train(tiny_config("bert", cache_dir, "train.num_steps=3", "optim.decay_steps=6"), tmp_path)
    assert max(losses(tmp_path)) == 3
    loop.train(tiny_config("bert", cache_dir, "optim.decay_steps=6"), tmp_path)
    full, resumed = losses(bert_run), losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    assert losses(tmp_path, "eval")[6] == pytest.approx(losses(bert_run, "eval")[6], rel=1e-5)


def test_rerunning_a_finished_run_does_nothing(bert_run, cache_dir):
    before = (bert_run / "metrics.jsonl").read_text()
    loop.train(tiny_config("bert", cache_dir), bert_run)
    assert (bert_run / "metrics.jsonl").read_text() == before


def test_partial_checkpoint_is_ignored_and_cleaned(bert_run, tmp_path, cache_dir):
    import shutil

    shutil.copytree(bert_run, tmp_path / "run")
    run = tmp_path / "run"
    (run / "DONE").unlink()
    # What a process killed mid-save leaves behind: a temporary directory that was never renamed.
    partial = run / "checkpoints" / "9.orbax-checkpoint-tmp-123"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    loop.train(tiny_config("bert", cache_dir, "train.num_steps=7", "optim.decay_steps=6"), run)
    assert not partial.exists()
    assert max(losses(run)) == 7


def _damage_latest(bert_run, tmp_path) -> Path:
    """A copy of the finished run whose newest checkpoint (step 6) has flipped bytes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    (run / "DONE").unlink()
    for path in (run / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir():
        data = bytearray(path.read_bytes())
        data[::7] = bytes(b ^ 0xFF for b in data[::7])
        path.write_bytes(bytes(data))
    return run


def test_damaged_checkpoint_is_set_aside_and_the_run_resumes_exactly(
    bert_run, tmp_path, cache_dir, caplog
):
    run = _damage_latest(bert_run, tmp_path)
    with caplog.at_level("WARNING", logger="jaxgen"):
        loop.train(tiny_config("bert", cache_dir), run)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    want = (r"skipping checkpoint step 6 \(cannot restore .*/checkpoints/6: .*\): moved it to "
            r".*checkpoints_damaged/6; resuming from step 3")  # fmt: skip
    assert re.match(want, warnings[0]), warnings[0]
    assert (run / "checkpoints_damaged" / "6" / "state").is_dir()
    # Resumed from step 3 with its data position: the same losses as the uninterrupted run.
    resumed, full = losses(run), losses(bert_run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    assert (run / "DONE").exists()


def test_resume_damaged_false_stops_with_the_error(bert_run, tmp_path, cache_dir):
    run = _damage_latest(bert_run, tmp_path)
    want = r"cannot restore checkpoint .*/6: .*train.resume_damaged=false: move that directory"
    with pytest.raises(checkpoint_lib.CheckpointDamaged, match=want):
        loop.train(tiny_config("bert", cache_dir, "train.resume_damaged=false"), run)
    assert (run / "checkpoints" / "6").is_dir()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    config = tiny_config("bert", cache_dir, "optim.learning_rate=1e30", "optim.clip_norm=0.0")
    with pytest.raises(loop.NonFiniteLossError, match=r"NaN or Inf at step \d+"):
        loop.train(config, tmp_path)
    saved = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert not (tmp_path / "DONE").exists()
    for path in saved:  # anything saved was saved before the loss went bad
        assert int(path.name) < 6


def test_spike_guard_skips_nonfinite_updates(tmp_path, cache_dir):
    config = tiny_config(
        "bert",
        cache_dir,
        "optim.learning_rate=1e30",
        "optim.clip_norm=0.0",
        "train.skip_nonfinite_or_spike=true",
    )
    loop.train(config, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert rows[-1]["skipped"] >= 1


def test_bad_corpus_fails_before_training(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        loop.train(tiny_config("bert", cache_dir, f"data.corpus={empty}"), tmp_path / "a")
    one = tmp_path / "one.txt"
    one.write_text("Just one document.\nWith two sentences.\n")
    with pytest.raises(DataError, match=r"the corpus has 1 document\(s\).* at least 2"):
        loop.train(tiny_config("bert", cache_dir, f"data.corpus={one}"), tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_user_text_and_jsonl_corpora_train(tmp_path, cache_dir):
    docs = [
        [f"Document {d} sentence {s} talks about topic {d * 7 % 5}." for s in range(30)]
        for d in range(12)
    ]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in docs))
    for corpus in (text, jsonl):
        workdir = tmp_path / corpus.suffix[1:]
        loop.train(
            tiny_config(
                "bert",
                cache_dir,
                f"data.corpus={corpus}",
                "data.eval_documents=4",
                "train.num_steps=2",
                "data.cache_dir=",
            ),
            workdir,
        )
        assert (workdir / "DONE").exists()


def _run_cli(args, cwd, **kwargs):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "jaxgen", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_sigterm_saves_a_final_checkpoint_and_the_rerun_resumes(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    # A run far too long to finish; constant learning rate so num_steps does not shape the schedule.
    common = TINY["bert"] + [
        f"data.cache_dir={cache_dir}",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    ]
    args = ["train", "--config", "configs/bert.py:smoke", "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in common]
    proc = _run_cli(args + ["--config.train.num_steps=100000"], cwd=REPO)
    deadline = time.time() + 240
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "SIGTERM received: saved a checkpoint at step" in out
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    stopped = steps[-1]
    assert stopped >= 5
    # The rerun and the uninterrupted reference train in this process (no second start-up).
    longer = config_lib.load_config(
        "configs/bert.py:smoke", [*common, f"train.num_steps={stopped + 3}"]
    )
    loop.train(longer, workdir)
    reference = tmp_path / "reference"
    loop.train(longer, reference)
    full, resumed = losses(reference), losses(workdir)
    assert sorted(resumed) == list(range(1, stopped + 4))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step


def test_bert_baselines_read_a_finished_run(bert_run):
    from tests.scripts import load_script

    result = load_script("bert_baselines").baselines(bert_run, train_batches=2)
    final = [r for r in read_metrics(bert_run) if r["split"] == "eval"][-1]
    assert result["run"] == final
    saved = json.loads((bert_run / "config.json").read_text())["train"]
    assert result["eval_examples"] == saved["eval_steps"] * saved["batch_size"]
    # Add-one unigram counts beat a uniform guess over the tokenizer's entries.
    assert result["unigram"] < result["uniform_tokenizer_vocab"] <= result["uniform_model_vocab"]
    assert 0.5 <= result["majority_label"] <= 1.0 and 0.0 <= result["overlap_rule"] <= 1.0


def test_held_out_documents_follow_split_seed_not_train_seed(tmp_path, cache_dir):
    def eval_docs(*extra):
        """The held-out records the run evaluates on."""
        workdir = tmp_path / "-".join(extra or ["base"])
        workdir.mkdir()
        source = DataSource(tiny_config("bert", cache_dir, *extra), workdir)
        return list(prepare.iter_records(source.prepared(source.run.data), "eval"))

    base = eval_docs()
    assert eval_docs("train.seed=7") == base  # a seed sweep evaluates every point on one split
    assert eval_docs("data.split_seed=7") != base


def test_resuming_a_run_saved_before_split_seed(bert_run, tmp_path, cache_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    (run / "DONE").unlink()
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["split_seed"]  # what runs saved before the key existed hold
    (run / "config.json").write_text(json.dumps(saved))
    # They split with train.seed (0 here), which is today's split_seed: same documents, resumes.
    loop.train(tiny_config("bert", cache_dir, "train.num_steps=7", "optim.decay_steps=6"), run)
    assert max(losses(run)) == 7

    # A run saved with train.seed=3 held out other documents: resuming with split_seed 0 refuses.
    saved["train"]["seed"] = 3
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError, match=r"data.split_seed: 3 -> 0"):
        loop.train(tiny_config("bert", cache_dir, "train.num_steps=8", "optim.decay_steps=6"), run)


# ------------------------------------------------------------------------------------ batch ramp


def test_batch_ramp_plan_of_gpt3_175b():
    """GPT-3's ramp: from 32k tokens (raised to the smallest batch the mesh holds) to the full
    batch over the first 12B tokens, linearly in tokens seen, in 8 stages; steps cover the run."""
    run = config_lib.load_config("configs/gpt.py:gpt3-175b")
    granule = run.train.grad_accum * 64  # the row's mesh: data 1 x fsdp 64
    phases = loop.plan_phases(run, granule)
    sizes = [p.batch_size for p in phases]
    assert sizes == sorted(sizes) and sizes[0] == granule and sizes[-1] == run.train.batch_size
    assert all(size % granule == 0 for size in sizes)
    assert phases[0].start == 0 and phases[-1].end == run.train.num_steps
    assert all(a.end == b.start for a, b in zip(phases, phases[1:], strict=False))
    # Stage k of 8 wants 32k + (3.1M - 32k) * k / 8 tokens per batch: 768 sequences for k < 6 (the
    # smallest multiple of 768 at or above the start), the full 1536 from k = 6 on.
    assert sizes == [768, 1536]
    tokens = (phases[0].end - phases[0].start) * 768 * 2048
    assert tokens == pytest.approx(run.train.batch_ramp_tokens * 6 / 8, rel=1e-3)
    # One train stream: each stage starts where the previous one stopped.
    for a, b in zip(phases, phases[1:], strict=False):
        assert b.start_example == a.start_example + (a.end - a.start) * a.batch_size


def test_batch_ramp_plan_on_a_fine_mesh():
    run = config_lib.load_config(
        "configs/gpt.py:smoke",
        ["train.batch_size=64", "data.seq_len=32", "train.batch_ramp_start_tokens=128",
         "train.batch_ramp_tokens=12288", "train.batch_ramp_stages=4", "train.num_steps=100"],
    )  # fmt: skip
    phases = loop.plan_phases(run, granule=4)
    # Stages at 128 + (2048 - 128) * k / 4 tokens = 4, 19, 34, 49 sequences, rounded to multiples
    # of 4 (half to even: 34 -> 32), each training on 3072 tokens; then the full batch of 64.
    assert [(p.batch_size, p.end - p.start) for p in phases] == [
        (4, 24), (20, 5), (32, 3), (48, 2), (64, 66)
    ]  # fmt: skip
    no_ramp = dataclasses.replace(run.train, batch_ramp_tokens=0, batch_ramp_start_tokens=0)
    phases = loop.plan_phases(dataclasses.replace(run, train=no_ramp), granule=4)
    assert [(p.batch_size, p.start, p.end) for p in phases] == [(64, 0, 100)]


RAMP = [
    "mesh.data=2",
    "mesh.tensor=4",
    "train.batch_ramp_start_tokens=64",  # 2 sequences of 32
    "train.batch_ramp_tokens=384",  # 3 stages of 128 tokens: 2 steps of 2, 1 of 4, 1 of 6
    "train.batch_ramp_stages=3",
    "train.checkpoint_every=1",
    "optim.decay_steps=6",
]


@pytest.mark.slow
def test_batch_ramp_grows_the_batch_and_resumes_exactly_mid_ramp(tmp_path, cache_dir):
    full = tmp_path / "full"
    loop.train(tiny_config("gpt", cache_dir, *RAMP), full)
    rows = [r for r in read_metrics(full) if r["split"] == "train"]
    assert [r["batch_size"] for r in rows] == [2, 2, 4, 6, 8, 8]
    # Stopped inside the first stage, then run to the end through every later stage's start.
    stopped = tmp_path / "stopped"
    for num_steps in (1, 6):
        loop.train(tiny_config("gpt", cache_dir, *RAMP, f"train.num_steps={num_steps}"), stopped)
        assert max(losses(stopped)) == num_steps
    expected, resumed = losses(full), losses(stopped)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_init_from_an_unrolled_run_into_a_scanned_model(bert_run, tmp_path, cache_dir):
    """train.init_from converts the layer layout: the scanned model starts from the unrolled
    run's final parameters (its step-0 eval equals the finished run's last eval)."""
    config = tiny_config(
        "bert", cache_dir, f"train.init_from={bert_run}", "model.scan_layers=true",
        "train.num_steps=1",
    )  # fmt: skip
    loop.train(config, tmp_path)
    assert losses(tmp_path, "eval")[0] == pytest.approx(losses(bert_run, "eval")[6], rel=1e-5)


def test_lora_run_starts_from_the_base_and_trains_only_the_adapters(bert_run, tmp_path, cache_dir):
    """lora.rank with train.init_from: step 0 evaluates as the base run's last step; checkpoints
    hold only the adapters; a resumed run continues exactly; every base parameter is untouched."""
    lora = [f"train.init_from={bert_run}", "lora.rank=4",
            "lora.targets=[\"query\", \"value\", \"wi\"]", "optim.learning_rate=1e-2",
            "optim.decay_steps=4", "train.checkpoint_every=2"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    loop.train(tiny_config("bert", cache_dir, *lora, "train.num_steps=4"), full)
    assert losses(full, "eval")[0] == pytest.approx(losses(bert_run, "eval")[6], rel=1e-5)
    loop.train(tiny_config("bert", cache_dir, *lora, "train.num_steps=2"), resumed)
    loop.train(tiny_config("bert", cache_dir, *lora, "train.num_steps=4"), resumed)
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)

    _, saved = checkpoint_lib.load_params(full)
    leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    assert leaves and all(str(path[-1].key) in ("lora_a", "lora_b") for path, _ in leaves)
    run = config_lib.load_saved_config(full / "config.json")
    _, tuned = loop.load_run_params(full, run)
    _, base = checkpoint_lib.load_params(bert_run)
    flat_base, flat_tuned = traverse_util.flatten_dict(base), traverse_util.flatten_dict(tuned)
    adapters = {k: v for k, v in flat_tuned.items() if k[-1] in ("lora_a", "lora_b")}
    assert {k[-2] for k in adapters} == {"query", "value", "wi"}
    assert any(np.any(v != 0) for k, v in adapters.items() if k[-1] == "lora_b")
    for key, value in flat_base.items():
        np.testing.assert_array_equal(flat_tuned[key], value, err_msg=str(key))
