"""T5 fine-tuning as text-to-text (Raffel et al. 2019): inputs and labels both written as text.

Inputs follow the t5 library's `glue` preprocessor: the task's name, then each field as `key:
value` with the keys sorted (`mrpc sentence1: … sentence2: …`, `mnli hypothesis: … premise: …`);
generic files use `text:` and `text_pair:` with no prefix. Targets are the class names of the
TFDS GLUE label lists (`not_equivalent`/`equivalent`, …); STS-B's score is rounded to the nearest
0.2 and written with one decimal ("3.4"). Evaluation decodes greedily (or with beam search,
data.beam_size > 1) and maps the text back to a label; a string that is no label counts as wrong
(class -1; STS-B: -1.0), as t5's `string_label_to_class_id` does. The module implements
`jaxgen.objectives.TaskObjective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxgen import sample
from jaxgen.config import positive, require
from jaxgen.objectives import causal_lm, task

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

Batch = Mapping[str, jax.Array]
LOSS_TERMS = ("loss",)
PREDICTS = "labels"
INVALID = -1

_BINARY = ("sentence1", "sentence2")
# task -> (input prefix, key of text, key of text_pair or None, target text of each label, in
# the GLUE_TASKS label order; empty for STS-B).
FORMATS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "cola": ("cola", "sentence", None, ("unacceptable", "acceptable")),
    "sst2": ("sst2", "sentence", None, ("negative", "positive")),
    "mrpc": ("mrpc", *_BINARY, ("not_equivalent", "equivalent")),
    "stsb": ("stsb", *_BINARY, ()),
    "qqp": ("qqp", "question1", "question2", ("not_duplicate", "duplicate")),
    "mnli": ("mnli", "premise", "hypothesis", ("contradiction", "entailment", "neutral")),
    "mnli_mismatched": ("mnli", "premise", "hypothesis",
                        ("contradiction", "entailment", "neutral")),
    "qnli": ("qnli", "question", "sentence", ("entailment", "not_entailment")),
    "rte": ("rte", *_BINARY, ("entailment", "not_entailment")),
    "wnli": ("wnli", *_BINARY, ("not_entailment", "entailment")),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Data(task.TaskData):
    """T5's task data: SentencePiece; target_len decoder tokens (the label text and eos);
    beam_size > 1 decodes evaluation with beam search, length_penalty its brevity alpha."""

    tokenizer: str = "sentencepiece"
    target_len: int = 8
    beam_size: int = 1
    length_penalty: float = 0.0

    def check(self) -> None:
        """The task checks, a positive target length and beam size."""
        super().check()
        positive(self, "target_len", "beam_size")
        require(self.task != "sft", "T5 fine-tunes classification tasks (data.task != 'sft')")


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError when seq_len exceeds the model's input length."""
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


def input_text(data: Data, example: Any) -> str:
    """The example's encoder input in T5's format (keys sorted, task name first)."""
    prefix, key_a, key_b, _ = FORMATS.get(data.task, ("", "text", "text_pair", ()))
    fields = {key_a: example.text}
    if key_b is not None and example.text_pair is not None:
        fields[key_b] = example.text_pair
    body = " ".join(f"{key}: {fields[key]}" for key in sorted(fields))
    return f"{prefix} {body}" if prefix else body


def target_names(data: Data, splits: task.Splits) -> tuple[str, ...]:
    """The target text of each class (empty for regression)."""
    if splits.regression:
        return ()
    return FORMATS[data.task][3] if data.task in FORMATS else splits.labels


def target_text(value: float, names: Sequence[str]) -> str:
    """A label as T5's target: the class name, or the score rounded to 0.2 with one decimal."""
    if not names:
        return f"{round(value * 5) / 5:.1f}"
    return names[int(value)]


def texts(examples: Sequence[Any], data: Data, splits: task.Splits) -> list[str]:
    """The texts a tokenizer made for the task is trained on: the inputs as T5 writes them and
    the target texts."""
    names = target_names(data, splits)
    labeled = [e for e in examples if e.label is not None]
    targets = [target_text(v, names) for v in task.label_values(labeled, splits)]
    return [input_text(data, e) for e in examples] + targets


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Encoder ids/mask [B, S], decoder input/target ids, mask, weights [B, Td]; label, weight."""
    enc = jax.ShapeDtypeStruct((batch_size, data.seq_len), jnp.int32)
    dec = jax.ShapeDtypeStruct((batch_size, data.target_len), jnp.int32)
    return {"encoder_input_ids": enc, "encoder_mask": enc, "decoder_input_ids": dec,
            "decoder_target_ids": dec, "decoder_mask": dec,
            "decoder_weights": jax.ShapeDtypeStruct((batch_size, data.target_len), jnp.float32),
            **task.example_spec(batch_size)}  # fmt: skip


def sequence_lengths(data: Data) -> dict[str, int]:
    """Encoder tokens, decoder tokens and scored positions (the decoder's)."""
    return {"inputs": data.seq_len, "targets": data.target_len, "scored": data.target_len}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays."""
    return {"encoder_input_ids": model.vocab_size, "decoder_input_ids": model.vocab_size,
            "decoder_target_ids": model.vocab_size, "encoder_mask": 2,
            "decoder_mask": 2}  # fmt: skip


def _rows(
    inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], data: Data, eos_id: int
) -> dict[str, np.ndarray]:
    n, s, t = len(inputs), data.seq_len, data.target_len
    enc, dec_in = np.zeros((n, s), np.int32), np.zeros((n, t), np.int32)
    dec_out, weights = np.zeros((n, t), np.int32), np.zeros((n, t), np.float32)
    for i, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        x = [*list(x)[: s - 1], eos_id]
        y = [*list(y)[: t - 1], eos_id]
        enc[i, : len(x)] = x
        dec_out[i, : len(y)] = y
        dec_in[i, 1 : len(y)] = y[:-1]  # the decoder starts from pad (0)
        weights[i, : len(y)] = 1.0
    return {"encoder_input_ids": enc, "encoder_mask": (enc > 0).astype(np.int32),
            "decoder_input_ids": dec_in, "decoder_target_ids": dec_out,
            "decoder_mask": (weights > 0).astype(np.int32), "decoder_weights": weights}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs and short targets of the spec."""
    inputs = [rng.integers(2, model.vocab_size, rng.integers(1, data.seq_len)).tolist()
              for _ in range(batch_size)]  # fmt: skip
    targets = [rng.integers(2, model.vocab_size, 1).tolist() for _ in range(batch_size)]
    return {**_rows(inputs, targets, data, 1), "label": np.zeros(batch_size, np.float32),
            "weight": np.ones(batch_size, np.float32)}  # fmt: skip


def encode(
    examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> dict[str, np.ndarray]:
    """The examples as arrays of the spec with N rows (unlabeled rows: an empty target)."""
    labels = task.label_values(examples, splits)
    names = target_names(data, splits)
    inputs = tokenizer.encode_batch([input_text(data, e) for e in examples])
    texts = ["" if e.label is None else target_text(v, names)
             for e, v in zip(examples, labels, strict=True)]  # fmt: skip
    targets = tokenizer.encode_batch(texts)
    rows = _rows(inputs, targets, data, tokenizer.eos_id)
    return {**rows, "label": labels, "weight": np.ones(len(examples), np.float32)}


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The T5 apply kwargs taken from a batch."""
    return {k: batch[k] for k in
            ("encoder_input_ids", "decoder_input_ids", "encoder_mask", "decoder_mask")}  # fmt: skip


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The weight of the loss: the real target tokens."""
    total = jnp.sum(batch["decoder_weights"].astype(jnp.float32))
    return {"loss": total, "z_loss": total}


def loss_and_metrics(outputs: jax.Array, batch: Batch, z_loss: float = 0.0) -> dict:
    """{name: (sum, weight)}: the target tokens' cross-entropy and accuracy."""
    return causal_lm.weighted_metrics(
        outputs, batch["decoder_target_ids"], batch["decoder_weights"], z_loss
    )


derived_metrics = task.no_derived_metrics


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real encoder and decoder tokens of a host batch."""
    return int(np.sum(batch["encoder_mask"]) + np.sum(batch["decoder_mask"]))


def predict_fn(module: nn.Module, data: Data, tokenizer: Any) -> Callable[[Any, Batch], jax.Array]:
    """fn(params, batch) -> decoded target ids [B, target_len] (greedy, or beam search; the
    decoders are jitted in `jaxgen.sample`)."""

    def predict(params: Any, batch: Batch) -> jax.Array:
        ids, mask = batch["encoder_input_ids"], batch["encoder_mask"]
        if data.beam_size > 1:
            return sample.beam_search_t5(
                module, params, ids, mask, max_decode_len=data.target_len,
                num_beams=data.beam_size, alpha=data.length_penalty, eos_id=tokenizer.eos_id,
            )  # fmt: skip
        return sample.decode_t5(module, params, ids, mask, max_decode_len=data.target_len,
                                temperature=0.0, eos_id=tokenizer.eos_id)  # fmt: skip

    return predict


def postprocess(
    raw: np.ndarray, examples: Sequence[Any], tokenizer: Any, data: Data, splits: task.Splits
) -> np.ndarray:
    """Decoded ids [N, Td] -> labels [N]: class ids (-1 for a string that is no class), or
    floats (-1.0 for text that is no number)."""
    names = target_names(data, splits)
    out = []
    for row in np.asarray(raw):
        ids = row.tolist()
        if tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        text = tokenizer.decode([i for i in ids if i != tokenizer.pad_id]).strip()
        if not names:
            try:
                out.append(float(text))
            except ValueError:
                out.append(float(INVALID))
        else:
            out.append(names.index(text) if text in names else INVALID)
    return np.asarray(out, np.float64 if not names else np.int64)
