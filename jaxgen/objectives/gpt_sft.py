"""GPT supervised fine-tuning on prompt/response pairs, the prompt masked out of the loss.

A row is prompt tokens, response tokens and end-of-text (so the model learns to stop), cut to
seq_len + 1 from the end and padded; inputs are the row without its last token and targets the row
without its first, weighted 1 where the target is a response token (or the closing end-of-text)
and 0 on the prompt and the padding. The loss is the mean over every response token of the
global batch (the step divides by the batch's total weight, however the micro-batches split it).
The module implements `jaxgen.objectives.TaskObjective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxgen.config import require
from jaxgen.objectives import causal_lm, task

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
LOSS_TERMS = ("loss",)
texts = task.texts
PREDICTS = ""  # scored by its held-out loss alone


@dataclasses.dataclass(frozen=True)
class Data(task.TaskData):
    """GPT's prompt/response data (byte-level BPE by default)."""

    tokenizer: str = "bpe"


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError unless the model is a language model with room for seq_len."""
    require(
        not model.num_labels,
        "supervised fine-tuning trains the LM head: set model.num_labels=0",
    )
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """causal_lm's batch (ids, targets, positions, segments, weights [B, T])."""
    return causal_lm.batch_spec(data, batch_size)


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per row the model reads and scores."""
    return {"inputs": data.seq_len, "scored": data.seq_len}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays."""
    return causal_lm.value_bounds(model, data)


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random rows of the spec (causal_lm's)."""
    return causal_lm.synthetic_batch(model, data, batch_size, rng)


def encode(
    examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> dict[str, np.ndarray]:
    """The (prompt, response) examples as rows of the spec, the prompt weighted 0."""
    n, t = len(examples), data.seq_len
    prompts = tokenizer.encode_batch([e.text for e in examples])
    responses = tokenizer.encode_batch([e.text_pair for e in examples])
    rows = np.full((n, t + 1), tokenizer.pad_id, np.int32)
    scored = np.zeros((n, t + 1), np.float32)  # whether the token at each place is scored
    real = np.zeros((n, t + 1), bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        row = [*prompt, *response, tokenizer.eos_id][: t + 1]
        rows[i, : len(row)] = row
        real[i, : len(row)] = True
        scored[i, len(prompt) : len(row)] = 1.0
    return {
        "input_ids": rows[:, :-1],
        "target_ids": rows[:, 1:],
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
        "segment_ids": real[:, :-1].astype(np.int32),
        "weights": np.ascontiguousarray(scored[:, 1:]),
    }


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The GPT apply kwargs taken from a batch."""
    return causal_lm.model_inputs(batch)


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The weight of the loss: the response tokens of the batch."""
    return causal_lm.loss_weights(batch)


def loss_and_metrics(outputs: jax.Array, batch: Batch, z_loss: float = 0.0) -> dict:
    """{name: (sum, weight)}: cross-entropy and accuracy over the response tokens."""
    return causal_lm.loss_and_metrics(outputs, batch, z_loss)


def derived_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """Perplexity of the responses."""
    return causal_lm.derived_metrics(means)


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a host batch."""
    return int(np.sum(batch["segment_ids"]))
