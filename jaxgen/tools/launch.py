"""`jaxgen launch tpu|slurm`: start `jaxgen train` on a Cloud TPU VM slice or a SLURM GPU cluster.

Everything that decides *what* runs is a pure function returning argv lists or script text, so tests
compare them exactly and `--dry-run` prints what would run. Only `launch_tpu`, `launch_slurm` and
`delete_tpu` touch the outside world; `jaxgen.cli` parses the flags.

TPU:   jaxgen launch tpu --name my-tpu --zone us-central2-b --accelerator v4-32 \\
           --config configs/bert.py:base --workdir gs://my-bucket/bert-base [--config.x=y ...]
SLURM: jaxgen launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
           --config configs/gpt.py:gpt2-small --workdir /shared/runs/gpt2 --submit
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxgen.config import REPO_ROOT

# The source tree shipped to TPU workers: the package plus the config files `--config` names.
SOURCE_PATHS = ("pyproject.toml", "README.md", "jaxgen", "configs")
REMOTE_DIR = "jaxgen"  # relative to the worker's home directory
REMOTE_ARCHIVE = "jaxgen-src.tar.gz"


class LaunchError(RuntimeError):
    """A launch that cannot proceed (missing tool, failed cloud command); the message says why."""


@dataclass(frozen=True)
class TpuVm:
    """A Cloud TPU VM slice: what `gcloud compute tpus tpu-vm` needs to address or create it."""

    name: str
    zone: str
    accelerator: str = "v4-8"
    version: str = "tpu-ubuntu2204-base"
    spot: bool = False
    project: str | None = None

    def _where(self) -> list[str]:
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags


def _gcloud(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *args]


def tpu_describe_command(vm: TpuVm) -> list[str]:
    """argv that succeeds iff the TPU VM exists."""
    return _gcloud("describe", vm.name, *vm._where(), "--format=value(state)")


def tpu_create_command(vm: TpuVm) -> list[str]:
    """argv that creates the TPU VM slice."""
    argv = _gcloud(
        "create",
        vm.name,
        *vm._where(),
        f"--accelerator-type={vm.accelerator}",
        f"--version={vm.version}",
    )
    if vm.spot:
        argv.append("--spot")
    return argv


def tpu_delete_command(vm: TpuVm) -> list[str]:
    """argv that deletes the TPU VM slice without prompting."""
    return _gcloud("delete", vm.name, *vm._where(), "--quiet")


def tpu_scp_command(vm: TpuVm, local_path: str, remote_path: str, worker: str = "all") -> list[str]:
    """argv that copies a local file to `remote_path` on the given worker(s)."""
    return _gcloud(
        "scp", local_path, f"{vm.name}:{remote_path}", *vm._where(), f"--worker={worker}"
    )


def tpu_ssh_command(vm: TpuVm, command: str, worker: str = "all") -> list[str]:
    """argv that runs a shell command on the given worker(s)."""
    return _gcloud("ssh", vm.name, *vm._where(), f"--worker={worker}", f"--command={command}")


def jax_version() -> str:
    """The jax version installed here, so TPU workers run the same one."""
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return ""


def train_argv(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    python: str = "python3",
    distributed: Sequence[str] = (),
) -> list[str]:
    """argv of `python -m jaxgen train`; overrides may be given as 'a.b=v' or '--config.a.b=v'."""
    return [
        python,
        "-m",
        "jaxgen",
        "train",
        "--config",
        config,
        "--workdir",
        workdir,
        *distributed,
        *(normalize_override(o) for o in overrides),
    ]


def normalize_override(override: str) -> str:
    """'a.b=v', 'config.a.b=v' or '--config.a.b=v' -> '--config.a.b=v'."""
    text = override.removeprefix("--").removeprefix("config.")
    if "=" not in text:
        raise LaunchError(f"override {override!r} must look like --config.optim.learning_rate=3e-4")
    return f"--config.{text}"


def tpu_install_script(jax_version: str = "") -> str:
    """Worker shell command: unpack the shipped source and pip-install it with jax[tpu]."""
    jax_req = f"jax[tpu]=={jax_version}" if jax_version else "jax[tpu]"
    return (
        f"set -e; rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
        f"tar -xzf ~/{REMOTE_ARCHIVE} -C ~/{REMOTE_DIR} && "
        # Editable, so `configs/...` paths resolve inside ~/jaxgen on every worker.
        f"python3 -m pip install --quiet --upgrade {shlex.quote(jax_req)} -e ~/{REMOTE_DIR}"
    )


def tpu_log_path(vm: TpuVm) -> str:
    """Where each worker writes its training log (relative to the worker's home)."""
    return f"jaxgen-{vm.name}.log"


def tpu_start_script(vm: TpuVm, train: Sequence[str]) -> str:
    """Worker shell command: start training detached (survives ssh disconnects), record its pid."""
    log = tpu_log_path(vm)
    return (
        f"cd ~/{REMOTE_DIR} && nohup {shlex.join(train)} > ~/{log} 2>&1 < /dev/null & "
        f"echo $! > ~/{log}.pid"
    )


def tpu_stream_script(vm: TpuVm) -> str:
    """Worker shell command: follow the training log until the training process exits."""
    log = tpu_log_path(vm)
    return f'tail -n +1 --pid="$(cat ~/{log}.pid)" -F ~/{log}'


def tpu_run_commands(
    vm: TpuVm,
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    archive: str = REMOTE_ARCHIVE,
    jax_version: str = "",
    stream: bool = True,
) -> list[list[str]]:
    """gcloud argvs once the VM exists: ship source, install, start training, stream worker 0."""
    train = train_argv(config, workdir, overrides)
    commands = [
        tpu_scp_command(vm, archive, REMOTE_ARCHIVE),  # remote paths are relative to home
        tpu_ssh_command(vm, tpu_install_script(jax_version)),
        tpu_ssh_command(vm, tpu_start_script(vm, train)),
    ]
    if stream:
        commands.append(tpu_ssh_command(vm, tpu_stream_script(vm), worker="0"))
    return commands


def remote_config_spec(config: str, repo_root: Path = REPO_ROOT) -> tuple[str, Path | None]:
    """The --config spec as seen from ~/jaxgen on a worker, and a file to ship if outside the repo.

    Files inside the repository keep their relative path; any other file travels as
    `configs/launch/<name>` inside the archive.
    """
    path, sep, arg = config.partition(":")
    local = Path(path).expanduser()
    if not local.is_file():
        if (repo_root / path).is_file():
            return config, None  # already relative to the repository
        raise LaunchError(f"config file {path!r} not found")
    local = local.resolve()
    try:
        return f"{local.relative_to(repo_root).as_posix()}{sep}{arg}", None
    except ValueError:
        return f"configs/launch/{local.name}{sep}{arg}", local


def pack_source(
    destination: str | os.PathLike, extra_config: Path | None = None, repo_root: Path = REPO_ROOT
) -> Path:
    """Writes a .tar.gz of this jaxgen checkout (package, configs, pyproject) for the workers."""
    destination = Path(destination)

    def skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info

    with tarfile.open(destination, "w:gz") as tar:
        for name in SOURCE_PATHS:
            if (repo_root / name).exists():
                tar.add(repo_root / name, arcname=name, filter=skip_caches)
        if extra_config is not None:
            tar.add(extra_config, arcname=f"configs/launch/{extra_config.name}")
    return destination


def _require_tool(name: str, hint: str) -> None:
    if shutil.which(name) is None:
        raise LaunchError(f"`{name}` not found on PATH: {hint}")


def _print_command(argv: Sequence[str], out=None) -> None:
    print(shlex.join(argv), file=out or sys.stdout, flush=True)


Runner = Callable[[Sequence[str]], int]
Query = Callable[[Sequence[str]], "tuple[int, str]"]


def _run_command(argv: Sequence[str]) -> int:
    return subprocess.run(list(argv), check=False).returncode


def _query_command(argv: Sequence[str]) -> tuple[int, str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return done.returncode, done.stdout


def _ensure_tpu_vm(vm: TpuVm, runner: Runner, query: Query) -> None:
    code, out = query(tpu_describe_command(vm))
    state = out.strip() if code == 0 else ""
    if state == "PREEMPTED":
        # A preempted Spot slice cannot be restarted; replace it (the run resumes from its workdir).
        print(f"TPU VM {vm.name} was preempted; recreating it", file=sys.stderr)
        if runner(tpu_delete_command(vm)) != 0:
            raise LaunchError(f"deleting preempted TPU VM {vm.name} failed")
        state = ""
    if state == "STOPPED":
        start = _gcloud("start", vm.name, *vm._where())
        _print_command(start, sys.stderr)
        if runner(start) != 0:
            raise LaunchError(f"starting TPU VM {vm.name} failed")
    elif state:
        print(f"reusing TPU VM {vm.name} in {vm.zone} ({state})", file=sys.stderr)
    else:
        _print_command(tpu_create_command(vm), sys.stderr)
        if runner(tpu_create_command(vm)) != 0:
            raise LaunchError(f"creating TPU VM {vm.name} failed")


def delete_tpu(vm: TpuVm, *, dry_run: bool = False, runner: Runner = _run_command) -> int:
    """Deletes the TPU VM (with dry_run prints the command); returns gcloud's exit code."""
    if dry_run:
        _print_command(tpu_delete_command(vm))
        return 0
    _require_tool("gcloud", "install the Google Cloud SDK (https://cloud.google.com/sdk)")
    return runner(tpu_delete_command(vm))


def launch_tpu(
    vm: TpuVm,
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    *,
    dry_run: bool = False,
    stream: bool = True,
    runner: Runner = _run_command,
    query: Query = _query_command,
) -> int:
    """Creates (or reuses) the TPU VM, installs this jaxgen and starts training on all workers,
    streams worker 0's log; with dry_run prints every command instead. Returns the exit code."""
    if not workdir.startswith("gs://"):
        print(
            f"warning: workdir {workdir!r} is not gs://; each TPU worker writes its own copy",
            file=sys.stderr,
        )
    spec, extra_config = remote_config_spec(config)
    describe = tpu_describe_command(vm)
    if dry_run:
        _print_command(describe)
        print(f"{shlex.join(tpu_create_command(vm))}  # only if the VM does not exist")
        print(f"# pack {', '.join(SOURCE_PATHS)} of {REPO_ROOT} into {REMOTE_ARCHIVE}")
        for argv in tpu_run_commands(
            vm, spec, workdir, overrides, REMOTE_ARCHIVE, jax_version(), stream
        ):
            _print_command(argv)
        return 0
    _require_tool(
        "gcloud", "install the Google Cloud SDK (https://cloud.google.com/sdk) and log in"
    )
    _ensure_tpu_vm(vm, runner, query)
    with tempfile.TemporaryDirectory() as tmp:
        archive = pack_source(Path(tmp) / REMOTE_ARCHIVE, extra_config)
        commands = tpu_run_commands(
            vm, spec, workdir, overrides, str(archive), jax_version(), stream
        )
        for argv in commands:
            _print_command(argv, sys.stderr)
            code = runner(argv)
            if code != 0:
                if argv is commands[-1] and stream:
                    return code  # the training itself failed (or the stream was interrupted)
                raise LaunchError(f"command failed with exit code {code}: {shlex.join(argv)}")
    return 0


def slurm_script(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    *,
    nodes: int,
    gpus_per_node: int,
    job_name: str = "jaxgen",
    partition: str | None = None,
    time: str | None = None,
    port: int | None = None,
    python: str = "python",
) -> str:
    """sbatch script text: one task per node, each running `jaxgen train` as one JAX process.

    The coordinator is the first node of the allocation; without `port` the port is derived from the
    job id so two jobs sharing a node do not collide.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(
            f"need at least one node and one GPU per node, got {nodes=} {gpus_per_node=}"
        )
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    if time:
        header.append(f"#SBATCH --time={time}")
    header.append(f"#SBATCH --output={workdir}/slurm-%j.out")
    port_line = f"PORT={port}" if port else "PORT=$((20000 + SLURM_JOB_ID % 20000))"
    # SLURM_PROCID differs per task, so it must expand inside each task, not in this batch script.
    task = (
        f"exec {shlex.join(train_argv(config, workdir, python=python))} "
        '--coordinator_address "$JAXGEN_COORDINATOR" '
        '--num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID"'
    )
    if overrides:
        task += " " + shlex.join(normalize_override(o) for o in overrides)
    body = [
        "",
        "set -euo pipefail",
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        port_line,
        'export JAXGEN_COORDINATOR="$COORDINATOR_HOST:$PORT"',
        f"srun --ntasks={nodes} --ntasks-per-node=1 bash -c {shlex.quote(task)}",
        "",
    ]
    return "\n".join(header + body)


def launch_slurm(
    script: str,
    path: str | os.PathLike,
    *,
    submit: bool = False,
    runner: Runner = _run_command,
) -> int:
    """Writes the sbatch script to `path` (creating its folder); submits it with sbatch if asked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}")
    if not submit:
        print(f"submit with: sbatch {shlex.quote(str(path))}")
        return 0
    _require_tool("sbatch", "run this on a SLURM login node, or drop --submit and copy the script")
    return runner(["sbatch", str(path)])
