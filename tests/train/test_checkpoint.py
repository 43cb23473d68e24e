"""Checkpointer: the state and the data position round-trip, a half-written checkpoint is ignored,
a corrupt one is a clear error, a checkpoint whose layers are stacked otherwise than the model's
(`model.scan_layers`) is named as such, and `load_params` reads a run's parameters, converting
their layer layout when asked."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import ModelConfig, scan
from jaxgen.train import checkpoint
from jaxgen.train.state import TrainState
from tests.models.tiny_models import COMMON

REPO = Path(__file__).resolve().parents[2]


def state(seed: int) -> TrainState:
    params = {"dense": {"kernel": jnp.full((3, 4), float(seed)), "bias": jnp.arange(4.0)}}
    return TrainState.create(params, {"count": jnp.int32(seed)}, jax.random.key(seed))


def abstract(s: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s)


def test_state_and_data_position_round_trip(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False, max_to_keep=2)
    for step in (1, 2, 3):
        saver.save(step, state(step), {"phase": 0, "iterator": {"next": step}}, force=True)
    saver.wait()
    assert saver.latest_step() == 3
    restored, data = saver.restore(3, abstract(state(0)))
    saver.close()
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((3, 4), 3.0))
    assert data == {"phase": 0, "iterator": {"next": 3}}
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [2, 3]  # max_to_keep
    step, params = checkpoint.load_params(tmp_path)
    assert step == 3 and float(params["dense"]["kernel"][0, 0]) == 3.0


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, state(1), {}, force=True)
    saver.close()
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-99"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    again = checkpoint.Checkpointer(tmp_path, use_async=False)
    assert again.latest_step() == 1  # the half-written step 2 is not a checkpoint
    again.save(2, state(2), {}, force=True)  # written afresh over what was left
    again.close()
    assert not partial.exists() and checkpoint.load_params(tmp_path)[0] == 2


def _flip_array_bytes(step_dir) -> None:
    """Flips bytes in the array data of a checkpoint (what a failing disk does), not its index."""
    for path in (step_dir / "state").glob("**/d/*"):
        data = bytearray(path.read_bytes())
        for i in range(0, len(data), 7):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


def test_corrupt_checkpoint_is_damaged_and_named_in_one_line(tmp_path, capsys):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, state(1), {}, force=True)
    saver.close()
    _flip_array_bytes(tmp_path / "checkpoints" / "1")
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)  # nothing cached from the save
    with pytest.raises(
        checkpoint.CheckpointDamaged, match=r"cannot restore checkpoint .*/1: "
    ) as err:
        saver.restore(1, abstract(state(0)))
    saver.close()
    # The innermost cause names the array and what is wrong, without tensorstore's spec dump.
    message = str(err.value)
    assert "\n" not in message and "TensorStore details" not in message, message
    assert "Error reading" in message and "/state/d/" in message, message
    # No reports of the abandoned reads of the other arrays.
    assert "Exception ignored" not in capsys.readouterr().err


def test_damaged_checkpoint_is_set_aside_not_deleted(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    for step in (1, 2):
        saver.save(step, state(step), {"at": step}, force=True)
    moved = saver.set_aside(2)
    assert moved == tmp_path / checkpoint.DAMAGED / "2" and (moved / "state").is_dir()
    assert saver.steps() == [1] and saver.latest_step() == 1
    restored, data = saver.restore(1, abstract(state(0)))
    assert data == {"at": 1} and float(restored.params["dense"]["kernel"][0, 0]) == 1.0
    # A second damaged step 2 (saved again, damaged again) does not overwrite the first.
    saver.save(2, state(2), {}, force=True)
    assert saver.set_aside(2) == tmp_path / checkpoint.DAMAGED / "2.1"
    saver.close()


IDENTITY = {"config": "configs/bert.py:smoke", "config_hash": "aaa", "data_manifest_hash": "ddd"}


def test_a_checkpoint_of_another_run_or_data_set_is_refused_naming_both(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False, identity=IDENTITY)
    saver.save(1, state(1), {}, force=True)
    saver.close()
    assert checkpoint.Checkpointer(tmp_path, identity=IDENTITY).meta(1) == {"step": 1, **IDENTITY}
    other = {**IDENTITY, "data_manifest_hash": "eee"}
    again = checkpoint.Checkpointer(tmp_path, use_async=False, identity=other)
    with pytest.raises(
        checkpoint.CheckpointMismatch,
        match=r"\(data_manifest_hash differ\): it was saved by .*data_manifest_hash=ddd; this run "
        r"is .*data_manifest_hash=eee",
    ):
        again.restore(1, abstract(state(0)))
    again.close()
    # Checkpoints saved before jaxgen recorded an identity restore as before.
    old = checkpoint.Checkpointer(tmp_path / "old", use_async=False)
    old.save(1, state(1), {}, force=True)
    old.close()
    checked = checkpoint.Checkpointer(tmp_path / "old", use_async=False, identity=other)
    assert checked.meta(1) == {"step": 1}
    checked.restore(1, abstract(state(0)))
    checked.close()


def test_another_train_state_is_a_mismatch_not_damage(tmp_path):
    """A changed optimizer (or model, or lora setting) is named, never taken for a damaged file
    (which a resumed run would set aside)."""
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, state(1), {}, force=True)
    other = TrainState.create(state(0).params, {"count": jnp.int32(0), "mu": state(0).params},
                              jax.random.key(0))  # fmt: skip
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"another train state than this run "
                       r"builds \(only in this run: opt_state/mu/dense/bias"):  # fmt: skip
        saver.restore(1, abstract(other))
    wider = TrainState.create({"dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(4)}},
                              {"count": jnp.int32(0)}, jax.random.key(0))  # fmt: skip
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"params/dense/kernel is \(3, 4\) in "
                       r"the checkpoint, \(3, 5\) in this run"):  # fmt: skip
        saver.restore(1, abstract(wider))
    saver.close()


def test_verify_lists_each_checkpoint_as_good_damaged_or_another_runs(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False, identity=IDENTITY)
    for step in (1, 2):
        saver.save(step, state(step), {}, force=True)
    saver.close()
    _flip_array_bytes(tmp_path / "checkpoints" / "2")
    checks = checkpoint.verify(tmp_path, config_hash="aaa")
    assert [(c.step, c.status) for c in checks] == [(1, "good"), (2, "damaged")]
    assert "Error reading" in checks[1].detail
    assert [c.status for c in checkpoint.verify(tmp_path, "bbb")] == ["other run", "other run"]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints in"):
        checkpoint.load_params(tmp_path)


def _layered(cfg, scanned: bool) -> TrainState:
    """A state whose params (and Adam-like moments) hold cfg's layers unrolled or stacked."""
    params = {f"layers_{i}": {"w": jnp.full((2, 3), float(i))} for i in range(cfg.num_layers)}
    params["head"] = {"kernel": jnp.ones((3,))}
    if scanned:
        params = scan.stack_layers(params, cfg)
    return TrainState.create(params, {"mu": params}, jax.random.key(0))


def test_restoring_across_layer_layouts_names_the_mismatch(tmp_path):
    cfg = ModelConfig.from_mapping({**COMMON, "family": "gpt", "num_layers": 3})
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, _layered(cfg, scanned=False), {}, force=True)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"holds the layers unrolled \(layers_0, ...\) but the model stacks them \(layers, "
        r"model.scan_layers=True\).*train.init_from=",
    ):
        saver.restore(1, abstract(_layered(scanned_cfg, scanned=True)))
    saver.close()

    # load_params converts explicitly to the layout the model config asks for.
    _, as_saved = checkpoint.load_params(tmp_path)
    assert "layers_2" in as_saved and "layers" not in as_saved
    _, stacked = checkpoint.load_params(tmp_path, model=scanned_cfg)
    np.testing.assert_array_equal(stacked["layers"]["w"][:, 0, 0], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(stacked["head"]["kernel"], np.ones(3))
    _, unrolled = checkpoint.load_params(tmp_path, model=cfg)
    assert sorted(unrolled) == ["head", "layers_0", "layers_1", "layers_2"]
    deeper = dataclasses.replace(scanned_cfg, num_layers=4)
    with pytest.raises(checkpoint.CheckpointError, match="layers_3 is missing"):
        checkpoint.load_params(tmp_path, model=deeper)


def test_a_scanned_checkpoint_does_not_resume_unrolled(tmp_path):
    cfg = ModelConfig.from_mapping({**COMMON, "family": "bert", "scan_layers": True})
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, _layered(cfg, scanned=True), {}, force=True)
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    stacked = r"holds the layers stacked \(layers\) but the model unrolls them"
    with pytest.raises(checkpoint.CheckpointError, match=stacked):
        saver.restore(1, abstract(_layered(unrolled, scanned=False)))
    restored, _ = saver.restore(1, abstract(_layered(cfg, scanned=True)))
    saver.close()
    np.testing.assert_array_equal(restored.params["layers"]["w"][:, 0, 0], [0.0, 1.0])


RESTORE_DAMAGED = """
import os, sys, time
import jax, jax.numpy as jnp
from jaxgen.train import checkpoint
from jaxgen.train.state import TrainState
from tests.train.test_checkpoint import _flip_array_bytes, abstract, state
path = sys.argv[1]
saver = checkpoint.Checkpointer(path, use_async=False)
saver.save(1, state(1), {}, force=True)
saver.close()
_flip_array_bytes(checkpoint.Path(path) / "checkpoints" / "1")
saver = checkpoint.Checkpointer(path, use_async=False)
try:
    saver.restore(1, abstract(state(0)))
except checkpoint.CheckpointDamaged as err:
    print("damaged:", err, file=sys.stderr)
time.sleep(1.0)  # the abandoned reads finish on tensorstore's threads meanwhile
sys.stderr.flush()
os._exit(0)
"""


def test_a_damaged_restore_prints_no_tracebacks_of_its_abandoned_reads(tmp_path):
    """Damage to the b-tree nodes fails the metadata reads before the arrays': neither may leave
    "Event loop is closed" tracebacks behind (run in a process of its own, as the CLI is)."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", RESTORE_DAMAGED, str(tmp_path)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "damaged: cannot restore checkpoint" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
