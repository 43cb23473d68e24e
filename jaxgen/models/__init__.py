"""The three model families; `build(model_config)` returns the Flax module named by `family`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jaxgen.config import LoraConfig
from jaxgen.models.bert import Bert
from jaxgen.models.config import ModelConfig
from jaxgen.models.gpt import Gpt
from jaxgen.models.t5 import T5

__all__ = ["Bert", "Gpt", "ModelConfig", "T5", "build"]

FAMILIES: dict[str, type[nn.Module]] = {"bert": Bert, "gpt": Gpt, "t5": T5}


def build(
    model_config: Mapping[str, Any] | ModelConfig, lora: LoraConfig | None = None
) -> nn.Module:
    """Returns the Bert, Gpt or T5 module for `config.model` (a ConfigDict, dict or ModelConfig),
    with low-rank adapters when `lora` has a rank."""
    config = ModelConfig.from_mapping(model_config)
    if lora is not None and lora.rank > 0:
        config = dataclasses.replace(config, lora=lora)
    return FAMILIES[config.family](config)
