"""BERT fine-tuning: classification or regression on the pooled [CLS] output (Devlin et al. 2018).

An example is `[CLS] a [SEP]` (segment 0) `b [SEP]` (segment 1), padded with [PAD] to seq_len,
the longer text cut from its end to fit (`task.truncate_pair`). The model's `classifier_logits
[B, model.num_labels]` are scored with cross-entropy, or with the squared error when num_labels is
1 (STS-B). The pretraining MLM head is given one position per row, so it costs nothing, and the
last layer then computes only [CLS] and that row (`jaxgen.models.bert`). The module implements
`jaxgen.objectives.TaskObjective`.
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
    """BERT's task data (WordPiece by default)."""


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError unless the model has a classifier head and room for seq_len."""
    require(
        model.num_labels > 0,
        "fine-tuning BERT on a task needs model.num_labels > 0 (the class count; 1 for regression)",
    )
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ids, segment ids and attention mask [B, T] int32; label and weight [B] float32."""
    ids = jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.int32)
    return {"input_ids": ids, "segment_ids": ids, "attention_mask": ids,
            **task.example_spec(batch_size)}  # fmt: skip


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per row the model reads; one scored output per row."""
    return {"inputs": data.seq_len, "scored": 1}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays."""
    return {"input_ids": model.vocab_size, "segment_ids": model.type_vocab_size,
            "attention_mask": 2}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random pairs of the spec; rows end in padding of random length."""
    b, t = batch_size, data.seq_len
    lengths = rng.integers(max(2, t // 2), t + 1, b)
    real = np.arange(t)[None, :] < lengths[:, None]
    split = np.arange(t)[None, :] >= (lengths // 2)[:, None]
    labels = rng.integers(0, max(model.num_labels, 2), b).astype(np.float32)
    if model.num_labels == 1:
        labels = rng.uniform(0.0, 5.0, b).astype(np.float32)
    return {
        "input_ids": np.where(real, rng.integers(0, model.vocab_size, (b, t)), 0).astype(np.int32),
        "segment_ids": (real & split).astype(np.int32),
        "attention_mask": real.astype(np.int32),
        "label": labels,
        "weight": np.ones(b, np.float32),
    }


def encode(
    examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> dict[str, np.ndarray]:
    """The examples as arrays of the spec with N rows (labels -1 where the split has none)."""
    n, t = len(examples), data.seq_len
    ids = np.full((n, t), tokenizer.pad_id, np.int32)
    segments, mask = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
    firsts = tokenizer.encode_batch([e.text for e in examples])
    pairs = [e.text_pair for e in examples]
    has_pair = [p is not None for p in pairs]
    seconds = tokenizer.encode_batch([p or "" for p in pairs])
    for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
        if has_pair[i]:
            a, b = task.truncate_pair(a, b, t - 3)
            row = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
            segments[i, len(a) + 2 : len(row)] = 1
        else:
            row = [tokenizer.cls_id, *a[: t - 2], tokenizer.sep_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    labels = task.label_values(examples, splits)
    return {"input_ids": ids, "segment_ids": segments, "attention_mask": mask, "label": labels,
            "weight": np.ones(n, np.float32)}  # fmt: skip


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The BERT apply kwargs; the MLM head scores one position per row (unused)."""
    rows = batch["input_ids"].shape[0]
    return {
        "input_ids": batch["input_ids"],
        "segment_ids": batch["segment_ids"],
        "attention_mask": batch["attention_mask"],
        "masked_positions": jnp.zeros((rows, 1), jnp.int32),
    }


loss_weights = task.example_weights


def _logits(outputs: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    return outputs["classifier_logits"]  # [B, C]


def loss_and_metrics(outputs: Mapping[str, jax.Array], batch: Batch, z_loss: float = 0.0) -> dict:
    """{name: (sum, weight)}: cross-entropy and accuracy (regression: squared error)."""
    return task.class_metrics(_logits(outputs, batch), batch)


derived_metrics = task.no_derived_metrics


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a host batch."""
    return int(np.sum(batch["attention_mask"]))


def predict_outputs(outputs: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    """[B] float32 predictions of the evaluation forward: the class id, or the regression value."""
    return task.class_predictions(_logits(outputs, batch))


postprocess = task.label_predictions
