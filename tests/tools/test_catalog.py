"""`jaxgen configs list|show` (jaxgen.tools.catalog): formats, names, counts, memory estimates."""

import json
import os

import pytest

from jaxgen import objectives
from jaxgen.config import REPO_ROOT
from jaxgen.tools import catalog

JSON_KEYS = {"name", "family", "num_layers", "d_model", "num_heads", "head_dim", "d_ff",
             "vocab_size", "max_len", "params", "published_params", "batch_size", "num_steps",
             "learning_rate"}  # fmt: skip


def test_names_are_config_specs():
    names = catalog.list_names()
    assert "configs/bert.py:base" in names and "configs/gpt.py:gpt3-175b" in names
    assert "configs/t5.py:t5-base,final" in names and "configs/t5.py:t5.1.1-xxl" in names
    assert all((REPO_ROOT / name.partition(":")[0]).is_file() for name in names)
    assert catalog.parse_name("bert.py:large") == ("bert", "large")
    assert catalog.parse_name("t5:t5-base,final") == ("t5", "t5-base,final")
    assert catalog.parse_name("configs/gpt.py") == ("gpt", "smoke")
    with pytest.raises(ValueError, match="configs/bert.py:base"):
        catalog.parse_name("vit.py:base")


def test_list_json_has_the_issue_keys():
    entries = json.loads(catalog.list_configs("bert", "json"))
    assert [e["name"] for e in entries] == catalog.list_names("bert")
    assert all(JSON_KEYS <= set(e) for e in entries)
    base = next(e for e in entries if e["name"] == "configs/bert.py:base")
    assert isinstance(base["params"], int) and base["params"] == pytest.approx(110e6, rel=0.03)
    assert (base["num_layers"], base["d_model"], base["batch_size"]) == (12, 768, 256)


def test_list_json_t5_counts_layers_per_stack():
    entries = json.loads(catalog.list_configs("t5", "json"))
    small = next(e for e in entries if e["name"] == "configs/t5.py:t5-small")
    assert small["num_layers"] == 6 and small["num_decoder_layers"] == 6


def test_list_table_and_markdown():
    table = catalog.list_configs("gpt").splitlines()
    assert table[0].split()[:3] == ["name", "layers", "d_model"]
    assert len(table) == 1 + len(catalog.list_names("gpt"))
    row = next(line for line in table if line.startswith("configs/gpt.py:gpt3-175b "))
    assert "175B" in row and "1536x2048" in row
    markdown = catalog.list_configs("gpt", "markdown").splitlines()
    assert markdown[0].startswith("| name | layers |") and markdown[1].startswith("|---|")
    assert len(markdown) == 2 + len(catalog.list_names("gpt"))
    with pytest.raises(ValueError, match="valid: table, json, markdown"):
        catalog.list_configs(None, "yaml")


def test_show_prints_config_params_and_memory():
    text = catalog.show_config("gpt.py:gpt3-175b")
    assert text.startswith("# configs/gpt.py:gpt3-175b")
    assert "num_layers: 96" in text and "batch_ramp_tokens" in text
    assert "params: 174," in text and "published 175B" in text
    for label in ("params (float32)", "optimizer state (adamw)", "activations", "HBM per device"):
        assert label in text
    assert "512 devices" in text  # v4-1024: 512 chips
    smoke = catalog.show_config("bert:smoke")
    assert "activations" in smoke and "HBM" not in smoke


def test_hardware_devices():
    assert catalog.hardware_devices("v3-64") == (64, 16 * 2**30)
    assert catalog.hardware_devices("v4-1024") == (512, 32 * 2**30)
    assert catalog.hardware_devices("v5litepod-256") == (256, 16 * 2**30)
    assert catalog.hardware_devices("cpu") == (1, None)


@pytest.mark.parametrize(
    "name",
    ["configs/bert.py:large", "configs/gpt.py:gpt2-xl", "configs/gpt.py:gpt3-13b",
     "configs/gpt.py:gpt3-175b", "configs/t5.py:t5-11b,final", "configs/t5.py:t5.1.1-xxl"],
)  # fmt: skip
def test_large_rows_fit_their_slice(name):
    config = catalog.load_run(name)
    estimate = catalog.memory_estimate(config)
    assert (
        estimate["devices"]
        == estimate["mesh"]["data"] * estimate["mesh"]["fsdp"] * estimate["mesh"]["tensor"]
    )
    assert config.train.batch_size % (config.train.grad_accum * estimate["mesh"]["data"]
                                      * estimate["mesh"]["fsdp"]) == 0  # fmt: skip
    assert estimate["total_bytes"] <= 0.75 * estimate["hbm_bytes"], estimate


def test_memory_estimate_shards_params():
    config = catalog.load_run("configs/gpt.py:gpt3-175b")
    estimate = catalog.memory_estimate(config)
    params = catalog.count_params(config.model)
    # Fully sharded over fsdp x tensor = 512, except leaves a mesh axis does not divide (the 50,257
    # vocab over tensor, norms and biases), which cost a little more.
    ideal = params * 4 / 512
    assert ideal <= estimate["params_bytes"] <= 1.1 * ideal
    assert estimate["optimizer_bytes"] == pytest.approx(2 * estimate["params_bytes"], rel=1e-6)


def test_configs_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert catalog.configs_dir() == REPO_ROOT / "configs"
    (tmp_path / "configs").mkdir()
    for family in objectives.FAMILIES:  # a local configs/ with all three files takes precedence
        os.symlink(REPO_ROOT / "configs" / f"{family}.py", tmp_path / "configs" / f"{family}.py")
    assert catalog.configs_dir() == tmp_path / "configs"
