"""`jaxgen` command line: every command is there, arguments are checked before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgen import cli

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"train", "prepare", "configs", "sample", "convert", "sweep", "launch", "compile"}


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
