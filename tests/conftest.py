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


def pytest_collection_modifyitems(session, config, items):
    """Runs the files holding slow end-to-end tests first, each file's tests in their order: the
    suite runs on two workers file by file (pyproject's addopts), and a long file started last
    would leave one worker idle while the other finishes it."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within files
