"""`ModelConfig`: the static, hashable model settings (`config.model`); jitted code sees this."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp

from jaxgen.config import ConfigError, LoraConfig, Section, choice, positive, require
from jaxgen.models.scan import REMAT_POLICIES

FAMILY_LAYER_NORM_EPS = {"bert": 1e-12, "gpt": 1e-5, "t5": 1e-6}


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Architecture of one model; keys of another family are errors (see FAMILY_KEYS).

    dtype: compute dtype (parameters are always float32). attention: xla, flash or auto (flash on
    TPU/GPU). remat: recompute each layer in the backward pass, keeping what remat_policy names
    (`jaxgen.models.scan.REMAT_POLICIES`). scan_layers: each layer stack is one `nn.scan` step with
    its parameters stacked on a leading `layers` axis (`jaxgen.models.scan`); compile time stops
    growing with depth. layer_norm_eps None: the family's paper value. max_len: positions of the
    learned table (BERT, GPT); T5 has relative positions and max_len bounds its encoder input.
    init_std: normal init of BERT and GPT (T5 uses fan-in). num_labels (BERT, GPT): 0 for the
    pretraining heads only; n > 0 adds a classifier: BERT `classifier_logits [B, n]` on the pooled
    [CLS] output (HF BertForSequenceClassification; n = 1 is regression), GPT `classifier_logits
    [B, T, n]` in place of the LM output (HF GPT2ForSequenceClassification's `score`).
    span_head (BERT): `span_logits [B, T, 2]`, each token's answer start and end logits (SQuAD;
    HF BertForQuestionAnswering's `qa_outputs`).
    """

    SECTION: ClassVar[str] = "model"
    COMMON_KEYS: ClassVar[tuple[str, ...]] = (
        "family", "vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff",
        "max_len", "dropout", "attention_dropout", "dtype", "attention", "remat", "remat_policy",
        "scan_layers", "layer_norm_eps",
    )  # fmt: skip
    FAMILY_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "bert": ("init_std", "type_vocab_size", "num_labels", "span_head"),
        "gpt": ("init_std", "norm_position", "sparse_attention", "local_window", "num_labels"),
        "t5": ("num_decoder_layers", "relative_attention_num_buckets",
               "relative_attention_max_distance", "feed_forward", "tie_embeddings"),
    }  # fmt: skip

    family: str
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    max_len: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: str = "float32"
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    layer_norm_eps: float | None = None
    init_std: float = 0.02
    # BERT
    type_vocab_size: int = 2
    num_labels: int = 0  # > 0: a classifier head (1: regression)
    span_head: bool = False  # BERT: start/end logits per token (SQuAD)
    # GPT
    norm_position: str = "pre"
    sparse_attention: str = "none"  # 'alternating': GPT-3's locally banded odd layers
    local_window: int = 256
    # T5
    num_decoder_layers: int | None = None  # None: num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "relu"
    tie_embeddings: bool = True
    # Not a `model` key: the run's `lora` section, set by `models.build` (None: no adapters).
    lora: LoraConfig | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The section's key names (every family's), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "lora")

    @classmethod
    def keys_of(cls, family: str) -> tuple[str, ...]:
        """The keys a model of `family` reads."""
        return cls.COMMON_KEYS + cls.FAMILY_KEYS[family]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ModelConfig:
        """The model section of a ConfigDict or dict; keys of other families fail loudly."""
        if isinstance(mapping, ModelConfig):
            return mapping
        items = dict(mapping.items())
        require("family" in items, "model.family is missing (bert, gpt or t5)")
        choice("model.family", items["family"], cls.FAMILY_KEYS)
        own = cls.keys_of(items["family"])
        for key in items:
            if key in cls.keys() and key not in own:
                owners = [f for f, keys in cls.FAMILY_KEYS.items() if key in keys]
                raise ConfigError(
                    f"model.{key} is a {'/'.join(owners)} setting; a {items['family']} model "
                    "does not read it"
                )
        return super().from_mapping(items)

    def check(self) -> None:
        """Enum and range checks; fills the family defaults of layer_norm_eps and decoder depth."""
        choice("model.family", self.family, self.FAMILY_KEYS)
        if self.layer_norm_eps is None:
            object.__setattr__(self, "layer_norm_eps", FAMILY_LAYER_NORM_EPS[self.family])
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        positive(self, "vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff")
        positive(self, "max_len", "type_vocab_size", "local_window", "num_decoder_layers")
        require(self.num_labels >= 0, f"model.num_labels must be >= 0, got {self.num_labels}")
        choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        choice("model.attention", self.attention, ("xla", "flash", "auto"))
        choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
        choice("model.norm_position", self.norm_position, ("pre", "post"))
        choice("model.sparse_attention", self.sparse_attention, ("none", "alternating"))
        choice("model.feed_forward", self.feed_forward, ("relu", "gated-gelu"))
        for key in ("dropout", "attention_dropout"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"model.{key} must be in [0, 1), got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The keys this family reads, as a JSON-ready dict."""
        return {key: getattr(self, key) for key in self.keys_of(self.family)}

    @property
    def stacks(self) -> tuple[tuple[str, str, bool], ...]:
        """(depth key, sequence it runs over, cross-attends to the inputs) of each layer stack.

        The sequence is a key of the objective's `sequence_lengths`: BERT and GPT run one stack
        over the inputs; T5's decoder runs over the targets and attends to the encoded inputs.
        """
        if self.family == "t5":
            return (("num_layers", "inputs", False), ("num_decoder_layers", "targets", True))
        return (("num_layers", "inputs", False),)

    @property
    def layer_period(self) -> tuple[str, ...]:
        """Names of the blocks of one scanned step when a stack's layers differ: GPT-3's alternating
        attention repeats (dense, local); () when every layer is alike (one layer per step)."""
        if self.family == "gpt" and self.sparse_attention == "alternating":
            return ("dense", "local")
        return ()

    @property
    def stack_depths(self) -> dict[str, int]:
        """{depth key: layers} of each layer stack (T5: encoder and decoder)."""
        return {key: getattr(self, key) for key, _, _ in self.stacks}

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The activation dtype (parameters are always float32)."""
        return jnp.dtype(self.dtype)
