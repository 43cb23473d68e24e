"""Generation from trained models: GPT sampling and T5 decoding with a KV cache, BERT Gibbs
sampling.

Pure functions of (module, params, token arrays, settings) -> token arrays. Each runs one jitted
`lax.fori_loop` over the steps, compiled once per module and shapes (the sampling settings are
traced). `temperature=0` means greedy (argmax); otherwise logits are divided by the temperature,
filtered to the `top_k` largest (0 = off) and to the smallest set whose probability reaches `top_p`
(1.0 = off), and sampled with a key derived from `seed`, so the same seed gives the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxgen.models import scan

Params = Any


def check_sampling(
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raises ValueError for a sampling setting out of range (None: not checked)."""
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off); got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p}")


def _settings(
    temperature: float, top_k: int, top_p: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validated (temperature, top_k, top_p) as traced scalars for `choose_tokens`."""
    check_sampling(temperature, top_k, top_p)
    return jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)


def _tokens(ids: Any, name: str, vocab_size: int | None = None) -> jax.Array:
    # A device array is checked where it lies: a global batch of a multi-host mesh has no host copy.
    if not isinstance(ids, jax.Array):
        ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be [batch, length] token ids; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
    # XLA would silently clamp an out-of-range id to the last embedding row.
    if vocab_size is not None and ids.size:
        low, high = (int(v) for v in np.asarray(_id_range(ids)))  # replicated: every host has it
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} has ids outside [0, {vocab_size}): min {low}, max {high}")
    return jnp.asarray(ids, jnp.int32)


def _id_range(ids: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """[min, max] of token ids: on the host for a host array, on the devices for a device one."""
    if isinstance(ids, np.ndarray):
        return np.array([ids.min(), ids.max()])
    return _device_id_range(ids)


@jax.jit
def _device_id_range(ids: jax.Array) -> jax.Array:
    return jnp.stack([jnp.min(ids), jnp.max(ids)])


def choose_tokens(
    rng: jax.Array,
    logits: jax.Array,
    temperature: jax.Array | float,
    top_k: jax.Array | int,
    top_p: jax.Array | float,
) -> jax.Array:
    """Picks one token per row of logits `[B, V]` -> `[B]` int32: argmax if temperature is 0, else a
    sample.

    All settings are traced values, so one compilation serves every setting.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    # Top-k: keep logits >= the k-th largest (k = 0 keeps all).
    kth = jnp.take(sorted_logits, jnp.maximum(top_k, 1) - 1, axis=-1)[:, None]  # [B, 1]
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    # Nucleus: keep the largest logits until their probability reaches top_p (the top one always).
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.maximum(jnp.min(kept, axis=-1, keepdims=True), kth)  # [B, 1] smallest kept logit
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _zeros_cache(init_fn: Any) -> Params:
    """A zero KV cache shaped by tracing `init_fn` (no parameter is computed)."""
    shapes = jax.eval_shape(init_fn)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# -----------------------------------------------------------------------------------------------
# GPT


def sample_gpt(
    module: nn.Module,
    params: Params,
    prompt: Any,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> jax.Array:
    """Continues prompts `[B, P]` int32 by `max_new_tokens` -> `[B, P + max_new_tokens]` int32.

    All rows share the prompt length P. After a row emits `eos_id` it keeps emitting `eos_id`.
    """
    prompt = _gpt_prompt(module, prompt, max_new_tokens)
    settings = _settings(temperature, top_k, top_p)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    return _sample_gpt(
        module,
        nn.meta.unbox(params),
        prompt,
        jax.random.key(seed),
        settings,
        eos,
        max_new_tokens=max_new_tokens,
    )


def _gpt_prompt(module: nn.Module, prompt: Any, max_new_tokens: int) -> jax.Array:
    """The prompts `[B, P]` as int32, checked against the vocabulary and the model's context."""
    prompt = _tokens(prompt, "prompt", module.config.vocab_size)
    prompt_len = prompt.shape[1]
    if prompt_len == 0:
        raise ValueError(
            "the GPT prompt is empty: give at least one token (e.g. the end-of-text token)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    max_len = module.config.max_len
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context max_len={max_len}; shorten the prompt or generate fewer tokens"
        )
    return prompt


def _gpt_decoder(module: nn.Module, params: Params, batch: int, total: int) -> tuple[Any, Params]:
    """(forward(cache, tokens `[B, t]`, start) -> (logits of the last `[B, V]`, cache), a zero KV
    cache) for decoding `batch` rows of up to `total` tokens."""

    def forward(cache: Params, tokens: jax.Array, start: jax.Array) -> tuple[jax.Array, Params]:
        positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [B, t]
        logits, mutated = module.apply(
            {"params": params, "cache": cache}, tokens, positions, decode=True, mutable=["cache"]
        )
        return logits[:, -1], mutated["cache"]  # [B, V]

    full = jnp.zeros((batch, total), jnp.int32)
    cache = _zeros_cache(
        lambda: module.init(jax.random.key(0), full, jnp.zeros_like(full), decode=True)
    )
    return forward, cache


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _sample_gpt(
    module: nn.Module,
    params: Params,
    prompt: jax.Array,
    rng: jax.Array,
    settings: tuple[jax.Array, jax.Array, jax.Array],
    eos_id: jax.Array,
    *,
    max_new_tokens: int,
) -> jax.Array:
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    forward, cache = _gpt_decoder(module, params, batch, total)
    logits, cache = forward(cache, prompt, jnp.int32(0))  # prefill the whole prompt at once
    out = jax.lax.dynamic_update_slice(jnp.zeros((batch, total), jnp.int32), prompt, (0, 0))

    def step(i: jax.Array, carry: tuple) -> tuple:
        out, cache, logits, done = carry
        token = choose_tokens(jax.random.fold_in(rng, i), logits, *settings)  # [B]
        token = jnp.where(done, eos_id, token)
        done = done | (token == eos_id)  # eos_id -1 (none) never matches
        position = prompt_len + i
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, position))
        # The forward after the last token is wasted but keeps the loop body uniform.
        logits, cache = forward(cache, token[:, None], position)
        return out, cache, logits, done

    done = jnp.zeros((batch,), bool)
    out, *_ = jax.lax.fori_loop(0, max_new_tokens, step, (out, cache, logits, done))
    return out


# ------------------------------------------------------------------------------------------------
# T5


def decode_t5(
    module: nn.Module,
    params: Params,
    encoder_input_ids: Any,
    encoder_mask: Any | None = None,
    *,
    max_decode_len: int,
    decoder_start_id: int = 0,
    eos_id: int | None = 1,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> jax.Array:
    """Sampled (or, at temperature 0, greedy) T5 decoding of encoder ids `[B, S]` -> `[B,
    max_decode_len]`.

    The decoder starts from `decoder_start_id` (T5: pad, 0), which is not part of the output; after
    `eos_id` a row emits `pad_id`. The encoder runs once; the decoder uses its KV cache.
    """
    encoder_input_ids, encoder_mask = _t5_inputs(
        module, encoder_input_ids, encoder_mask, max_decode_len
    )
    specials = jnp.array([decoder_start_id, -1 if eos_id is None else eos_id, pad_id], jnp.int32)
    return _decode_t5(
        module,
        nn.meta.unbox(params),
        encoder_input_ids,
        encoder_mask,
        jax.random.key(seed),
        _settings(temperature, top_k, top_p),
        specials,
        max_decode_len=max_decode_len,
    )


def _t5_inputs(
    module: nn.Module, encoder_input_ids: Any, encoder_mask: Any | None, max_decode_len: int
) -> tuple[jax.Array, jax.Array | None]:
    """Encoder ids `[B, S]` and mask as int32, checked against the vocabulary and each other."""
    encoder_input_ids = _tokens(encoder_input_ids, "encoder_input_ids", module.config.vocab_size)
    if encoder_input_ids.shape[1] == 0:
        raise ValueError("encoder_input_ids is empty: give at least one token")
    if encoder_mask is not None:
        encoder_mask = _tokens(encoder_mask, "encoder_mask")
        if encoder_mask.shape != encoder_input_ids.shape:
            raise ValueError(
                f"encoder_mask must be {encoder_input_ids.shape}; got {encoder_mask.shape}"
            )
    if max_decode_len < 1:
        raise ValueError(f"max_decode_len must be >= 1; got {max_decode_len}")
    return encoder_input_ids, encoder_mask


def _t5_decoder(
    module: nn.Module, params: Params, encoded: jax.Array, mask: jax.Array | None, length: int
) -> tuple[Any, Params]:
    """(forward(cache, tokens `[B]`) -> (logits of the next `[B, V]`, cache), a zero KV cache)
    for decoding up to `length` tokens after the encoder output `encoded [B, S, D]`."""

    def forward(cache: Params, tokens: jax.Array) -> tuple[jax.Array, Params]:
        logits, mutated = module.apply(
            {"params": params, "cache": cache}, encoded, tokens[:, None], mask, decode=True,
            method="decode", mutable=["cache"],
        )  # fmt: skip
        return logits[:, 0], mutated["cache"]

    full = jnp.zeros((encoded.shape[0], length), jnp.int32)
    cache = _zeros_cache(
        lambda: module.init(jax.random.key(0), encoded, full, mask, decode=True, method="decode")
    )
    return forward, cache


@functools.partial(jax.jit, static_argnames=("module", "max_decode_len"))
def _decode_t5(
    module: nn.Module,
    params: Params,
    encoder_input_ids: jax.Array,
    encoder_mask: jax.Array | None,
    rng: jax.Array,
    settings: tuple[jax.Array, jax.Array, jax.Array],
    specials: jax.Array,
    *,
    max_decode_len: int,
) -> jax.Array:
    decoder_start_id, eos_id, pad_id = specials[0], specials[1], specials[2]
    batch = encoder_input_ids.shape[0]
    encoded = module.apply(
        {"params": params}, encoder_input_ids, encoder_mask, method="encode"
    )  # [B, S, D]
    forward, cache = _t5_decoder(module, params, encoded, encoder_mask, max_decode_len)

    def step(i: jax.Array, carry: tuple) -> tuple:
        out, cache, token, done = carry
        logits, cache = forward(cache, token)  # [B, V]
        token = choose_tokens(jax.random.fold_in(rng, i), logits, *settings)  # [B]
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)  # eos_id -1 (none) never matches
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return out, cache, token, done

    start = jnp.full((batch,), decoder_start_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    full = jnp.zeros((batch, max_decode_len), jnp.int32)
    out, *_ = jax.lax.fori_loop(0, max_decode_len, step, (full, cache, start, done))
    return out


# ----------------------------------------------------------------------------------------------
# Beam search

NEG = -1.0e9  # the score of an empty slot or an excluded candidate (HF's and t5x's value)


def brevity(length: jax.Array, alpha: float) -> jax.Array:
    """t5x's brevity penalty ((5 + length) / 6) ** alpha: a finished beam's log-prob is divided by
    it (alpha 0: plain log-probs)."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _reorder_cache(cache: Params, rows: jax.Array) -> Params:
    """The KV cache of the beams `rows` (flat indices into batch x beams); scanned stacks keep
    their layers on axis 0 and their rows on axis 1, cache indices are shared scalars."""

    def take(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        if leaf.ndim < 2:  # cache_index: a scalar, or [L] when stacked
            return leaf
        return jnp.take(leaf, rows, axis=1 if scan.in_stack(path) else 0)

    return jax.tree_util.tree_map_with_path(take, cache)


def _beam_search(
    step_fn: Any,
    cache: Params,
    logits: jax.Array,
    batch: int,
    num_beams: int,
    length: int,
    eos_id: jax.Array,
    pad_id: jax.Array,
    alpha: float,
) -> jax.Array:
    """Beam search over `length` new tokens -> the best finished beam per row `[B, length]`.

    logits `[B*K, V]`: of the first new token, each row repeated K times; step_fn(cache, tokens
    `[B*K]`, i) -> (logits of token i + 1, cache). HF's algorithm (transformers 5 `_beam_search`,
    early_stopping=False): the 2K best continuations; those ending in eos among the first K finish
    (score / brevity(length)); the K best others run on; a row stops once its best running beam,
    at its current length, cannot beat its worst of K finished ones; at `length` every candidate
    finishes. With alpha 0 it returns HF's tokens for length_penalty 0.
    """
    k = num_beams
    vocab = logits.shape[-1]
    top_k_mask = jnp.arange(2 * k) < k
    batch_offset = (jnp.arange(batch) * k)[:, None]

    def gather(x: jax.Array, index: jax.Array) -> jax.Array:  # x [B, M, ...], index [B, J]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def step(i: jax.Array, carry: tuple) -> tuple:
        cache, logits, run_seq, run_score, fin_seq, fin_score, fin_flag, open_ = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
        total = (logp + run_score[:, :, None]).reshape(batch, k * vocab)
        cand_score, flat = jax.lax.top_k(total, 2 * k)  # [B, 2K]
        beam, token = flat // vocab, flat % vocab
        cand_seq = gather(run_seq, beam)
        cand_seq = jax.lax.dynamic_update_index_in_dim(cand_seq, token, i, axis=2)
        hits = (token == eos_id) | (i + 1 == length)
        # The K best continuations that did not end run on.
        run_score, keep = jax.lax.top_k(cand_score + hits * NEG, k)
        run_seq = gather(cand_seq, keep)
        rows = (gather(beam, keep) + batch_offset).reshape(-1)
        # Those that ended among the first K join the finished ones, while the row is open.
        joined = cand_score / brevity(i + 1, alpha)
        joined = jnp.where(hits & top_k_mask & open_[:, None], joined, joined + NEG)
        merged_score = jnp.concatenate([fin_score, joined], axis=1)
        fin_score, best = jax.lax.top_k(merged_score, k)
        fin_seq = gather(jnp.concatenate([fin_seq, cand_seq], axis=1), best)
        fin_flag = gather(jnp.concatenate([fin_flag, hits & top_k_mask], axis=1), best)
        # Can a running beam still beat the worst finished one (all K finished)?
        best_running = run_score[:, 0] / brevity(i + 1, alpha)
        worst = jnp.where(fin_flag.all(axis=1), fin_score.min(axis=1), NEG)
        open_ = open_ & (best_running > worst)
        tokens = jax.lax.dynamic_index_in_dim(run_seq, i, axis=2, keepdims=False).reshape(-1)
        # The forward after the last token is wasted but keeps the loop body uniform.
        logits, cache = step_fn(_reorder_cache(cache, rows), tokens, i)
        return cache, logits, run_seq, run_score, fin_seq, fin_score, fin_flag, open_

    seqs = jnp.full((batch, k, length), pad_id, jnp.int32)
    run_score = jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None, :].repeat(batch, 0)
    fin_score = jnp.full((batch, k), NEG)
    carry = (cache, logits, seqs, run_score, seqs, fin_score, jnp.zeros((batch, k), bool),
             jnp.ones((batch,), bool))  # fmt: skip
    # A beam is frozen when it finishes: its positions after eos keep their pad_id fill.
    return jax.lax.fori_loop(0, length, step, carry)[4][:, 0]


def _check_beams(num_beams: int, alpha: float) -> None:
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1; got {num_beams}")
    if alpha < 0:
        raise ValueError(f"the brevity penalty alpha must be >= 0 (0 = none); got {alpha}")


def beam_search_gpt(
    module: nn.Module,
    params: Params,
    prompt: Any,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    alpha: float = 0.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """The best of `num_beams` beams continuing prompts `[B, P]` -> `[B, P + max_new_tokens]`
    int32 (`pad_id` after a beam's `eos_id`); alpha: t5x's brevity penalty."""
    prompt = _gpt_prompt(module, prompt, max_new_tokens)
    _check_beams(num_beams, alpha)
    specials = jnp.array([-1 if eos_id is None else eos_id, pad_id], jnp.int32)
    new = _beam_gpt(module, nn.meta.unbox(params), prompt, specials, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, alpha=float(alpha))  # fmt: skip
    return jnp.concatenate([prompt, new], axis=1)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "num_beams", "alpha"))
def _beam_gpt(
    module: nn.Module,
    params: Params,
    prompt: jax.Array,
    specials: jax.Array,
    *,
    max_new_tokens: int,
    num_beams: int,
    alpha: float,
) -> jax.Array:
    batch, prompt_len = prompt.shape
    rows = jnp.repeat(prompt, num_beams, axis=0)  # [B*K, P]
    forward, cache = _gpt_decoder(module, params, rows.shape[0], prompt_len + max_new_tokens)
    logits, cache = forward(cache, rows, jnp.int32(0))
    step_fn = lambda c, t, i: forward(c, t[:, None], prompt_len + i)  # noqa: E731
    return _beam_search(step_fn, cache, logits, batch, num_beams, max_new_tokens,
                        specials[0], specials[1], alpha)  # fmt: skip


def beam_search_t5(
    module: nn.Module,
    params: Params,
    encoder_input_ids: Any,
    encoder_mask: Any | None = None,
    *,
    max_decode_len: int,
    num_beams: int = 4,
    alpha: float = 0.0,
    decoder_start_id: int = 0,
    eos_id: int | None = 1,
    pad_id: int = 0,
) -> jax.Array:
    """The best of `num_beams` beams decoding encoder ids `[B, S]` -> `[B, max_decode_len]` int32
    (without the start token; `pad_id` after `eos_id`); alpha: t5x's brevity penalty."""
    encoder_input_ids, encoder_mask = _t5_inputs(
        module, encoder_input_ids, encoder_mask, max_decode_len
    )
    _check_beams(num_beams, alpha)
    specials = jnp.array([decoder_start_id, -1 if eos_id is None else eos_id, pad_id], jnp.int32)
    return _beam_t5(module, nn.meta.unbox(params), encoder_input_ids, encoder_mask, specials,
                    max_decode_len=max_decode_len, num_beams=num_beams,
                    alpha=float(alpha))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("module", "max_decode_len", "num_beams", "alpha"))
def _beam_t5(
    module: nn.Module,
    params: Params,
    encoder_input_ids: jax.Array,
    encoder_mask: jax.Array | None,
    specials: jax.Array,
    *,
    max_decode_len: int,
    num_beams: int,
    alpha: float,
) -> jax.Array:
    batch = encoder_input_ids.shape[0]
    encoded = module.apply({"params": params}, encoder_input_ids, encoder_mask, method="encode")
    encoded = jnp.repeat(encoded, num_beams, axis=0)  # [B*K, S, D]
    mask = None if encoder_mask is None else jnp.repeat(encoder_mask, num_beams, axis=0)
    forward, cache = _t5_decoder(module, params, encoded, mask, max_decode_len)
    logits, cache = forward(cache, jnp.full((encoded.shape[0],), specials[0], jnp.int32))
    step_fn = lambda c, t, i: forward(c, t)  # noqa: E731
    return _beam_search(step_fn, cache, logits, batch, num_beams, max_decode_len,
                        specials[1], specials[2], alpha)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# BERT


def gibbs_bert(
    module: nn.Module,
    params: Params,
    input_ids: Any,
    *,
    mask_id: int,
    segment_ids: Any | None = None,
    attention_mask: Any | None = None,
    free: Any | None = None,
    num_sweeps: int = 50,
    order: str = "parallel",
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    banned_ids: Sequence[int] = (),
) -> jax.Array:
    """BERT as a Markov random field (Wang & Cho 2019): Gibbs-resamples ids `[B, T]` -> `[B, T]`.

    The `free` positions (default: those equal to `mask_id`, e.g. an all-[MASK] start or a partly
    masked prompt) are resampled; the rest stay fixed. `order='parallel'` (the default, one forward
    pass per sweep): each sweep resamples every free position at once. `order='sequential'`: each
    sweep visits the free positions left to right, masking the visited one and sampling it from the
    MLM distribution given all others. `mask_id` and `banned_ids` (e.g. [CLS], [SEP], [PAD]) are
    never sampled.
    """
    input_ids = _tokens(input_ids, "input_ids", module.config.vocab_size)
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("input_ids is empty")
    if length > module.config.max_len:
        raise ValueError(
            f"input length {length} exceeds the model's max_len={module.config.max_len}"
        )
    if order not in ("sequential", "parallel"):
        raise ValueError(f"order must be 'sequential' or 'parallel'; got {order!r}")
    if num_sweeps < 1:
        raise ValueError(f"num_sweeps must be >= 1; got {num_sweeps}")
    segment_ids = (
        jnp.zeros_like(input_ids) if segment_ids is None else _tokens(segment_ids, "segment_ids")
    )
    attention_mask = (
        jnp.ones_like(input_ids)
        if attention_mask is None
        else _tokens(attention_mask, "attention_mask")
    )
    free = input_ids == mask_id if free is None else jnp.asarray(free, bool)
    for name, arr in (
        ("segment_ids", segment_ids),
        ("attention_mask", attention_mask),
        ("free", free),
    ):
        if arr.shape != input_ids.shape:
            raise ValueError(f"{name} must be {input_ids.shape}; got {arr.shape}")
    # A [V] mask rather than a list of ids, so that the compiled loop does not depend on its length.
    banned = np.zeros(module.config.vocab_size, bool)
    banned[[mask_id, *banned_ids]] = True
    banned = jnp.asarray(banned)
    return _gibbs_bert(
        module,
        nn.meta.unbox(params),
        input_ids,
        segment_ids,
        attention_mask,
        free,
        banned,
        jax.random.key(seed),
        _settings(temperature, top_k, 1.0),
        mask_id=mask_id,
        num_sweeps=num_sweeps,
        order=order,
    )


@functools.partial(jax.jit, static_argnames=("module", "mask_id", "num_sweeps", "order"))
def _gibbs_bert(
    module: nn.Module,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array,
    attention_mask: jax.Array,
    free: jax.Array,
    banned: jax.Array,
    rng: jax.Array,
    settings: tuple[jax.Array, jax.Array, jax.Array],
    *,
    mask_id: int,
    num_sweeps: int,
    order: str,
) -> jax.Array:
    batch, length = tokens.shape
    variables = {"params": params}

    def mlm_logits(ids: jax.Array, positions: jax.Array | None) -> jax.Array:
        out = module.apply(variables, ids, segment_ids, attention_mask, positions)
        return jnp.where(banned, -jnp.inf, out["mlm_logits"])  # [B, P, V]

    def choose(key: jax.Array, logits: jax.Array) -> jax.Array:
        return choose_tokens(key, logits, *settings)

    if order == "parallel":

        def sweep(i: jax.Array, tokens: jax.Array) -> jax.Array:
            logits = mlm_logits(tokens, None)  # [B, T, V]
            keys = jax.random.split(jax.random.fold_in(rng, i), length)
            sampled = jax.vmap(choose, in_axes=(0, 1), out_axes=1)(keys, logits)  # [B, T]
            return jnp.where(free, sampled, tokens)

        return jax.lax.fori_loop(0, num_sweeps, sweep, tokens)

    def visit(i: jax.Array, tokens: jax.Array) -> jax.Array:
        t = i % length
        is_free = free[:, t]  # [B]

        def resample(tokens: jax.Array) -> jax.Array:
            current = tokens[:, t]
            masked = tokens.at[:, t].set(jnp.where(is_free, mask_id, current))
            logits = mlm_logits(masked, jnp.full((batch, 1), t, jnp.int32))[:, 0]  # [B, V]
            sampled = choose(jax.random.fold_in(rng, i), logits)
            return tokens.at[:, t].set(jnp.where(is_free, sampled, current))

        # Fixed columns (e.g. [CLS], the prompt) skip the forward pass.
        return jax.lax.cond(jnp.any(is_free), resample, lambda tokens: tokens, tokens)

    return jax.lax.fori_loop(0, num_sweeps * length, visit, tokens)
