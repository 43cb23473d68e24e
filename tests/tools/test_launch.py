"""jaxgen.tools.launch: exact gcloud commands and sbatch scripts; clear errors without gcloud."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from jaxgen import cli
from jaxgen.tools import launch

VM = launch.TpuVm("bert-pod", "us-central2-b", "v4-32", spot=True, project="my-proj")
WHERE = "--zone=us-central2-b --project=my-proj"


def _join_all(commands):
    return [launch.shlex.join(c) for c in commands]


def test_tpu_vm_commands():
    assert launch.shlex.join(launch.tpu_create_command(VM)) == (
        f"gcloud compute tpus tpu-vm create bert-pod {WHERE} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"
    )
    plain = launch.TpuVm("t", "europe-west4-a")
    assert launch.tpu_create_command(plain) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=europe-west4-a",
        "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip
    assert launch.shlex.join(launch.tpu_describe_command(VM)) == (
        f"gcloud compute tpus tpu-vm describe bert-pod {WHERE} '--format=value(state)'"
    )
    assert launch.shlex.join(launch.tpu_delete_command(VM)) == (
        f"gcloud compute tpus tpu-vm delete bert-pod {WHERE} --quiet"
    )


def test_tpu_run_commands_golden():
    commands = launch.tpu_run_commands(
        VM,
        "configs/bert.py:base",
        "gs://bucket/bert-base",
        ["train.num_steps=1000", "--config.optim.learning_rate=1e-4"],
        archive="/tmp/x/jaxgen-src.tar.gz",
        jax_version="0.10.2",
    )
    assert _join_all(commands) == [
        "gcloud compute tpus tpu-vm scp /tmp/x/jaxgen-src.tar.gz bert-pod:jaxgen-src.tar.gz "
        f"{WHERE} --worker=all",
        f"gcloud compute tpus tpu-vm ssh bert-pod {WHERE} --worker=all '--command=set -e; "
        "rm -rf ~/jaxgen && mkdir -p ~/jaxgen && tar -xzf ~/jaxgen-src.tar.gz -C ~/jaxgen && "
        "python3 -m pip install --quiet --upgrade '\"'\"'jax[tpu]==0.10.2'\"'\"' -e ~/jaxgen'",
        f"gcloud compute tpus tpu-vm ssh bert-pod {WHERE} --worker=all '--command=cd ~/jaxgen && "
        "nohup python3 -m jaxgen train --config configs/bert.py:base "
        "--workdir gs://bucket/bert-base --config.train.num_steps=1000 "
        "--config.optim.learning_rate=1e-4 > ~/jaxgen-bert-pod.log "
        "2>&1 < /dev/null & echo $! > ~/jaxgen-bert-pod.log.pid'",
        f"gcloud compute tpus tpu-vm ssh bert-pod {WHERE} --worker=0 '--command=tail -n +1 "
        '--pid="$(cat ~/jaxgen-bert-pod.log.pid)" -F ~/jaxgen-bert-pod.log\'',
    ]
    no_stream = launch.tpu_run_commands(VM, "c.py", "gs://b/r", stream=False)
    assert len(no_stream) == 3 and all("--worker=all" in c for c in no_stream)


def test_slurm_script_golden():
    script = launch.slurm_script(
        "configs/gpt.py:gpt2-small",
        "/shared/runs/gpt2",
        ["--config.train.batch_size=512", "optim.learning_rate=6e-4"],
        nodes=4,
        gpus_per_node=8,
        partition="gpu",
        time="24:00:00",
    )
    assert script == textwrap.dedent(
        """\
        #!/bin/bash
        #SBATCH --job-name=jaxgen
        #SBATCH --nodes=4
        #SBATCH --ntasks-per-node=1
        #SBATCH --gpus-per-node=8
        #SBATCH --partition=gpu
        #SBATCH --time=24:00:00
        #SBATCH --output=/shared/runs/gpt2/slurm-%j.out

        set -euo pipefail
        COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        PORT=$((20000 + SLURM_JOB_ID % 20000))
        export JAXGEN_COORDINATOR="$COORDINATOR_HOST:$PORT"
        srun --ntasks=4 --ntasks-per-node=1 bash -c 'exec python -m jaxgen train --config \
configs/gpt.py:gpt2-small --workdir /shared/runs/gpt2 --coordinator_address "$JAXGEN_COORDINATOR" \
--num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID" --config.train.batch_size=512 \
--config.optim.learning_rate=6e-4'
        """
    )
    minimal = launch.slurm_script(
        "my config.py:x", "/r", nodes=1, gpus_per_node=2, port=1234, python="/env/bin/python"
    )
    assert "PORT=1234\n" in minimal and "#SBATCH --partition" not in minimal
    assert (
        "bash -c 'exec /env/bin/python -m jaxgen train --config '\"'\"'my config.py:x'" in minimal
    )
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(launch.LaunchError, match="nodes=0"):
        launch.slurm_script("c.py", "/r", nodes=0, gpus_per_node=8)


def test_slurm_task_sees_its_own_process_id(tmp_path):
    """Runs the script's srun line with a fake srun/scontrol/python: each task gets its own id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node7\\ngpu-node8\\n'\n")
    # Fake srun: starts every task of the step with its SLURM_PROCID, like the real one.
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nshift 2\nfor i in 0 1; do SLURM_NTASKS=2 SLURM_PROCID=$i "$@"; done\n'
    )
    (bin_dir / "python").write_text('#!/bin/sh\necho "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = launch.slurm_script(
        "c.py:x", str(tmp_path), ["a.b=1"], nodes=2, gpus_per_node=1, python="python"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "123"}
    env["SLURM_JOB_NODELIST"] = "gpu-node[7-8]"
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"-m jaxgen train --config c.py:x --workdir {tmp_path} --coordinator_address "
        f"gpu-node7:20123 --num_processes 2 --process_id {i} --config.a.b=1"
        for i in (0, 1)
    ]


def test_remote_config_spec_and_pack_source(tmp_path):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "jaxgen").mkdir()
    (repo / "jaxgen" / "__init__.py").write_text("")
    (repo / "jaxgen" / "__pycache__").mkdir()
    (repo / "jaxgen" / "__pycache__" / "x.pyc").write_text("")
    (repo / "pyproject.toml").write_text("")
    (repo / "configs" / "bert.py").write_text("")
    mine = tmp_path / "mine.py"
    mine.write_text("")
    assert launch.remote_config_spec(f"{repo}/configs/bert.py:base", repo) == (
        "configs/bert.py:base",
        None,
    )
    assert launch.remote_config_spec(f"{mine}:a", repo) == ("configs/launch/mine.py:a", mine)
    with pytest.raises(launch.LaunchError, match="not found"):
        launch.remote_config_spec("nope.py:x", repo)
    archive = launch.pack_source(tmp_path / "src.tar.gz", mine, repo)
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == [
        "configs", "configs/bert.py", "configs/launch/mine.py", "jaxgen", "jaxgen/__init__.py",
        "pyproject.toml",
    ]  # fmt: skip


def _parse(argv):
    args, extra = cli.build_parser().parse_known_args(argv)
    return args, extra


def _config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("def get_config(arg):\n    pass\n")
    return path


def test_cli_tpu_dry_run_prints_every_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "jax_version", lambda: "0.10.2")
    config = _config_file(tmp_path)
    args, extra = _parse(
        [
            "launch", "tpu", "--name", "bert-pod", "--zone", "us-central2-b", "--accelerator",
            "v4-32", "--spot", "--project", "my-proj", "--config", f"{config}:smoke",
            "--workdir", "gs://bucket/run", "--config.train.num_steps=10", "--dry-run",
        ]
    )  # fmt: skip
    assert args.func(args, extra) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == launch.shlex.join(launch.tpu_describe_command(VM))
    assert lines[1] == launch.shlex.join(launch.tpu_create_command(VM)) + (
        "  # only if the VM does not exist"
    )
    assert lines[2].startswith("# pack ")
    expected = launch.tpu_run_commands(
        VM,
        "configs/launch/cfg.py:smoke",
        "gs://bucket/run",
        ["--config.train.num_steps=10"],
        jax_version="0.10.2",
    )
    assert lines[3:] == _join_all(expected)

    args, extra = _parse(
        ["launch", "tpu", "--name", "bert-pod", "--zone", "us-central2-b", "--delete", "--dry-run"]
    )
    assert args.func(args, extra) == 0
    assert capsys.readouterr().out == (
        "gcloud compute tpus tpu-vm delete bert-pod --zone=us-central2-b --quiet\n"
    )


@pytest.mark.parametrize(
    "state, expected",
    [
        ("READY", []),
        (None, ["create"]),
        ("PREEMPTED", ["delete", "create"]),
        ("STOPPED", ["start"]),
    ],
)
def test_launch_tpu_creates_or_reuses_the_vm(tmp_path, monkeypatch, state, expected):
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    ran, archives = [], []

    def runner(argv):
        ran.append(argv)
        if argv[4] == "scp":
            with tarfile.open(argv[5]) as tar:
                archives.append(tar.getnames())
        return 0

    def query(argv):
        assert argv[4] == "describe"
        return (1, "") if state is None else (0, state + "\n")

    config = _config_file(tmp_path)
    code = launch.launch_tpu(VM, f"{config}:x", "gs://b/r", runner=runner, query=query)
    assert code == 0
    assert [argv[4] for argv in ran] == [*expected, "scp", "ssh", "ssh", "ssh"]
    assert "jaxgen/tools/launch.py" in archives[0] and "configs/launch/cfg.py" in archives[0]


def test_launch_tpu_failed_step_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    config = _config_file(tmp_path)
    with pytest.raises(launch.LaunchError, match="exit code 255"):
        launch.launch_tpu(
            VM, f"{config}:x", "gs://b/r", runner=lambda argv: 255, query=lambda argv: (0, "READY")
        )


def test_missing_gcloud_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    config = _config_file(tmp_path)
    args, extra = _parse(
        [
            "launch",
            "tpu",
            "--name",
            "t",
            "--zone",
            "z",
            "--config",
            f"{config}:x",
            "--workdir",
            "gs://b/r",
        ]
    )
    assert args.func(args, extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxgen launch: `gcloud` not found on PATH") and "Traceback" not in err

    # Through the real entry point: exit code 2 and one line on stderr.
    done = subprocess.run(
        [sys.executable, "-m", "jaxgen", "launch", "tpu", "--name", "t", "--zone", "z", "--delete"],
        env={**os.environ, "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("jaxgen launch: `gcloud` not found")
        and "Traceback" not in done.stderr
    )


def test_cli_slurm_writes_and_submits(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    argv = [
        "launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", "c.py:x",
        "--workdir", str(workdir), "--config.train.num_steps=3",
    ]  # fmt: skip
    args, extra = _parse(argv)
    assert args.func(args, extra) == 0
    script = (workdir / "launch.sbatch").read_text()
    assert script == launch.slurm_script(
        "c.py:x", str(workdir), ["--config.train.num_steps=3"], nodes=2, gpus_per_node=8
    )

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    args, extra = _parse([*argv, "--submit"])
    assert args.func(args, extra) == 2
    assert "`sbatch` not found" in capsys.readouterr().err

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/submitted\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert args.func(args, extra) == 0
    assert (tmp_path / "submitted").read_text().strip() == str(workdir / "launch.sbatch")


def test_unknown_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "tpu", "--name", "t", "--zone", "z", "--delete", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
