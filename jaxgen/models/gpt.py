"""GPT: decoder-only Transformer with learned positions and causal self-attention.

`norm_position='post'` is GPT-1 (Radford et al. 2018: x = LN(x + sublayer(x)), no final norm);
`'pre'` is GPT-2/GPT-3 (x = x + sublayer(LN(x)), final LayerNorm `final_norm`), matching HuggingFace
`GPT2LMHeadModel` (whose fused `c_attn` splits into query/key/value here). The MLP uses the
tanh-approximate GELU (HF 'gelu_new', as the original GPT code) for both variants. The output
projection is tied to the token embeddings. Init: normal(init_std), biases zero; with pre-LN the
residual projections (`attention/out`, `mlp/wo`, HF `c_proj`) use init_std / sqrt(2 * num_layers) as
GPT-2 does (GPT-1 did not scale them). `sparse_attention='alternating'` (GPT-3): odd layers attend
only to the last `local_window` positions.

Parameter tree (D d_model, N heads, H head_dim, F d_ff, V vocab, L max_len, every leaf float32):

    token_embed/embedding       [V, D]  (vocab, embed)   also the output projection
    position_embed/embedding    [L, D]  (length, embed)
    layers_{i}/attention_norm/{scale,bias} [D]
    layers_{i}/attention/{query,key,value}/kernel [D, N, H], bias [N, H]
    layers_{i}/attention/out/kernel [N, H, D], bias [D]
    layers_{i}/mlp_norm/{scale,bias} [D]
    layers_{i}/mlp/wi/kernel [D, F], bias [F];  layers_{i}/mlp/wo/kernel [F, D], bias [D]
    final_norm/{scale,bias}     [D]     (pre-LN only)
    score/kernel                [D, C]  (model.num_labels = C > 0: a classifier, no LM output)

With `scan_layers` the layers_{i} subtrees are one `layers` subtree, each leaf stacked `[L, ...]`
(logical axis `layers` first; see `jaxgen.models.scan`), and so is the KV cache; with alternating
attention the scanned step is a (dense, local) pair: `layers/dense/...` holds the even layers and
`layers/local/...` the odd ones, each `[L / 2, ...]`.

Decoding: `decode=True` uses the 'cache' collection (see `layers.MultiHeadAttention`); `positions`
must then be given (the absolute positions of the fed tokens).
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
    constrain,
    init_std_scaled,
)

ACTS = ("batch", "length", "embed")


class GptBlock(nn.Module):
    """One pre-LN or post-LN causal Transformer block."""

    config: ModelConfig
    local: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x `[B, T, D]`, segment_ids `[B, T]` or None -> `[B, T, D]`."""
        cfg, det, dtype = self.config, self.deterministic, self.config.compute_dtype
        std = cfg.init_std
        out_std = init_std_scaled(std, cfg.num_layers) if cfg.norm_position == "pre" else std
        attn = MultiHeadAttention(
            cfg.num_heads,
            cfg.head_dim,
            q_std=std,
            kv_std=std,
            out_std=out_std,
            dropout_rate=cfg.attention_dropout,
            impl=cfg.attention,
            local_window=cfg.local_window if self.local else None,
            decode=self.decode,
            deterministic=det,
            dtype=dtype,
            lora=cfg.lora,
            name="attention",
        )
        mlp = Mlp(
            cfg.d_ff,
            "gelu_tanh",
            wi_std=std,
            wo_std=out_std,
            deterministic=det,
            dtype=dtype,
            lora=cfg.lora,
            name="mlp",
        )
        attention_norm = LayerNorm(cfg.layer_norm_eps, dtype, name="attention_norm")
        mlp_norm = LayerNorm(cfg.layer_norm_eps, dtype, name="mlp_norm")
        dropout = Dropout(cfg.dropout, deterministic=det)

        def self_attention(h: jax.Array) -> jax.Array:
            return attn(h, causal=True, segment_ids=segment_ids)

        if cfg.norm_position == "pre":
            x = x + dropout(self_attention(attention_norm(x)))
            x = x + dropout(mlp(mlp_norm(x)))
        else:
            x = attention_norm(x + dropout(self_attention(x)))
            x = mlp_norm(x + dropout(mlp(x)))
        return constrain(x, ACTS)


class GptPeriod(nn.Module):
    """One scanned step of GPT-3's alternating layers: a dense block, then a locally banded one.

    The band is a static attribute of the attention, so the two kinds of layer cannot share one
    scanned step; their pair can (`ModelConfig.layer_period`).
    """

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x `[B, T, D]`, segment_ids `[B, T]` or None -> `[B, T, D]`."""
        cfg = self.config
        block_cls = scan.remat(GptBlock, cfg, self.decode)
        for name in cfg.layer_period:
            local = name == "local"
            x = block_cls(cfg, local, self.deterministic, self.decode, name=name)(x, segment_ids)
        return x


class Gpt(nn.Module):
    """GPT language model: token ids -> next-token logits."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array | dict[str, jax.Array]:
        """input_ids, positions, segment_ids `[B, T]` int32 -> logits `[B, T, V]` float32, or
        with model.num_labels > 0 {'classifier_logits': `[B, T, num_labels]`} (no LM head).

        positions=None means 0..T-1; segment_ids (0 = padding) keep packed documents apart.
        """
        cfg, dtype = self.config, self.config.compute_dtype
        length = input_ids.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"input length {length} exceeds model.max_len={cfg.max_len}")
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and arr.shape != input_ids.shape:
                raise ValueError(f"{name} must be {input_ids.shape}; got {arr.shape}")
        if positions is None:
            if decode:
                raise ValueError("decode=True needs the positions of the fed tokens")
            positions = jnp.arange(length)[None, :]  # [1, T]
        if decode:
            segment_ids = None  # a decoding batch is one document per row

        token_embed = Embed(
            cfg.vocab_size, cfg.d_model, cfg.init_std, dtype=dtype, name="token_embed"
        )
        position_embed = Embed(
            cfg.max_len,
            cfg.d_model,
            cfg.init_std,
            ("length", "embed"),
            dtype,
            name="position_embed",
        )
        x = token_embed(input_ids) + position_embed(positions)  # [B, T, D]
        x = Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ACTS)

        block_cls = scan.remat(GptBlock, cfg, decode)
        if cfg.scan_layers:
            steps = scan.scan_steps(cfg.num_layers, cfg.layer_period, "num_layers")
            if cfg.layer_period:
                step = GptPeriod(cfg, deterministic, decode, name=scan.STACKED)
            else:
                step = block_cls(cfg, False, deterministic, decode, name=scan.STACKED)
            x = scan.scan_stack(step, x, segment_ids, length=steps)
        else:
            for i in range(cfg.num_layers):
                local = cfg.sparse_attention == "alternating" and i % 2 == 1
                x = block_cls(cfg, local, deterministic, decode, name=f"layers_{i}")(x, segment_ids)
        if cfg.norm_position == "pre":
            x = LayerNorm(cfg.layer_norm_eps, dtype, name="final_norm")(x)
        if cfg.num_labels:  # HF GPT2ForSequenceClassification's `score`: no bias, every position
            scores = Dense(
                (cfg.num_labels,), ("embed", None), std=cfg.init_std, use_bias=False,
                dtype=dtype, name="score",
            )(x)  # fmt: skip
            return {"classifier_logits": scores.astype(jnp.float32)}  # [B, T, num_labels]
        logits = token_embed.attend(x)  # [B, T, V]
        return constrain(logits, ("batch", "length", "vocab"))
