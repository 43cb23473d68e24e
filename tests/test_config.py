"""Config loading, command-line overrides and their errors."""

import json

import pytest

from jaxgen import config as config_lib

CONFIG_FILE = """
import ml_collections

def get_config(arg="smoke"):
    if arg not in ("smoke", "base"):
        raise ValueError(f"unknown row {arg!r}; valid rows: smoke, base")
    c = ml_collections.ConfigDict()
    c.model = dict(family="bert", vocab_size=100, num_layers=2, d_model=32, num_heads=2,
                   head_dim=16, d_ff=64, max_len=64, dropout=0.1, attention_dropout=0.1,
                   dtype="float32", attention="xla", type_vocab_size=2)
    c.data = dict(corpus="builtin", seq_len=32, max_predictions=5, lowercase=True)
    c.optim = dict(name="adamw", learning_rate=1e-3, schedule="linear", warmup_steps=10,
                   weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)
    c.train = dict(batch_size=8, num_steps=10 if arg == "smoke" else 1000, grad_accum=1,
                   eval_every=5, log_every=5, checkpoint_every=5, seed=0, phases=[])
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(CONFIG_FILE)
    return str(path)


def test_load_row_and_overrides(config_file):
    config = config_lib.load_config(
        f"{config_file}:base",
        [
            "--config.optim.learning_rate=3e-4",
            "--config.model.num_layers=4",
            "data.lowercase=false",
        ],
    )
    assert config.train.num_steps == 1000
    assert config.optim.learning_rate == pytest.approx(3e-4)
    assert config.model.num_layers == 4 and isinstance(config.model.num_layers, int)
    assert config.data.lowercase is False


def test_misspelt_key_names_the_nearest_valid_key(config_file):
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optim.learning_rate'"):
        config_lib.load_config(config_file, ["--config.optim.learning_rat=1e-4"])
    with pytest.raises(config_lib.ConfigError, match="did you mean 'model.num_layers'"):
        config_lib.load_config(config_file, ["--config.modle.num_layers=2"])


def test_bad_values_are_rejected(config_file):
    with pytest.raises(config_lib.ConfigError, match="model.num_layers expects an integer"):
        config_lib.load_config(config_file, ["--config.model.num_layers=two"])
    with pytest.raises(config_lib.ConfigError, match="true/false"):
        config_lib.load_config(config_file, ["--config.data.lowercase=maybe"])
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.load_config(config_file, ["--config.model.dtype=float64"])
    with pytest.raises(config_lib.ConfigError, match="exceeds model.max_len"):
        config_lib.load_config(config_file, ["--config.data.seq_len=128"])
    with pytest.raises(config_lib.ConfigError, match="must look like"):
        config_lib.load_config(config_file, ["--config.model.num_layers"])


def test_list_overrides_and_phases(config_file):
    config = config_lib.load_config(
        config_file, ['--config.train.phases=[{"fraction": 0.9, "seq_len": 16}, {"fraction": 0.1}]']
    )
    assert config.train.phases[0]["seq_len"] == 16
    with pytest.raises(config_lib.ConfigError, match="sum to 1"):
        config_lib.load_config(config_file, ['--config.train.phases=[{"fraction": 0.5}]'])


def test_unknown_row_and_missing_file(config_file):
    with pytest.raises(ValueError, match="valid rows"):
        config_lib.load_config(f"{config_file}:huge")
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load_config("configs/nope.py:smoke")


def test_save_and_reload_round_trip(config_file, tmp_path):
    config = config_lib.load_config(config_file)
    config_lib.save_config(config, tmp_path / "config.json")
    again = config_lib.load_saved_config(tmp_path / "config.json")
    assert config_lib.diff(config_lib.to_dict(config), config_lib.to_dict(again)) == []
    assert json.loads((tmp_path / "config.json").read_text())["model"]["family"] == "bert"
