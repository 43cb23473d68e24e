"""Building blocks shared by BERT, GPT and T5: config, dense, embeddings, norms, MLP, attention.

Einsum and shape letters used in every model file: B batch, T query length, S key length, D embed
(d_model), N heads, H head dim, F mlp (d_ff), V vocab.

Parameters are created in float32 and carry logical axis names (`nn.with_logical_partitioning`) from
the vocabulary `batch, length, kv_length, embed, heads, kv, mlp, vocab, layers`; compute happens in
the config's dtype. Norm statistics and softmax always run in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jaxgen.kernels import dropout as dropout_lib
from jaxgen.kernels.attention import RelativePositionBias, attention


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, HF's 'gelu' (BERT)."""
    # 0.5 x (1 + erf(x / sqrt 2)), PyTorch's formula: XLA:CPU evaluates erf as one polynomial,
    # while jax.nn.gelu's erfc form costs an exp and two range selects per element.
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))


def gelu_tanh(x: jax.Array) -> jax.Array:
    """Tanh-approximate GELU, HF's 'gelu_new' (GPT-2, T5 v1.1)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": jax.nn.relu,
}


def _attention_partition() -> PartitionSpec | None:
    """Mesh axes of q `[B, T, N, H]` under the active logical rules (None outside a mesh context).

    The flash kernel runs under shard_map with this spec; the model itself never names mesh axes.
    """
    if not nn.get_logical_axis_rules():
        return None
    return nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))


def logical_param(
    module: nn.Module,
    name: str,
    init: Callable,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
) -> jax.Array:
    """Creates a float32 parameter annotated with logical axis names; returns it unboxed."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names (a no-op outside a rules context)."""
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """`y = x @ kernel + bias` over the last `in_dims` dims of x; kernel `[*in, *features]`.

    With `lora` (a rank > 0) also `+ alpha/rank * dropout(x) @ lora_a @ lora_b`, `lora_a [*in, r]`
    sharded like the kernel's input dims and `lora_b [r, *features]` like its output dims.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    in_dims: int = 1
    std: float = 0.02
    use_bias: bool = True
    dtype: Any = jnp.float32
    lora: Any = None  # jaxgen.config.LoraConfig of an adapted kernel, else None
    deterministic: bool = True  # the adapters' dropout

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., *in]` -> `[..., *features]` in `dtype`."""
        in_shape = x.shape[x.ndim - self.in_dims :]
        init = nn.initializers.normal(self.std)
        kernel = logical_param(self, "kernel", init, in_shape + self.features, self.kernel_axes)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ()))
        )
        if self.lora is not None:
            y = y + self._adapter(x, in_shape, contract)
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims :]
            bias = logical_param(self, "bias", nn.initializers.zeros, self.features, bias_axes)
            y = y + bias.astype(self.dtype)
        return y

    def _adapter(
        self, x: jax.Array, in_shape: tuple[int, ...], contract: tuple[tuple[int, ...], ...]
    ) -> jax.Array:
        rank = self.lora.rank
        fan_in = math.prod(in_shape)
        # peft's default: Kaiming-uniform A (a = sqrt(5): bound 1/sqrt(fan_in)), B zeros, so the
        # adapted model starts as the base model.
        a_init = _symmetric(fan_in)
        in_axes, out_axes = self.kernel_axes[: self.in_dims], self.kernel_axes[self.in_dims :]
        a = logical_param(self, "lora_a", a_init, in_shape + (rank,), in_axes + (None,))
        b = logical_param(
            self, "lora_b", nn.initializers.zeros, (rank,) + self.features, (None,) + out_axes
        )
        x = Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), (contract, ((), ())))
        out = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return out * jnp.asarray(self.lora.scale, self.dtype)


def _adapted(lora: Any, name: str, deterministic: bool) -> dict[str, Any]:
    """Dense's adapter fields for the kernel `name`: `lora` when its targets name it."""
    if lora is None or name not in lora.targets:
        return {}
    return {"lora": lora, "deterministic": deterministic}


def _symmetric(fan_in: int) -> Callable:
    """Uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in)] (torch's kaiming_uniform_ with a = sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Embed(nn.Module):
    """A lookup table `embedding [num, D]`; `attend` is the tied output projection."""

    num_embeddings: int
    features: int
    std: float = 0.02
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    dtype: Any = jnp.float32

    def setup(self) -> None:
        init = nn.initializers.normal(self.std)
        self.embedding = logical_param(
            self, "embedding", init, (self.num_embeddings, self.features), self.axes
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids `[...]` int32 -> `[..., D]`."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> logits `[..., num]` (x @ embedding.T) in float32."""
        return jnp.einsum(
            "...d,vd->...v",
            x.astype(self.dtype),
            self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


@jax.custom_vjp
def add_vocab_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """logits `[..., V]` + bias `[V]`, with the bias gradient as a matrix-vector product."""
    return logits + bias


def _add_vocab_bias_fwd(logits: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return logits + bias, None


def _add_vocab_bias_bwd(_: None, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The bias gradient sums grad over every row. XLA:CPU lowers that column reduction of a
    # [rows, V] array (V ~ 30k) about 40x slower than the same sum as `ones @ grad`.
    rows = grad.reshape(-1, grad.shape[-1])  # [M, V]
    return grad, jnp.einsum("m,mv->v", jnp.ones(rows.shape[:1], rows.dtype), rows)


add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


class Dropout(nn.Module):
    """Inverted dropout with the counter-based mask of `jaxgen.kernels.dropout` ('dropout' rng).

    Same interface as `flax.linen.Dropout`; the mask is a hash of the layer's key and the element
    index, far cheaper on CPU than threefry bits (see that module).
    """

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """x -> x with each element zeroed with probability `rate`, the rest scaled up."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        return dropout_lib.dropout(x, self.rate, self.make_rng("dropout"))


class LayerNorm(nn.Module):
    """LayerNorm, float32 statistics (centred variance, as PyTorch); `scale`, `bias` `[D]`."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> `[..., D]` in `dtype`."""
        features = x.shape[-1]
        scale = logical_param(self, "scale", nn.initializers.ones, (features,), ("embed",))
        bias = logical_param(self, "bias", nn.initializers.zeros, (features,), ("embed",))
        return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias` over the last axis (centred variance)."""
    return _normalize(x, scale, epsilon, True) + bias


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """`x / sqrt(mean(x^2) + epsilon) * scale` over the last axis (T5's norm)."""
    return _normalize(x, scale, epsilon, False)


# Both norms share one hand-written backward pass that keeps x-hat and one rsqrt per row.
# Autodiff of the plain expressions saves the rsqrt broadcast to [..., D] (XLA materialises it)
# and splits the backward into more passes: the norms were ~8% of a BERT CPU step, 2-4% less now.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _normalize(x: jax.Array, scale: jax.Array, epsilon: float, centred: bool) -> jax.Array:
    return _normalize_fwd(x, scale, epsilon, centred)[0]


def _normalize_fwd(x, scale, epsilon, centred):
    if centred:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)
    x_hat = x * rstd
    return x_hat * scale, (x_hat, rstd, scale)


def _normalize_bwd(epsilon, centred, residuals, dy):
    del epsilon
    x_hat, rstd, scale = residuals
    g = dy * scale
    dx = g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)
    if centred:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    return rstd * dx, jnp.sum(dy * x_hat, axis=tuple(range(dy.ndim - 1)))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction, no bias; `scale [D]`; statistics in float32."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> `[..., D]` in `dtype`."""
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        return rms_norm(x.astype(jnp.float32), scale, self.epsilon).astype(self.dtype)


class Mlp(nn.Module):
    """Feed-forward `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))` when `gated`."""

    d_ff: int
    activation: str
    wi_std: float
    wo_std: float
    use_bias: bool = True
    gated: bool = False
    inner_dropout: float = 0.0  # T5 drops the hidden activations; BERT and GPT do not
    deterministic: bool = True
    dtype: Any = jnp.float32
    lora: Any = None  # jaxgen.config.LoraConfig: adapters on the kernels its targets name

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`."""
        d_model = x.shape[-1]
        act = ACTIVATIONS[self.activation]

        def wi(name: str) -> jax.Array:
            dense = Dense(
                (self.d_ff,),
                ("embed", "mlp"),
                std=self.wi_std,
                use_bias=self.use_bias,
                dtype=self.dtype,
                name=name,
                **_adapted(self.lora, name, self.deterministic),
            )
            # Named for the remat policies (models/scan.py PROJECTIONS); a no-op without remat.
            return checkpoint_name(dense(x), "mlp_wi")  # [B, T, F]

        h = act(wi("wi_0")) * wi("wi_1") if self.gated else act(wi("wi"))
        h = constrain(h, ("batch", "length", "mlp"))
        h = Dropout(self.inner_dropout)(h, deterministic=self.deterministic)
        out = Dense(
            (d_model,),
            ("mlp", "embed"),
            std=self.wo_std,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="wo",
            **_adapted(self.lora, "wo", self.deterministic),
        )(h)
        return checkpoint_name(out, "mlp_wo")  # [B, T, D]


class MultiHeadAttention(nn.Module):
    """Multi-head attention: q, k, v projections `[D, N, H]`, output `out [N, H, D]`.

    `decode=True` keeps a KV cache in the 'cache' collection (`cached_key`, `cached_value`
    `[B, S, N, H]`, `cache_index`): the first call (at init) only sizes the cache to its input
    length; later calls append their T tokens at `cache_index` and attend causally to everything
    cached (the XLA path, queries offset by the cache index). `local_window` adds GPT-3's banded
    causal pattern (each query sees only the last `local_window` keys, itself included). Both are
    masks the attention implementation computes from positions: no `[T, S]` bias is built.
    """

    num_heads: int
    head_dim: int
    q_std: float
    kv_std: float
    out_std: float
    use_bias: bool = True
    scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    dropout_rate: float = 0.0
    impl: str = "auto"
    local_window: int | None = None
    decode: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    lora: Any = None  # jaxgen.config.LoraConfig: adapters on the kernels its targets name

    def _project(self, x: jax.Array, name: str, std: float) -> jax.Array:
        dense = Dense(
            (self.num_heads, self.head_dim),
            ("embed", "heads", "kv"),
            std=std,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name=name,
            **_adapted(self.lora, name, self.deterministic),
        )
        return checkpoint_name(dense(x), f"{name}_proj")  # [B, len, N, H]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        causal: bool = False,
        segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        relative_bias: RelativePositionBias | None = None,
    ) -> jax.Array:
        """x `[B, T, D]` attends over kv `[B, S, D]` (default: x itself) -> `[B, T, D]`."""
        cross = kv is not None
        kv = x if kv is None else kv
        q = constrain(self._project(x, "query", self.q_std), ("batch", "length", "heads", "kv"))
        k = self._project(kv, "key", self.kv_std)  # [B, S, N, H]
        v = self._project(kv, "value", self.kv_std)  # [B, S, N, H]
        kv_axes = ("batch", "kv_length", "heads", "kv")
        k, v = constrain(k, kv_axes), constrain(v, kv_axes)
        impl, q_offset = self.impl, 0
        if self.decode and not cross:
            if self.has_variable("cache", "cached_key"):
                k, v, q_offset = self._update_cache(k, v)
                causal, segment_ids, kv_segment_ids = True, None, None
            else:
                # First call (init): create a zero cache sized by this full-length input.
                self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
                self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
                self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if self.decode:
            impl = "xla"
        use_dropout = not self.deterministic and self.dropout_rate > 0.0
        out = attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            relative_bias=relative_bias,
            window=self.local_window,
            q_offset=q_offset,
            scale=self.scale,
            dropout_rate=self.dropout_rate if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            impl=impl,
            partition=_attention_partition(),
        )  # [B, T, N, H]
        out = constrain(out, ("batch", "length", "heads", "kv"))
        dense = Dense(
            (x.shape[-1],),
            ("heads", "kv", "embed"),
            in_dims=2,
            std=self.out_std,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="out",
            **_adapted(self.lora, "out", self.deterministic),
        )
        return checkpoint_name(dense(out), "out_proj")  # [B, T, D]

    def _update_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes k, v `[B, T, N, H]` at cache_index -> cached k, v `[B, S, N, H]`, its offset.

        Slots past the new tokens are still zeros: the causal mask at the returned query offset
        hides them.
        """
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        index, t_len = cache_index.value, k.shape[1]
        k = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, index, 0, 0)
        )
        v = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, index, 0, 0)
        )
        cached_key.value, cached_value.value, cache_index.value = k, v, index + t_len
        return k, v, index


def init_std_scaled(std: float, num_layers: int) -> float:
    """GPT-2's residual-projection init std: std / sqrt(2 * num_layers)."""
    return std / math.sqrt(2 * num_layers)
