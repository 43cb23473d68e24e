"""The schema every config file shares: each section as a ConfigDict with every key of its typed
section (`jaxgen.config`, `jaxgen.models.config`, the objective's `Data`), defaults from there.

A family file passes only the values its rows set; the typed sections hold the defaults, reject
unknown keys naming the nearest one, and check the values when the config is loaded. Config files
load this file with `jaxgen.config.load_python_file` (configs/ is not a package).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxgen import config as config_lib
from jaxgen import objectives
from jaxgen.models.config import ModelConfig


def _section(cls: type, keys: tuple[str, ...], values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A ConfigDict of `keys` with `cls`'s defaults updated by `values`, checked by `cls`."""
    for key in values:
        if key not in keys:
            cls.reject_key(key)
    defaults = {f: getattr(cls, f) for f in keys if hasattr(cls, f)}
    section = ml_collections.ConfigDict({**defaults, **values})
    cls.from_mapping(section)  # a wrong type or value fails here, in the config file
    return section


def model(family: str, **values: Any) -> ml_collections.ConfigDict:
    """`config.model` of a family: its keys only (a BERT row has no GPT keys)."""
    return _section(ModelConfig, ModelConfig.keys_of(family), {"family": family, **values})


def data(family: str, **values: Any) -> ml_collections.ConfigDict:
    """`config.data`: the shared keys and the family objective's own."""
    cls = objectives.get(family).Data
    return _section(cls, cls.keys(), values)


def task_data(family: str, **values: Any) -> ml_collections.ConfigDict:
    """`config.data` of a fine-tuning run: the task objective's keys (values must name the task)."""
    cls = objectives.for_data(family, values).Data
    return _section(cls, cls.keys(), values)


def optim(name: str, **values: Any) -> ml_collections.ConfigDict:
    """`config.optim` of one optimizer (adamw or adafactor): the shared keys and its own."""
    config_lib.choice("optim.name", name, config_lib.OPTIMIZERS)
    cls = config_lib.OPTIMIZERS[name]
    return _section(cls, cls.keys(), {"name": name, **values})


def train(**values: Any) -> ml_collections.ConfigDict:
    """`config.train`; phases are a list of dicts."""
    section = _section(config_lib.TrainConfig, config_lib.TrainConfig.keys(), values)
    with section.ignore_type():
        section.phases = [dict(p) for p in values.get("phases", ())]
    return section


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """`config.mesh`: the (data, fsdp, tensor) axis sizes; -1 takes the remaining devices."""
    return _section(config_lib.MeshConfig, config_lib.MeshConfig.keys(), dict(
        data=data, fsdp=fsdp, tensor=tensor))  # fmt: skip


def meta(**values: Any) -> ml_collections.ConfigDict:
    """`config.meta`: what the row is; never changes a run."""
    return _section(config_lib.MetaConfig, config_lib.MetaConfig.keys(), values)


def lora(**values: Any) -> ml_collections.ConfigDict:
    """`config.lora`: low-rank adapters; rank 0 (the default) trains every parameter."""
    return _section(config_lib.LoraConfig, config_lib.LoraConfig.keys(), values)


def config(**sections: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The whole config from its sections (model, data, optim, train, mesh, meta, lora; lora
    defaults to off)."""
    for name in sections:
        if name not in config_lib.SECTIONS:
            raise config_lib.ConfigError(
                f"unknown config section {name!r}{config_lib.nearest(name, config_lib.SECTIONS)}"
            )
    sections.setdefault("lora", lora())
    return ml_collections.ConfigDict(sections)
