"""ModelConfig: unknown and other-family keys fail naming the key, family defaults fill in."""

import pytest

from jaxgen.config import ConfigError
from jaxgen.models import ModelConfig, build
from tests.models.tiny_models import COMMON


def test_config_rejects_unknown_key_with_nearest_name():
    with pytest.raises(ConfigError, match="unknown config key 'model.num_head'; did you mean "
                                          "'model.num_heads'"):  # fmt: skip
        ModelConfig.from_mapping({"family": "gpt", **COMMON, "num_head": 3})
    with pytest.raises(ConfigError, match="model.family must be one of bert, gpt, t5"):
        build({**COMMON, "family": "rnn"})


def test_config_rejects_another_familys_key():
    with pytest.raises(ConfigError, match="model.norm_position is a gpt setting; a bert model"):
        ModelConfig.from_mapping({"family": "bert", **COMMON, "norm_position": "post"})
    with pytest.raises(ConfigError, match="model.init_std is a bert/gpt setting; a t5 model"):
        ModelConfig.from_mapping({"family": "t5", **COMMON, "init_std": 1.0})


def test_config_checks_enums_and_ranges():
    with pytest.raises(ConfigError, match="model.dtype must be one of float32, bfloat16"):
        ModelConfig.from_mapping({"family": "gpt", **COMMON, "dtype": "float16"})
    with pytest.raises(ConfigError, match="model.d_model must be positive"):
        ModelConfig.from_mapping({"family": "gpt", **COMMON, "d_model": 0})
    with pytest.raises(ConfigError, match="model.num_layers expects an integer"):
        ModelConfig.from_mapping({"family": "gpt", **COMMON, "num_layers": "two"})


def test_config_family_defaults():
    assert ModelConfig.from_mapping({"family": "bert", **COMMON}).layer_norm_eps == 1e-12
    t5 = ModelConfig.from_mapping({"family": "t5", **COMMON})
    assert t5.layer_norm_eps == 1e-6 and t5.num_decoder_layers == COMMON["num_layers"]
    assert set(t5.to_dict()) == set(ModelConfig.keys_of("t5"))
    assert "init_std" not in t5.to_dict() and "norm_position" not in t5.to_dict()
