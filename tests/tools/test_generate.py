"""`jaxgen sample` end to end: tiny GPT, T5 and BERT runs trained for 6 steps, then sampled.

Training three runs costs about a minute of compilation on 2 CPU cores, so the tests that sample
are marked slow; the workdir errors that need no checkpoint run in the fast suite.
"""

from __future__ import annotations

import pytest

from jaxgen import cli
from jaxgen import config as config_lib
from jaxgen.data.tokenizer import load_tokenizer
from jaxgen.tools.generate import generate
from jaxgen.train import checkpoint, loop
from tests.tiny_runs import tiny_config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token cache for this module's three runs."""
    return tmp_path_factory.mktemp("sample_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A tiny run per family, the same config as the trainer tests' (their compiled steps are
    reused from the compilation cache)."""
    workdirs = {}
    for family in ("gpt", "t5", "bert"):
        workdir = tmp_path_factory.mktemp(f"{family}_run")
        loop.train(tiny_config(family, cache_dir), workdir)
        workdirs[family] = workdir
    return workdirs


def run_cli(capsys, *argv):
    """Runs `jaxgen ...` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# Every call of a family uses the same shapes (prompt length, batch, steps): one compilation each.
GPT = dict(prompt="The class", max_new_tokens=8, num_samples=2)
T5 = dict(prompt="The <extra_id_0> statement is <extra_id_1> module.", max_new_tokens=10)
BERT = dict(prompt="the module", length=5, num_sweeps=2)


@pytest.mark.slow
def test_gpt_cli_prints_a_continuation_of_the_prompt(runs, capsys):
    code, out, err = run_cli(
        capsys, "sample", "--workdir", str(runs["gpt"]), "--prompt", GPT["prompt"],
        "--max_new_tokens", "8", "--num_samples", "2",
        "--temperature", "0.8", "--top_k", "40", "--top_p", "0.95",
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith(GPT["prompt"])


@pytest.mark.slow
def test_gpt_same_seed_same_text_and_greedy_rows_agree(runs):
    first = generate(runs["gpt"], seed=3, **GPT)
    assert generate(runs["gpt"], seed=3, **GPT) == first
    assert len(first) == 2 and all(text.startswith(GPT["prompt"]) for text in first)
    greedy = generate(runs["gpt"], greedy=True, **GPT)
    assert greedy[0] == greedy[1]


@pytest.mark.slow
def test_t5_decodes_the_sentinel_target(runs, capsys):
    code, out, err = run_cli(
        capsys, "sample", "--workdir", str(runs["t5"]), "--prompt", T5["prompt"],
        "--max_new_tokens", "10", "--greedy",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip()  # a 2-step model's target, e.g. "<extra_id_0> the the"
    first = generate(runs["t5"], temperature=1.0, seed=1, **T5)
    assert len(first) == 1 and generate(runs["t5"], temperature=1.0, seed=1, **T5) == first


@pytest.mark.slow
def test_beam_search_from_the_cli_and_its_errors(runs, capsys):
    code, out, err = run_cli(
        capsys, "sample", "--workdir", str(runs["t5"]), "--prompt", T5["prompt"],
        "--max_new_tokens", "10", "--beam_size", "3", "--length_penalty", "0.6",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == generate(runs["t5"], num_beams=3, alpha=0.6, **T5)
    one = dict(GPT, num_samples=1)
    assert generate(runs["gpt"], num_beams=1, **one) == generate(runs["gpt"], greedy=True, **one)
    with pytest.raises(ValueError, match="deterministic: drop temperature"):
        generate(runs["gpt"], num_beams=2, temperature=0.5, **one)
    with pytest.raises(ValueError, match="--num_samples 1 with --beam_size"):
        generate(runs["gpt"], num_beams=2, **GPT)
    with pytest.raises(ValueError, match="brevity penalty: add --beam_size"):
        generate(runs["gpt"], alpha=0.6, **one)


@pytest.mark.slow
def test_cli_flags_reach_the_samplers_and_defaults_stay_theirs(runs, capsys):
    code, out, err = run_cli(
        capsys, "sample", "--workdir", str(runs["bert"]), "--prompt", BERT["prompt"],
        "--length", "5", "--gibbs_steps", "2", "--gibbs_order", "sequential", "--seed", "4",
    )  # fmt: skip
    assert code == 0, err
    expected = generate(runs["bert"], order="sequential", seed=4, **BERT)
    assert out.splitlines() == expected


@pytest.mark.slow
@pytest.mark.parametrize("order", ["parallel", "sequential"])
def test_bert_gibbs_sampling(runs, order):
    first = generate(runs["bert"], order=order, **BERT)
    assert len(first) == 1 and first[0].startswith(BERT["prompt"])
    assert not any(s in first[0] for s in ("[MASK]", "[SEP]", "[CLS]", "[PAD]"))
    assert generate(runs["bert"], order=order, **BERT) == first
    if order == "parallel":  # no prompt: all [MASK] between [CLS] and [SEP], same total length
        tokenizer = load_tokenizer(runs["bert"] / "tokenizer")
        length = len(tokenizer.encode(BERT["prompt"])) + BERT["length"]
        no_prompt = generate(runs["bert"], prompt="", length=length, num_sweeps=2)
        assert no_prompt[0].strip()


def test_workdir_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--workdir", str(tmp_path), "--prompt", "x")
    assert code == 1
    assert "no jaxgen run (no config.json)" in err and str(tmp_path) in err
    assert "Traceback" not in err
    # A run that saved its config but no checkpoint yet.
    config_lib.save_config(config_lib.load_config("configs/gpt.py:smoke"), tmp_path / "config.json")
    code, _, err = run_cli(capsys, "sample", "--workdir", str(tmp_path), "--prompt", "x")
    assert code == 1 and f"CheckpointError: no checkpoints in {tmp_path}" in err
    with pytest.raises(checkpoint.CheckpointError, match=f"no checkpoints in {tmp_path}"):
        generate(tmp_path, prompt="x")
    # The empty prompt is reported before the checkpoint is even looked for.
    code, _, err = run_cli(capsys, "sample", "--workdir", str(tmp_path))
    assert code == 1 and "empty prompt" in err and str(tmp_path) in err


@pytest.mark.slow
def test_too_long_prompts_are_clear_errors(runs):
    long = " ".join(["word"] * 40)  # > 32 tokens
    for family in ("gpt", "t5", "bert"):
        with pytest.raises(ValueError, match=r"longer than the context .* max_len=32"):
            generate(runs[family], prompt=long, length=1)
    with pytest.raises(ValueError, match="--max_new_tokens <= "):
        generate(runs["gpt"], prompt="The", max_new_tokens=40)
    with pytest.raises(ValueError, match="gpt sampling does not take num_sweeps"):
        generate(runs["gpt"], prompt="The", num_sweeps=3)
    with pytest.raises(ValueError, match="top_p is not supported by BERT"):
        generate(runs["bert"], prompt="the", top_p=0.9)
