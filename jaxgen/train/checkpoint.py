"""Checkpoints: an orbax CheckpointManager holding the train state, the data iterator state and
what the checkpoint belongs to.

    checkpoints/<step>/state/   the TrainState (orbax, OCDBT)
                      /data/    the data iterator's position (JSON)
                      /meta/    step, config name and hash, data manifest hash (JSON)

orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest; `cleanup_tmp_directories` removes the
partial one on the next start. Errors raised inside an asynchronous save surface at the next
`save`, `wait` or `close`. A complete checkpoint that later cannot be read (a damaged disk, a
flipped byte) raises `CheckpointDamaged`; `set_aside` moves it to `checkpoints_damaged/` so that
a run can resume from the one before. One from another run or data set raises
`CheckpointMismatch` and is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxgen.models import scan
from jaxgen.models.config import ModelConfig
from jaxgen.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""


class CheckpointDamaged(CheckpointError):
    """A complete checkpoint whose files cannot be read back (corrupt, truncated or missing)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint saved by another run or from another data set."""


DAMAGED = "checkpoints_damaged"  # where `set_aside` moves unreadable checkpoints, per workdir
# The identity keys a restore compares (the rest of `meta` is for people reading it).
IDENTITY = ("config_hash", "data_manifest_hash", "lora_base")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    # Registered up front: a manager that only knows item names logs a warning per item whenever
    # it reads metadata.
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=_handlers())


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause's message: orbax wraps tensorstore's error (which
    names the file and what is wrong with it) in one that appends a long spec."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    for tail in (" See full TensorStore details", " [tensorstore_spec="):
        line = line.split(tail)[0]
    return f"{type(err).__name__}: {line}".rstrip(": ")


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Drops the "Exception ignored in <coroutine>" reports a failed restore leaves behind.

    orbax reads every array in its own coroutine; when one read fails, the others are abandoned
    and Python reports each of them when it is collected: tens of tracebacks after the one error
    that matters. They are collected here, with the reports dropped, before the error goes on.
    """
    _drop_closed_loop_reports()
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_coroutine_leftover(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except Exception as err:
        while err is not None:  # releases the abandoned reads the tracebacks hold
            traceback.clear_frames(err.__traceback__)
            err = err.__cause__ or err.__context__
        raise
    finally:
        gc.collect()
        sys.unraisablehook = previous
        _drop_closed_loop_reports()


def _is_coroutine_leftover(unraisable: Any) -> bool:
    return type(unraisable.object).__name__ in ("coroutine", "Task", "Future")


def _is_closed_loop_error(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _drop_closed_loop_reports() -> None:
    """From now on, drops the reports of reads that finish after their restore failed.

    tensorstore's threads complete the abandoned reads later and try to wake the event loop orbax
    has closed: "RuntimeError: Event loop is closed" printed once per read (through
    sys.excepthook or sys.unraisablehook), at any later moment, and asyncio logs each abandoned
    task's own error. The restore error itself already says what is wrong.
    """
    if getattr(sys.excepthook, "jaxgen_drops_closed_loop_reports", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind: type, value: BaseException, tb: Any) -> None:
        if not _is_closed_loop_error(value):
            excepthook(kind, value, tb)

    def on_unraisable(unraisable: Any) -> None:
        if not _is_closed_loop_error(unraisable.exc_value):
            unraisablehook(unraisable)

    on_exception.jaxgen_drops_closed_loop_reports = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


class Checkpointer:
    """Saves and restores (TrainState, data iterator state) under `workdir/checkpoints/<step>/`.

    With `keep_best`, the state of the run's best eval loss (or task score) is also kept under
    `workdir/checkpoints_best/<step>/`, independent of `max_to_keep`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        keep_best: bool = False,
        use_async: bool = True,
        identity: Mapping[str, str] | None = None,
        best_mode: str = "min",
    ) -> None:
        """identity: what this run's checkpoints record and a restore requires (`run_identity`);
        best_mode: whether the best checkpoint has the lowest ('min', a loss) or highest ('max',
        a task score) value given to `save_best`."""
        self.identity = dict(identity or {})
        self.directory = Path(workdir) / "checkpoints"
        self.manager = _manager(
            self.directory,
            ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=use_async,
                cleanup_tmp_directories=True,
                create=True,
            ),
        )
        self.best = None
        if keep_best:
            self.best = _manager(
                Path(workdir) / "checkpoints_best",
                ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    # "loss": what best checkpoints saved before task scores recorded
                    best_fn=lambda metrics: metrics.get("value", metrics.get("loss")),
                    best_mode=best_mode,
                    enable_async_checkpointing=False,
                    cleanup_tmp_directories=True,
                    create=True,
                ),
            )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(
        self, step: int, state: TrainState, data_state: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts saving a checkpoint at `step`; raises if an earlier asynchronous save failed."""
        self.manager.check_for_errors()
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave({"step": int(step), **self.identity}),
            ),
            force=force,
        )

    def save_best(self, step: int, state: TrainState, value: float) -> None:
        """Keeps this step's state if its value (eval loss, or task score) is the best so far
        (no-op without keep_best)."""
        if self.best is not None:
            self.best.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({})
                ),
                metrics={"value": float(value)},
                force=True,
            )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Reads the checkpoint at `step` into arrays with the shardings of `abstract_state`.

        Raises CheckpointMismatch for another run's checkpoint, CheckpointDamaged when its files
        cannot be read.
        """
        where = self.directory / str(step)
        # The checks read the checkpoint's metadata, which may be as damaged as its arrays.
        with _quiet_failed_reads():
            self.check_identity(step)
            self._check_fits(step, abstract_state)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # orbax raises many types; the user needs path and cause
                raise CheckpointDamaged(
                    f"cannot restore checkpoint {where}: {_first_line(err)}"
                ) from err
        return restored["state"], restored["data"]

    def meta(self, step: int) -> dict[str, Any] | None:
        """What the checkpoint at `step` records about its run; None for one saved before jaxgen
        recorded it."""
        try:
            return _read_meta(self.manager, self.directory, step)
        except Exception as err:
            where = self.directory / str(step) / "meta"
            raise CheckpointDamaged(f"cannot read {where}: {_first_line(err)}") from err

    def check_identity(self, step: int) -> None:
        """Raises CheckpointMismatch when the checkpoint at `step` belongs to another run or data
        set than this Checkpointer's `identity`."""
        saved = self.meta(step)
        if saved is None or not self.identity:
            return
        differ = [k for k in IDENTITY if k in saved and saved[k] != self.identity.get(k)]
        if differ:
            describe = lambda m: ", ".join(  # noqa: E731
                f"{k}={m[k]}" for k in ("config", *IDENTITY) if k in m
            )
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} belongs to another run "
                f"({', '.join(differ)} differ): it was saved by {describe(saved)}; this run is "
                f"{describe(self.identity)}. Use a new --workdir, or the config and data it was "
                "saved with"
            )

    def set_aside(self, step: int) -> Path:
        """Moves the checkpoint at `step` to `<workdir>/checkpoints_damaged/<step>` (never deletes
        it) and forgets it; returns where it went."""
        target_dir = self.directory.parent / DAMAGED
        target = target_dir / str(step)
        n = 1
        while target.exists():
            target, n = target_dir / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            target_dir.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxgen set aside checkpoint {step}")
        self.manager.reload()
        return target

    def _check_fits(self, step: int, abstract_state: TrainState) -> None:
        """Raises CheckpointMismatch when the checkpoint holds another train state than the run
        builds: its layers stacked otherwise (model.scan_layers; orbax's own error would blame a
        corrupt directory), or other leaves or shapes (an optimizer, model or lora setting
        changed). A readable checkpoint is never taken for a damaged one."""
        try:
            saved = self.manager.item_metadata(step)["state"].tree
        except Exception:  # unreadable metadata: restore itself reports what is wrong
            return
        where = self.directory / str(step)
        params = saved.get("params") if isinstance(saved, Mapping) else None
        mismatch = params is not None and layer_layout_mismatch(params, abstract_state.params)
        if mismatch:
            raise CheckpointMismatch(
                f"cannot restore checkpoint {where}: {mismatch}. Resume with "
                "the model.scan_layers it was saved with, or start a new run from its parameters "
                f"with train.init_from={self.directory.parent} (load_params converts them; the "
                "optimizer state starts afresh)"
            )
        differ = structure_mismatch(ocp.tree.to_flat_dict(saved), abstract_state)
        if differ:
            raise CheckpointMismatch(
                f"cannot restore checkpoint {where}: it holds another train "
                f"state than this run builds ({differ}); an optimizer, model or lora setting "
                "changed since it was saved. Resume with the settings it was saved with (its "
                "config.json), or start a new --workdir with "
                f"train.init_from={self.directory.parent}"
            )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk, re-raising any error they hit."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def close(self) -> None:
        """Finishes pending saves and releases the managers."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self.best is not None:
            self.best.close()


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings, the target orbax restores into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def structure_mismatch(saved: Mapping[tuple[str, ...], Any], target: Any) -> str | None:
    """What differs between a checkpoint's flat metadata ({path: array metadata}) and the tree
    a restore targets: missing or extra leaves, or other shapes; None when they agree."""
    wanted = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        key_data = jnp.issubdtype(getattr(leaf, "dtype", jnp.float32), jax.dtypes.prng_key)
        wanted[tuple(_key_name(k) for k in path)] = None if key_data else tuple(leaf.shape)
    show = lambda paths: ", ".join("/".join(p) for p in sorted(paths)[:3])  # noqa: E731
    extra, missing = set(saved) - set(wanted), set(wanted) - set(saved)
    if extra or missing:
        parts = [f"only in the checkpoint: {show(extra)}"] if extra else []
        parts += [f"only in this run: {show(missing)}"] if missing else []
        return "; ".join(parts)
    for path, shape in sorted(wanted.items()):
        have = tuple(getattr(saved[path], "shape", ()) or ())
        if shape is not None and have != shape:
            return f"{'/'.join(path)} is {have} in the checkpoint, {shape} in this run"
    return None


def layer_layout_mismatch(saved: Any, target: Any) -> str | None:
    """Where a parameter tree holds its layers unrolled (`layers_{i}`) and the other stacked
    (`layers`, `jaxgen.models.scan`), said in words; None when their layouts agree."""

    def walk(a: Any, b: Any, path: str) -> str | None:
        if not isinstance(a, dict) or not isinstance(b, dict):
            return None
        where = f"{path}/" if path else ""
        unrolled, stacked = "layers_0", scan.STACKED
        if unrolled in a and stacked in b and stacked not in a:
            return (
                f"the checkpoint holds the layers unrolled ({where}layers_0, ...) but the model "
                f"stacks them ({where}{stacked}, model.scan_layers=True)"
            )
        if stacked in a and unrolled in b and unrolled not in a:
            return (
                f"the checkpoint holds the layers stacked ({where}{stacked}) but the model "
                f"unrolls them ({where}layers_0, ..., model.scan_layers=False)"
            )
        for key in a.keys() & b.keys():
            found = walk(a[key], b[key], f"{where}{key}")
            if found:
                return found
        return None

    return walk(saved, target, "")


def load_params(
    workdir: str | os.PathLike, step: int | None = None, model: ModelConfig | None = None
) -> tuple[int, Any]:
    """Reads the params of a run's latest (or given) checkpoint, unsharded, for sampling/export.

    With `model` the layers come stacked or unrolled as `model.scan_layers` asks, whichever way
    the checkpoint holds them (`jaxgen.models.scan.stack_layers` / `unstack_layers`).
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoints in {workdir}: train first (jaxgen train --workdir {workdir})"
        )
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored["state"]
    params = state["params"] if isinstance(state, dict) else state.params
    if model is not None:
        try:
            params = scan.match_layers(params, model)
        except scan.LayerLayoutError as err:
            raise CheckpointError(f"the parameters in {directory / str(step)}: {err}") from err
    return step, params


# ------------------------------------------------------------------------------------ verifying


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """One checkpoint's verdict: `good`, `damaged` or `other run`, and why."""

    directory: str
    step: int
    status: str
    detail: str


def verify(workdir: str | os.PathLike, config_hash: str | None = None) -> list[StepCheck]:
    """Reads every array and record of each checkpoint of a workdir (the latest ones and the best
    one), one checkpoint in host memory at a time, and says which can be restored.

    config_hash: the run's (`loop.run_identity`); a checkpoint recording another is `other run`.
    """
    checks = []
    for name in ("checkpoints", "checkpoints_best"):
        directory = (Path(workdir) / name).absolute()
        if not directory.is_dir():
            continue
        with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
            for step in sorted(manager.all_steps()):
                checks.append(_verify_step(manager, directory, step, config_hash))
    return checks


def _read_meta(manager: ocp.CheckpointManager, directory: Path, step: int) -> dict | None:
    """The `meta` item of the checkpoint at `step`; None for one saved before it existed."""
    if not (directory / str(step) / "meta").is_dir():
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _verify_step(
    manager: ocp.CheckpointManager, directory: Path, step: int, config_hash: str | None
) -> StepCheck:
    where = directory / str(step)
    check = lambda status, detail: StepCheck(str(directory), step, status, detail)  # noqa: E731
    try:
        with _quiet_failed_reads():
            meta = _read_meta(manager, directory, step) or {}
            if config_hash and meta.get("config_hash", config_hash) != config_hash:
                return check(
                    "other run",
                    f"saved by config_hash={meta['config_hash']} ({meta.get('config')}); "
                    f"this workdir's config.json is config_hash={config_hash}",
                )
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            tree = manager.item_metadata(step)["state"].tree
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree
            )
            args = {"state": ocp.args.StandardRestore(abstract)}
            if (where / "data").is_dir():
                args["data"] = ocp.args.JsonRestore()
            items = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as err:
        return check("damaged", _first_line(err))
    leaves = jax.tree.leaves(items["state"])
    bad = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(items["state"])
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf)))
    ]
    if bad:
        return check("damaged", f"non-finite values in {', '.join(bad[:3])}")
    size = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    recorded = f", config {meta['config']} ({meta['config_hash']})" if "config" in meta else ""
    return check("good", f"{len(leaves)} arrays, {size / 2**20:.1f} MiB{recorded}")
