"""Checkpointer: the state and the data position round-trip, a half-written checkpoint is ignored,
a corrupt one is a clear error, and `load_params` reads a run's parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.train import checkpoint
from jaxgen.train.state import TrainState


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


def test_corrupt_checkpoint_names_its_directory(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, use_async=False)
    saver.save(1, state(1), {}, force=True)
    for path in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot restore checkpoint .*/1: "):
        saver.restore(1, abstract(state(0)))
    saver.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints in"):
        checkpoint.load_params(tmp_path)
