"""Configs: load `configs/<family>.py:<row>`, apply overrides, check every section, save and reload.

A config file builds an `ml_collections.ConfigDict` (`configs/common.py` holds the shared
schema). It enters jaxgen once, at the CLI boundary, where `run_config` turns it into typed,
frozen sections: `ModelConfig` (`jaxgen.models.config`), the family's data settings (the
objective module's `Data`), `AdamWConfig` or `AdafactorConfig`, `TrainConfig`, `MeshConfig` and
`MetaConfig`. Each section holds its defaults, rejects unknown keys naming the nearest one and
checks its enums, so nothing downstream restates a default or sees a ConfigDict.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import ml_collections

SECTIONS = ("model", "data", "optim", "train", "mesh", "meta", "lora")
REPO_ROOT = Path(__file__).resolve().parent.parent

S = TypeVar("S", bound="Section")


class ConfigError(ValueError):
    """A config that cannot be loaded, overridden or used; the message says what to change."""


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)


def nearest(key: str, valid: Iterable[str]) -> str:
    """'; did you mean X?' for the closest of `valid` to `key` ('' when none is close)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        # A misspelt leaf under a correct section is matched on the leaf name alone.
        section, _, leaf = key.rpartition(".")
        leaves = {v.rpartition(".")[2]: v for v in valid if v.startswith(section + ".")}
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.0)
        close = [leaves[match[0]]] if match else []
    return f"; did you mean {close[0]!r}?" if close else ""


# ------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Section:
    """A typed, frozen config section; `from_mapping` is the only way a ConfigDict gets in."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The section's key names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls: type[S], mapping: Mapping[str, Any]) -> S:
        """The section from a ConfigDict or dict; unknown keys and wrong types name the key."""
        if isinstance(mapping, cls):
            return mapping
        items = dict(mapping.items())
        valid = cls.keys()
        for key in items:
            if key not in valid:
                cls.reject_key(key)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {k: _coerce(f"{cls.SECTION}.{k}", v, types[k]) for k, v in items.items()}
        return cls(**values)

    @classmethod
    def reject_key(cls, key: str) -> None:
        """Raises the ConfigError for a key this section does not have."""
        where = f"{cls.SECTION}.{key}"
        hint = nearest(where, [f"{cls.SECTION}.{k}" for k in cls.keys()])
        raise ConfigError(f"unknown config key {where!r}{hint}")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError for values out of range (overridden per section)."""

    def to_dict(self) -> dict[str, Any]:
        """The section as a JSON-ready dict."""
        return {k: _plain(getattr(self, k)) for k in self.keys()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """A config value as its field's type (ints from 1e9-style floats, lists as tuples)."""
    kind = annotation.split("|")[0].strip().split("[")[0]
    if value is None and "None" in annotation:
        return None
    if kind == "bool":
        require(isinstance(value, bool), f"{key} expects true or false, got {value!r}")
    elif kind == "int":
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value),
            f"{key} expects an integer, got {value!r}",
        )
        return int(value)
    elif kind == "float":
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{key} expects a number, got {value!r}",
        )
        return float(value)
    elif kind == "str":
        require(isinstance(value, str), f"{key} expects a string, got {value!r}")
    elif kind == "tuple":
        require(isinstance(value, (list, tuple)), f"{key} expects a list, got {value!r}")
        return tuple(dict(v) if isinstance(v, Mapping) else v for v in value)
    return value


def choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ConfigError unless `value` is one of `choices`."""
    choices = tuple(choices)
    require(value in choices, f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def positive(section: Section, *keys: str) -> None:
    """Raises ConfigError unless every named key of `section` is > 0."""
    for key in keys:
        value = getattr(section, key)
        require(value > 0, f"{section.SECTION}.{key} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Settings every family's data shares; each objective's `Data` adds its own.

    corpus: 'builtin', text/JSONL files, directories or globs (local or gs://), or a directory made
    by `jaxgen prepare`; anything but a prepared directory is prepared into the cache on first use.
    tokenizer: wordpiece, bpe or sentencepiece. vocab_path: '' trains a vocabulary of
    model.vocab_size on a sample of the train split. seq_len: tokens per example (T5: the encoder
    length). Held out for evaluation: the documents whose hash (keyed by split_seed) falls in the
    first eval_fraction of the hash space, or the eval_documents lowest hashes when that fraction
    holds fewer (eval_fraction 0: exactly eval_documents). cache_dir: '' caches prepared corpora in
    the workdir.
    """

    SECTION: ClassVar[str] = "data"
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("wordpiece", "bpe", "sentencepiece")

    corpus: str = "builtin"
    tokenizer: str = "wordpiece"
    vocab_path: str = ""
    lowercase: bool = False
    seq_len: int = 128
    eval_fraction: float = 0.1
    eval_documents: int = 1
    split_seed: int = 0
    cache_dir: str = ""

    def check(self) -> None:
        """Enum and range checks."""
        choice("data.tokenizer", self.tokenizer, self.TOKENIZERS)
        positive(self, "seq_len")
        require(
            0.0 <= self.eval_fraction < 1.0,
            f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        require(
            self.eval_documents >= 0,
            f"data.eval_documents must be >= 0, got {self.eval_documents}",
        )
        require(
            self.eval_fraction > 0 or self.eval_documents > 0,
            "data.eval_fraction and data.eval_documents are both 0: there is no eval split",
        )


SCHEDULES = ("linear", "cosine", "rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    """What every optimizer shares: the learning-rate schedule, weight decay and clipping.

    schedule: linear warmup over warmup_steps, then `linear` (to final_lr_fraction of the peak over
    decay_steps, 0 = train.num_steps), `cosine` (likewise), `rsqrt` (T5: the peak held for
    warmup_steps, then 1/sqrt(step)) or `constant`. warmup_ratio: warmup as a fraction of
    train.num_steps instead (BERT fine-tuning's 0.1; set one of the two). clip_norm: global
    gradient norm (0 = off).
    """

    SECTION: ClassVar[str] = "optim"

    name: str = "adamw"
    learning_rate: float = 1e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    decay_steps: int = 0
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float = 0.0

    def check(self) -> None:
        """Enum and range checks."""
        choice("optim.name", self.name, OPTIMIZERS)
        require(
            type(self) is OptimConfig or OPTIMIZERS[self.name] is type(self),
            f"optim.name={self.name!r} does not name a {type(self).__name__}",
        )
        choice("optim.schedule", self.schedule, SCHEDULES)
        positive(self, "learning_rate")
        for key in ("warmup_steps", "decay_steps", "weight_decay", "clip_norm"):
            value = getattr(self, key)
            require(value >= 0, f"optim.{key} must be >= 0, got {value}")
        require(
            0.0 <= self.warmup_ratio < 1.0,
            f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
        )
        require(
            not (self.warmup_ratio and self.warmup_steps),
            f"optim.warmup_steps={self.warmup_steps} and optim.warmup_ratio="
            f"{self.warmup_ratio} are both set; keep one",
        )
        require(
            0.0 <= self.final_lr_fraction <= 1.0,
            f"optim.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
        )


@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimConfig):
    """Adam with decoupled weight decay (biases and norm gains not decayed): b1, b2, eps."""

    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def check(self) -> None:
        """Betas in [0, 1), eps > 0."""
        super().check()
        for key in ("b1", "b2"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"optim.{key} must be in [0, 1), got {value}")
        positive(self, "eps")


@dataclasses.dataclass(frozen=True)
class AdafactorConfig(OptimConfig):
    """Adafactor (Shazeer & Stern 2018) as T5 trains with it.

    decay_rate: exponent of the second-moment decay 1 - (step + 1)^-decay_rate (T5: 0.8).
    epsilon: added to squared gradients (T5: 1e-30). clipping_threshold: update clipping by RMS
    (T5: 1.0; 0 = off). factored: factored second moments for matrices whose two largest dims are at
    least min_dim_size_to_factor. momentum: first-moment decay (0 = none, as T5).
    multiply_by_parameter_scale: updates scaled by the parameter's RMS (T5: on). The learning rate
    always comes from `optim.schedule` (Adafactor's own "relative step" is never used; T5's
    1/sqrt(step) is the `rsqrt` schedule).
    """

    name: str = "adafactor"
    decay_rate: float = 0.8
    epsilon: float = 1e-30
    clipping_threshold: float = 1.0
    factored: bool = True
    min_dim_size_to_factor: int = 128
    momentum: float = 0.0
    multiply_by_parameter_scale: bool = True

    def check(self) -> None:
        """Ranges of the Adafactor settings."""
        super().check()
        positive(self, "decay_rate", "epsilon", "min_dim_size_to_factor")
        require(
            self.clipping_threshold >= 0,
            f"optim.clipping_threshold must be >= 0, got {self.clipping_threshold}",
        )
        require(
            0.0 <= self.momentum < 1.0, f"optim.momentum must be in [0, 1), got {self.momentum}"
        )


OPTIMIZERS: dict[str, type[OptimConfig]] = {"adamw": AdamWConfig, "adafactor": AdafactorConfig}


def optim_config(mapping: Mapping[str, Any]) -> OptimConfig:
    """The optimizer section named by `mapping['name']`; another optimizer's keys are errors."""
    items = dict(mapping.items())
    name = items.get("name", OptimConfig.name)
    choice("optim.name", name, OPTIMIZERS)
    cls = OPTIMIZERS[name]
    for key in items:
        if key in cls.keys():
            continue
        owners = [other for other, c in OPTIMIZERS.items() if key in c.keys()]
        if owners:
            own = [k for k in cls.keys() if k not in OptimConfig.keys()]
            raise ConfigError(
                f"optim.{key} is a setting of {' and '.join(owners)}, not of optim.name={name!r}; "
                f"{name} takes {', '.join(own)}"
            )
        cls.reject_key(key)
    return cls.from_mapping(items)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The trainer's settings.

    batch_size: sequences in a global batch (all processes and micro-batches together); grad_accum
    micro-batches per step. phases: [{'fraction': f, <data key>: value, ...}], consecutive parts of
    the steps with their own data settings (BERT: seq_len and max_predictions). Batch ramp (GPT-3):
    the global batch grows from batch_ramp_start_tokens to batch_size x seq_len over the first
    batch_ramp_tokens tokens in batch_ramp_stages equal steps (0 tokens = no ramp).
    z_loss: coefficient of log(Z)^2. init_from: a workdir whose parameters start the run.
    epochs (fine-tuning): the budget as passes over the task's train split (num_steps then
    follows from its size: int(examples / batch_size * epochs)); 0 keeps num_steps.
    resume_damaged: when the newest checkpoint cannot be read, move it to checkpoints_damaged/
    and resume from the newest one that can (False: stop with the error).
    """

    SECTION: ClassVar[str] = "train"

    batch_size: int = 32
    num_steps: int = 1000
    grad_accum: int = 1
    eval_every: int = 100
    eval_steps: int = 4
    log_every: int = 20
    checkpoint_every: int = 200
    max_to_keep: int = 3
    keep_best: bool = False
    seed: int = 0
    phases: tuple[dict[str, Any], ...] = ()
    batch_ramp_tokens: int = 0
    batch_ramp_start_tokens: int = 0
    batch_ramp_stages: int = 8
    skip_nonfinite_or_spike: bool = False
    z_loss: float = 0.0
    init_from: str = ""
    resume_damaged: bool = True
    epochs: float = 0.0

    def check(self) -> None:
        """Positive counts, divisible batches, phases that cover the steps once."""
        positive(self, "batch_size", "num_steps", "grad_accum", "eval_every", "eval_steps")
        positive(self, "log_every", "checkpoint_every", "max_to_keep", "batch_ramp_stages")
        require(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size={self.batch_size} must be divisible by "
            f"train.grad_accum={self.grad_accum}",
        )
        for key in ("seed", "batch_ramp_tokens", "batch_ramp_start_tokens", "z_loss", "epochs"):
            value = getattr(self, key)
            require(value >= 0, f"train.{key} must be >= 0, got {value}")
        require(
            bool(self.batch_ramp_tokens) == bool(self.batch_ramp_start_tokens),
            "train.batch_ramp_tokens and train.batch_ramp_start_tokens are set together "
            f"(got {self.batch_ramp_tokens} and {self.batch_ramp_start_tokens})",
        )
        for phase in self.phases:
            require(
                isinstance(phase, Mapping), f"train.phases entries must be dicts, got {phase!r}"
            )
            require("fraction" in phase, f"train.phases entry {dict(phase)} needs a 'fraction'")
        if self.phases:
            total = sum(float(p["fraction"]) for p in self.phases)
            require(abs(total - 1.0) < 1e-6, f"train.phases fractions must sum to 1, got {total}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1: the rest."""

    SECTION: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def check(self) -> None:
        """Each size positive or -1."""
        for axis in ("data", "fsdp", "tensor"):
            size = getattr(self, axis)
            require(size == -1 or size > 0, f"mesh.{axis} must be positive or -1, got {size}")


@dataclasses.dataclass(frozen=True)
class MetaConfig(Section):
    """What the row is and what it was sized for; never changes a run.

    name: the `--config` spec. paper: the source of the recipe. published_params /
    released_params: the paper's and the released checkpoint's counts (0 = none). hardware: the
    TPU slice the mesh, dtype and remat were sized for ('cpu' for smoke rows). printed_num_heads:
    a head count the paper prints where the row must differ (0 = none). recipe: T5's §3.1 or §3.7.
    """

    SECTION: ClassVar[str] = "meta"

    name: str = ""
    paper: str = ""
    published_params: int = 0
    released_params: int = 0
    hardware: str = "cpu"
    printed_num_heads: int = 0
    recipe: str = ""


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """Low-rank adapters (Hu et al. 2021) on the dense kernels named in `targets`.

    rank: 0 trains every parameter (no adapters); r > 0 adds `lora_a [*in, r]` (uniform, as peft's
    Kaiming init) and `lora_b [r, *out]` (zeros) beside each targeted kernel, adds
    `alpha / rank * dropout(x) @ lora_a @ lora_b` to its output, and trains only the adapters.
    targets: Dense module names (attention: query key value out; MLP: wi wi_0 wi_1 wo), whatever
    the kernel's rank (jaxgen's `[D, N, H]` projections included). dropout: on the adapters' input.
    """

    SECTION: ClassVar[str] = "lora"
    TARGETS: ClassVar[tuple[str, ...]] = (
        "query",
        "key",
        "value",
        "out",
        "wi",
        "wi_0",
        "wi_1",
        "wo",
    )

    rank: int = 0
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def check(self) -> None:
        """A non-negative rank, known targets, a dropout rate in [0, 1)."""
        require(self.rank >= 0, f"lora.rank must be 0 (off) or positive, got {self.rank}")
        require(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(bool(self.targets), "lora.targets is empty: name the Dense modules to adapt")
        for target in self.targets:
            choice("lora.targets entry", target, self.TARGETS)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the adapters' output."""
        return self.alpha / self.rank


# ------------------------------------------------------------------------------------ run config


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every section of a run, typed; what `jaxgen train` hands to the library."""

    model: Any  # jaxgen.models.config.ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: MeshConfig
    meta: MetaConfig
    lora: LoraConfig = LoraConfig()

    @property
    def family(self) -> str:
        """bert, gpt or t5."""
        return self.model.family

    def phase_data(self, phase: Mapping[str, Any]) -> DataConfig:
        """The data settings of one `train.phases` entry (its keys other than 'fraction')."""
        overrides = {k: v for k, v in phase.items() if k != "fraction"}
        for key in overrides:
            if key not in self.data.keys():
                type(self.data).reject_key(key)
        values = {**self.data.to_dict(), **overrides}
        return type(self.data).from_mapping(values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every section."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}


def run_config(config: Mapping[str, Any]) -> RunConfig:
    """Typed sections of a ConfigDict or dict; raises ConfigError naming the first bad key."""
    from jaxgen import objectives
    from jaxgen.models.config import ModelConfig

    for key in config:
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section {key!r}{nearest(key, SECTIONS)}")
    for key in SECTIONS:
        # lora is optional: a config without it trains every parameter.
        require(key in config or key == "lora", f"config has no '{key}' section")
    model = ModelConfig.from_mapping(config["model"])
    objective = objectives.for_data(model.family, config["data"])
    run = RunConfig(
        model=model,
        data=objective.Data.from_mapping(config["data"]),
        optim=optim_config(config["optim"]),
        train=TrainConfig.from_mapping(config["train"]),
        mesh=MeshConfig.from_mapping(config["mesh"]),
        meta=MetaConfig.from_mapping(config["meta"]),
        lora=LoraConfig.from_mapping(config.get("lora", {})),
    )
    if objectives.is_task(run):
        require(
            not run.train.phases and not run.train.batch_ramp_tokens,
            "train.phases and the batch ramp are pretraining settings; a fine-tuning run "
            f"(data.task={run.data.task!r}) trains one data setting at one batch size",
        )
        require(
            run.train.eval_steps == TrainConfig.eval_steps,
            f"train.eval_steps={run.train.eval_steps} does nothing here: a fine-tuning run "
            "evaluates its whole dev split",
        )
    else:
        require(
            not run.train.epochs,
            f"train.epochs={run.train.epochs} sets a fine-tuning budget (a run with data.task); "
            "pretraining runs train.num_steps",
        )
    for phase in run.train.phases or ({"fraction": 1.0},):
        objective.check(run.model, run.phase_data(phase))
    return run


# ---------------------------------------------------------------------------------------- files


def load_python_file(path: str | os.PathLike) -> ModuleType:
    """Imports a Python file by path: config files, configs/common.py, sweep files."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"Python file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"jaxgen_file_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    module = load_python_file(file)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}:get_config must return an ml_collections.ConfigDict")
    return config


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every leaf key of a config as a dotted path, e.g. 'optim.learning_rate'."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and key != "phases":
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


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


def _switch_optimizer(optim: ml_collections.ConfigDict, name: str) -> None:
    """Replaces the optimizer's own keys by `name`'s defaults (shared keys are kept)."""
    cls = OPTIMIZERS[name]
    for key in list(optim.keys()):
        if key not in OptimConfig.keys():
            del optim[key]
    defaults = cls()
    for key in cls.keys():
        if key not in OptimConfig.keys():
            optim[key] = getattr(defaults, key)


def _section_class(config: ml_collections.ConfigDict, section: str) -> type[Section] | None:
    """The typed class of one section of a ConfigDict (None when it cannot be told yet)."""
    from jaxgen import objectives
    from jaxgen.models.config import ModelConfig

    try:
        if section == "model":
            return ModelConfig
        if section == "data":
            return objectives.for_data(config.model.family, config.data).Data
        if section == "optim":
            return OPTIMIZERS[config.optim.get("name", OptimConfig.name)]
    except (AttributeError, KeyError, ValueError):
        return None
    return {"train": TrainConfig, "mesh": MeshConfig, "meta": MetaConfig}.get(section)


def _schema_default(config: ml_collections.ConfigDict, section: str, key: str) -> Any:
    """The default of a schema key a config file left out, or raises KeyError."""
    cls = _section_class(config, section)
    if cls is None or key not in cls.keys():
        raise KeyError(key)
    if section == "model" and key not in cls.keys_of(config.model.family):
        raise KeyError(key)
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    if field.default is dataclasses.MISSING:
        raise KeyError(key)
    return field.default


def _known_keys(config: ml_collections.ConfigDict) -> list[str]:
    """Every key an override may name: the config's and its sections' schema keys."""
    keys = set(flat_keys(config))
    for section in SECTIONS:
        cls = _section_class(config, section)
        if cls is not None and section in config:
            keys.update(f"{section}.{k}" for k in cls.keys())
    return sorted(keys)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `a.b=v` (or `--config.a.b=v`) strings in place; unknown keys name the closest key.

    A key of a section's schema that the config file left out takes the override (typed like
    its default). `optim.name` is applied first: switching the optimizer brings in the new one's
    own keys with their defaults, so `--config.optim.name=adafactor --config.optim.decay_rate=0.9`
    works.
    """
    parsed = []
    for override in overrides:
        text = override.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(
                f"override {override!r} must look like --config.optim.learning_rate=3e-4"
            )
        key, _, raw = text.partition("=")
        parsed.append((key, raw))
    parsed.sort(key=lambda kv: kv[0] != "optim.name")
    for key, raw in parsed:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {key!r}{nearest(key, _known_keys(config))}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {key!r}{nearest(key, _known_keys(config))}")
        if leaf in node:
            current = node[leaf]
        else:
            try:
                current = _schema_default(config, parents[0] if len(parents) == 1 else "", leaf)
            except KeyError:
                raise ConfigError(
                    f"unknown config key {key!r}{nearest(key, _known_keys(config))}"
                ) from None
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"{key} is a section; override one of its keys, e.g. {key}.<name>")
        value = _parse_value(raw, current, key)
        if key == "optim.name":
            choice("optim.name", value, OPTIMIZERS)
            if value != current:
                _switch_optimizer(node, value)
        with node.ignore_type():
            node[leaf] = value


def load_config(spec: str, overrides: Iterable[str] = ()) -> RunConfig:
    """Loads `path.py:arg`, applies overrides and returns the typed, checked run config."""
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    return run_config(config)


def save_config(run: RunConfig, path: str | os.PathLike) -> None:
    """Writes the run config as indented JSON, atomically: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict written by an earlier jaxgen, in today's schema, meaning what it meant.

    Runs saved before `data.split_seed` drew their held-out documents with train.seed; catalog
    fields lived at the top level before `meta`; Adafactor runs recorded unused b1/b2/eps and ran
    with T5's fixed settings, which are today's Adafactor defaults.
    """
    saved = json.loads(json.dumps(saved))  # a deep copy
    saved.setdefault("lora", {})  # runs saved before adapters existed trained every parameter
    data = saved.setdefault("data", {})
    if "split_seed" not in data and "task" not in data:  # fine-tuning data has no held-out split
        data["split_seed"] = saved.get("train", {}).get("seed", 0)
    meta = saved.setdefault("meta", {})
    for key in MetaConfig.keys():
        if key in saved and key not in SECTIONS:
            meta[key] = saved.pop(key)
    optim = saved.get("optim", {})
    if optim.get("name") == "adafactor":
        for key in ("b1", "b2", "eps"):
            optim.pop(key, None)
    from jaxgen.models.config import ModelConfig

    model = saved.get("model", {})
    if model.get("family") in ModelConfig.FAMILY_KEYS:
        own = ModelConfig.keys_of(model["family"])
        for key in [k for k in model if k in ModelConfig.keys() and k not in own]:
            del model[key]  # e.g. T5's init_std, which its fan-in initialisation never read
    return saved


def load_saved_config(path: str | os.PathLike) -> RunConfig:
    """Reads a config.json written by `save_config` (or an earlier jaxgen) as a RunConfig."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the run config {path}: {err}") from err
    return run_config(upgrade_saved(saved))


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
