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
    c.meta = dict(name="toy")
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
    assert again == config
    assert config_lib.diff(config.to_dict(), again.to_dict()) == []
    assert json.loads((tmp_path / "config.json").read_text())["model"]["family"] == "bert"


# One misspelt key per section, in a config file (the typed sections reject it) and on the command
# line (the override finds no such key); both name the nearest valid key.
MISSPELT = {
    "model": ("num_hedas", "num_heads"),
    "data": ("max_prediction", "max_predictions"),
    "optim": ("warmup_step", "warmup_steps"),
    "train": ("batch_sise", "batch_size"),
    "mesh": ("fsdb", "fsdp"),
    "meta": ("papr", "paper"),
}


@pytest.mark.parametrize("section", list(MISSPELT))
def test_unknown_keys_in_every_section_name_the_nearest_key(section, config_file):
    wrong, right = MISSPELT[section]
    config = config_lib.load_config_file(config_file)
    config[section][wrong] = 1
    with pytest.raises(
        config_lib.ConfigError,
        match=f"unknown config key '{section}.{wrong}'; did you mean '{section}.{right}'",
    ):
        config_lib.run_config(config)
    with pytest.raises(config_lib.ConfigError, match=f"did you mean '{section}.{right}'"):
        config_lib.load_config(config_file, [f"--config.{section}.{wrong}=1"])


def test_unknown_section_is_named(config_file):
    config = config_lib.load_config_file(config_file)
    config.trian = {}
    with pytest.raises(
        config_lib.ConfigError, match="unknown config section 'trian'; did you mean"
    ):
        config_lib.run_config(config)


def test_adafactor_takes_its_own_keys_and_rejects_adamw_keys(config_file):
    run = config_lib.load_config(
        config_file,
        ["--config.optim.decay_rate=0.9", "--config.optim.name=adafactor",
         "--config.optim.momentum=0.5"],
    )  # fmt: skip
    assert isinstance(run.optim, config_lib.AdafactorConfig)
    assert (run.optim.decay_rate, run.optim.momentum) == (0.9, 0.5)
    assert run.optim.learning_rate == pytest.approx(1e-3)  # shared keys survive the switch
    assert not hasattr(run.optim, "b1")
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.b1'"):
        config_lib.load_config(config_file, ["--config.optim.name=adafactor", "optim.b1=0.8"])
    config = config_lib.load_config_file(config_file)
    config.optim.name = "adafactor"
    with pytest.raises(
        config_lib.ConfigError,
        match="optim.b1 is a setting of adamw, not of optim.name='adafactor'; adafactor takes "
        "decay_rate, epsilon",
    ):
        config_lib.run_config(config)
    config = config_lib.load_config_file(config_file)
    config.optim.decay_rate = 0.8
    with pytest.raises(config_lib.ConfigError, match="optim.decay_rate is a setting of adafactor"):
        config_lib.run_config(config)
    with pytest.raises(config_lib.ConfigError, match="optim.name must be one of adamw, adafactor"):
        config_lib.load_config(config_file, ["--config.optim.name=sgd"])


def test_phase_keys_are_data_keys(config_file):
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'data.seq_lne'"):
        config_lib.load_config(
            config_file, ['--config.train.phases=[{"fraction": 1.0, "seq_lne": 16}]']
        )


def test_saved_configs_of_earlier_versions_are_upgraded(config_file, tmp_path):
    run = config_lib.load_config(config_file)
    old = run.to_dict()
    meta = old.pop("meta")
    old.update(name=meta["name"], paper="a paper", hardware="cpu")  # catalog keys at the top
    del old["data"]["split_seed"]
    old["train"]["seed"] = 3  # held-out documents followed train.seed then
    (tmp_path / "config.json").write_text(json.dumps(old))
    again = config_lib.load_saved_config(tmp_path / "config.json")
    assert again.meta.paper == "a paper" and again.data.split_seed == 3
