"""Golden sharding tables: each tiny model on a (2, 2, 2) mesh gets exactly the checked-in specs.

tests/golden/sharding_<family>_tiny.json maps every parameter path to its PartitionSpec written as
a list (one entry per dimension: null, a mesh axis, or a list of mesh axes). A change to a model's
logical axis names or to `parallel.LOGICAL_RULES` shows up here as a readable diff.

After an intended change, regenerate the tables and review the diff before committing them:

    JAXGEN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_sharding_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import pytest

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.train import step as step_lib

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("JAXGEN_UPDATE_GOLDEN", "") not in ("", "0")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}

# configs/<family>.py:smoke shrunk so that every sharded dimension divides by 2 (an axis that does
# not divide a dimension is dropped, which would hide a rule behind replication).
SHRINK = [
    "model.num_layers=1",
    "model.d_model=32",
    "model.num_heads=2",
    "model.head_dim=16",
    "model.d_ff=64",
    "model.vocab_size=512",
    "model.max_len=32",
    "data.seq_len=16",
]
EXTRA = {"bert": [], "gpt": [], "t5": ["model.num_decoder_layers=1"]}


def spec_as_list(spec: jax.sharding.PartitionSpec, ndim: int) -> list[Any]:
    """A PartitionSpec padded to `ndim` entries, JSON-friendly (tuples of axes become lists)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def sharding_table(family: str) -> dict[str, list[Any]]:
    """{param path: spec as a list} of the tiny `family` model on the (2, 2, 2) mesh."""
    config = config_lib.load_config(f"configs/{family}.py:smoke", SHRINK + EXTRA[family])
    module = models.build(config.model)
    mesh = parallel.make_mesh(MESH)
    init = step_lib.init_params_fn(module, objectives.get(family), config.data)
    with parallel.mesh_context(mesh):
        boxed = jax.eval_shape(init, jax.random.key(0))  # shapes only: nothing is computed
        shardings = parallel.logical_shardings(boxed, mesh)
    flat_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    flat_shapes = jax.tree.leaves(parallel.strip_boxes(boxed))
    return {
        "/".join(key.key for key in path): spec_as_list(sharding.spec, len(leaf.shape))
        for (path, sharding), leaf in zip(flat_shardings, flat_shapes, strict=True)
    }


def describe_diff(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """One line per parameter that is missing, new, or sharded differently."""
    lines = [f"  missing: {k} (golden {expected[k]})" for k in sorted(expected.keys() - actual)]
    lines += [f"  new:     {k} = {actual[k]}" for k in sorted(actual.keys() - expected)]
    lines += [
        f"  changed: {k}: golden {expected[k]} -> now {actual[k]}"
        for k in sorted(expected.keys() & actual.keys())
        if expected[k] != actual[k]
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_sharding_matches_golden_table(family):
    golden = GOLDEN_DIR / f"sharding_{family}_tiny.json"
    actual = sharding_table(family)
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        # One parameter per line, so that a review diff reads like the table.
        rows = [f"  {json.dumps(k)}: {json.dumps(actual[k])}" for k in sorted(actual)]
        golden.write_text("{\n" + ",\n".join(rows) + "\n}\n")
        return
    assert golden.is_file(), (
        f"{golden} is missing; create it with JAXGEN_UPDATE_GOLDEN=1 pytest {__file__}"
    )
    expected = json.loads(golden.read_text())
    assert actual == expected, (
        f"the {family} sharding on a (2, 2, 2) mesh differs from {golden.name}:\n"
        f"{describe_diff(expected, actual)}\n"
        f"If intended, regenerate with JAXGEN_UPDATE_GOLDEN=1 pytest {__file__}"
    )


def test_golden_tables_shard_over_every_axis():
    # Guards the golden files themselves: a table that replicated everything would match trivially.
    for family in ("bert", "gpt", "t5"):
        table = json.loads((GOLDEN_DIR / f"sharding_{family}_tiny.json").read_text())
        used = {axis for spec in table.values() for entry in spec for axis in _axes(entry)}
        assert {"fsdp", "tensor"} <= used, family


def _axes(entry: Any) -> list[str]:
    return [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
