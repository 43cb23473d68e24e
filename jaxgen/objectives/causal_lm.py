"""GPT's objective: documents packed into fixed-length windows and next-token cross-entropy.

Host side (numpy): `pack_windows` joins tokenized documents, each followed by an end-of-text token,
into one stream and cuts it into windows of `seq_len + 1` tokens (the prepared records);
`window_examples` makes a window's example: inputs are the window without its last token, targets
the window without its first. With
`separate_documents` packed documents are kept apart: segment ids number them inside a window,
positions restart at each document, and no loss is taken on a target from another document.

Device side (pure jnp, float32): `model_inputs` picks the model's kwargs from a batch and
`loss_and_metrics` returns `{name: (sum, weight)}`; `weighted_metrics` is shared with span
corruption and BERT's MLM. The module implements `jaxgen.objectives.Objective`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig, require

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]

MIN_DOCUMENTS = 1
LOSS_TERMS = ("loss",)
# The data keys that shape the prepared records (the rest act when they are read).
RECORD_KEYS = ("seq_len", "separate_documents")


@dataclasses.dataclass(frozen=True)
class Data(DataConfig):
    """GPT's data: byte-level BPE; separate_documents keeps packed documents apart (segment ids,
    positions restarting at each document, no target across a boundary). GPT-2/3 pack documents
    separated by <|endoftext|> with no masking between them (False)."""

    tokenizer: str = "bpe"
    separate_documents: bool = False


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError when the data cannot feed the model."""
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def pack_windows(
    docs: Sequence[np.ndarray], seq_len: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Joins token documents, each closed by eos, and cuts windows of seq_len + 1 tokens.

    Returns tokens [N, seq_len + 1] int32 and, per token, its document's index relative to the
    window's first token [N, seq_len + 1] int32 (0 for the document the window starts in). The
    incomplete tail is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be at least 1")
    window = seq_len + 1
    pieces, doc_ids = [], []
    for i, doc in enumerate(docs):
        doc = np.asarray(doc, dtype=np.int32).reshape(-1)
        pieces.append(np.append(doc, np.int32(eos_id)))
        doc_ids.append(np.full(doc.size + 1, i, np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    owner = np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64)
    num_seqs = stream.size // window
    tokens = stream[: num_seqs * window].reshape(num_seqs, window)
    owner = owner[: num_seqs * window].reshape(num_seqs, window)
    return tokens, (owner - owner[:, :1]).astype(np.int32)


def window_examples(
    tokens: np.ndarray, owner: np.ndarray, separate_documents: bool
) -> dict[str, np.ndarray]:
    """Examples of windows tokens/owner [N, seq_len + 1]: input_ids, target_ids, positions,
    segment_ids (int32) and weights (float32), each [N, seq_len]."""
    num_seqs, seq_len = tokens.shape[0], tokens.shape[1] - 1
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    shape = (num_seqs, seq_len)
    if not separate_documents:
        return {
            "input_ids": np.ascontiguousarray(inputs, np.int32),
            "target_ids": np.ascontiguousarray(targets, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
            "segment_ids": np.ones(shape, np.int32),
            "weights": np.ones(shape, np.float32),
        }
    input_owner, target_owner = owner[:, :-1], owner[:, 1:]
    # A document that began in an earlier window is segment 1 here and counts its positions from the
    # window start: positions must stay below seq_len, which the position table is sized for.
    segment_ids = input_owner - input_owner[:, :1] + 1
    starts = np.ones(shape, bool)
    starts[:, 1:] = input_owner[:, 1:] != input_owner[:, :-1]
    index = np.broadcast_to(np.arange(seq_len), shape)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "input_ids": np.ascontiguousarray(inputs, np.int32),
        "target_ids": np.ascontiguousarray(targets, np.int32),
        "positions": (index - segment_start).astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        # The eos closing a document is still predicted (it belongs to it); the first token of the
        # next document is not, since nothing before it in its own document could predict it.
        "weights": (input_owner == target_owner).astype(np.float32),
    }


def pack_documents(
    docs: Sequence[np.ndarray], seq_len: int, eos_id: int, separate_documents: bool
) -> dict[str, np.ndarray]:
    """Packs token documents into [num_seqs, seq_len] examples (`pack_windows`, then
    `window_examples`)."""
    return window_examples(*pack_windows(docs, seq_len, eos_id), separate_documents)


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a batch of `batch_size` windows: ids, positions, segments [B, T], weights."""
    ids = jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.int32)
    return {
        "input_ids": ids,
        "target_ids": ids,
        "positions": ids,
        "segment_ids": ids,
        "weights": jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.float32),
    }


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per row the model reads (inputs) and the positions it scores (every one)."""
    return {"inputs": data.seq_len, "scored": data.seq_len}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays (XLA would clamp an out-of-range index)."""
    return {"input_ids": model.vocab_size, "target_ids": model.vocab_size,
            "positions": model.max_len, "segment_ids": data.seq_len + 1}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random windows of the spec's shapes; rows end in padding (weight 0) of random length."""
    b, t = batch_size, data.seq_len
    tokens = rng.integers(0, model.vocab_size, (b, t + 1), dtype=np.int32)
    lengths = rng.integers(t // 2, t + 1, b)
    real = np.arange(t)[None, :] < lengths[:, None]
    return {
        "input_ids": tokens[:, :-1],
        "target_ids": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": real.astype(np.int32),
        "weights": real.astype(np.float32),
    }


def make_records(
    corpus: Any, tokenizer: Any, data: Data, split: str, seed: int, shard: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The packed windows (tokens, owner) of a tokenized corpus (deterministic: no rng)."""
    if tokenizer.eos_id is None:
        raise objectives.DataError(
            f"GPT needs a tokenizer with an end-of-text token; got {tokenizer!r}"
        )
    docs = [corpus.tokens(i) for i in range(corpus.num_documents)]
    tokens, owner = pack_windows(docs, data.seq_len, tokenizer.eos_id)
    return list(zip(tokens, owner, strict=True))


def encode_record(record: tuple[np.ndarray, np.ndarray], dtype: np.dtype, data: Data) -> bytes:
    """A window as bytes: its tokens, then (separate_documents) its uint16 relative owners."""
    tokens, owner = record
    encoded = np.asarray(tokens, dtype).tobytes()
    return encoded + np.asarray(owner, np.uint16).tobytes() if data.separate_documents else encoded


def decode_record(raw: bytes, dtype: np.dtype, data: Data) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `encode_record`."""
    window = data.seq_len + 1
    tokens = np.frombuffer(raw, dtype, count=window).astype(np.int32)
    if data.separate_documents:
        owner = np.frombuffer(raw, np.uint16, offset=window * np.dtype(dtype).itemsize)
        return tokens, owner.astype(np.int32)
    return tokens, np.zeros(window, np.int32)


def record_tokens(record: tuple[np.ndarray, np.ndarray]) -> int:
    """Tokens a record holds."""
    return int(record[0].size)


def example_fn(
    tokenizer: Any, data: Data, split: str, seed: int
) -> Callable[[int, int, Any], dict[str, np.ndarray]]:
    """make(position, index, (tokens, owner)) -> the window's example (no rng: packing is fixed)."""

    def make(position: int, index: int, record: tuple[np.ndarray, np.ndarray]) -> dict:
        tokens, owner = record
        examples = window_examples(tokens[None], owner[None], data.separate_documents)
        return {key: value[0] for key, value in examples.items()}

    return make


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The GPT apply kwargs (input_ids, positions, segment_ids, each [B, T]) taken from a batch."""
    return {
        "input_ids": batch["input_ids"],
        "positions": batch["positions"],
        "segment_ids": batch["segment_ids"],
    }


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token float32 (cross-entropy, log_z, correct) of logits [..., V] and targets [...]."""
    logits = logits.astype(jnp.float32)
    # log_softmax(logits)[target] = logits[target] - logsumexp(logits): gathering one logit per
    # token avoids a one-hot (or a second [B, T, V] log-prob array) for large vocabularies.
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    index = targets[..., None].astype(jnp.int32)  # [..., 1]
    target_logit = jnp.take_along_axis(logits, index, axis=-1)[..., 0]  # [...]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return log_z - target_logit, log_z, correct


def weighted_metrics(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0
) -> Metrics:
    """(sum, weight) of cross-entropy ('loss'), accuracy and z_loss * log_z^2 of logits [B, T, V].

    The weight of every metric is the sum of `weights` [B, T].
    """
    ce, log_z, correct = token_losses(logits, targets)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    metrics: Metrics = {
        "loss": (jnp.sum(ce * weights), total),
        "accuracy": (jnp.sum(correct * weights), total),
    }
    if z_loss:
        # T5X/MaxText's auxiliary term keeps the softmax normaliser near 1 (stabler bf16 training).
        metrics["z_loss"] = (z_loss * jnp.sum(jnp.square(log_z) * weights), total)
    return metrics


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The weight of each loss term: the number of real targets (sum of `weights`)."""
    total = jnp.sum(batch["weights"].astype(jnp.float32))
    return {"loss": total, "z_loss": total}


def loss_and_metrics(outputs: jax.Array, batch: Batch, z_loss: float = 0.0) -> Metrics:
    """{name: (sum, weight)} of GPT logits [B, T, V] vs target_ids, weighted by weights."""
    return weighted_metrics(outputs, batch["target_ids"], batch["weights"], z_loss)


def derived_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """Perplexity, exp(loss) (capped at exp(50) so a diverged run still logs a number)."""
    return {"perplexity": math.exp(min(means["loss"], 50.0))}


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Input tokens of a host batch (packing leaves no padding)."""
    return int(np.size(batch["input_ids"]))
