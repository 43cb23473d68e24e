"""BERT (Devlin et al. 2018): post-LN Transformer encoder with the MLM and NSP pretraining heads.

Matches HuggingFace `BertForPreTraining` (exact erf GELU, LayerNorm eps from the config, 1e-12).
Parameter tree (D d_model, N heads, H head_dim, F d_ff, V vocab, L max_len, every leaf float32):

    token_embed/embedding        [V, D]   (vocab, embed)   also the tied MLM output projection
    position_embed/embedding     [L, D]   (length, embed)
    segment_embed/embedding      [2, D]   (None, embed)
    embed_norm/{scale,bias}      [D]
    layers_{i}/attention/{query,key,value}/kernel [D, N, H], bias [N, H]
    layers_{i}/attention/out/kernel [N, H, D], bias [D]
    layers_{i}/attention_norm/{scale,bias} [D]
    layers_{i}/mlp/wi/kernel [D, F], bias [F];  layers_{i}/mlp/wo/kernel [F, D], bias [D]
    layers_{i}/mlp_norm/{scale,bias} [D]
    mlm_dense/kernel [D, D] (embed, mlp), bias [D];  mlm_norm/{scale,bias} [D];  mlm_bias [V]
    pooler/kernel [D, D] (embed, mlp), bias [D];  nsp/kernel [D, 2], bias [2]
    classifier/kernel [D, C], bias [C] (model.num_labels = C > 0)
    span/kernel [D, 2], bias [2] (model.span_head)

Given masked_positions (and no span head), an unrolled stack's last layer computes only the rows
the heads read, [CLS] and those positions (its keys and values still cover every token): in a
fine-tuning step the last layer's queries, attention and MLP run at 2 of T positions.

With `scan_layers` the layers_{i} subtrees are one `layers` subtree, each leaf stacked `[L, ...]`
(logical axis `layers` first; see `jaxgen.models.scan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxgen.models import scan
from jaxgen.models.config import ModelConfig
from jaxgen.models.layers import (
    Dense,
    Dropout,
    Embed,
    LayerNorm,
    Mlp,
    MultiHeadAttention,
    add_vocab_bias,
    constrain,
    gelu,
    logical_param,
)

ACTS = ("batch", "length", "embed")


class BertBlock(nn.Module):
    """Post-LN encoder block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, kv_segment_ids: jax.Array, query_positions: jax.Array | None = None
    ) -> jax.Array:
        """x `[B, T, D]`, kv_segment_ids `[B, T]` (the attention mask) -> `[B, T, D]`, or only
        the rows at query_positions `[B, Q]` -> `[B, Q, D]` (keys and values still cover all T)."""
        cfg, det, dtype = self.config, self.deterministic, self.config.compute_dtype
        std = cfg.init_std
        attn = MultiHeadAttention(
            cfg.num_heads,
            cfg.head_dim,
            q_std=std,
            kv_std=std,
            out_std=std,
            dropout_rate=cfg.attention_dropout,
            impl=cfg.attention,
            deterministic=det,
            dtype=dtype,
            lora=cfg.lora,
            name="attention",
        )
        kv = None
        if query_positions is not None:
            x, kv = jnp.take_along_axis(x, query_positions[:, :, None], axis=1), x
        # Every query (padding too, as in HF) sees every real key: queries all in segment 1.
        queries = jnp.ones(x.shape[:2], jnp.int32)
        h = attn(x, kv, segment_ids=queries, kv_segment_ids=kv_segment_ids)
        h = Dropout(cfg.dropout)(h, deterministic=det)
        x = LayerNorm(cfg.layer_norm_eps, dtype, name="attention_norm")(x + h)
        h = Mlp(
            cfg.d_ff, "gelu", wi_std=std, wo_std=std, deterministic=det, dtype=dtype,
            lora=cfg.lora, name="mlp",
        )(x)  # fmt: skip
        h = Dropout(cfg.dropout)(h, deterministic=det)
        x = LayerNorm(cfg.layer_norm_eps, dtype, name="mlp_norm")(x + h)
        return constrain(x, ACTS)


class Bert(nn.Module):
    """BERT encoder with MLM head (at the masked positions only) and NSP head."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array,
        attention_mask: jax.Array,
        masked_positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """ids, segment ids, mask `[B, T]` int32; masked_positions `[B, P]` or None (all T).

        Returns {'mlm_logits': `[B, P, V]` (or `[B, T, V]`), 'nsp_logits': `[B, 2]`}, float32,
        and 'classifier_logits' `[B, num_labels]` when model.num_labels > 0, 'span_logits'
        `[B, T, 2]` (answer start, end) with model.span_head.
        """
        cfg, dtype = self.config, self.config.compute_dtype
        batch, length = input_ids.shape
        if length > cfg.max_len:
            raise ValueError(f"input length {length} exceeds model.max_len={cfg.max_len}")
        for name, arr in (("segment_ids", segment_ids), ("attention_mask", attention_mask)):
            if arr.shape != input_ids.shape:
                raise ValueError(f"{name} must be {input_ids.shape}; got {arr.shape}")
        if masked_positions is not None and (
            masked_positions.ndim != 2 or masked_positions.shape[0] != batch
        ):
            raise ValueError(f"masked_positions must be [{batch}, P]; got {masked_positions.shape}")

        token_embed = Embed(
            cfg.vocab_size, cfg.d_model, cfg.init_std, dtype=dtype, name="token_embed"
        )
        positions = jnp.arange(length)[None, :]  # [1, T]
        x = (
            token_embed(input_ids)
            + Embed(
                cfg.max_len,
                cfg.d_model,
                cfg.init_std,
                ("length", "embed"),
                dtype,
                name="position_embed",
            )(positions)
            + Embed(
                cfg.type_vocab_size,
                cfg.d_model,
                cfg.init_std,
                (None, "embed"),
                dtype,
                name="segment_embed",
            )(segment_ids)
        )  # [B, T, D]
        x = LayerNorm(cfg.layer_norm_eps, dtype, name="embed_norm")(x)
        x = Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ACTS)

        block_cls = scan.remat(BertBlock, cfg)
        kv_segment_ids = attention_mask.astype(jnp.int32)
        # The heads read the last layer at [CLS] (pooler) and at the masked positions (MLM) only,
        # unless the span head reads every token. An unrolled stack's last layer then computes
        # only those rows: its keys and values cover every token, but its queries, attention
        # output and MLP run at 1 + P of T positions. A scanned stack runs every layer in full
        # (one compiled step) and gathers the rows after it.
        read = None
        if masked_positions is not None and not cfg.span_head:
            cls_position = jnp.zeros((batch, 1), jnp.int32)
            read = jnp.concatenate([cls_position, masked_positions.astype(jnp.int32)], axis=1)
        if cfg.scan_layers:
            block = block_cls(cfg, deterministic, name=scan.STACKED)
            x = scan.scan_stack(block, x, kv_segment_ids, length=cfg.num_layers)
            if read is not None:
                x = jnp.take_along_axis(x, read[:, :, None], axis=1)
        else:
            for i in range(cfg.num_layers):
                last = read if i == cfg.num_layers - 1 else None
                x = block_cls(cfg, deterministic, name=f"layers_{i}")(x, kv_segment_ids, last)

        # MLM head: only the gathered positions go through the transform and the vocab projection.
        h = x if read is None else x[:, 1:]  # [B, P or T, D]
        h = Dense(
            (cfg.d_model,), ("embed", "mlp"), std=cfg.init_std, dtype=dtype, name="mlm_dense"
        )(h)  # [B, P, D]
        h = LayerNorm(cfg.layer_norm_eps, dtype, name="mlm_norm")(gelu(h))
        mlm_bias = logical_param(
            self, "mlm_bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",)
        )
        mlm_logits = add_vocab_bias(token_embed.attend(h), mlm_bias)  # [B, P, V]
        mlm_logits = constrain(mlm_logits, ("batch", "length", "vocab"))

        pooled = Dense(
            (cfg.d_model,), ("embed", "mlp"), std=cfg.init_std, dtype=dtype, name="pooler"
        )(x[:, 0])  # [B, D]
        nsp_logits = Dense((2,), ("embed", None), std=cfg.init_std, dtype=dtype, name="nsp")(
            jnp.tanh(pooled)
        )  # [B, 2]
        out = {"mlm_logits": mlm_logits, "nsp_logits": nsp_logits.astype(jnp.float32)}
        if cfg.num_labels:  # fine-tuning: BERT's "apart from output layers, the same"
            h = Dropout(cfg.dropout)(jnp.tanh(pooled), deterministic=deterministic)
            logits = Dense(
                (cfg.num_labels,), ("embed", None), std=cfg.init_std, dtype=dtype,
                name="classifier",
            )(h)  # fmt: skip
            out["classifier_logits"] = logits.astype(jnp.float32)  # [B, num_labels]
        if cfg.span_head:  # run_squad.py's cls/squad/output_weights: start and end per token
            span = Dense((2,), ("embed", None), std=cfg.init_std, dtype=dtype, name="span")(x)
            out["span_logits"] = constrain(span.astype(jnp.float32), ("batch", "length", None))
        return out
