"""HF conversion of scanned models: per-layer tensors are stacked on import and unstacked on export,
so a scanned model converts exactly as the unrolled one does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file

from jaxgen import models
from jaxgen.interop import hf
from jaxgen.models import scan
from tests.interop.hf.conftest import save, t5_model
from tests.interop.hf.test_names import ATOL, ROUND_TRIP


def _flat(params: dict) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(params, sep="/")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """T5 v1.1 with a 3-layer decoder over a 2-layer encoder: each stack stacks its own depth."""
    model = t5_model("v1.1")
    return save(model, tmp_path_factory.mktemp("hf_t5")), model


@pytest.mark.parametrize("fixture", ["bert_dir", "gpt_dir", "t5_dir"])
def test_scanned_conversion_equals_the_unrolled_one(fixture, request, tmp_path):
    path, _ = request.getfixturevalue(fixture)
    config, params = hf.load(path)
    scanned_config, scanned = hf.load(path, scan_layers=True)
    assert scanned_config.model == dataclasses.replace(config.model, scan_layers=True)
    want = _flat(scan.stack_layers(params, scanned_config.model))
    got = _flat(scanned)
    assert sorted(got) == sorted(want) and any("layers/" in key for key in got)
    for key, value in want.items():
        assert isinstance(got[key], np.ndarray) and got[key].dtype == np.float32, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)

    # Export: the same files as the unrolled model's.
    hf.save(config, params, tmp_path / "unrolled")
    hf.save(scanned_config, scanned, tmp_path / "scanned")
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "scanned" / name).read_text() == (
            tmp_path / "unrolled" / name
        ).read_text()
    exported = load_file(tmp_path / "scanned" / "model.safetensors")
    reference = load_file(tmp_path / "unrolled" / "model.safetensors")
    assert sorted(exported) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_scanned_gpt_gives_the_hf_logits(gpt_dir):
    path, reference = gpt_dir
    config, params = hf.load(path, scan_layers=True)
    ids = np.random.default_rng(1).integers(0, 99, (2, 12)).astype(np.int32)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    logits = jax.jit(models.build(config.model).apply)({"params": params}, ids)
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_scanned_round_trip_is_bit_identical(name, tmp_path):
    model = dict(ROUND_TRIP[name], scan_layers=True)
    rng = np.random.default_rng(len(name))
    shapes = hf.param_shapes(model)  # stacked: [L, ...] under layers/
    assert any(key.startswith(("layers/", "encoder/layers/")) for key in shapes)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    hf.save(hf.full_config(model), traverse_util.unflatten_dict(params, sep="/"), tmp_path)
    assert "scan_layers" not in json.loads((tmp_path / "config.json").read_text())
    _, loaded = hf.load(tmp_path, scan_layers=True)
    again = _flat(loaded)
    assert sorted(again) == sorted(params)
    for key, value in params.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_export_names_a_layout_mismatch(tmp_path):
    model = ROUND_TRIP["gpt"]
    shapes = hf.param_shapes(model)  # unrolled
    params = traverse_util.unflatten_dict(
        {k: np.zeros(s, np.float32) for k, s in shapes.items()}, sep="/"
    )
    with pytest.raises(hf.InteropError, match="model.scan_layers=True, but cannot unstack .*"
                                              "no 'layers' entry"):  # fmt: skip
        hf.save(dict(model, scan_layers=True), params, tmp_path)
