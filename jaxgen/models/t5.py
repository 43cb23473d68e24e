"""T5 (Raffel et al. 2019): encoder-decoder with RMS norm, pre-norm residuals and relative position
bias.

Matches HuggingFace `T5ForConditionalGeneration`: no absolute positions; one relative-position table
per stack (HF keeps it in layer 0, here it is a parameter of the stack passed to every layer as a
`RelativePositionBias`, so the flash kernel computes the bias itself), bidirectional buckets in the
encoder, causal ones in the decoder, none in cross-attention; attention logits unscaled (scale 1.0);
ReLU feed-forward (v1.0) or gated-GELU with tanh GELU (v1.1, HF 'gelu_new'); no biases anywhere.
With `tie_embeddings` the output projection is the shared embedding and the decoder output is scaled
by d_model**-0.5 first. Init (Mesh-TF convention; `init_std` is not used): embedding 1.0, query
(d_model * head_dim)**-0.5, key/value d_model**-0.5, out (heads * head_dim)**-0.5, wi d_model**-0.5,
wo d_ff**-0.5, relative table d_model**-0.5, untied lm_head d_model**-0.5 (fan-in, as t5x; HF's 1.0
would give huge initial logits).

Parameter tree (D d_model, N heads, H head_dim, F d_ff, V vocab, R relative buckets, every leaf
float32):

    token_embed/embedding                      [V, D]  (vocab, embed)  shared by both stacks
    encoder/relative_bias                      [R, N]  (None, heads)
    encoder/layers_{i}/self_attention_norm/scale [D]
    encoder/layers_{i}/self_attention/{query,key,value}/kernel [D, N, H];  .../out/kernel [N, H, D]
    encoder/layers_{i}/mlp_norm/scale          [D]
    encoder/layers_{i}/mlp/wi/kernel [D, F]  (gated-gelu: wi_0, wi_1);  .../mlp/wo/kernel [F, D]
    encoder/final_norm/scale                   [D]
    decoder/relative_bias                      [R, N]
    decoder/layers_{i}/{self_attention_norm, self_attention, cross_attention_norm, cross_attention,
                        mlp_norm, mlp}         (shapes as in the encoder)
    decoder/final_norm/scale                   [D]
    lm_head/kernel                             [D, V]  (embed, vocab)  only when not tie_embeddings

With `scan_layers` each stack's layers_{i} subtrees are one `layers` subtree, each leaf stacked
`[L, ...]` (logical axis `layers` first; see `jaxgen.models.scan`); so is the decoder's KV cache.

Methods: `encode` and `decode` (decode=True keeps the decoder self-attention KV cache in 'cache').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxgen.kernels.attention import RelativePositionBias
from jaxgen.models import scan
from jaxgen.models.config import ModelConfig
from jaxgen.models.layers import (
    Dense,
    Dropout,
    Embed,
    Mlp,
    MultiHeadAttention,
    RMSNorm,
    constrain,
    logical_param,
)

ACTS = ("batch", "length", "embed")


class T5Block(nn.Module):
    """Pre-norm block: self-attention, (decoder) cross-attention, feed-forward, each residual."""

    config: ModelConfig
    is_decoder: bool = False
    deterministic: bool = True
    decode: bool = False

    def _attention(self, name: str, decode: bool) -> MultiHeadAttention:
        cfg = self.config
        d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
        return MultiHeadAttention(
            n,
            h,
            q_std=(d * h) ** -0.5,
            kv_std=d**-0.5,
            out_std=(n * h) ** -0.5,
            use_bias=False,
            scale=1.0,
            dropout_rate=cfg.attention_dropout,
            impl="xla" if self.decode else cfg.attention,
            decode=decode,
            deterministic=self.deterministic,
            dtype=cfg.compute_dtype,
            lora=cfg.lora,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        relative_table: jax.Array,
        encoded: jax.Array | None,
        encoder_mask: jax.Array | None,
    ) -> jax.Array:
        """x `[B, T, D]`, mask `[B, T]`, the stack's bias table `[R, N]`, encoded `[B, S, D]`,
        its mask `[B, S]` -> `[B, T, D]`."""
        cfg, dtype = self.config, self.config.compute_dtype
        # Only the table crosses the block boundary: under nn.remat every argument is traced,
        # and the bucket settings must stay static Python values.
        relative_bias = RelativePositionBias(
            relative_table,
            not self.is_decoder,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        eps = cfg.layer_norm_eps
        dropout = Dropout(cfg.dropout, deterministic=self.deterministic)
        # Queries are all in segment 1 so that (as in HF) only padding keys are hidden.
        queries = None if mask is None else jnp.ones_like(mask)
        h = RMSNorm(eps, dtype, name="self_attention_norm")(x)
        h = self._attention("self_attention", self.decode)(
            h,
            causal=self.is_decoder,
            segment_ids=queries,
            kv_segment_ids=mask,
            relative_bias=relative_bias,
        )
        x = x + dropout(h)
        if self.is_decoder:
            queries = None if encoder_mask is None else jnp.ones(x.shape[:2], jnp.int32)
            h = RMSNorm(eps, dtype, name="cross_attention_norm")(x)
            h = self._attention("cross_attention", False)(
                h, encoded, segment_ids=queries, kv_segment_ids=encoder_mask
            )
            x = x + dropout(h)
        gated = cfg.feed_forward == "gated-gelu"
        mlp = Mlp(
            cfg.d_ff,
            "gelu_tanh" if gated else "relu",
            wi_std=cfg.d_model**-0.5,
            wo_std=cfg.d_ff**-0.5,
            use_bias=False,
            gated=gated,
            inner_dropout=cfg.dropout,
            deterministic=self.deterministic,
            dtype=dtype,
            lora=cfg.lora,
            name="mlp",
        )
        x = x + dropout(mlp(RMSNorm(eps, dtype, name="mlp_norm")(x)))
        return constrain(x, ACTS)


class T5Stack(nn.Module):
    """The encoder or decoder stack with its relative-position table and final norm."""

    config: ModelConfig
    is_decoder: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        encoded: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Embedded inputs x `[B, T, D]` -> hidden states `[B, T, D]`."""
        cfg = self.config
        buckets = cfg.relative_attention_num_buckets
        table = logical_param(
            self,
            "relative_bias",
            nn.initializers.normal(cfg.d_model**-0.5),
            (buckets, cfg.num_heads),
            (None, "heads"),
        )
        relative_bias = RelativePositionBias(
            table, not self.is_decoder, buckets, cfg.relative_attention_max_distance
        )
        num_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        block_cls = scan.remat(T5Block, cfg, decode)
        x = Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ACTS)
        args = (mask, relative_bias.table, encoded, encoder_mask)
        if cfg.scan_layers:
            block = block_cls(cfg, self.is_decoder, deterministic, decode, name=scan.STACKED)
            x = scan.scan_stack(block, x, *args, length=num_layers)
        else:
            for i in range(num_layers):
                block = block_cls(cfg, self.is_decoder, deterministic, decode, name=f"layers_{i}")
                x = block(x, *args)
        x = RMSNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="final_norm")(x)
        return Dropout(cfg.dropout)(x, deterministic=deterministic)


def _check_mask(name: str, mask: jax.Array | None, ids: jax.Array) -> jax.Array | None:
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of its ids {ids.shape}; got {mask.shape}")
    return None if mask is None else mask.astype(jnp.int32)


class T5(nn.Module):
    """T5 encoder-decoder: (encoder ids, decoder ids) -> decoder logits."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, 1.0, dtype=cfg.compute_dtype)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(
                (cfg.vocab_size,),
                ("embed", "vocab"),
                std=cfg.d_model**-0.5,
                use_bias=False,
                dtype=cfg.compute_dtype,
            )

    def encode(
        self,
        encoder_input_ids: jax.Array,
        encoder_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """encoder ids `[B, S]` int32, mask `[B, S]` -> encoder output `[B, S, D]`."""
        encoder_mask = _check_mask("encoder_mask", encoder_mask, encoder_input_ids)
        x = self.token_embed(encoder_input_ids)  # [B, S, D]
        return self.encoder(x, encoder_mask, deterministic=deterministic)

    def decode(
        self,
        encoded: jax.Array,
        decoder_input_ids: jax.Array,
        encoder_mask: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """encoder output `[B, S, D]`, decoder ids `[B, T]` -> logits `[B, T, V]` float32.

        decode=True feeds the next T tokens through the KV cache (decoder_mask is then ignored).
        """
        decoder_mask = (
            None if decode else _check_mask("decoder_mask", decoder_mask, decoder_input_ids)
        )
        if encoder_mask is not None and encoder_mask.shape != encoded.shape[:2]:
            raise ValueError(f"encoder_mask must be {encoded.shape[:2]}; got {encoder_mask.shape}")
        encoder_mask = None if encoder_mask is None else encoder_mask.astype(jnp.int32)
        x = self.token_embed(decoder_input_ids)  # [B, T, D]
        x = self.decoder(x, decoder_mask, encoded, encoder_mask, deterministic, decode)
        if self.config.tie_embeddings:
            logits = self.token_embed.attend(x * self.config.d_model**-0.5)  # [B, T, V]
        else:
            logits = self.lm_head(x).astype(jnp.float32)  # [B, T, V]
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        encoder_input_ids: jax.Array,
        decoder_input_ids: jax.Array,
        encoder_mask: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """encoder ids `[B, S]`, decoder ids `[B, T]` (shifted right) -> logits `[B, T, V]`."""
        if encoder_input_ids.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: {encoder_input_ids.shape=} {decoder_input_ids.shape=}"
            )
        encoded = self.encode(encoder_input_ids, encoder_mask, deterministic)
        return self.decode(encoded, decoder_input_ids, encoder_mask, decoder_mask, deterministic)
