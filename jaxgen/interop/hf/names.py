"""HF tensor names <-> jaxgen parameter paths, and the reversible transforms between them.

Conventions bridged here (jaxgen shapes are in the `jaxgen/models/*.py` docstrings):
- torch `nn.Linear.weight` is `[out, in]`; jaxgen kernels are `[in..., out...]`: transposed, heads
  split out: query/key/value `[N*H, D] -> [D, N, H]`, attention out `[D, N*H] -> [N, H, D]`;
- GPT-2's `Conv1D.weight` is already `[in, out]`; its fused `c_attn` `[D, 3*N*H]` is q, k, v;
- tied output projections (BERT decoder, GPT-2 lm_head, T5 v1.0 lm_head) are the token embedding;
- T5 keeps one relative-position table per stack in HF's block 0; jaxgen has it on the stack;
- HF numbers its layers; a model with `scan_layers` stacks them on a leading axis: the tables map
  the unrolled layers_{i}, and the scanned layout is stacked after import and unstacked before
  export (`jaxgen.models.scan`).
Every transform is a reshape, transpose, split or concatenation: jaxgen -> HF -> jaxgen is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxgen import models, objectives
from jaxgen.interop.hf import architectures
from jaxgen.interop.hf.errors import InteropError, unsupported
from jaxgen.models import scan
from jaxgen.models.config import ModelConfig
from jaxgen.train import step as step_lib

log = logging.getLogger(__name__)

Params = dict[str, Any]

# jaxgen parameters an architecture may lack (a head it does not have): initialised as jaxgen does.
OPTIONAL_PARAMS = {
    "BertModel": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/"),
    "BertForMaskedLM": ("pooler/", "nsp/"),
    "BertForSequenceClassification": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/"),
    "BertForQuestionAnswering": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/", "pooler/"),
}
# jaxgen parameters an exported architecture does not hold.
NOT_EXPORTED = {
    "BertForSequenceClassification": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/"),
    "BertForQuestionAnswering": ("mlm_dense/", "mlm_norm/", "mlm_bias", "nsp/", "pooler/"),
}
# Non-parameter buffers that some checkpoints carry.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


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
    if cfg.num_labels:
        rules += _dense("classifier", "classifier")
    if cfg.span_head:  # BertForQuestionAnswering: [start, end] per token
        rules += _dense("qa_outputs", "span")
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


def _bert_names(name: str) -> str:
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )
    return (
        name if name.startswith(("bert.", "cls.", "classifier.", "qa_outputs.")) else "bert." + name
    )


def _gpt_names(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


# family -> the table of its parameters.
RULES: dict[str, Callable[[ModelConfig], list[Rule]]] = {
    "bert": bert_rules, "gpt": gpt_rules, "t5": t5_rules,
}  # fmt: skip
# Base-model names (BertModel, GPT2Model) prefixed as the head model's; old gamma/beta renamed.
CANONICAL_NAME: dict[str, Callable[[str], str]] = {
    "bert": _bert_names, "gpt": _gpt_names, "t5": lambda name: name,
}  # fmt: skip

# HF tensors that duplicate another (tied): (duplicate, canonical).
TIED = {
    "bert": (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
             ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    "gpt": (("lm_head.weight", "transformer.wte.weight"),),
    "t5": (("encoder.embed_tokens.weight", "shared.weight"),
           ("decoder.embed_tokens.weight", "shared.weight")),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ mapping


def param_shapes(model: Mapping[str, Any] | ModelConfig) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of the jaxgen model's parameters (jax.eval_shape: nothing computed)."""
    cfg = ModelConfig.from_mapping(model)
    objective = objectives.get(cfg.family)
    data = objective.Data(seq_len=min(8, cfg.max_len))
    boxed = step_lib.abstract_params(models.build(cfg), objective, data)
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
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
            f"{sorted(extra)} that the model lacks; update the tables in jaxgen/interop/hf/names.py"
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
    """Maps HF tensors (by name) onto jaxgen params (nested dict of float32 numpy arrays), with
    the layers stacked when `model` has scan_layers."""
    scanned = ModelConfig.from_mapping(dict(model))
    cfg = dataclasses.replace(scanned, scan_layers=False)  # the tables name unrolled layers
    shapes = param_shapes(cfg)
    canonical = CANONICAL_NAME[cfg.family]
    tensors = {canonical(name): value for name, value in tensors.items()}
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
                raise unsupported(
                    arch, f"{duplicate!r} differing from {canonical!r} (untied weights)"
                )
            used.add(duplicate)
    if missing_heads:
        log.warning("%s has no %s: initialised as jaxgen does", arch, ", ".join(missing_heads))
    unused = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if unused:
        log.warning("ignored checkpoint tensors not used by jaxgen: %s", ", ".join(unused))
    params = traverse_util.unflatten_dict(flat, sep="/")
    return scan.stack_layers(params, scanned) if scanned.scan_layers else params


def params_to_hf(params: Params, model: Mapping[str, Any] | ModelConfig) -> dict[str, np.ndarray]:
    """jaxgen params -> {HF name: contiguous float32 array} in the export architecture's layout.

    With `model.scan_layers` the params hold stacked layers; they are unstacked first.
    """
    cfg = ModelConfig.from_mapping(model)
    params = nn.meta.unbox(dict(params))
    if cfg.scan_layers:
        try:
            params = scan.unstack_layers(params, cfg)
        except scan.LayerLayoutError as err:
            raise InteropError(f"model.scan_layers=True, but {err}") from err
        cfg = dataclasses.replace(cfg, scan_layers=False)
    shapes = param_shapes(cfg)
    flat = traverse_util.flatten_dict(params, sep="/")
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
    skipped = NOT_EXPORTED.get(architectures.export_architecture(cfg), ())
    for rule in _checked_rules(cfg, shapes):
        if skipped and all(p.startswith(skipped) for p in rule.jax):
            continue
        arrays = [np.asarray(flat[p], dtype=np.float32) for p in rule.jax]
        for name, value in zip(rule.hf, rule.transform.to_hf(arrays), strict=True):
            tensors[name] = np.ascontiguousarray(value)
    return tensors
