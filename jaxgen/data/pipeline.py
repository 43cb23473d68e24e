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

import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig
from jaxgen.data.corpus import corpus_hash
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.models.config import ModelConfig
from jaxgen.objectives import DataError, Objective

__all__ = ["DataError", "DataIterator", "TokenizedCorpus", "build_dataset", "tokenize_documents"]

SPLITS = ("train", "eval")
_TOKEN_CACHE: dict[str, TokenizedCorpus] = {}
_RECORD_CACHE: dict[tuple, Any] = {}
_RECORD_CACHE_SIZE = 8


# ------------------------------------------------------------------------------------------ tokens


@dataclasses.dataclass
class TokenizedCorpus:
    """All token ids of a corpus, flat, with sentence and document boundaries."""

    ids: np.ndarray  # [num_tokens] int32
    sentence_starts: np.ndarray  # [num_sentences + 1] int64 offsets into ids
    document_starts: np.ndarray  # [num_documents + 1] int64 offsets into sentences

    @property
    def num_documents(self) -> int:
        """Number of documents (including any that lost all their sentences to tokenization)."""
        return len(self.document_starts) - 1

    def sentences(self, document: int) -> list[np.ndarray]:
        """The non-empty sentences of one document, each [len] int32."""
        first, last = self.document_starts[document], self.document_starts[document + 1]
        starts = self.sentence_starts[first : last + 1]
        return [self.ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a]

    def tokens(self, document: int) -> np.ndarray:
        """All token ids of one document, [len] int32."""
        first, last = self.document_starts[document], self.document_starts[document + 1]
        return self.ids[self.sentence_starts[first] : self.sentence_starts[last]]


def tokenize_documents(
    documents: Sequence[Sequence[str]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    *,
    use_cache: bool = True,
) -> TokenizedCorpus:
    """Tokenizes every sentence, reusing a copy in memory or in `cache_dir/tokens-<hash>.npz`."""
    key = hashlib.sha256(f"{tokenizer.fingerprint}|{corpus_hash(documents)}".encode()).hexdigest()[
        :20
    ]
    if use_cache and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    file = Path(cache_dir) / f"tokens-{key}.npz" if cache_dir else None
    if use_cache and file is not None and file.is_file():
        with np.load(file) as data:
            corpus = TokenizedCorpus(data["ids"], data["sentence_starts"], data["document_starts"])
    else:
        sentences = [s for doc in documents for s in doc]
        lengths, chunks = [], []
        for start in range(0, len(sentences), 8192):  # bounded memory for big corpora
            encoded = tokenizer.encode_batch(sentences[start : start + 8192])
            lengths.extend(len(e) for e in encoded)
            chunks.extend(np.asarray(e, dtype=np.int32) for e in encoded)
        ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
        sentence_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        document_starts = np.concatenate(
            [[0], np.cumsum([len(doc) for doc in documents], dtype=np.int64)]
        )
        corpus = TokenizedCorpus(ids, sentence_starts, document_starts)
        if use_cache and file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            # Written under a temporary name and renamed: a crash never leaves a truncated cache.
            fd, tmp = tempfile.mkstemp(prefix=file.name, suffix=".tmp.npz", dir=file.parent)
            os.close(fd)
            np.savez(tmp, ids=ids, sentence_starts=sentence_starts, document_starts=document_starts)
            os.replace(tmp, file)
    if use_cache:
        _TOKEN_CACHE[key] = corpus
    return corpus


# ----------------------------------------------------------------------------------------- records


class _Records:
    """A random-access source whose element i is (i, record); the index keys static masks."""

    def __init__(self, records: Sequence[Any] | dict[str, np.ndarray]):
        self._records = records
        self._length = (
            len(next(iter(records.values()))) if isinstance(records, dict) else len(records)
        )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, Any]:
        index = int(index) % self._length
        if isinstance(self._records, dict):
            return index, {k: v[index] for k, v in self._records.items()}
        return index, self._records[index]


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key not in _RECORD_CACHE:
        if len(_RECORD_CACHE) >= _RECORD_CACHE_SIZE:
            _RECORD_CACHE.pop(next(iter(_RECORD_CACHE)))
        _RECORD_CACHE[key] = build()
    return _RECORD_CACHE[key]


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
    documents: Sequence[Sequence[str]],
    split: str,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    start_example: int = 0,
    cache_dir: str | os.PathLike | None = None,
    prefetch: int = 2,
) -> DataIterator:
    """This process's rows of each global batch of `global_batch_size` examples of `documents`.

    The global batch is the same for any process_count; each process builds only its rows. split
    'train' repeats forever, reshuffled each epoch, from example `start_example` of the stream on
    (a batch-size ramp continues the stream); 'eval' yields `num_batches` batches (default: one
    pass over the held-out examples, at least one batch), the same ones on every call. cache_dir:
    where token ids are cached. Every batch is checked against the objective's batch spec.
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

    corpus = tokenize_documents(documents, tokenizer, cache_dir)
    corpus_key = f"{tokenizer.fingerprint}|{corpus_hash(documents)}"
    key = (objective.__name__, corpus_key, split, seed, tuple(sorted(data.to_dict().items())))
    records = _Records(
        _cached(key, lambda: objective.make_records(corpus, tokenizer, data, split, seed))
    )
    if not len(records):
        raise DataError(
            f"the {split} split yields no examples of data.seq_len={data.seq_len} "
            f"({len(documents)} documents, {len(corpus.ids)} tokens)"
        )
    make = objective.example_fn(tokenizer, data, split, seed)

    # Train: a new permutation each epoch. Eval: one fixed order (it never reaches a second epoch
    # unless it is longer than the held-out set), so any number of eval batches is a uniform sample
    # of the held-out examples rather than the first documents.
    if split == "train":
        order = [seed, objectives.TAG_SHUFFLE]
    else:
        order = [objectives.EVAL_SEED, objectives.TAG_EVAL]
    shuffle_seed = int(np.random.SeedSequence(order).generate_state(1)[0])
    source = grain.MapDataset.source(records).shuffle(seed=shuffle_seed)
    if split == "train":
        total = sys.maxsize
    else:
        total = num_batches or max(1, len(records) // global_batch_size)
    examples = source.repeat().map_with_index(lambda i, item: make(i, *item))

    rows = global_batch_size // process_count
    offset = start_example + process_index * rows

    def batch(index: int) -> dict[str, np.ndarray]:
        start = index * global_batch_size + offset
        local = _collate([examples[start + j] for j in range(rows)])
        objectives.check_batch(objective, local, model, data, rows)
        return local

    signature = {
        "family": model.family,
        "split": split,
        "seed": seed,
        "global_batch_size": global_batch_size,
        "seq_len": data.seq_len,
        "num_records": len(records),
    }
    if start_example:
        signature["start_example"] = start_example
    batches = grain.MapDataset.range(total).map(batch)
    return DataIterator(batches, signature, None if split == "train" else total, prefetch)


def pipeline_throughput(
    objective: Objective,
    model: ModelConfig,
    data: DataConfig,
    tokenizer: Tokenizer,
    documents: Sequence[Sequence[str]],
    *,
    global_batch_size: int,
    num_batches: int = 20,
) -> dict[str, float]:
    """Times the data path from raw text to batches: tokenization (uncached), then batch making.

    Returns tokenize_seconds, tokenize_tokens_per_sec, first_batch_seconds (pair creation etc.),
    examples_per_sec and batches_per_sec (steady state, no prefetch threads).
    """
    start = time.perf_counter()
    corpus = tokenize_documents(documents, tokenizer, use_cache=False)
    tokenize_seconds = time.perf_counter() - start
    _RECORD_CACHE.clear()
    start = time.perf_counter()
    iterator = build_dataset(
        objective, model, data, tokenizer, documents, "train",
        seed=0, global_batch_size=global_batch_size, prefetch=0,
    )  # fmt: skip
    next(iterator)
    first_batch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {
        "tokenize_seconds": tokenize_seconds,
        "tokenize_tokens_per_sec": len(corpus.ids) / max(tokenize_seconds, 1e-9),
        "first_batch_seconds": first_batch_seconds,
        "examples_per_sec": num_batches * global_batch_size / seconds,
        "batches_per_sec": num_batches / seconds,
    }
