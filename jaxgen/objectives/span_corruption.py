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
optional z-loss), sharing the weighted metrics with `causal_lm`. The module implements
`jaxgen.objectives.Objective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig, require
from jaxgen.objectives import causal_lm

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]

MIN_DOCUMENTS = 1
LOSS_TERMS = ("loss",)
# The data keys that shape the prepared records (the raw chunk length follows from them).
RECORD_KEYS = ("seq_len", "noise_density", "mean_noise_span_length")


@dataclasses.dataclass(frozen=True)
class Data(DataConfig):
    """T5's data: SentencePiece with sentinels; seq_len is the encoder length, the decoder length
    follows from it (`input_and_target_lengths`); noise_density of the raw tokens is corrupted in
    spans of mean length mean_noise_span_length."""

    tokenizer: str = "sentencepiece"
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def check(self) -> None:
        """Noise settings T5's helper can turn into lengths."""
        super().check()
        require(
            0.0 < self.noise_density < 1.0,
            f"data.noise_density must be in (0, 1), got {self.noise_density}",
        )
        require(
            self.mean_noise_span_length >= 1.0,
            f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}",
        )


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError when the data cannot feed the model (model.max_len bounds the encoder)."""
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len} (T5's longest "
        "encoder input)",
    )


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


def lengths(data: Data) -> tuple[int, int, int]:
    """(raw tokens per example, encoder length, decoder length) of the data settings."""
    raw_len, decoder_len = input_and_target_lengths(
        data.seq_len, data.noise_density, data.mean_noise_span_length
    )
    return raw_len, data.seq_len, decoder_len


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Encoder ids/mask [B, Te], decoder input/target ids and mask [B, Td], weights [B, Td]."""
    _, te, td = lengths(data)
    enc = jax.ShapeDtypeStruct((batch_size, te), jnp.int32)
    dec = jax.ShapeDtypeStruct((batch_size, td), jnp.int32)
    return {
        "encoder_input_ids": enc,
        "decoder_input_ids": dec,
        "decoder_target_ids": dec,
        "encoder_mask": enc,
        "decoder_mask": dec,
        "decoder_weights": jax.ShapeDtypeStruct((batch_size, td), jnp.float32),
    }


def sequence_lengths(data: Data) -> dict[str, int]:
    """Encoder tokens (inputs), decoder tokens (targets) and scored positions (the targets)."""
    _, encoder_len, decoder_len = lengths(data)
    return {"inputs": encoder_len, "targets": decoder_len, "scored": decoder_len}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays (XLA would clamp an out-of-range index)."""
    v = model.vocab_size
    return {"encoder_input_ids": v, "decoder_input_ids": v, "decoder_target_ids": v,
            "encoder_mask": 2, "decoder_mask": 2}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random ids of the spec's shapes; encoder and decoder rows end in padding of random length."""
    _, te, td = lengths(data)
    ids = lambda *shape: rng.integers(1, model.vocab_size, shape, dtype=np.int32)  # noqa: E731
    enc = (np.arange(te)[None] < rng.integers(te // 2, te + 1, batch_size)[:, None]).astype(
        np.int32
    )
    dec = (np.arange(td)[None] < rng.integers(1, td + 1, batch_size)[:, None]).astype(np.int32)
    targets = ids(batch_size, td) * dec
    return {
        "encoder_input_ids": ids(batch_size, te) * enc,
        "decoder_input_ids": np.pad(targets[:, :-1], ((0, 0), (1, 0))),  # shifted right, start 0
        "decoder_target_ids": targets,
        "encoder_mask": enc,
        "decoder_mask": dec,
        "decoder_weights": dec.astype(np.float32),
    }


def make_records(
    corpus: Any, tokenizer: Any, data: Data, split: str, seed: int, shard: int = 0
) -> list[np.ndarray]:
    """Raw chunks of `lengths(data)[0]` tokens: T5 concatenates documents with no separator."""
    if not tokenizer.sentinel_ids or tokenizer.eos_id is None:
        raise objectives.DataError(
            f"T5 needs a SentencePiece tokenizer with sentinels; got {tokenizer!r}"
        )
    raw_len = lengths(data)[0]
    stream = corpus.ids
    return list(stream[: len(stream) // raw_len * raw_len].reshape(-1, raw_len))


def encode_record(record: np.ndarray, dtype: np.dtype, data: Data) -> bytes:
    """A raw chunk as bytes."""
    return np.asarray(record, dtype).tobytes()


def decode_record(raw: bytes, dtype: np.dtype, data: Data) -> np.ndarray:
    """The inverse of `encode_record`."""
    return np.frombuffer(raw, dtype).astype(np.int32)


def record_tokens(record: np.ndarray) -> int:
    """Tokens a record holds."""
    return int(record.size)


def example_fn(
    tokenizer: Any, data: Data, split: str, seed: int
) -> Callable[[int, int, Any], dict[str, np.ndarray]]:
    """make(position, index, chunk) -> example: noise drawn anew at each stream position."""
    _, encoder_len, decoder_len = lengths(data)
    options = dict(
        noise_density=data.noise_density,
        mean_noise_span_length=data.mean_noise_span_length,
        sentinel_start_id=tokenizer.sentinel_id(0),
        eos_id=tokenizer.eos_id,
        encoder_len=encoder_len,
        decoder_len=decoder_len,
        pad_id=tokenizer.pad_id,
    )
    noise_seed = seed if split == "train" else objectives.EVAL_SEED

    def make(position: int, index: int, chunk: np.ndarray) -> dict[str, np.ndarray]:
        return corrupt(chunk, objectives.host_rng(noise_seed, objectives.TAG_NOISE, position),
                       **options)  # fmt: skip

    return make


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The T5 apply kwargs (encoder ids/mask [B, Te], decoder ids/mask [B, Td]) from a batch."""
    return {
        "encoder_input_ids": batch["encoder_input_ids"],
        "decoder_input_ids": batch["decoder_input_ids"],
        "encoder_mask": batch["encoder_mask"],
        "decoder_mask": batch["decoder_mask"],
    }


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The weight of each loss term: the number of real decoder targets."""
    total = jnp.sum(batch["decoder_weights"].astype(jnp.float32))
    return {"loss": total, "z_loss": total}


def loss_and_metrics(outputs: jax.Array, batch: Batch, z_loss: float = 0.0) -> Metrics:
    """{name: (sum, weight)} of decoder logits [B, Td, V] vs decoder_target_ids (+ z-loss)."""
    return causal_lm.weighted_metrics(
        outputs, batch["decoder_target_ids"], batch["decoder_weights"], z_loss
    )


def derived_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """No metric beyond the sums' means."""
    return {}


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real encoder plus decoder tokens of a host batch."""
    return int(np.sum(batch["encoder_mask"])) + int(np.sum(batch["decoder_mask"]))
