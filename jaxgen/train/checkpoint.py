"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator state.

orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest; `cleanup_tmp_directories` removes the
partial one on the next start. Errors raised inside an asynchronous save surface at the next
`save`, `wait` or `close`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen.models import scan
from jaxgen.models.config import ModelConfig
from jaxgen.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("state", "data")
    )


class Checkpointer:
    """Saves and restores (TrainState, data iterator state) under `workdir/checkpoints/<step>/`.

    With `keep_best`, the parameters of the run's best eval loss are also kept under
    `workdir/checkpoints_best/<step>/`, independent of `max_to_keep`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        keep_best: bool = False,
        use_async: bool = True,
    ) -> None:
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
                    best_fn=lambda metrics: metrics["loss"],
                    best_mode="min",
                    enable_async_checkpointing=False,
                    cleanup_tmp_directories=True,
                    create=True,
                ),
            )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

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
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def save_best(self, step: int, state: TrainState, eval_loss: float) -> None:
        """Keeps this step's state if its eval loss is the best so far (no-op without keep_best)."""
        if self.best is not None:
            self.best.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({})
                ),
                metrics={"loss": float(eval_loss)},
                force=True,
            )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Reads the checkpoint at `step` into arrays with the shardings of `abstract_state`."""
        self._check_layer_layout(step, abstract_state)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax raises many types; the user needs the path and the cause
            raise CheckpointError(
                f"cannot restore checkpoint {self.directory / str(step)}: "
                f"{type(err).__name__}: {err}. "
                "Move that directory away to resume from the previous checkpoint."
            ) from err
        return restored["state"], restored["data"]

    def _check_layer_layout(self, step: int, abstract_state: TrainState) -> None:
        """Raises CheckpointError when the checkpoint stacks its layers and the model does not, or
        the other way round (orbax's own error would blame a corrupt directory)."""
        try:
            saved = self.manager.item_metadata(step)["state"].tree["params"]
        except Exception:  # unreadable metadata: restore itself reports what is wrong
            return
        mismatch = layer_layout_mismatch(saved, abstract_state.params)
        if mismatch:
            raise CheckpointError(
                f"cannot restore checkpoint {self.directory / str(step)}: {mismatch}. Resume with "
                "the model.scan_layers it was saved with, or start a new run from its parameters "
                f"with train.init_from={self.directory.parent} (load_params converts them; the "
                "optimizer state starts afresh)"
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
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
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
