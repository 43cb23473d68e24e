"""Test setup (before jax is imported): eight simulated CPU devices, a shared compilation cache."""

import os
import shutil
import tempfile

# Tests are compile-bound, not run-bound: cheaper LLVM passes cut compile time by about 40%.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests train the same tiny configs (and subprocesses re-run them): compile each program once.
# The session's own cache is removed at the end (a cache named by the caller is kept).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxgen-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    """Removes this session's compilation cache so repeated runs do not fill the temp dir."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The files that take longest, longest first (their test durations summed, measured on 2 cores;
# `--durations` re-measures). On two workers each file runs on one; started last, a long file
# would leave the other worker idle while it finishes.
LONGEST_FILES = (
    "test_loop.py", "test_finetune.py", "test_multiprocess.py", "test_mesh_equivalence.py",
    "test_faults.py", "test_flash_equivalence.py", "test_config_keys.py", "test_step.py",
    "test_compile.py", "test_sweep_e2e.py", "test_scan.py", "test_lora.py", "test_prepare.py",
    "test_generate.py", "test_remat.py", "test_peft.py", "test_names.py", "test_learning.py",
)  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    """Runs the longest files first (LONGEST_FILES, then the rest), each file's tests in their
    order, so that the two workers finish together."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files
