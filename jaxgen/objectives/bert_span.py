"""BERT fine-tuning on SQuAD v1.1/v2.0: an answer span's start and end (run_squad.py).

Each question becomes sliding windows `[CLS] question [SEP] context span [SEP]`
(`jaxgen.data.tasks.squad_windows`: seq_len tokens, the question cut to max_query_length, spans
doc_stride tokens apart); a window whose span does not hold the answer (and every window of a
v2.0 question without one) points at [CLS]. The loss is the mean of the start and end
cross-entropies over the positions of the model's `span_logits [B, T, 2]`. The fine-tuning loop
decodes a question's answer from the logits of its `windows` with
`jaxgen.train.task_metrics.squad_nbest` (n_best_size starts and ends, max_answer_length, v2.0's
null_score_diff_threshold). The module implements `jaxgen.objectives.TaskObjective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import positive, require
from jaxgen.data import tasks
from jaxgen.objectives import bert_classify, task

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
LOSS_TERMS = ("loss",)
PREDICTS = "spans"


@dataclasses.dataclass(frozen=True)
class Data(task.TaskData):
    """SQuAD's data: run_squad.py's window settings (seq_len 384, doc_stride 128, query 64) and
    decoding settings; version_2_with_negative allows questions without an answer (v2.0)."""

    seq_len: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0

    def check(self) -> None:
        """The task checks and positive window and decoding sizes."""
        super().check()
        require(self.task == "squad", f"the span objective reads SQuAD, not {self.task!r}")
        positive(self, "doc_stride", "max_query_length", "n_best_size", "max_answer_length")


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError unless the model has a span head and room for seq_len."""
    require(model.span_head, "fine-tuning BERT on SQuAD needs model.span_head=True")
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ids, segments, mask [B, T] int32; start and end positions [B] int32; weight [B]."""
    ids = jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.int32)
    row = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return {"input_ids": ids, "segment_ids": ids, "attention_mask": ids,
            "start_position": row, "end_position": row,
            "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}  # fmt: skip


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per window the model reads and scores."""
    return {"inputs": data.seq_len, "scored": data.seq_len}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays."""
    return {"input_ids": model.vocab_size, "segment_ids": model.type_vocab_size,
            "attention_mask": 2, "start_position": data.seq_len,
            "end_position": data.seq_len}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random windows of the spec with a random answer span in each."""
    b, t = batch_size, data.seq_len
    start = rng.integers(1, t - 1, b).astype(np.int32)
    return {
        "input_ids": rng.integers(0, model.vocab_size, (b, t)).astype(np.int32),
        "segment_ids": (np.arange(t)[None, :] >= t // 4).repeat(b, 0).astype(np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "start_position": start,
        "end_position": np.minimum(start + rng.integers(0, 3, b), t - 1).astype(np.int32),
        "weight": np.ones(b, np.float32),
    }


def texts(examples: Sequence[Any], data: Data, splits: task.Splits) -> list[str]:
    """The texts a tokenizer made for the task is trained on: questions and contexts."""
    return [t for e in examples for t in (e.question, e.context)]


def windows(examples: Sequence[Any], tokenizer: Any, data: Data) -> list[tasks.SquadWindow]:
    """Every window of every question, in order."""
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise tasks.TaskError(
            f"SQuAD aligns answers through token offsets, which a {tokenizer.kind} tokenizer "
            "does not give; use data.tokenizer=wordpiece"
        )
    out = []
    for example in examples:
        if example.is_impossible and not data.version_2_with_negative:
            raise tasks.TaskError(
                f"question {example.qid!r} has no answer (SQuAD v2.0): set "
                "--config.data.version_2_with_negative=true"
            )
        out += tasks.squad_windows(
            example, tokenizer.encode_with_offsets, cls_id=tokenizer.cls_id,
            sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id, max_seq_len=data.seq_len,
            doc_stride=data.doc_stride, max_query_len=data.max_query_length,
        )  # fmt: skip
    return out


def encode(
    examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> dict[str, np.ndarray]:
    """The questions' windows as arrays of the spec (one row per window)."""
    found = windows(examples, tokenizer, data)
    return {
        "input_ids": np.stack([w.input_ids for w in found]),
        "segment_ids": np.stack([w.segment_ids for w in found]),
        "attention_mask": np.stack([w.input_mask for w in found]),
        "start_position": np.array([w.start_position for w in found], np.int32),
        "end_position": np.array([w.end_position for w in found], np.int32),
        "weight": np.ones(len(found), np.float32),
    }


model_inputs = bert_classify.model_inputs  # the same encoder inputs


loss_weights = task.example_weights


def loss_and_metrics(outputs: Mapping[str, jax.Array], batch: Batch, z_loss: float = 0.0) -> dict:
    """{name: (sum, weight)}: the mean of the start and end cross-entropies ('loss') and the
    share of windows whose start and end are both predicted ('span_accuracy')."""
    logits = outputs["span_logits"].astype(jnp.float32)  # [B, T, 2]
    weight = batch["weight"].astype(jnp.float32)
    total = jnp.sum(weight)
    log_probs = jax.nn.log_softmax(logits, axis=1)  # over positions
    losses, correct = [], []
    for side, key in enumerate(("start_position", "end_position")):
        target = batch[key][:, None]
        losses.append(-jnp.take_along_axis(log_probs[:, :, side], target, axis=1)[:, 0])
        correct.append(jnp.argmax(logits[:, :, side], axis=1) == batch[key])
    ce = (losses[0] + losses[1]) / 2
    both = (correct[0] & correct[1]).astype(jnp.float32)
    return {"loss": (jnp.sum(ce * weight), total), "span_accuracy": (jnp.sum(both * weight), total)}


derived_metrics = task.no_derived_metrics


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a host batch."""
    return int(np.sum(batch["attention_mask"]))


def predict_outputs(outputs: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    """Start and end logits [B, T, 2] of the evaluation forward."""
    return outputs["span_logits"]
