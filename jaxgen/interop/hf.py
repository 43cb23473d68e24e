"""HuggingFace checkpoints: load BERT, GPT-2 and T5 into jaxgen and export them back (local files).

A HuggingFace model directory holds `config.json`, the weights (`model.safetensors` or
`pytorch_model.bin`, possibly sharded with a `*.index.json`) and optionally vocabulary files
(`vocab.txt`, `vocab.json` + `merges.txt`, `spiece.model`, or only `tokenizer.json`). Supported:

    BertForPreTraining, BertModel, BertForMaskedLM -> bert (a missing MLM/NSP head is initialised)
    GPT2LMHeadModel, GPT2Model                     -> gpt  (pre-LN, lm_head tied to wte)
    T5ForConditionalGeneration                     -> t5   (v1.0: relu, tied, scaled output;
                                                             v1.1: gated-gelu, own lm_head)

Conventions bridged here (jaxgen shapes are in the `jaxgen/models/*.py` docstrings):
- torch `nn.Linear.weight` is `[out, in]`; jaxgen kernels are `[in..., out...]`: transposed, heads
  split out: query/key/value `[N*H, D] -> [D, N, H]`, attention out `[D, N*H] -> [N, H, D]`;
- GPT-2's `Conv1D.weight` is already `[in, out]`; its fused `c_attn` `[D, 3*N*H]` is q, k, v;
- tied output projections (BERT decoder, GPT-2 lm_head, T5 v1.0 lm_head) are the token embedding;
- T5 keeps one relative-position table per stack in HF's block 0; jaxgen has it on the stack.
Every transform is a reshape, transpose, split or concatenation: jaxgen -> HF -> jaxgen is exact.

`jaxgen convert --from hf` writes a run directory whose step-0 checkpoint holds a full TrainState
(fresh optimizer state from `config.optim`); `train.init_from` reads only its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxgen import config as config_lib
from jaxgen import models
from jaxgen.models.layers import ModelConfig

log = logging.getLogger(__name__)

Params = dict[str, Any]

ARCHITECTURES: dict[str, str] = {
    "BertForPreTraining": "bert",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "GPT2LMHeadModel": "gpt",
    "GPT2Model": "gpt",
    "T5ForConditionalGeneration": "t5",
}
EXPORT_ARCHITECTURE = {
    "bert": "BertForPreTraining",
    "gpt": "GPT2LMHeadModel",
    "t5": "T5ForConditionalGeneration",
}
MODEL_TYPE = {"bert": "bert", "gpt": "gpt2", "t5": "t5"}
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "spiece.model")
# jaxgen parameters an architecture may lack (a head it does not have): initialised as jaxgen does.
OPTIONAL_PARAMS = {
    "BertModel": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/"),
    "BertForMaskedLM": ("pooler/", "nsp/"),
}
# Non-parameter buffers that some checkpoints carry.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


class InteropError(ValueError):
    """A checkpoint that cannot be read, mapped or written; the message names the file or tensor."""


# -------------------------------------------------------------------------------- tensor transforms


def _size(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A reversible map between HF tensors and jaxgen parameters (either side may be several)."""

    # jaxgen shapes -> the HF shapes they correspond to
    hf_shapes: Callable[[list[tuple[int, ...]]], list[tuple[int, ...]]]
    # (HF arrays, jaxgen shapes) -> jaxgen arrays
    to_jax: Callable[[list[np.ndarray], list[tuple[int, ...]]], list[np.ndarray]]
    # jaxgen arrays -> HF arrays
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


# Same shape (embeddings, norm gains, relative tables).
SAME = Transform(
    hf_shapes=lambda shapes: [tuple(shapes[0])],
    to_jax=lambda arrays, shapes: [arrays[0]],
    to_hf=lambda arrays: [arrays[0]],
)
# A vector on the HF side, e.g. a bias [N*H] <-> [N, H].
FLAT = Transform(
    hf_shapes=lambda shapes: [(_size(shapes[0]),)],
    to_jax=lambda arrays, shapes: [arrays[0].reshape(shapes[0])],
    to_hf=lambda arrays: [arrays[0].reshape(-1)],
)


def linear(in_dims: int = 1) -> Transform:
    """torch Linear weight `[out, in]` <-> kernel `[*in (in_dims axes), *out]`."""
    return Transform(
        hf_shapes=lambda shapes: [(_size(shapes[0][in_dims:]), _size(shapes[0][:in_dims]))],
        to_jax=lambda arrays, shapes: [arrays[0].T.reshape(shapes[0])],
        to_hf=lambda arrays: [arrays[0].reshape(_size(arrays[0].shape[:in_dims]), -1).T],
    )


def conv1d(in_dims: int = 1) -> Transform:
    """GPT-2 Conv1D weight `[in, out]` <-> kernel `[*in (in_dims axes), *out]`."""
    return Transform(
        hf_shapes=lambda shapes: [(_size(shapes[0][:in_dims]), _size(shapes[0][in_dims:]))],
        to_jax=lambda arrays, shapes: [arrays[0].reshape(shapes[0])],
        to_hf=lambda arrays: [arrays[0].reshape(_size(arrays[0].shape[:in_dims]), -1)],
    )


def _split(array: np.ndarray, shapes: list[tuple[int, ...]], axis: int) -> list[np.ndarray]:
    """Splits `array` along `axis` into pieces reshaped to `shapes` (axis 1: leading dim shared)."""
    widths = [_size(s[axis:]) for s in shapes]
    bounds = np.cumsum(widths)[:-1]
    parts = np.split(array, bounds, axis=axis)
    return [part.reshape(s) for part, s in zip(parts, shapes, strict=True)]


# GPT-2 c_attn weight [D, 3*N*H] <-> query, key, value kernels [D, N, H] (concatenated along `out`).
FUSED_CONV1D = Transform(
    hf_shapes=lambda shapes: [(shapes[0][0], sum(_size(s[1:]) for s in shapes))],
    to_jax=lambda arrays, shapes: _split(arrays[0], shapes, axis=1),
    to_hf=lambda arrays: [np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)],
)
# GPT-2 c_attn bias [3*N*H] <-> query, key, value biases [N, H].
FUSED_BIAS = Transform(
    hf_shapes=lambda shapes: [(sum(_size(s) for s in shapes),)],
    to_jax=lambda arrays, shapes: _split(arrays[0], shapes, axis=0),
    to_hf=lambda arrays: [np.concatenate([a.reshape(-1) for a in arrays])],
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor names <-> jaxgen parameter paths ('a/b/c'), related by `transform`."""

    hf: tuple[str, ...]
    jax: tuple[str, ...]
    transform: Transform


def _rule(hf: str | tuple[str, ...], jax_path: str | tuple[str, ...], transform: Transform) -> Rule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
    return Rule(as_tuple(hf), as_tuple(jax_path), transform)


def _dense(hf: str, path: str, *, bias: bool = True, in_dims: int = 1) -> list[Rule]:
    rules = [_rule(f"{hf}.weight", f"{path}/kernel", linear(in_dims))]
    return rules + [_rule(f"{hf}.bias", f"{path}/bias", FLAT)] if bias else rules


def _layer_norm(hf: str, path: str) -> list[Rule]:
    return [_rule(f"{hf}.weight", f"{path}/scale", SAME), _rule(f"{hf}.bias", f"{path}/bias", SAME)]


# -------------------------------------------------------------------------------------- name tables


def bert_rules(cfg: ModelConfig) -> list[Rule]:
    """BertForPreTraining names <-> jaxgen Bert parameters."""
    rules = [
        _rule("bert.embeddings.word_embeddings.weight", "token_embed/embedding", SAME),
        _rule("bert.embeddings.position_embeddings.weight", "position_embed/embedding", SAME),
        _rule("bert.embeddings.token_type_embeddings.weight", "segment_embed/embedding", SAME),
        *_layer_norm("bert.embeddings.LayerNorm", "embed_norm"),
    ]
    for i in range(cfg.num_layers):
        hf, jx = f"bert.encoder.layer.{i}", f"layers_{i}"
        for name in ("query", "key", "value"):
            rules += _dense(f"{hf}.attention.self.{name}", f"{jx}/attention/{name}")
        rules += _dense(f"{hf}.attention.output.dense", f"{jx}/attention/out", in_dims=2)
        rules += _layer_norm(f"{hf}.attention.output.LayerNorm", f"{jx}/attention_norm")
        rules += _dense(f"{hf}.intermediate.dense", f"{jx}/mlp/wi")
        rules += _dense(f"{hf}.output.dense", f"{jx}/mlp/wo")
        rules += _layer_norm(f"{hf}.output.LayerNorm", f"{jx}/mlp_norm")
    rules += _dense("bert.pooler.dense", "pooler")
    rules += _dense("cls.predictions.transform.dense", "mlm_dense")
    rules += _layer_norm("cls.predictions.transform.LayerNorm", "mlm_norm")
    rules += [_rule("cls.predictions.bias", "mlm_bias", SAME)]
    rules += _dense("cls.seq_relationship", "nsp")
    return rules


def gpt_rules(cfg: ModelConfig) -> list[Rule]:
    """GPT2LMHeadModel names <-> jaxgen Gpt parameters (pre-LN)."""
    rules = [
        _rule("transformer.wte.weight", "token_embed/embedding", SAME),
        _rule("transformer.wpe.weight", "position_embed/embedding", SAME),
    ]
    for i in range(cfg.num_layers):
        hf, jx = f"transformer.h.{i}", f"layers_{i}/"
        qkv = tuple(f"{jx}attention/{name}" for name in ("query", "key", "value"))
        rules += _layer_norm(f"{hf}.ln_1", f"{jx}attention_norm")
        rules += [
            _rule(f"{hf}.attn.c_attn.weight", tuple(f"{p}/kernel" for p in qkv), FUSED_CONV1D),
            _rule(f"{hf}.attn.c_attn.bias", tuple(f"{p}/bias" for p in qkv), FUSED_BIAS),
            _rule(f"{hf}.attn.c_proj.weight", f"{jx}attention/out/kernel", conv1d(2)),
            _rule(f"{hf}.attn.c_proj.bias", f"{jx}attention/out/bias", SAME),
        ]
        rules += _layer_norm(f"{hf}.ln_2", f"{jx}mlp_norm")
        rules += [
            _rule(f"{hf}.mlp.c_fc.weight", f"{jx}mlp/wi/kernel", conv1d()),
            _rule(f"{hf}.mlp.c_fc.bias", f"{jx}mlp/wi/bias", SAME),
            _rule(f"{hf}.mlp.c_proj.weight", f"{jx}mlp/wo/kernel", conv1d()),
            _rule(f"{hf}.mlp.c_proj.bias", f"{jx}mlp/wo/bias", SAME),
        ]
    rules += _layer_norm("transformer.ln_f", "final_norm")
    return rules


def t5_rules(cfg: ModelConfig) -> list[Rule]:
    """T5ForConditionalGeneration names <-> jaxgen T5 parameters."""
    rules = [_rule("shared.weight", "token_embed/embedding", SAME)]
    wi = ("wi_0", "wi_1") if cfg.feed_forward == "gated-gelu" else ("wi",)

    def attention(hf: str, path: str) -> list[Rule]:
        out = [_rule(f"{hf}.{a}.weight", f"{path}/{b}/kernel", linear())
               for a, b in (("q", "query"), ("k", "key"), ("v", "value"))]  # fmt: skip
        return out + [_rule(f"{hf}.o.weight", f"{path}/out/kernel", linear(2))]

    for stack in ("encoder", "decoder"):
        table = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        rules.append(_rule(table, f"{stack}/relative_bias", SAME))
        num_layers = cfg.num_decoder_layers if stack == "decoder" else cfg.num_layers
        for i in range(num_layers):
            hf, jx = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
            rules.append(
                _rule(f"{hf}.0.layer_norm.weight", f"{jx}/self_attention_norm/scale", SAME)
            )
            rules += attention(f"{hf}.0.SelfAttention", f"{jx}/self_attention")
            ff = 1
            if stack == "decoder":
                rules.append(
                    _rule(f"{hf}.1.layer_norm.weight", f"{jx}/cross_attention_norm/scale", SAME)
                )
                rules += attention(f"{hf}.1.EncDecAttention", f"{jx}/cross_attention")
                ff = 2
            rules.append(_rule(f"{hf}.{ff}.layer_norm.weight", f"{jx}/mlp_norm/scale", SAME))
            for name in (*wi, "wo"):
                rules += _dense(f"{hf}.{ff}.DenseReluDense.{name}", f"{jx}/mlp/{name}", bias=False)
        rules.append(_rule(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale", SAME))
    if not cfg.tie_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head/kernel", linear()))
    return rules


RULES = {"bert": bert_rules, "gpt": gpt_rules, "t5": t5_rules}

# HF tensors that duplicate another (tied): (duplicate, canonical).
TIED = {
    "bert": (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
             ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    "gpt": (("lm_head.weight", "transformer.wte.weight"),),
    "t5": (("encoder.embed_tokens.weight", "shared.weight"),
           ("decoder.embed_tokens.weight", "shared.weight")),
}  # fmt: skip


# ----------------------------------------------------------------------------------- config mapping


def _hf_get(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def _unsupported(arch: str, what: str) -> InteropError:
    return InteropError(
        f"{arch}: {what} has no jaxgen equivalent, so the model cannot be loaded exactly"
    )


def _t5_scales_output(hf: Mapping[str, Any]) -> bool:
    """Whether HF scales the decoder output by d_model**-0.5 (T5 v1.0 yes, v1.1 no)."""
    if hf.get("scale_decoder_outputs") is not None:  # transformers >= 5 writes it explicitly
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A jaxgen `config.model` dict from a HF config.json dict (raises for unsupported settings)."""
    arch = architecture(hf)
    family = ARCHITECTURES[arch]
    common = dict(family=family, dtype="float32", attention="auto", remat=False)
    if family == "bert":
        act = _hf_get(hf, "hidden_act", "gelu")
        if act != "gelu":
            raise _unsupported(arch, f"hidden_act={act!r} (jaxgen BERT uses the exact erf 'gelu')")
        if _hf_get(hf, "position_embedding_type", "absolute") != "absolute":
            raise _unsupported(arch, f"position_embedding_type={hf['position_embedding_type']!r}")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise _unsupported(arch, "a decoder BERT (is_decoder / add_cross_attention)")
        d_model, heads = _hf_get(hf, "hidden_size", 768), _hf_get(hf, "num_attention_heads", 12)
        return dict(
            common,
            vocab_size=_hf_get(hf, "vocab_size", 30522),
            num_layers=_hf_get(hf, "num_hidden_layers", 12),
            d_model=d_model,
            num_heads=heads,
            head_dim=d_model // heads,
            d_ff=_hf_get(hf, "intermediate_size", 3072),
            max_len=_hf_get(hf, "max_position_embeddings", 512),
            dropout=float(_hf_get(hf, "hidden_dropout_prob", 0.1)),
            attention_dropout=float(_hf_get(hf, "attention_probs_dropout_prob", 0.1)),
            layer_norm_eps=float(_hf_get(hf, "layer_norm_eps", 1e-12)),
            init_std=float(_hf_get(hf, "initializer_range", 0.02)),
            type_vocab_size=_hf_get(hf, "type_vocab_size", 2),
        )
    if family == "gpt":
        act = _hf_get(hf, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(arch, f"activation_function={act!r} (jaxgen GPT uses tanh GELU)")
        if not _hf_get(hf, "scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise _unsupported(arch, "attention scaling other than 1/sqrt(head_dim)")
        if hf.get("add_cross_attention"):
            raise _unsupported(arch, "add_cross_attention=True")
        d_model, heads = _hf_get(hf, "n_embd", 768), _hf_get(hf, "n_head", 12)
        return dict(
            common,
            vocab_size=_hf_get(hf, "vocab_size", 50257),
            num_layers=_hf_get(hf, "n_layer", 12),
            d_model=d_model,
            num_heads=heads,
            head_dim=d_model // heads,
            d_ff=_hf_get(hf, "n_inner", 4 * d_model),
            max_len=_hf_get(hf, "n_positions", 1024),
            dropout=float(_hf_get(hf, "resid_pdrop", 0.1)),
            attention_dropout=float(_hf_get(hf, "attn_pdrop", 0.1)),
            layer_norm_eps=float(_hf_get(hf, "layer_norm_epsilon", 1e-5)),
            init_std=float(_hf_get(hf, "initializer_range", 0.02)),
            norm_position="pre",
            sparse_attention="none",
            local_window=256,
        )
    feed_forward = _hf_get(hf, "feed_forward_proj", "relu")
    if feed_forward not in ("relu", "gated-gelu"):
        raise _unsupported(arch, f"feed_forward_proj={feed_forward!r} (jaxgen: relu or gated-gelu)")
    num_layers = _hf_get(hf, "num_layers", 6)
    dropout = float(_hf_get(hf, "dropout_rate", 0.1))
    return dict(
        common,
        vocab_size=_hf_get(hf, "vocab_size", 32128),
        num_layers=num_layers,
        d_model=_hf_get(hf, "d_model", 512),
        num_heads=_hf_get(hf, "num_heads", 8),
        head_dim=_hf_get(hf, "d_kv", 64),
        d_ff=_hf_get(hf, "d_ff", 2048),
        # T5 has no absolute positions; max_len only bounds the data pipeline's lengths.
        max_len=_hf_get(hf, "n_positions", 512),
        dropout=dropout,
        attention_dropout=dropout,
        layer_norm_eps=float(_hf_get(hf, "layer_norm_epsilon", 1e-6)),
        init_std=0.02,  # unused by T5 (fan-in init)
        num_decoder_layers=_hf_get(hf, "num_decoder_layers", num_layers),
        relative_attention_num_buckets=_hf_get(hf, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_hf_get(hf, "relative_attention_max_distance", 128),
        feed_forward=feed_forward,
        # Refined by `load` from the weights: jaxgen ties the output projection iff HF scales it.
        tie_embeddings=_t5_scales_output(hf),
    )


def hf_config_from_model(
    model: Mapping[str, Any] | ModelConfig, token_ids: Mapping[str, int | None] | None = None
) -> dict[str, Any]:
    """The HF config.json dict for a jaxgen `config.model` (raises where HF cannot express it)."""
    cfg = ModelConfig.from_mapping(dict(model) if not isinstance(model, ModelConfig) else model)
    family, ids = cfg.family, dict(token_ids or {})
    base = {"architectures": [EXPORT_ARCHITECTURE[family]], "model_type": MODEL_TYPE[family],
            "dtype": "float32", "vocab_size": cfg.vocab_size}  # fmt: skip
    if family in ("bert", "gpt") and cfg.num_heads * cfg.head_dim != cfg.d_model:
        raise InteropError(
            f"HF {EXPORT_ARCHITECTURE[family]} needs num_heads * head_dim == d_model; got "
            f"{cfg.num_heads} * {cfg.head_dim} != {cfg.d_model}"
        )
    if family == "bert":
        return dict(
            base,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.d_ff,
            hidden_act="gelu",
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.max_len,
            type_vocab_size=cfg.type_vocab_size,
            initializer_range=cfg.init_std,
            layer_norm_eps=cfg.layer_norm_eps,
            position_embedding_type="absolute",
            pad_token_id=ids.get("pad_token_id", 0),
            tie_word_embeddings=True,
        )
    if family == "gpt":
        if cfg.norm_position != "pre":
            raise InteropError(
                "GPT2LMHeadModel is pre-LN: a norm_position='post' (GPT-1) model cannot be exported"
            )
        if cfg.sparse_attention != "none":
            raise InteropError(
                "GPT2LMHeadModel has no locally banded attention: sparse_attention must be 'none'"
            )
        return dict(
            base,
            n_embd=cfg.d_model,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_len,
            activation_function="gelu_new",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.layer_norm_eps,
            initializer_range=cfg.init_std,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            bos_token_id=ids.get("bos_token_id"),
            eos_token_id=ids.get("eos_token_id"),
            tie_word_embeddings=True,
        )
    return dict(
        base,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=cfg.feed_forward,
        is_encoder_decoder=True,
        # HF reads tie_word_embeddings=False as "unscaled decoder output" (v1.1), as jaxgen does.
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=ids.get("pad_token_id", 0),
        eos_token_id=ids.get("eos_token_id", 1),
        decoder_start_token_id=ids.get("pad_token_id", 0),
        n_positions=cfg.max_len,  # T5 has no position limit; kept so max_len survives a round trip
    )


def architecture(hf: Mapping[str, Any]) -> str:
    """The supported architecture named in a HF config dict; else an error listing the supported."""
    names = list(hf.get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return name
    found = ", ".join(names) if names else f"none (model_type={hf.get('model_type')!r})"
    raise InteropError(f"unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)}")


def _default_sections(family: str, max_len: int) -> ml_collections.ConfigDict:
    """data/optim/train/mesh sections when configs/<family>.py is not available."""
    seq_len = min(128, max_len)
    data = dict(corpus="builtin", tokenizer="wordpiece", vocab_path="", lowercase=family == "bert",
                seq_len=seq_len, eval_documents=8, split_seed=0, cache_dir="")  # fmt: skip
    if family == "bert":
        data.update(mask_prob=0.15, max_predictions=20, short_seq_prob=0.1, dupe_factor=10,
                    dynamic_masking=True, whole_word_masking=False,
                    random_next_prob=0.5)  # fmt: skip
    elif family == "gpt":
        data.update(tokenizer="bpe", separate_documents=False)
    else:
        data.update(tokenizer="sentencepiece", noise_density=0.15, mean_noise_span_length=3.0)
    if family == "t5":
        optim = dict(name="adafactor", learning_rate=1e-3, schedule="constant", warmup_steps=0)
    else:
        optim = dict(name="adamw", learning_rate=1e-4, schedule="linear", warmup_steps=100)
    optim.update(decay_steps=0, final_lr_fraction=0.0, weight_decay=0.01 if family != "t5" else 0.0,
                 b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)  # fmt: skip
    train = dict(batch_size=32, num_steps=1000, grad_accum=1, eval_every=100, eval_steps=4,
                 log_every=20, checkpoint_every=200, max_to_keep=3, keep_best=False, seed=0,
                 phases=[], skip_nonfinite_or_spike=False, z_loss=0.0, init_from="")  # fmt: skip
    return ml_collections.ConfigDict(
        dict(data=data, optim=optim, train=train, mesh=dict(data=-1, fsdp=1, tensor=1))
    )


COMMON_KEYS = ("family", "vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff",
               "max_len", "dropout", "attention_dropout", "dtype", "attention", "remat",
               "layer_norm_eps", "init_std")  # fmt: skip
FAMILY_KEYS = {
    "bert": ("type_vocab_size",),
    "gpt": ("norm_position", "sparse_attention", "local_window"),
    "t5": ("num_decoder_layers", "relative_attention_num_buckets",
           "relative_attention_max_distance", "feed_forward", "tie_embeddings"),
}  # fmt: skip


def model_section(model: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """The complete `config.model` dict of a family (defaults filled in from ModelConfig)."""
    cfg = ModelConfig.from_mapping(dict(model) if not isinstance(model, ModelConfig) else model)
    return {key: getattr(cfg, key) for key in COMMON_KEYS + FAMILY_KEYS[cfg.family]}


def full_config(model: Mapping[str, Any], *, name: str = "") -> ml_collections.ConfigDict:
    """A complete jaxgen config around `model`; other sections from configs/<family>.py:smoke."""
    model = model_section(model)
    family = model["family"]
    config_file = config_lib.REPO_ROOT / "configs" / f"{family}.py"
    if config_file.is_file():
        config = config_lib.load_config(f"{config_file}:smoke")
    else:
        config = _default_sections(family, int(model["max_len"]))
    config.model = ml_collections.ConfigDict(dict(model))
    if name:
        with config.ignore_type():
            config.name = name
    if family != "t5":
        # The smoke row's lengths may exceed a small model's positions.
        config.data.seq_len = min(int(config.data.seq_len), int(model["max_len"]))
        for phase in config.train.phases:
            if "seq_len" in phase:
                phase["seq_len"] = min(int(phase["seq_len"]), int(model["max_len"]))
    config_lib.validate(config)
    return config


# ------------------------------------------------------------------------------------- file reading


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise InteropError(f"{file} not found: a HuggingFace model directory needs {file.name}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{file} is not valid JSON: {err}") from err


def _to_float32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise InteropError(
            f"reading {file} needs the safetensors package: pip install 'jaxgen[interop]'"
        ) from err
    try:
        return {k: _to_float32(v) for k, v in load_file(str(file)).items()}
    except (TypeError, ValueError) as err:
        # numpy has no bfloat16: read such files through torch when it is installed.
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise InteropError(f"cannot read {file} with numpy ({err}); install torch") from err
        return {k: v.float().numpy() for k, v in load_torch(str(file)).items()}


def _read_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise InteropError(
            f"reading {file} needs torch (pip install 'jaxgen[interop]'), or convert it to "
            f"{SAFETENSORS_FILE}"
        ) from err
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory as float32 numpy arrays, by HF name (shards too)."""
    path = Path(path)
    for name, reader in ((SAFETENSORS_FILE, _read_safetensors), (TORCH_FILE, _read_torch)):
        if (path / name).is_file():
            return reader(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            tensors: dict[str, np.ndarray] = {}
            for shard in sorted(set(_read_json(index)["weight_map"].values())):
                if not (path / shard).is_file():
                    raise InteropError(f"{path / shard} not found (listed in {index.name})")
                tensors.update(reader(path / shard))
            return tensors
    raise InteropError(
        f"no weights in {path}: expected {SAFETENSORS_FILE} or {TORCH_FILE} "
        "(or a sharded *.index.json)"
    )


def _canonical_names(tensors: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Prefixes base-model names (BertModel, GPT2Model) as the head model's; renames gamma/beta."""
    out = {}
    for name, value in tensors.items():
        if family == "bert":
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias"
            )
            if not name.startswith(("bert.", "cls.")):
                name = "bert." + name
        elif family == "gpt" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------ mapping


def _sample_inputs(cfg: ModelConfig) -> tuple[jax.Array, ...]:
    ids = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return {"bert": (ids, ids, ids), "gpt": (ids,), "t5": (ids, ids)}[cfg.family]


def param_shapes(model: Mapping[str, Any] | ModelConfig) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of the jaxgen model's parameters (jax.eval_shape: nothing computed)."""
    cfg = ModelConfig.from_mapping(dict(model) if not isinstance(model, ModelConfig) else model)
    module = models.build(cfg)
    boxed = jax.eval_shape(module.init, jax.random.key(0), *_sample_inputs(cfg))
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed)["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _checked_rules(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
    rules = RULES[cfg.family](cfg)
    covered = [p for rule in rules for p in rule.jax]
    missing, extra = set(shapes) - set(covered), set(covered) - set(shapes)
    if missing or extra:
        # The model's parameter tree changed: this table must follow it.
        raise InteropError(
            f"jaxgen.interop.hf does not know the {cfg.family} parameters {sorted(missing)} and "
            f"expects "
            f"{sorted(extra)} that the model lacks; update the tables in jaxgen/interop/hf.py"
        )
    return rules


def _init_missing(
    path: str, shape: tuple[int, ...], std: float, rng: np.random.Generator
) -> np.ndarray:
    """jaxgen's init for a missing head: normal(std) kernels, zero biases, unit gains."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
        return (rng.standard_normal(shape) * std).astype(np.float32)
    return np.full(shape, 1.0 if leaf == "scale" else 0.0, np.float32)


def params_from_hf(
    tensors: Mapping[str, np.ndarray], model: Mapping[str, Any], arch: str
) -> Params:
    """Maps HF tensors (by name) onto jaxgen params (nested dict of float32 numpy arrays)."""
    cfg = ModelConfig.from_mapping(dict(model))
    shapes = param_shapes(cfg)
    tensors = _canonical_names(dict(tensors), cfg.family)
    for duplicate, canonical in TIED[cfg.family]:
        if canonical not in tensors and duplicate in tensors:
            tensors[canonical] = tensors[duplicate]
    optional = OPTIONAL_PARAMS.get(arch, ())
    rng = np.random.default_rng(0)
    flat: dict[str, np.ndarray] = {}
    missing_heads: list[str] = []
    used: set[str] = set()
    for rule in _checked_rules(cfg, shapes):
        jax_shapes = [shapes[p] for p in rule.jax]
        absent = [n for n in rule.hf if n not in tensors]
        if absent:
            if all(p.startswith(optional) for p in rule.jax):
                for p in rule.jax:
                    flat[p] = _init_missing(p, shapes[p], cfg.init_std, rng)
                missing_heads += rule.jax
                continue
            raise InteropError(
                f"the checkpoint lacks {absent[0]!r}, needed for the jaxgen parameter(s) "
                f"{', '.join(rule.jax)} of a {arch}"
            )
        arrays = [tensors[n] for n in rule.hf]
        expected = rule.transform.hf_shapes(jax_shapes)
        for name, array, want in zip(rule.hf, arrays, expected, strict=True):
            if tuple(array.shape) != tuple(want):
                raise InteropError(
                    f"shape mismatch for {'/'.join(rule.jax)} (HF {name!r}): checkpoint has "
                    f"{tuple(array.shape)}, the model built from config.json expects {tuple(want)}"
                )
        for path, value in zip(rule.jax, rule.transform.to_jax(arrays, jax_shapes), strict=True):
            flat[path] = np.ascontiguousarray(value, dtype=np.float32)
        used.update(rule.hf)
    for duplicate, canonical in TIED[cfg.family]:
        if duplicate in tensors and duplicate not in used:
            if canonical in used and not np.array_equal(tensors[duplicate], tensors[canonical]):
                raise _unsupported(
                    arch, f"{duplicate!r} differing from {canonical!r} (untied weights)"
                )
            used.add(duplicate)
    if missing_heads:
        log.warning("%s has no %s: initialised as jaxgen does", arch, ", ".join(missing_heads))
    unused = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if unused:
        log.warning("ignored checkpoint tensors not used by jaxgen: %s", ", ".join(unused))
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_hf(params: Params, model: Mapping[str, Any] | ModelConfig) -> dict[str, np.ndarray]:
    """jaxgen params -> {HF name: contiguous float32 array} in the export architecture's layout."""
    cfg = ModelConfig.from_mapping(dict(model) if not isinstance(model, ModelConfig) else model)
    shapes = param_shapes(cfg)
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)), sep="/")
    unknown = sorted(set(flat) - set(shapes))
    if unknown:
        raise InteropError(
            f"parameters not in a jaxgen {cfg.family} model of this config: {unknown}"
        )
    for path, shape in shapes.items():
        if path not in flat:
            raise InteropError(f"parameter {path} is missing (expected shape {shape})")
        if tuple(flat[path].shape) != shape:
            raise InteropError(
                f"shape mismatch for {path}: params have {tuple(flat[path].shape)}, "
                f"the config's model expects {shape}"
            )
    tensors = {}
    for rule in _checked_rules(cfg, shapes):
        arrays = [np.asarray(flat[p], dtype=np.float32) for p in rule.jax]
        for name, value in zip(rule.hf, rule.transform.to_hf(arrays), strict=True):
            tensors[name] = np.ascontiguousarray(value)
    return tensors


def _t5_tying(tensors: dict[str, np.ndarray], model: dict[str, Any], arch: str) -> None:
    """Sets model['tie_embeddings'] from the weights and HF's output scaling; may fill lm_head."""
    scaled = model["tie_embeddings"]  # set from the config's output scaling
    shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    head = tensors.get("lm_head.weight")
    separate = head is not None and (shared is None or not np.array_equal(head, shared))
    if scaled and separate:
        raise _unsupported(arch, "a separate lm_head with d_model**-0.5 output scaling")
    if not scaled:
        model["tie_embeddings"] = False
        if head is None and shared is not None:
            # HF ties lm_head to the embedding but does not scale: jaxgen holds a copy as lm_head.
            tensors["lm_head.weight"] = shared


# ------------------------------------------------------------------------------------ load and save


def _tokenizer_settings(path: Path, family: str) -> tuple[str, str, bool]:
    """(kind, vocab_path, lowercase) from vocabulary files next to the weights ('' when none)."""
    settings = {}
    if (path / "tokenizer_config.json").is_file():
        settings = _read_json(path / "tokenizer_config.json")
    lower = settings.get("do_lower_case")
    if (path / "vocab.txt").is_file():
        return "wordpiece", str(path / "vocab.txt"), True if lower is None else bool(lower)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return "bpe", str(path), bool(lower)
    models_found = sorted(path.glob("*.model"))
    if models_found:
        return "sentencepiece", str(models_found[0]), bool(lower)
    kind = {"bert": "wordpiece", "gpt": "bpe", "t5": "sentencepiece"}[family]
    return kind, "", family == "bert" if lower is None else bool(lower)


def _extract_vocabulary(path: Path, out: Path) -> tuple[str, bool] | None:
    """vocab.txt or vocab.json+merges.txt from tokenizer.json (transformers 5 saves only that)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    spec = _read_json(file)
    model, normalizer = spec.get("model") or {}, spec.get("normalizer") or {}
    out.mkdir(parents=True, exist_ok=True)
    if model.get("type") == "WordPiece":
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        return "wordpiece", bool(normalizer.get("lowercase", True))
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (out / "vocab.json").write_text(
            json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8"
        )
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                        encoding="utf-8")  # fmt: skip
        return "bpe", normalizer.get("type") == "Lowercase"
    return None


def load(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Params]:
    """A local HF model directory -> (full jaxgen config, params: nested dict of float32 arrays)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory (expected a HuggingFace model directory)")
    hf = _read_json(path / CONFIG_FILE)
    arch = architecture(hf)
    model = model_config_from_hf(hf)
    tensors = read_weights(path)
    if model["family"] == "t5":
        _t5_tying(tensors, model, arch)
    params = params_from_hf(tensors, model, arch)
    config = full_config(model, name=f"hf:{path}")
    kind, vocab_path, lowercase = _tokenizer_settings(path, model["family"])
    config.data.tokenizer, config.data.vocab_path, config.data.lowercase = (
        kind,
        vocab_path,
        lowercase,
    )
    return config, params


def save(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    params: Params,
    path: str | os.PathLike,
    *,
    token_ids: Mapping[str, int | None] | None = None,
) -> None:
    """Writes config.json + model.safetensors (HF layout, float32) that from_pretrained reads.

    `config` is a full jaxgen config or its `model` section; `token_ids` (pad/bos/eos_token_id) go
    into config.json when known.
    """
    model = config["model"] if "model" in config else config
    model = dict(model)
    try:
        from safetensors.numpy import save_file
    except ImportError as err:
        raise InteropError(
            "writing model.safetensors needs safetensors: pip install 'jaxgen[interop]'"
        ) from err
    hf = hf_config_from_model(model, token_ids)
    tensors = params_to_hf(params, model)
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / SAFETENSORS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    generation = {k: hf[k] for k in keys if hf.get(k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ convert


def import_workdir(src: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """HF directory -> jaxgen run directory (config.json, checkpoints/0, tokenizer); returns it."""
    from jaxgen.data import tokenizer as tokenizer_lib
    from jaxgen.train import checkpoint as checkpoint_lib
    from jaxgen.train import optim
    from jaxgen.train.state import TrainState

    workdir = Path(workdir).expanduser()
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise InteropError(f"{workdir} already holds checkpoints; convert into a new directory")
    config, params = load(src)
    workdir.mkdir(parents=True, exist_ok=True)
    if not config.data.vocab_path:
        extracted = _extract_vocabulary(Path(src).expanduser(), workdir / "tokenizer")
        if extracted is not None:
            config.data.tokenizer, config.data.lowercase = extracted
            config.data.vocab_path = str(workdir / "tokenizer")
    if config.data.vocab_path:
        tokenizer = tokenizer_lib.load_vocabulary(
            config.data.tokenizer, config.data.vocab_path, bool(config.data.lowercase)
        )
        if tokenizer.vocab_size > config.model.vocab_size:
            log.warning("the tokenizer has %d tokens, more than model.vocab_size=%d",
                        tokenizer.vocab_size, config.model.vocab_size)  # fmt: skip
        tokenizer.save(workdir / "tokenizer")
        # Later runs with train.init_from=<workdir> can point data.vocab_path here.
        config.data.vocab_path = str((workdir / "tokenizer").absolute())
    else:
        log.warning("%s has no vocabulary files; the run will train its own tokenizer", src)
    config_lib.save_config(config, workdir / "config.json")

    optimizer = optim.make_optimizer(config.optim, int(config.train.num_steps))
    jax_params = jax.tree.map(jnp.asarray, params)
    state = TrainState.create(
        jax_params, optimizer.init(jax_params), jax.random.key(int(config.train.seed))
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, use_async=False)
    try:
        checkpointer.save(0, state, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    log.info("converted %s into %s (step 0)", src, workdir)
    return workdir


def export_workdir(
    workdir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None
) -> int:
    """A run's latest (or given) checkpoint -> HF directory plus vocabulary; returns the step."""
    from jaxgen.data import tokenizer as tokenizer_lib
    from jaxgen.train import checkpoint as checkpoint_lib

    workdir, dst = Path(workdir).expanduser(), Path(dst).expanduser()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise InteropError(f"{config_file} not found: is {workdir} a jaxgen run directory?")
    config = config_lib.load_saved_config(config_file)
    step, params = checkpoint_lib.load_params(workdir, step)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    token_ids: dict[str, int | None] = {}
    tokenizer_dir = workdir / "tokenizer"
    if (tokenizer_dir / tokenizer_lib.META_FILE).is_file():
        tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        token_ids = {"pad_token_id": tokenizer.pad_id}
        if tokenizer.eos_id is not None:
            token_ids.update(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    save(config, params, dst, token_ids=token_ids)
    copied = []
    for name in VOCAB_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dst / name)
            copied.append(name)
    if copied:
        settings = {"do_lower_case": bool(config.data.get("lowercase", False)),
                    "model_max_length": int(config.model.max_len)}  # fmt: skip
        (dst / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    log.info(
        "exported %s step %d to %s (%s)", workdir, step, dst, ", ".join(copied) or "no vocabulary"
    )
    return step


def convert_command(args: Any) -> int:
    """`jaxgen convert --from hf --src DIR --workdir OUT` or `--to hf --workdir RUN --dst DIR`."""
    if getattr(args, "src_format", None) == "hf":
        if not args.src:
            raise InteropError("--from hf needs --src DIR (a HuggingFace model directory)")
        workdir = import_workdir(args.src, args.workdir)
        print(f"wrote {workdir} (step 0): sample with `jaxgen sample --workdir {workdir}`, or "
              f"continue pretraining with --config.train.init_from={workdir}")  # fmt: skip
        return 0
    if getattr(args, "dst_format", None) == "hf":
        if not args.dst:
            raise InteropError("--to hf needs --dst DIR (the output directory)")
        step = export_workdir(args.workdir, args.dst)
        print(f"exported step {step} of {args.workdir} to {args.dst}")
        return 0
    raise InteropError("convert needs --from hf or --to hf")
