"""Multi-host start-up: one call that joins JAX's distributed runtime when, and only when, needed.

`initialize` must run before anything touches a jax backend (`jax.devices()`, the first jitted
call), so `jaxgen train` calls it first. Three cases start the runtime:

- explicit `coordinator_address`, `num_processes`, `process_id` (GPU clusters, the CPU test);
- SLURM with more than one task (jax reads the rest from SLURM's variables);
- a Cloud TPU slice with more than one host (jax reads the rest from the TPU env or metadata).

On one host nothing happens, so single-machine runs never open a coordinator port.
"""

from __future__ import annotations

import glob
import logging
import os
import urllib.request

import jax

log = logging.getLogger(__name__)

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear as PCI devices of Google's vendor id.
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else None


def _slurm_process_count() -> int:
    # The variables jax's own SLURM detection reads; they exist inside an `srun` step, where
    # SLURM_NTASKS is the number of processes of the step.
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(name in os.environ for name in needed):
        return 1
    return _env_int("SLURM_NTASKS") or 1


def _tpu_worker_count_from_env() -> int:
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return 2  # multislice always spans several hosts
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()])


def _on_cloud_tpu_vm() -> bool:
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _tpu_worker_count_from_metadata() -> int:
    # Plain ssh sessions on a TPU VM (how `jaxgen launch tpu` starts workers) do not carry the TPU_*
    # variables; the metadata server lists the slice's workers instead.
    request = urllib.request.Request(
        _METADATA_URL + "worker-network-endpoints", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 1
    return max(1, len([w for w in text.split(",") if w.strip()]))


def tpu_worker_count() -> int:
    """Number of hosts of the Cloud TPU slice this process runs on (0 when not on a TPU VM)."""
    count = _tpu_worker_count_from_env()
    if count:
        return count
    if os.environ.get("TPU_SKIP_MDS_QUERY") is not None or not _on_cloud_tpu_vm():
        return 0
    return _tpu_worker_count_from_metadata()


def needs_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> str | None:
    """Why this process must join the distributed runtime ('explicit'|'slurm'|'tpu'), or None."""
    if num_processes is not None and num_processes <= 1 and coordinator_address is None:
        return None
    if coordinator_address is not None or (num_processes or 0) > 1 or process_id is not None:
        return "explicit"
    if _slurm_process_count() > 1:
        return "slurm"
    if tpu_worker_count() > 1:
        return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Calls `jax.distributed.initialize` on multi-host TPU slices, under SLURM, or with explicit
    arguments; does nothing on one host or when already initialized."""
    if jax.distributed.is_initialized():
        return
    reason = needs_initialize(coordinator_address, num_processes, process_id)
    if reason is None:
        return
    if reason == "explicit" and None in (coordinator_address, num_processes, process_id):
        raise ValueError(
            "multi-host runs need all of --coordinator_address, --num_processes and --process_id "
            f"(got {coordinator_address=}, {num_processes=}, {process_id=})"
        )
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib. It only
    # affects the CPU backend, so setting it on GPU/TPU hosts is harmless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining the distributed runtime (%s)", reason)
    if reason == "explicit":
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()  # jax's own SLURM / Cloud TPU detection fills in the rest
    log.info(
        "process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )


def is_primary() -> bool:
    """True on the process that writes metrics and logs (process index 0)."""
    return jax.process_index() == 0
