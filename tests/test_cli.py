"""`jaxgen` command line: every command is there, arguments are checked before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxgen import cli

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"train", "prepare", "configs", "sample", "convert", "sweep", "launch", "compile",
            "checkpoints"}  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`jaxgen argv...` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_every_command_is_registered():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == COMMANDS


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "configs/bert.py:smoke", "--workdir", "x", "--bogus=1"],
        ["configs", "list", "--bogus"],
        ["sample", "--workdir", "x", "--bogus"],
        ["sweep", "--config", "c.py", "--workdir", "x", "--sweep", "a=1", "--bogus"],
        ["compile", "--config", "configs/bert.py:smoke", "--bogus"],
    ],
    ids=["train", "configs", "sample", "sweep", "compile"],
)
def test_unknown_arguments_exit_2_naming_them(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and "unrecognized arguments: --bogus" in err
    assert not (tmp_path / "x").exists()


def test_checkpoints_verify_lists_each_step_and_fails_on_a_damaged_one(capsys, tmp_path):
    import jax.numpy as jnp

    from jaxgen.train import checkpoint
    from jaxgen.train.state import TrainState

    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    for step in (2, 4):
        params = {"w": jnp.full((64, 64), float(step))}
        saver.save(step, TrainState.create(params, {}, jax.random.key(0)), {}, force=True)
    saver.close()
    code, out, _ = run(capsys, "checkpoints", "verify", "--workdir", str(tmp_path))
    assert code == 0 and out.count(" good ") == 2, out
    for path in (tmp_path / "checkpoints" / "4" / "state").glob("**/d/*"):
        path.write_bytes(path.read_bytes()[:10])  # truncated
    code, out, err = run(capsys, "checkpoints", "verify", "--workdir", str(tmp_path))
    lines = out.splitlines()
    assert code == 1 and "1 of 2 checkpoints cannot be resumed from" in err
    assert " 2  good " in lines[1] and " 4  damaged " in lines[2], out
    code, _, err = run(capsys, "checkpoints", "verify", "--workdir", str(tmp_path / "none"))
    assert code == 1 and "no complete checkpoint in" in err


def test_configs_list_json(capsys):
    code, out, _ = run(capsys, "configs", "list", "--family", "t5", "--json")
    assert code == 0
    names = [entry["name"] for entry in json.loads(out)]
    assert names[0] == "configs/t5.py:smoke" and "configs/t5.py:t5-base,final" in names


def test_config_errors_exit_2_without_a_traceback(capsys, tmp_path):
    code, _, err = run(
        capsys, "train", "--config", "configs/gpt.py:smoke", "--workdir", str(tmp_path / "r"),
        "--config.optim.name=adafactor", "--config.optim.b1=0.9",
    )  # fmt: skip
    assert code == 2 and "ConfigError: unknown config key 'optim.b1'" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_cli_rejects_a_misspelt_key_before_any_work(tmp_path):
    """The real entry point (`python -m jaxgen`), as a user runs it."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "jaxgen", "train", "--config", "configs/bert.py:smoke",
         "--workdir", str(tmp_path / "run"), "--config.optim.learning_rat=1e-4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "did you mean 'optim.learning_rate'" in done.stderr
    assert not (tmp_path / "run").exists()
