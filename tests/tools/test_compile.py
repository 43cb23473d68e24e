"""`jaxgen compile`: target names, real TPU compiles of the small rows, and the failure paths."""

from __future__ import annotations

import json

import pytest

from jaxgen import cli
from jaxgen.tools import compile as aot

GIB = 2**30


@pytest.mark.parametrize(
    ("name", "topology", "devices", "chip_config", "wrap", "hbm_gib"),
    [
        ("v4-8", "v4:2x2x1", 4, "megacore", (False, False, False), 32),
        ("v4-1024", "v4:8x8x8", 512, "megacore", (True, True, True), 32),
        ("v5p-128", "v5p:4x4x4", 64, "megacore", (True, True, True), 95),
        ("v5e-256", "v5e:16x16", 256, "default", (True, True, False), 16),
        ("v5litepod-16", "v5e:4x4", 16, "default", (False, False, False), 16),
        ("v6e-64", "v6e:8x8", 64, "default", (False, False, False), 32),
        ("v3-64", "v3:4x8", 64, "default", (False, False, False), 16),
    ],
)
def test_user_names_map_to_libtpu_topologies(name, topology, devices, chip_config, wrap, hbm_gib):
    target = aot.parse_target(name)
    assert (target.platform, target.topology, target.num_devices) == ("tpu", topology, devices)
    assert (target.chip_config, target.wrap, target.hbm_bytes) == (chip_config, wrap, hbm_gib * GIB)
    assert aot.parse_target(name, num_slices=2).num_devices == 2 * devices


def test_gpu_targets_and_bad_names():
    h100 = aot.parse_target("h100:2x8")
    assert (h100.platform, h100.topology, h100.num_devices) == ("cuda", "1x2x8", 16)
    assert 79 * GIB < h100.hbm_bytes <= 80 * GIB  # from the shipped device description
    with pytest.raises(aot.CompileError, match="valid forms: v2-N"):
        aot.parse_target("tpu-8")
    with pytest.raises(aot.CompileError, match="v5e-N takes N in 1, 4, 8"):
        aot.parse_target("v5e-3")
    with pytest.raises(aot.CompileError, match="num_slices"):
        aot.parse_target("v5e-4", num_slices=0)


def test_a_missing_compiler_names_the_extra(monkeypatch):
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(aot.CompileError, match=r"pip install -e '\.\[tpu-compile\]'"):
        aot.require_extra("tpu")
    with pytest.raises(aot.CompileError, match=r"gpu-compile"):
        aot.require_extra("cuda")


def _compile(capsys, *argv: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compile", *argv, "--json"])
    return exit_.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_small_rows_compile_for_v5e_with_the_flash_kernel(capsys, family):
    code, report = _compile(
        capsys, "--config", f"configs/{family}.py:smoke", "--topology", "v5e-4",
        "--config.model.attention=flash",
    )  # fmt: skip
    assert code == 0 and report["fits"] and report["error"] is None
    assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
    assert [s["step"] for s in report["steps"]] == ["train", "eval"]
    for step in report["steps"]:
        assert step["error"] is None and step["argument_bytes"] > 0 and step["flops"] > 0
        assert 0 < step["total_bytes"] < report["hbm_bytes"]
    assert report["headroom_bytes"] == report["hbm_bytes"] - report["peak_bytes"]


def test_a_fine_tuning_row_with_lora_compiles_for_v5e(capsys):
    """The span head and LoRA's adapters (frozen base, trained adapters and head) lower for TPU."""
    code, report = _compile(
        capsys, "--config", "configs/finetune.py:squad@smoke", "--topology", "v5e-4",
        "--config.lora.rank=4",
    )  # fmt: skip
    assert code == 0 and report["fits"] and report["error"] is None
    assert [s["step"] for s in report["steps"]] == ["train", "eval"]
    assert all(step["error"] is None and step["flops"] > 0 for step in report["steps"])


def test_a_row_that_does_not_fit_exits_non_zero_naming_hbm(capsys):
    code, report = _compile(
        capsys, "--config", "configs/bert.py:smoke", "--topology", "v5e-1",
        "--config.train.batch_size=65536",
    )  # fmt: skip
    assert code == 1 and not report["fits"]
    assert (
        "configs/bert.py:smoke on v5e-1 (HBM 16.00 GiB per device) does not fit" in report["error"]
    )
    assert "RESOURCE_EXHAUSTED" in report["error"]
