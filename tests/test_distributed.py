"""jaxgen.distributed: two local processes × 4 CPU devices join one runtime and psum over all 8."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxgen import distributed

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxgen import distributed

    distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    assert jax.device_count() == 8, jax.device_count()
    assert jax.local_device_count() == 4, jax.local_device_count()
    assert jax.process_count() == 2, jax.process_count()
    assert distributed.is_primary() == (jax.process_index() == 0)

    mesh = Mesh(np.array(jax.devices()), ("i",))
    # Device k of the global mesh holds k + 1, built from each process's own rows; the psum over
    # all 8 devices is 1 + ... + 8 = 36 only if both processes' data meet.
    local = (jax.process_index() * 4 + np.arange(4, dtype=np.float32) + 1.0)[:, None]
    ranks = jax.make_array_from_process_local_data(NamedSharding(mesh, P("i")), local, (8, 1))
    total = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P()
        )
    )(ranks)
    value = float(np.asarray(total.addressable_shards[0].data).ravel()[0])
    assert value == 36.0, value
    print(f"ok process={jax.process_index()} psum={value}")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_psum_over_eight_devices(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), address, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed:\n{out}"
        assert f"ok process={i} psum=36.0" in out


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({}, (None, None, None), None),
        ({}, (None, 1, None), None),
        ({}, ("localhost:1234", 2, 0), "explicit"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, (None,) * 3, None),
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "node[01-02]",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1",
                "SLURM_LOCALID": "0",
            },
            (None,) * 3,
            "slurm",
        ),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, (None,) * 3, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, (None,) * 3, None),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}, (None,) * 3, "tpu"),
    ],
)
def test_needs_initialize_detects_clusters(monkeypatch, env, args, expected):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # never query a metadata server from a test
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.needs_initialize(*args) == expected


def test_single_host_initialize_is_a_no_op(monkeypatch):
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    distributed.initialize()
    assert distributed.is_primary()


def test_partial_explicit_arguments_are_an_error(monkeypatch):
    import jax

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="--coordinator_address"):
        distributed.initialize(None, 2, None)
