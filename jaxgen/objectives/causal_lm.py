"""GPT's objective: documents packed into fixed-length windows and next-token cross-entropy.

Host side (numpy, used by the data pipeline): `pack_documents` joins tokenized documents, each
followed by an end-of-text token, into one stream and cuts it into windows of `seq_len + 1` tokens;
inputs are a window without its last token, targets the window without its first. With
`separate_documents` packed documents are kept apart: segment ids number them inside a window,
positions restart at each document, and no loss is taken on a target from another document.

Device side (pure jnp, float32): `model_inputs` picks the model's kwargs from a batch and
`loss_and_metrics` returns the weighted mean loss and `{name: (sum, weight)}` sums.
`weighted_loss_and_metrics` is shared with span corruption.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


def pack_documents(
    docs: list[np.ndarray], seq_len: int, eos_id: int, separate_documents: bool
) -> dict[str, np.ndarray]:
    """Packs token documents into [num_seqs, seq_len] arrays.

    Returns input_ids, target_ids, positions, segment_ids (int32) and weights (float32).
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
    num_seqs = stream.size // window  # the incomplete tail is dropped
    tokens = stream[: num_seqs * window].reshape(num_seqs, window)
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
    owner = owner[: num_seqs * window].reshape(num_seqs, window)
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


def weighted_loss_and_metrics(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, Metrics]:
    """Weighted mean cross-entropy (+ z_loss * log_z^2) of logits [B, T, V]; metric sums."""
    ce, log_z, correct = token_losses(logits, targets)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    ce_sum = jnp.sum(ce * weights)
    metrics: Metrics = {
        "loss": (ce_sum, total),
        "accuracy": (jnp.sum(correct * weights), total),
    }
    objective = ce_sum
    if z_loss:
        # T5X/MaxText's auxiliary term keeps the softmax normaliser near 1 (stabler bf16 training).
        z_sum = z_loss * jnp.sum(jnp.square(log_z) * weights)
        metrics["z_loss"] = (z_sum, total)
        objective = objective + z_sum
    # An all-padding batch has no tokens to average over: give 0 (and zero gradients), not NaN.
    loss = objective / jnp.where(total > 0, total, 1.0)
    return loss, metrics


def loss_and_metrics(
    outputs: jax.Array, batch: Batch, z_loss: float = 0.0
) -> tuple[jax.Array, Metrics]:
    """Next-token loss of GPT logits [B, T, V] vs target_ids, weighted by weights; metric sums."""
    return weighted_loss_and_metrics(outputs, batch["target_ids"], batch["weights"], z_loss)
