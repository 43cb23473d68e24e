"""What the fine-tuning objectives share: their data section, the task's splits, pair encoding,
row padding and the classification loss.

A fine-tuning run's `config.data` names a `task`: a GLUE task (read from `task_dir` in the GLUE
layout), `files` (generic TSV/CSV/JSONL `train_file`/`validation_file`, optional `test_file`) or
`sft` (prompt/response JSONL, GPT). The objective module is chosen by the family and the task's
kind (`jaxgen.objectives.for_data`). Tasks are small, so a run encodes every split into host arrays
once (`encode`); the rows of a batch are those arrays' rows, and evaluation pads the last batch
with rows of weight 0 (`pad_rows`), so every example counts once and no padding counts at all.

Every task batch carries `label [B]` (float32: a class id, or the regression target) and `weight
[B]` (1 for a real example, 0 for padding); a split without labels (GLUE test) has label -1.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import DataConfig, Section, choice, positive
from jaxgen.data import tasks

GLUE = tuple(name for name in tasks.GLUE_TASKS if name != "ax")  # ax is test-only: no training
TASKS = (*GLUE, "files", "sft", "squad")
NO_LABEL = -1.0


def kind(task: str) -> str:
    """The objective kind of a task: 'sft' (prompt/response), 'span' (SQuAD) or 'classify'."""
    return {"sft": "sft", "squad": "span"}.get(task, "classify")


@dataclasses.dataclass(frozen=True)
class TaskData(Section):
    """A fine-tuning task's data.

    task: a GLUE task (cola sst2 mrpc stsb qqp mnli mnli_mismatched qnli rte wnli), 'files',
    'sft' or 'squad' (SQuAD v1.1/v2.0 JSON files). task_dir: the GLUE task's directory (or
    glue_data, holding it). train_file, validation_file, test_file: the data of 'files', 'sft'
    and 'squad' (test_file optional; GLUE reads task_dir/test.tsv when present). tokenizer,
    vocab_path, lowercase: as pretraining's; the tokenizer of train.init_from's run is used
    when it has one. seq_len: tokens per example (longer pairs are cut from the end of the
    longer text, as run_classifier.py does).
    """

    SECTION: ClassVar[str] = "data"
    TOKENIZERS: ClassVar[tuple[str, ...]] = DataConfig.TOKENIZERS

    task: str = ""
    task_dir: str = ""
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    tokenizer: str = "wordpiece"
    vocab_path: str = ""
    lowercase: bool = False
    seq_len: int = 128

    def check(self) -> None:
        """A known task with the files it reads."""
        choice("data.task", self.task, TASKS)
        choice("data.tokenizer", self.tokenizer, self.TOKENIZERS)
        positive(self, "seq_len")


@dataclasses.dataclass(frozen=True)
class Splits:
    """A task's examples: train, dev, test (None without a test file), the class names in label
    order (empty for regression) and whether the labels are floats."""

    train: list[Any]  # tasks.Example, or tasks.SquadExample for SQuAD
    dev: list[Any]
    test: list[Any] | None
    labels: tuple[str, ...]
    regression: bool


def load_splits(data: TaskData) -> Splits:
    """Reads the task's splits and checks that dev labels are among the train labels."""
    # Checked here, not in TaskData.check: a config file's rows leave the paths to the command line.
    if data.task in GLUE and not data.task_dir:
        raise tasks.TaskError(
            f"data.task={data.task!r} reads GLUE files: set --config.data.task_dir to the "
            "task's directory (or to glue_data)"
        )
    if data.task not in GLUE and not (data.train_file and data.validation_file):
        raise tasks.TaskError(
            f"data.task={data.task!r} reads --config.data.train_file and "
            "--config.data.validation_file; set both"
        )
    if data.task in GLUE:
        spec = tasks.glue_task(data.task)
        test = None
        if tasks.has_glue_split(data.task_dir, data.task, "test"):
            test = tasks.read_glue(data.task_dir, data.task, "test")
        return Splits(
            train=tasks.read_glue(data.task_dir, data.task, "train"),
            dev=tasks.read_glue(data.task_dir, data.task, "dev"),
            test=test,
            labels=spec.labels,
            regression=spec.regression,
        )
    if data.task == "squad":
        test = tasks.read_squad(data.test_file) if data.test_file else None
        train, dev = tasks.read_squad(data.train_file), tasks.read_squad(data.validation_file)
        return Splits(train, dev, test, (), False)
    if data.task == "sft":

        def pairs(path: str) -> list[tasks.Example]:
            return [tasks.Example(f"{i}", p, r) for i, (p, r) in
                    enumerate(tasks.read_prompt_response(path))]  # fmt: skip

        test = pairs(data.test_file) if data.test_file else None
        return Splits(pairs(data.train_file), pairs(data.validation_file), test, (), False)
    train = tasks.read_generic(data.train_file)
    dev = tasks.read_generic(data.validation_file)
    test = tasks.read_generic(data.test_file, require_label=False) if data.test_file else None
    regression = tasks.is_regression(train)
    if tasks.is_regression(dev) != regression:
        raise tasks.TaskError(
            f"{data.validation_file} and {data.train_file} disagree on the task: one has float "
            "(regression) labels, the other class names"
        )
    labels = () if regression else tasks.label_names(train)
    if not regression:
        unknown = sorted({e.label for e in dev} - set(labels))
        if unknown:
            raise tasks.TaskError(
                f"{data.validation_file} has labels {unknown} that {data.train_file} never uses; "
                f"the train labels are {list(labels)}"
            )
    return Splits(train, dev, test, labels, regression)


def texts(examples: Sequence[Any], data: TaskData, splits: Splits) -> list[str]:
    """The texts a tokenizer made for the task is trained on: every text and text pair."""
    return [t for e in examples for t in (e.text, e.text_pair) if t]


def num_outputs(splits: Splits) -> int:
    """The classifier's outputs for these splits: the class count, or 1 for regression."""
    return 1 if splits.regression else len(splits.labels)


def label_values(examples: Sequence[tasks.Example], splits: Splits) -> np.ndarray:
    """The examples' labels as float32 [N]: class ids, regression targets, or -1 unlabeled."""
    values = []
    for example in examples:
        if example.label is None:
            values.append(NO_LABEL)
        elif splits.regression:
            values.append(float(example.label))
        else:
            values.append(float(splits.labels.index(example.label)))
    return np.asarray(values, np.float32)


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Cuts tokens off the end of the longer of a and b (a on ties) until both fit in max_tokens,
    as run_classifier.py's `_truncate_seq_pair`."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The arrays grown to `rows` rows with zeros (weight 0: padding that no metric counts)."""
    have = len(next(iter(arrays.values())))
    if have > rows:
        raise ValueError(f"{have} rows do not fit in {rows}")
    return {
        k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)]) if rows > have
        else v for k, v in arrays.items()
    }  # fmt: skip


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A short hash of encoded examples (a resumed run must read the same train set)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:16]


def example_spec(batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The per-example arrays every task batch has: label and weight [B] float32."""
    row = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return {"label": row, "weight": row}


def class_metrics(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """{name: (sum, weight)} of a classifier's logits [B, C]: cross-entropy and accuracy, or
    (C = 1) the squared error of the regression output."""
    logits = logits.astype(jnp.float32)
    weight = batch["weight"].astype(jnp.float32)
    total = jnp.sum(weight)
    if logits.shape[-1] == 1:
        error = jnp.square(logits[:, 0] - batch["label"])
        return {"loss": (jnp.sum(error * weight), total)}
    labels = jnp.maximum(batch["label"], 0).astype(jnp.int32)  # unlabeled rows have weight 0
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss": (jnp.sum(ce * weight), total), "accuracy": (jnp.sum(correct * weight), total)}


def class_predictions(logits: jax.Array) -> jax.Array:
    """[B] float32 predictions of logits [B, C]: the class id, or (C = 1) the regression value."""
    if logits.shape[-1] == 1:
        return logits[:, 0].astype(jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.float32)


def example_weights(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The weight of the loss: the number of real examples."""
    return {"loss": jnp.sum(batch["weight"].astype(jnp.float32))}


def no_derived_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """None: a task's metrics come from its predictions."""
    return {}


def label_predictions(
    raw: np.ndarray, examples: Sequence[Any], tokenizer: Any, data: TaskData, splits: Splits
) -> np.ndarray:
    """A classifier's predictions [N] as the task metrics take them (class ids, or floats)."""
    return np.asarray(raw, np.float64 if splits.regression else np.int64)
