"""The grain pipeline: documents → token ids (cached) → objective examples → numpy batches.

Everything is a grain `MapDataset`, so element k of the stream is a pure function of (seed, k): the
iterator state is just the next batch index, resuming reproduces the same batches, and the global
batch is the same whatever the number of processes (each process builds only its own rows of it).

- Train repeats forever with a new shuffle each epoch. Eval is a fixed finite set, shuffled once,
  identical at every evaluation.
- The objective makes the records once (`make_records`: BERT sentence pairs over `dupe_factor`
  passes, GPT windows, T5 raw chunks) and each example in a grain map (`example_fn`: masks, span
  corruption), with rngs keyed by the record (static masks) or the stream position.

Tokenizing is the slow part, so token ids are cached (in memory, and as .npz in a cache dir).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import grain
import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.models.config import ModelConfig
from jaxgen.objectives import DataError, Objective

__all__ = ["DataError", "DataIterator", "build_dataset", "pipeline_throughput"]

SPLITS = ("train", "eval")


def _collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class DataIterator:
    """Batches (dicts of numpy arrays) from grain, with JSON-serialisable state for checkpoints."""

    def __init__(
        self,
        batches: grain.MapDataset,
        signature: dict[str, Any],
        num_batches: int | None,
        prefetch: int = 2,
    ):
        self.signature = signature
        self.num_batches = num_batches
        # One prefetch thread, no worker processes: grain's multiprocess mode is fragile here.
        options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        self._iterator = iter(batches.to_iter_dataset(options))

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: this process's rows of the global batch."""
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of the iterator (plus the settings it is valid for)."""
        return {"signature": dict(self.signature), "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from `get_state` of an iterator with the same settings."""
        saved = state.get("signature", {})
        changed = {k: (saved.get(k), v) for k, v in self.signature.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"data iterator state was saved with different settings ({detail})")
        self._iterator.set_state(state["grain"])


def build_dataset(
    objective: Objective,
    model: ModelConfig,
    data: DataConfig,
    tokenizer: Tokenizer,
    source: Any,
    split: str,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    start_example: int = 0,
    prefetch: int = 2,
) -> DataIterator:
    """This process's rows of each global batch of `global_batch_size` examples of `source`.

    source: random access to decoded records (`len`, `read(indices)`; a
    `jaxgen.data.reader.PreparedSource`). The global batch is the same for any process_count;
    each process builds only its rows. split 'train' repeats forever, reshuffled each epoch, from
    example `start_example` of the stream on (a batch-size ramp continues the stream); 'eval'
    yields `num_batches` batches (default: one pass over the held-out examples, at least one
    batch), the same ones on every call. Every batch is checked against the objective's spec.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"the global batch of {global_batch_size} rows must be a positive multiple of the "
            f"{process_count} processes"
        )
    if tokenizer.vocab_size > model.vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={model.vocab_size}: "
            "ids would fall outside the embedding table; raise model.vocab_size"
        )
    try:
        objective.check(model, data)
    except ValueError as err:
        raise DataError(str(err)) from err
    if not len(source):
        raise DataError(f"the {split} split has no examples of data.seq_len={data.seq_len}")
    make = objective.example_fn(tokenizer, data, split, seed)

    # Train: a new permutation each epoch. Eval: one fixed order (it never reaches a second epoch
    # unless it is longer than the held-out set), so any number of eval batches is a uniform sample
    # of the held-out examples rather than the first documents.
    if split == "train":
        order = [seed, objectives.TAG_SHUFFLE]
    else:
        order = [objectives.EVAL_SEED, objectives.TAG_EVAL]
    shuffle_seed = int(np.random.SeedSequence(order).generate_state(1)[0])
    indices = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat()
    if split == "train":
        total = sys.maxsize
    else:
        total = num_batches or max(1, len(source) // global_batch_size)
    rows = global_batch_size // process_count
    offset = start_example + process_index * rows

    def batch(index: int) -> dict[str, np.ndarray]:
        positions = range(index * global_batch_size + offset, index * global_batch_size + offset
                          + rows)  # fmt: skip
        chosen = [int(indices[p]) for p in positions]
        records = source.read(chosen)
        local = _collate(
            [make(p, i, r) for p, i, r in zip(positions, chosen, records, strict=True)]
        )
        objectives.check_batch(objective, local, model, data, rows)
        return local

    signature = {
        "family": model.family,
        "split": split,
        "seed": seed,
        "global_batch_size": global_batch_size,
        "seq_len": data.seq_len,
        "num_records": len(source),
    }
    if getattr(source, "hash", None):
        signature["records"] = source.hash
    if start_example:
        signature["start_example"] = start_example
    batches = grain.MapDataset.range(total).map(batch)
    return DataIterator(batches, signature, None if split == "train" else total, prefetch)


def pipeline_throughput(iterator: DataIterator, num_batches: int = 20) -> dict[str, float]:
    """Times an iterator (built with prefetch=0): first-batch seconds, then examples/s and
    batches/s in the steady state."""
    start = time.perf_counter()
    first = next(iterator)
    first_batch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    rows = len(next(iter(first.values())))
    return {
        "first_batch_seconds": first_batch_seconds,
        "examples_per_sec": num_batches * rows / seconds,
        "batches_per_sec": num_batches / seconds,
    }
