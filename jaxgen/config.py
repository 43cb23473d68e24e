"""Configs: load `configs/<family>.py:<row>`, apply overrides, validate, save and reload as JSON.

Config enters at the CLI boundary once: everything downstream receives plain values or sub-configs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

SECTIONS = ("model", "data", "optim", "train", "mesh")
FAMILIES = ("bert", "gpt", "t5")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config that cannot be loaded, overridden or used; the message says what to change."""


def resolve_config_path(path: str) -> Path:
    """Finds a config file: as given, else relative to the repository that holds this package."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    in_repo = REPO_ROOT / path
    if in_repo.is_file():
        return in_repo
    raise ConfigError(f"config file {path!r} not found (looked in {os.getcwd()} and {REPO_ROOT})")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of `path.py:arg` (arg optional) and returns the ConfigDict."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"--config must look like configs/bert.py:smoke; got {spec!r}")
    file = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"jaxgen_config_{file.stem}", file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}:get_config must return an ml_collections.ConfigDict")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of a config as a dotted path, e.g. 'optim.learning_rate'."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def _unknown_key_error(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    valid = flat_keys(config)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:
        # A misspelt leaf under a correct section is matched on the leaf name alone.
        section = key.rpartition(".")[0]
        leaves = [k for k in valid if k.startswith(section + ".")] or valid
        close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    others = f" (other close keys: {', '.join(close[1:])})" if len(close) > 1 else ""
    return ConfigError(f"unknown config key {key!r}{hint}{others}")


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} expects true/false, got {text!r}")
    if isinstance(current, int):
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError as err:
            raise ConfigError(f"{key} expects an integer, got {text!r}") from err
        if float(value) != int(value):
            raise ConfigError(f"{key} expects an integer, got {text!r}")
        return int(value)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError as err:
            raise ConfigError(f"{key} expects a number, got {text!r}") from err
    if isinstance(current, (list, tuple, dict)) or current is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        return value
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `a.b=v` (or `--config.a.b=v`) strings in place; unknown keys name the closest key."""
    for override in overrides:
        text = override.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(
                f"override {override!r} must look like --config.optim.learning_rate=3e-4"
            )
        key, _, raw = text.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise _unknown_key_error(key, config)
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise _unknown_key_error(key, config)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"{key} is a section; override one of its keys, e.g. {key}.<name>")
        value = _parse_value(raw, node[leaf], key)
        with node.ignore_type():
            node[leaf] = value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values a run depends on; raises ConfigError naming the key and what it must be."""
    for section in SECTIONS:
        _require(section in config, f"config has no '{section}' section")
    model, data, train, optim = config.model, config.data, config.train, config.optim
    _require(
        model.family in FAMILIES, f"model.family must be one of {FAMILIES}, got {model.family!r}"
    )
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff", "max_len"):
        _require(int(model[key]) > 0, f"model.{key} must be positive, got {model[key]}")
    _require(
        model.dtype in ("float32", "bfloat16"),
        f"model.dtype must be float32 or bfloat16, got {model.dtype!r}",
    )
    _require(
        model.attention in ("xla", "flash", "auto"),
        f"model.attention must be xla, flash or auto, got {model.attention!r}",
    )
    for key in ("dropout", "attention_dropout"):
        _require(0.0 <= model[key] < 1.0, f"model.{key} must be in [0, 1), got {model[key]}")
    _require(data.seq_len > 0, f"data.seq_len must be positive, got {data.seq_len}")
    if model.family != "t5":
        _require(
            data.seq_len <= model.max_len,
            f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
        )
    for phase in train.phases:
        _require(isinstance(phase, Mapping), f"train.phases entries must be dicts, got {phase!r}")
        _require("fraction" in phase, f"train.phases entry {dict(phase)} needs a 'fraction'")
        if model.family != "t5" and "seq_len" in phase:
            _require(
                phase["seq_len"] <= model.max_len,
                f"train.phases seq_len={phase['seq_len']} exceeds model.max_len={model.max_len}",
            )
    if train.phases:
        total = sum(float(p["fraction"]) for p in train.phases)
        _require(abs(total - 1.0) < 1e-6, f"train.phases fractions must sum to 1, got {total}")
    for key in (
        "batch_size",
        "num_steps",
        "grad_accum",
        "log_every",
        "eval_every",
        "checkpoint_every",
    ):
        _require(int(train[key]) > 0, f"train.{key} must be positive, got {train[key]}")
    _require(
        train.batch_size % train.grad_accum == 0,
        f"train.batch_size={train.batch_size} must be divisible by "
        f"train.grad_accum={train.grad_accum}",
    )
    _require(
        optim.learning_rate > 0, f"optim.learning_rate must be positive, got {optim.learning_rate}"
    )
    _require(
        optim.name in ("adamw", "adafactor"),
        f"optim.name must be adamw or adafactor, got {optim.name!r}",
    )
    for axis in ("data", "fsdp", "tensor"):
        size = int(config.mesh[axis])
        _require(size == -1 or size > 0, f"mesh.{axis} must be positive or -1, got {size}")


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py:arg`, applies overrides, validates, and returns the resolved config."""
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    validate(config)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready plain dict of the config."""
    return json.loads(config.to_json_best_effort())


def save_config(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Writes the resolved config as indented JSON, atomically: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_saved_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads a config.json written by `save_config`."""
    return ml_collections.ConfigDict(json.loads(Path(path).read_text()))


def with_saved_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict (from `to_dict`) completed with keys added since it was written, set to
    what that run used."""
    data = saved.setdefault("data", {})
    if "split_seed" not in data:
        # Runs saved before data.split_seed existed drew their held-out documents with train.seed.
        data["split_seed"] = saved.get("train", {}).get("seed", 0)
    return saved


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed.extend(diff(a, b, f"{prefix}{key}."))
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
