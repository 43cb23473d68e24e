"""GPT fine-tuning: classification from the last real token (HF GPT2ForSequenceClassification).

An example is the text, then (for pairs) end-of-text and the second text, cut to seq_len from the
end and padded (segment 0). The model's `score` head gives `classifier_logits [B, T, C]`; the
logits of each row's last real token (`last [B]`) are scored with cross-entropy, or with the
squared error when model.num_labels is 1. The module implements `jaxgen.objectives.TaskObjective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import require
from jaxgen.objectives import task

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
LOSS_TERMS = ("loss",)
texts = task.texts
PREDICTS = "labels"


@dataclasses.dataclass(frozen=True)
class Data(task.TaskData):
    """GPT's task data (byte-level BPE by default)."""

    tokenizer: str = "bpe"


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError unless the model has a score head and room for seq_len."""
    require(
        model.num_labels > 0,
        "fine-tuning GPT on a classification task needs model.num_labels > 0 (the class count; "
        "1 for regression)",
    )
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ids, positions, segment ids [B, T] int32; last [B] int32; label and weight [B] float32."""
    ids = jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.int32)
    return {"input_ids": ids, "positions": ids, "segment_ids": ids,
            "last": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            **task.example_spec(batch_size)}  # fmt: skip


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per row the model reads; one scored output per row."""
    return {"inputs": data.seq_len, "scored": 1}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays."""
    return {"input_ids": model.vocab_size, "positions": model.max_len, "segment_ids": 2,
            "last": data.seq_len}  # fmt: skip


def _rows(tokens: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(tokens)
    ids = np.full((n, seq_len), pad_id, np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    last = np.zeros(n, np.int32)
    for i, row in enumerate(tokens):
        row = list(row)[:seq_len] or [pad_id]
        ids[i, : len(row)] = row
        segments[i, : len(row)] = 1
        last[i] = len(row) - 1
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"input_ids": ids, "positions": positions, "segment_ids": segments, "last": last}


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random texts of the spec, of random lengths."""
    lengths = rng.integers(1, data.seq_len + 1, batch_size)
    tokens = [rng.integers(1, model.vocab_size, n).tolist() for n in lengths]
    labels = rng.integers(0, max(model.num_labels, 2), batch_size).astype(np.float32)
    return {**_rows(tokens, data.seq_len, 0), "label": labels,
            "weight": np.ones(batch_size, np.float32)}  # fmt: skip


def encode(
    examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> dict[str, np.ndarray]:
    """The examples as arrays of the spec with N rows (labels -1 where the split has none)."""
    firsts = tokenizer.encode_batch([e.text for e in examples])
    seconds = tokenizer.encode_batch([e.text_pair or "" for e in examples])
    tokens = []
    for example, a, b in zip(examples, firsts, seconds, strict=True):
        tokens.append([*a, tokenizer.eos_id, *b] if example.text_pair is not None else a)
    rows = _rows(tokens, data.seq_len, tokenizer.pad_id)
    return {**rows, "label": task.label_values(examples, splits),
            "weight": np.ones(len(examples), np.float32)}  # fmt: skip


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The GPT apply kwargs taken from a batch."""
    return {k: batch[k] for k in ("input_ids", "positions", "segment_ids")}


def _last_logits(outputs: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    logits = outputs["classifier_logits"]  # [B, T, C]
    return jnp.take_along_axis(logits, batch["last"][:, None, None], axis=1)[:, 0]  # [B, C]


loss_weights = task.example_weights


def loss_and_metrics(outputs: Mapping[str, jax.Array], batch: Batch, z_loss: float = 0.0) -> dict:
    """{name: (sum, weight)} of the last real token's logits: cross-entropy and accuracy
    (regression: squared error)."""
    return task.class_metrics(_last_logits(outputs, batch), batch)


derived_metrics = task.no_derived_metrics


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a host batch."""
    return int(np.sum(batch["segment_ids"]))


def predict_outputs(outputs: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    """[B] float32 predictions of the evaluation forward: the class id, or the regression value."""
    return task.class_predictions(_last_logits(outputs, batch))


postprocess = task.label_predictions
