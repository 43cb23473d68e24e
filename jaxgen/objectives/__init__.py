"""What a model family is: the `Objective` contract and the one explicit table of implementations.

An objective module owns everything that differs between BERT, GPT and T5 outside the model: its
data settings, the shapes of its batch, how host-side examples are made from a tokenized corpus,
the model inputs, the loss and its metrics. Code elsewhere asks the module, never the family name.

Metrics are `{name: (sum, weight)}` pairs, so any number of micro-batches, processes or eval batches
reduce exactly: a metric's value is the sum of its sums over the sum of its weights. The optimized
loss is the sum over `LOSS_TERMS` (and `z_loss` when on) of each term's weighted mean; `loss` in
metrics is the sum over `LOSS_TERMS` (BERT: MLM + NSP; GPT, T5: the cross-entropy).

Modules are imported on demand, so a family whose objective is missing or broken does not stop the
others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import jax

    from jaxgen.config import DataConfig
    from jaxgen.models.config import ModelConfig

MODULES = {"bert": "mlm_nsp", "gpt": "causal_lm", "t5": "span_corruption"}
FAMILIES = tuple(MODULES)
# Fine-tuning: (family, task kind) -> module; `task.kind` tells a task's kind.
TASK_MODULES = {
    ("bert", "classify"): "bert_classify",
    ("bert", "span"): "bert_span",
    ("gpt", "classify"): "gpt_classify",
    ("gpt", "sft"): "gpt_sft",
    ("t5", "classify"): "t5_text",
}
Metrics = dict[str, tuple[Any, Any]]

# Host-side random streams are numpy generators seeded by (seed, tag, ...): one tag per use, so
# streams never overlap. Eval examples (pairs, masks, noise, order) use EVAL_SEED, so every
# evaluation of every run on the same held-out documents sees the same batches.
TAG_PAIRS, TAG_SHUFFLE, TAG_MASK, TAG_EVAL, TAG_NOISE = 1, 2, 3, 4, 5
EVAL_SEED = 0
# Optimized, but not part of the reported loss.
AUXILIARY_TERMS = ("z_loss",)


class DataError(ValueError):
    """Data that cannot feed the model (ids out of range, too few documents, wrong shapes)."""


@runtime_checkable
class StepObjective(Protocol):
    """What the train and eval steps ask of every objective, pretraining or fine-tuning.

    LOSS_TERMS: metrics whose means sum to the loss.
    """

    LOSS_TERMS: tuple[str, ...]

    def check(self, model: ModelConfig, data: Any) -> None:
        """Raises ConfigError when these data settings cannot feed this model."""

    def batch_spec(self, data: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The arrays of a batch of `batch_size` rows, as shapes and dtypes."""

    def sequence_lengths(self, data: Any) -> dict[str, int]:
        """Tokens per row: 'inputs' (first stack), 'targets' (T5's decoder), 'scored' (logits)."""

    def value_bounds(self, model: ModelConfig, data: Any) -> dict[str, int]:
        """Exclusive upper bounds of the integer arrays (all are >= 0)."""

    def synthetic_batch(
        self, model: ModelConfig, data: Any, batch_size: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """A valid random batch of the spec (padding and weights included), for tests, benches."""

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The model's apply kwargs taken from a batch."""

    def loss_weights(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The weight of each loss term in a batch (a function of the batch alone)."""

    def loss_and_metrics(
        self, outputs: Any, batch: Mapping[str, Any], z_loss: float = 0.0
    ) -> Metrics:
        """{name: (sum, weight)} of every metric, the loss terms included."""

    def derived_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
        """Metrics computed from the reduced means (GPT: perplexity)."""

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Real tokens of a host batch (for tokens/s)."""


@runtime_checkable
class Objective(StepObjective, Protocol):
    """What a pretraining objective module provides (mlm_nsp, causal_lm, span_corruption).

    Data: its `config.data` section class (a `jaxgen.config.DataConfig`).
    MIN_DOCUMENTS: documents a corpus split needs.
    RECORD_KEYS: the data keys that shape its prepared records (`jaxgen prepare`).
    """

    Data: type[DataConfig]
    MIN_DOCUMENTS: int
    RECORD_KEYS: tuple[str, ...]

    def make_records(
        self, corpus: Any, tokenizer: Any, data: DataConfig, split: str, seed: int, shard: int = 0
    ) -> Iterable[Any]:
        """The deterministic part of example making: the records of one shard of a split."""

    def encode_record(self, record: Any, dtype: np.dtype, data: DataConfig) -> bytes:
        """A record as the bytes of one ArrayRecord entry (tokens as `dtype`)."""

    def decode_record(self, raw: bytes, dtype: np.dtype, data: DataConfig) -> Any:
        """The inverse of encode_record."""

    def record_tokens(self, record: Any) -> int:
        """Tokens a record holds (the manifest's counts)."""

    def example_fn(
        self, tokenizer: Any, data: DataConfig, split: str, seed: int
    ) -> Callable[[int, int, Any], dict[str, np.ndarray]]:
        """make(stream position, record index, record) -> one example of the spec (no batch dim)."""


@runtime_checkable
class TaskObjective(StepObjective, Protocol):
    """What a fine-tuning objective module provides (bert_classify, gpt_classify, gpt_sft,
    t5_text, bert_span): in place of prepared records `encode`, which turns a split's examples
    into host arrays of the spec. Data: its section class (a `jaxgen.objectives.task.TaskData`).
    PREDICTS: 'labels' (class ids or floats [N]), 'spans' (answer start and end logits of each
    of its `windows`) or '' (none: scored by the loss); with predictions it has
    `predict_outputs` (the evaluation forward's outputs, batch -> raw predictions) or, where the
    predictions need more than that forward (T5 decodes), `predict_fn` (params, batch -> raw
    predictions); for labels also `postprocess` (a split's raw predictions and examples -> the
    labels)."""

    Data: type
    PREDICTS: str

    def texts(self, examples: Sequence[Any], data: Any, splits: Any) -> list[str]:
        """The texts a tokenizer made for the task is trained on (its train split's)."""

    def encode(self, examples: Sequence[Any], tokenizer: Any, data: Any, splits: Any) -> dict:
        """A split's examples as arrays of the spec with one row per example."""


def get(family: str) -> Objective:
    """Objective module of a family: bert -> mlm_nsp, gpt -> causal_lm, t5 -> span_corruption."""
    if family not in MODULES:
        from jaxgen.config import ConfigError

        raise ConfigError(f"unknown model family {family!r}; valid families are {list(MODULES)}")
    return importlib.import_module(f"{__name__}.{MODULES[family]}")


def for_data(family: str, data: Mapping[str, Any]) -> Any:
    """The objective of a family and a `config.data` mapping: a fine-tuning objective when the
    data names a `task`, else the family's pretraining objective."""
    task_name = data.get("task") if hasattr(data, "get") else None  # a dict or a ConfigDict
    if not task_name:
        return get(family)
    from jaxgen.objectives import task

    get(family)  # an unknown family fails here, naming the valid ones
    key = (family, task.kind(str(task_name)))
    if key not in TASK_MODULES:
        from jaxgen.config import ConfigError

        kinds = sorted(k for f, k in TASK_MODULES if f == family)
        raise ConfigError(
            f"data.task={task_name!r} is a {key[1]} task, which {family} does not fine-tune; "
            f"{family} fine-tunes {' and '.join(kinds)} tasks (classify: GLUE and 'files'; "
            "sft: GPT prompt/response; span: BERT on SQuAD)"
        )
    return importlib.import_module(f"{__name__}.{TASK_MODULES[key]}")


def of_run(run: Any) -> Any:
    """The objective of a RunConfig (`for_data` of its family and data)."""
    return for_data(run.family, run.data.to_dict())


def is_task(run: Any) -> bool:
    """Whether a RunConfig fine-tunes on a task (its data names one)."""
    return bool(getattr(run.data, "task", ""))


def host_rng(seed: int, *keys: int) -> np.random.Generator:
    """The numpy generator of one host-side random stream, keyed by (seed, tag, ...)."""
    return np.random.default_rng([seed, *keys])


# ------------------------------------------------------------------------------------ reduction


def optimized_terms(objective: Objective, sums: Mapping[str, Any]) -> tuple[str, ...]:
    """The metric names whose weighted means add up to the optimized loss."""
    return objective.LOSS_TERMS + tuple(t for t in AUXILIARY_TERMS if t in sums)


def objective_value(
    objective: Objective, sums: Metrics, weights: Mapping[str, Any] | None = None
) -> Any:
    """The optimized loss: sum over its terms of sum / weight (jnp or numpy).

    `weights` are the terms' weights in the whole global batch (`loss_weights`); a micro-batch's
    value with them is its exact share of the global loss and gradient. A term of weight 0 (e.g.
    an all-padding batch) contributes 0, not NaN.
    """
    total = 0.0
    for term in optimized_terms(objective, sums):
        weight = sums[term][1] if weights is None else weights[term]
        total = total + sums[term][0] / _nonzero(weight)
    return total


def _nonzero(weight: Any) -> Any:
    if isinstance(weight, (int, float, np.floating, np.integer)):
        return weight if weight > 0 else 1.0
    import jax.numpy as jnp

    return jnp.where(weight > 0, weight, 1.0)


def summarize(objective: Objective, means: Mapping[str, float]) -> dict[str, float]:
    """Metric means plus `loss` (the sum over LOSS_TERMS) and the objective's derived metrics."""
    out = dict(means)
    out["loss"] = float(sum(means[t] for t in objective.LOSS_TERMS))
    out.update(objective.derived_metrics(out))
    return out


def reduce_metrics(objective: Objective, sums_list: Sequence[Metrics]) -> dict[str, float]:
    """Exact means over batches of host `{name: (sum, weight)}` sums, summarized."""
    totals: dict[str, list[float]] = {}
    for sums in sums_list:
        for key, (s, w) in sums.items():
            acc = totals.setdefault(key, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(w)
    return summarize(objective, {k: s / max(w, 1e-8) for k, (s, w) in totals.items()})


# ---------------------------------------------------------------------------------- batch check


def check_batch(
    objective: Objective,
    batch: Mapping[str, np.ndarray],
    model: ModelConfig,
    data: DataConfig,
    rows: int | None = None,
) -> None:
    """Raises DataError unless a host batch matches the spec: keys, shapes, dtypes and bounds.

    rows: the batch's leading dimension (this process's rows); None takes it from the batch. XLA
    clamps out-of-range gathers silently, so ids and positions must be checked on the host.
    """
    rows = len(next(iter(batch.values()))) if rows is None else rows
    spec = objective.batch_spec(data, rows)
    if set(batch) != set(spec):
        raise DataError(
            f"batch keys {sorted(batch)} differ from the {objective.__name__} spec {sorted(spec)}"
        )
    for key, want in spec.items():
        got = batch[key]
        if tuple(got.shape) != tuple(want.shape):
            raise DataError(
                f"batch[{key!r}] has shape {tuple(got.shape)}, the spec wants {tuple(want.shape)} "
                f"(data.seq_len={data.seq_len})"
            )
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise DataError(f"batch[{key!r}] has dtype {got.dtype}, the spec wants {want.dtype}")
    for key, bound in objective.value_bounds(model, data).items():
        values = batch[key]
        if not values.size:
            continue
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= bound:
            bad = high if high >= bound else low
            raise DataError(
                f"batch[{key!r}] has value {bad} outside [0, {bound}): " + _bound_hint(key, model)
            )


def _bound_hint(key: str, model: ModelConfig) -> str:
    if key.endswith("ids") and "segment" not in key:
        return (
            f"a token id beyond model.vocab_size={model.vocab_size}; the tokenizer's vocabulary "
            "is larger than the model's"
        )
    if key == "positions":
        return f"a position beyond model.max_len={model.max_len}"
    return "the data and the model disagree"
