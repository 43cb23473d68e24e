"""HF config.json <-> jaxgen config: one mapping per architecture, and the full run config around a
model.

    BertForPreTraining, BertModel, BertForMaskedLM -> bert (a missing MLM/NSP head is initialised)
    GPT2LMHeadModel, GPT2Model                     -> gpt  (pre-LN, lm_head tied to wte)
    T5ForConditionalGeneration                     -> t5   (v1.0: relu, tied, scaled output;
                                                             v1.1: gated-gelu, own lm_head)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jaxgen import config as config_lib
from jaxgen import objectives
from jaxgen.interop.hf.errors import InteropError, unsupported
from jaxgen.models.config import ModelConfig

ARCHITECTURES: dict[str, str] = {
    "BertForPreTraining": "bert",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForSequenceClassification": "bert",
    "BertForQuestionAnswering": "bert",
    "GPT2LMHeadModel": "gpt",
    "GPT2Model": "gpt",
    "T5ForConditionalGeneration": "t5",
}
# family -> (the architecture exported, its model_type)
EXPORT = {
    "bert": ("BertForPreTraining", "bert"),
    "gpt": ("GPT2LMHeadModel", "gpt2"),
    "t5": ("T5ForConditionalGeneration", "t5"),
}


def _hf_get(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def _t5_scales_output(hf: Mapping[str, Any]) -> bool:
    """Whether HF scales the decoder output by d_model**-0.5 (T5 v1.0 yes, v1.1 no)."""
    if hf.get("scale_decoder_outputs") is not None:  # transformers >= 5 writes it explicitly
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def _bert_from_hf(hf: Mapping[str, Any], arch: str, common: dict[str, Any]) -> dict[str, Any]:
    """BertConfig -> config.model."""
    act = _hf_get(hf, "hidden_act", "gelu")
    if act != "gelu":
        raise unsupported(arch, f"hidden_act={act!r} (jaxgen BERT uses the exact erf 'gelu')")
    if _hf_get(hf, "position_embedding_type", "absolute") != "absolute":
        raise unsupported(arch, f"position_embedding_type={hf['position_embedding_type']!r}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise unsupported(arch, "a decoder BERT (is_decoder / add_cross_attention)")
    d_model, heads = _hf_get(hf, "hidden_size", 768), _hf_get(hf, "num_attention_heads", 12)
    return dict(
        **common,
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
        num_labels=_num_labels(hf) if arch == "BertForSequenceClassification" else 0,
        span_head=arch == "BertForQuestionAnswering",
    )


def _num_labels(hf: Mapping[str, Any]) -> int:
    """A sequence classifier's outputs: id2label's size (HF's num_labels), 1 for regression."""
    if hf.get("num_labels"):
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


def _gpt_from_hf(hf: Mapping[str, Any], arch: str, common: dict[str, Any]) -> dict[str, Any]:
    """GPT2Config -> config.model."""
    act = _hf_get(hf, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise unsupported(arch, f"activation_function={act!r} (jaxgen GPT uses tanh GELU)")
    if not _hf_get(hf, "scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise unsupported(arch, "attention scaling other than 1/sqrt(head_dim)")
    if hf.get("add_cross_attention"):
        raise unsupported(arch, "add_cross_attention=True")
    d_model, heads = _hf_get(hf, "n_embd", 768), _hf_get(hf, "n_head", 12)
    return dict(
        **common,
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


def _t5_from_hf(hf: Mapping[str, Any], arch: str, common: dict[str, Any]) -> dict[str, Any]:
    """T5Config -> config.model."""
    feed_forward = _hf_get(hf, "feed_forward_proj", "relu")
    if feed_forward not in ("relu", "gated-gelu"):
        raise unsupported(arch, f"feed_forward_proj={feed_forward!r} (jaxgen: relu or gated-gelu)")
    num_layers = _hf_get(hf, "num_layers", 6)
    dropout = float(_hf_get(hf, "dropout_rate", 0.1))
    return dict(
        **common,
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
        num_decoder_layers=_hf_get(hf, "num_decoder_layers", num_layers),
        relative_attention_num_buckets=_hf_get(hf, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_hf_get(hf, "relative_attention_max_distance", 128),
        feed_forward=feed_forward,
        # Refined by `load` from the weights: jaxgen ties the output projection iff HF scales it.
        tie_embeddings=_t5_scales_output(hf),
    )


# family -> HF config.json dict -> config.model dict
FROM_HF: dict[str, Callable[[Mapping[str, Any], str, dict[str, Any]], dict[str, Any]]] = {
    "bert": _bert_from_hf, "gpt": _gpt_from_hf, "t5": _t5_from_hf,
}  # fmt: skip


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A jaxgen `config.model` dict from a HF config.json dict (raises for unsupported settings)."""
    arch = architecture(hf)
    family = ARCHITECTURES[arch]
    common = dict(family=family, dtype="float32", attention="auto", remat=False)
    return FROM_HF[family](hf, arch, common)


def _heads_fill_d_model(cfg: ModelConfig, name: str) -> None:
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        raise InteropError(
            f"HF {name} needs num_heads * head_dim == d_model; got "
            f"{cfg.num_heads} * {cfg.head_dim} != {cfg.d_model}"
        )


def _bert_to_hf(cfg: ModelConfig, base: dict[str, Any], ids: Mapping[str, Any]) -> dict[str, Any]:
    """config.model -> BertConfig."""
    _heads_fill_d_model(cfg, "BertForPreTraining")
    return dict(
        **base,
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
        **_classifier_to_hf(cfg),
    )


def _classifier_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A classifier exports as BertForSequenceClassification (its MLM and NSP heads stay behind)."""
    if not cfg.num_labels:
        return {}
    labels = {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    problem = "regression" if cfg.num_labels == 1 else "single_label_classification"
    return {"id2label": labels, "label2id": {v: k for k, v in labels.items()},
            "problem_type": problem, "classifier_dropout": None}  # fmt: skip


def _gpt_to_hf(cfg: ModelConfig, base: dict[str, Any], ids: Mapping[str, Any]) -> dict[str, Any]:
    """config.model -> GPT2Config."""
    _heads_fill_d_model(cfg, "GPT2LMHeadModel")
    if cfg.norm_position != "pre":
        raise InteropError(
            "GPT2LMHeadModel is pre-LN: a norm_position='post' (GPT-1) model cannot be exported"
        )
    if cfg.sparse_attention != "none":
        raise InteropError(
            "GPT2LMHeadModel has no locally banded attention: sparse_attention must be 'none'"
        )
    return dict(
        **base,
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


def _t5_to_hf(cfg: ModelConfig, base: dict[str, Any], ids: Mapping[str, Any]) -> dict[str, Any]:
    """config.model -> T5Config."""
    return dict(
        **base,
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


# family -> config.model -> HF config.json dict
TO_HF: dict[str, Callable[[ModelConfig, dict[str, Any], Mapping[str, Any]], dict[str, Any]]] = {
    "bert": _bert_to_hf, "gpt": _gpt_to_hf, "t5": _t5_to_hf,
}  # fmt: skip


def hf_config_from_model(
    model: Mapping[str, Any] | ModelConfig, token_ids: Mapping[str, int | None] | None = None
) -> dict[str, Any]:
    """The HF config.json dict for a jaxgen `config.model` (raises where HF cannot express it)."""
    cfg = ModelConfig.from_mapping(model)
    name, model_type = export_architecture(cfg), EXPORT[cfg.family][1]
    base = {"architectures": [name], "model_type": model_type, "dtype": "float32",
            "vocab_size": cfg.vocab_size}  # fmt: skip
    return TO_HF[cfg.family](cfg, base, dict(token_ids or {}))


# family -> the architecture a model with a classifier head (model.num_labels > 0) exports as
EXPORT_CLASSIFIER = {"bert": "BertForSequenceClassification"}


def export_architecture(cfg: ModelConfig) -> str:
    """The HF architecture a jaxgen model exports as (a BERT classifier or span model: its own)."""
    if getattr(cfg, "span_head", False):
        if cfg.num_labels:
            raise ValueError(
                "a model with both a classifier (model.num_labels) and a span head has no HF "
                "architecture; export one of them"
            )
        return "BertForQuestionAnswering"
    if cfg.num_labels:
        # The HF classes are per family: only BERT's classifier has an importer and exporter.
        if cfg.family not in EXPORT_CLASSIFIER:
            raise ValueError(
                f"a {cfg.family} model with a classifier head (model.num_labels="
                f"{cfg.num_labels}) has no HF export; export a {'/'.join(EXPORT_CLASSIFIER)} "
                "classifier, or the base model"
            )
        return EXPORT_CLASSIFIER[cfg.family]
    return EXPORT[cfg.family][0]


def architecture(hf: Mapping[str, Any]) -> str:
    """The supported architecture named in a HF config dict; else an error listing the supported."""
    names = list(hf.get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return name
    found = ", ".join(names) if names else f"none (model_type={hf.get('model_type')!r})"
    raise InteropError(f"unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)}")


def full_config(model: Mapping[str, Any], *, name: str = "") -> config_lib.RunConfig:
    """A complete run config around `model`: the schema's defaults for the other sections, the
    data length capped at the model's positions."""
    cfg = ModelConfig.from_mapping(model)
    data = objectives.get(cfg.family).Data(seq_len=min(128, cfg.max_len))
    return config_lib.RunConfig(
        model=cfg,
        data=data,
        optim=config_lib.AdamWConfig(),
        train=config_lib.TrainConfig(),
        mesh=config_lib.MeshConfig(),
        meta=config_lib.MetaConfig(name=name),
    )
