"""The family contract: every objective implements it, batches are checked against its spec, metrics
reduce exactly, and code outside models/ and objectives/ does not switch on the family name."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import models, objectives
from jaxgen.objectives import DataError

PACKAGE = Path(objectives.__file__).resolve().parent.parent
FAMILIES = objectives.FAMILIES
SWITCH = re.compile(r"family *(==|!=|in |not in )")
SHRINK = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=16",
          "model.d_ff=64", "model.vocab_size=128", "model.max_len=32",
          "data.seq_len=16"]  # fmt: skip


def tiny(family: str):
    """(objective, run config) of the family's smoke row at tiny sizes."""
    return objectives.get(family), config_lib.load_config(f"configs/{family}.py:smoke", SHRINK)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_objective_implements_the_protocol(family):
    objective, run = tiny(family)
    assert isinstance(objective, objectives.Objective)
    assert isinstance(run.data, objective.Data) and issubclass(
        objective.Data, config_lib.DataConfig
    )
    spec = objective.batch_spec(run.data, 4)
    assert set(objective.model_inputs(spec)) <= set(spec)
    weights = objective.loss_weights(objective.synthetic_batch(run.model, run.data, 4, _rng()))
    assert set(objective.LOSS_TERMS) <= set(weights)
    assert set(objective.sequence_lengths(run.data)) >= {"inputs", "scored"}
    assert all(stack[1] in objective.sequence_lengths(run.data) for stack in run.model.stacks)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_batch_is_driven_by_the_spec(family):
    objective, run = tiny(family)
    batch = objective.synthetic_batch(run.model, run.data, 4, _rng())
    objectives.check_batch(objective, batch, run.model, run.data)  # the synthetic batch is valid
    key = next(iter(batch))
    with pytest.raises(DataError, match="differ from the .* spec"):
        objectives.check_batch(objective, {k: v for k, v in batch.items() if k != key}, run.model,
                               run.data)  # fmt: skip
    with pytest.raises(DataError, match=rf"batch\['{key}'\] has shape \(4, 17\)"):
        objectives.check_batch(
            objective, {**batch, key: np.zeros((4, 17), batch[key].dtype)}, run.model, run.data
        )
    with pytest.raises(DataError, match=rf"batch\['{key}'\] has dtype int64"):
        objectives.check_batch(
            objective, {**batch, key: batch[key].astype(np.int64)}, run.model, run.data
        )
    for name, bound in objective.value_bounds(run.model, run.data).items():
        for bad in (bound, -1):
            values = batch[name].copy()
            values.flat[0] = bad
            with pytest.raises(DataError, match=rf"batch\['{name}'\] has value {bad} outside"):
                objectives.check_batch(objective, {**batch, name: values}, run.model, run.data)


def test_out_of_range_ids_name_the_vocabulary():
    objective, run = tiny("gpt")
    batch = objective.synthetic_batch(run.model, run.data, 2, _rng())
    batch["target_ids"][0, 0] = 128
    with pytest.raises(DataError, match="beyond model.vocab_size=128"):
        objectives.check_batch(objective, batch, run.model, run.data)
    batch = objective.synthetic_batch(run.model, run.data, 2, _rng())
    batch["positions"][0, 0] = 32
    with pytest.raises(DataError, match="a position beyond model.max_len=32"):
        objectives.check_batch(objective, batch, run.model, run.data)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_metrics_are_weighted_by_real_targets(family):
    """Reducing the sums of two batches gives the metrics of both as one batch (BERT's loss too),
    which the mean of the two batches' losses is not: their numbers of real targets differ."""
    objective, run = tiny(family)
    module = models.build(run.model)
    rng = np.random.default_rng(5)
    a = objective.synthetic_batch(run.model, run.data, 4, rng)
    b = objective.synthetic_batch(run.model, run.data, 4, rng)
    for key in ("masked_weights", "weights", "decoder_weights"):  # few real targets left in b
        if key in b:
            b[key][:, 1:] = 0.0
    params = jax.jit(lambda key: module.init(key, **objective.model_inputs(a))["params"])(
        jax.random.key(0)
    )

    @jax.jit
    def sums(batch):
        outputs = module.apply({"params": params}, **objective.model_inputs(batch))
        return objective.loss_and_metrics(outputs, batch)

    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    reduced = objectives.reduce_metrics(objective, jax.device_get([sums(a), sums(b)]))
    whole = objectives.reduce_metrics(objective, jax.device_get([sums(both)]))
    for key, value in whole.items():
        assert reduced[key] == pytest.approx(value, rel=1e-5), key
    per_batch = [objectives.reduce_metrics(objective, [jax.device_get(sums(x))]) for x in (a, b)]
    assert abs(np.mean([m["loss"] for m in per_batch]) - whole["loss"]) > 1e-4


def test_code_outside_models_and_objectives_does_not_switch_on_the_family():
    """At most 6 places, each with a comment saying why (the contract's rule)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(("models/", "objectives/")):
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if SWITCH.search(line):
                explained = "#" in line or lines[number - 1].strip().startswith("#")
                found.append((relative, number + 1, explained))
    assert len(found) <= 6, found
    assert all(explained for *_, explained in found), found


def test_the_family_table_is_explicit():
    assert objectives.MODULES == {"bert": "mlm_nsp", "gpt": "causal_lm", "t5": "span_corruption"}
    with pytest.raises(config_lib.ConfigError, match="unknown model family 'vit'"):
        objectives.get("vit")
