"""T5's span-corruption objective (Raffel et al. 2019, section 3.1.4) and its decoder cross-entropy.

Host side (numpy, explicit `np.random.Generator`), following T5's `t5/data/preprocessors.py`:
`input_and_target_lengths` is `random_spans_helper` (how many raw tokens to cut so that the
corrupted input fills the encoder exactly), `random_spans_noise_mask` picks noise spans, and
`corrupt` replaces each noise span of the input by one sentinel and keeps only the noise spans,
each behind its sentinel, as the target:

    tokens   a b c d e f g h i          (noise: c d, g)
    inputs   a b <X> e f <Y> h i </s>   (<X> = sentinel_start_id, <Y> = sentinel_start_id - 1, ...)
    targets  <X> c d <Y> g </s>

Device side (pure jnp, float32): `model_inputs` and `loss_and_metrics` (decoder cross-entropy with
optional z-loss), sharing the weighted loss with `causal_lm`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxgen.objectives import causal_lm

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


def _corrupted_lengths(
    raw_len: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    # One sentinel per span on each side plus one EOS, as T5 counts them (half-to-even round).
    num_noise = int(round(raw_len * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def input_and_target_lengths(
    encoder_len: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(raw_len, decoder_len): most raw tokens whose corrupted input fits encoder_len, as T5."""
    raw_len = encoder_len - 1
    while _corrupted_lengths(raw_len + 1, noise_density, mean_noise_span_length)[0] <= encoder_len:
        raw_len += 1
    _, decoder_len = _corrupted_lengths(raw_len, noise_density, mean_noise_span_length)
    # T5 trims one token at density 0.5 so that the target length matches the (round) input length.
    if noise_density == 0.5 and decoder_len > encoder_len:
        raw_len -= 1
        decoder_len -= 1
    return raw_len, decoder_len


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    # Choosing which of the num_items - 1 gaps start a new segment, uniformly, makes every split of
    # num_items into num_segments positive parts equally likely.
    starts = np.arange(num_items - 1) < num_segments - 1
    segment_id = np.cumsum(np.concatenate([[0], rng.permutation(starts)]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool noise mask [length]: spans alternating non-noise/noise, non-noise first, as in T5."""
    if noise_density == 0.0:
        return np.zeros(length, bool)
    # Lengths below 2 cannot hold one span of each kind: build a mask for 2 and cut it, as T5 does.
    padded_length = max(length, 2)
    # T5 computes these counts in float32 (tf.round is half-to-even, like np.round).
    num_noise = int(np.round(np.float32(padded_length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), padded_length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    num_spans = max(num_spans, 1)
    num_nonnoise = padded_length - num_noise
    if num_spans > min(num_noise, num_nonnoise):
        raise ValueError(
            f"{num_spans=} spans do not fit {num_noise=} and {num_nonnoise=} tokens "
            f"({length=}, {noise_density=}, {mean_noise_span_length=})"
        )
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * spans]
    is_noise_span = np.tile([False, True], num_spans)
    return np.repeat(is_noise_span, span_lengths)[:length]


def noise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_start_id: int
) -> np.ndarray:
    """Tokens [L] with each noise span replaced by one sentinel, counting down from the start id."""
    previous_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~previous_is_noise
    sentinels = sentinel_start_id + 1 - np.cumsum(first_noise)
    replaced = np.where(first_noise, sentinels, tokens)
    return replaced[~(noise_mask & previous_is_noise)]


def nonnoise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_start_id: int
) -> np.ndarray:
    """Tokens [L] with each non-noise span replaced by one sentinel (the span-corruption target)."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_start_id)


def corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    sentinel_start_id: int,
    eos_id: int,
    encoder_len: int,
    decoder_len: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Span-corrupts tokens [raw_len] into padded encoder [Te] / decoder [Td] arrays."""
    tokens = np.asarray(tokens).reshape(-1)
    noise_mask = random_spans_noise_mask(tokens.size, noise_density, mean_noise_span_length, rng)
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, sentinel_start_id)
    targets = nonnoise_span_to_unique_sentinel(tokens, noise_mask, sentinel_start_id)
    inputs = np.append(inputs, eos_id)
    targets = np.append(targets, eos_id)
    if inputs.size > encoder_len or targets.size > decoder_len:
        raise ValueError(
            f"corrupted lengths ({inputs.size}, {targets.size}) exceed {encoder_len=}, "
            f"{decoder_len=} for {tokens.size} raw tokens; cut them with input_and_target_lengths"
        )
    encoder_ids = np.full(encoder_len, pad_id, np.int32)
    encoder_ids[: inputs.size] = inputs
    target_ids = np.full(decoder_len, pad_id, np.int32)
    target_ids[: targets.size] = targets
    # Teacher forcing: the decoder reads the targets shifted right, starting from pad_id (as T5).
    decoder_input_ids = np.concatenate([[pad_id], target_ids[:-1]]).astype(np.int32)
    encoder_mask = (np.arange(encoder_len) < inputs.size).astype(np.int32)
    decoder_mask = (np.arange(decoder_len) < targets.size).astype(np.int32)
    return {
        "encoder_input_ids": encoder_ids,
        "decoder_input_ids": decoder_input_ids,
        "decoder_target_ids": target_ids,
        "encoder_mask": encoder_mask,
        "decoder_mask": decoder_mask,
        "decoder_weights": decoder_mask.astype(np.float32),
    }


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The T5 apply kwargs (encoder ids/mask [B, Te], decoder ids/mask [B, Td]) from a batch."""
    return {
        "encoder_input_ids": batch["encoder_input_ids"],
        "decoder_input_ids": batch["decoder_input_ids"],
        "encoder_mask": batch["encoder_mask"],
        "decoder_mask": batch["decoder_mask"],
    }


def loss_and_metrics(
    outputs: jax.Array, batch: Batch, z_loss: float = 0.0
) -> tuple[jax.Array, Metrics]:
    """Decoder cross-entropy (+ z-loss) of logits [B, Td, V] vs decoder_target_ids; metric sums."""
    return causal_lm.weighted_loss_and_metrics(
        outputs, batch["decoder_target_ids"], batch["decoder_weights"], z_loss
    )
