"""The grain pipeline: documents → token ids (cached) → objective examples → numpy batches.

Everything is a grain `MapDataset`, so element k of the stream is a pure function of (seed, k): the
iterator state is just the next batch index, resuming reproduces the same batches, and the global
batch is the same whatever the number of processes (each process builds only its own rows of it).

- Train repeats forever with a new shuffle each epoch. Eval is a fixed finite set, shuffled once,
  identical at every evaluation.
- BERT: sentence pairs are made once per `dupe_factor` pass (google-research/bert's static data);
  masks are drawn in a grain map with an rng keyed by the pair (static masking: the same mask every
  epoch) or by the stream position (dynamic masking: new masks each epoch).
- GPT: documents joined with eos and cut into windows by `causal_lm.pack_documents`, shuffled per
  epoch.
- T5: the token stream cut into raw chunks (T5's `random_spans_helper` length), span-corrupted in
  the map.

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
from jaxgen.data.corpus import corpus_hash, load_documents, split_documents
from jaxgen.data.tokenizer import Tokenizer

SPLITS = ("train", "eval")
# Eval examples (pairs, masks, noise, order) use this fixed seed, so every evaluation of every run
# on the same held-out documents sees the same batches.
EVAL_SEED = 0
_TAGS = {"pairs": 1, "shuffle": 2, "mask": 3, "eval": 4, "noise": 5}
_ID_KEYS = (
    "input_ids",
    "masked_ids",
    "target_ids",
    "encoder_input_ids",
    "decoder_input_ids",
    "decoder_target_ids",
)
_TOKEN_CACHE: dict[str, TokenizedCorpus] = {}
_RECORD_CACHE: dict[tuple, Any] = {}
_RECORD_CACHE_SIZE = 8


class DataError(ValueError):
    """Data that cannot feed the model (ids out of range, too few documents, lengths too long)."""


def _setting(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


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


def _bert_stream(
    data: Any,
    tokenizer: Tokenizer,
    corpus: TokenizedCorpus,
    split: str,
    *,
    seed: int,
    seq_len: int,
    max_predictions: int,
    corpus_key: str,
) -> tuple[_Records, Callable[[int, tuple[int, Any]], dict[str, np.ndarray]]]:
    mlm_nsp = objectives.get("bert")
    for name in ("cls_id", "sep_id", "mask_id"):
        if getattr(tokenizer, name, None) is None:
            raise DataError(f"BERT needs a WordPiece tokenizer with {name}; got {tokenizer!r}")
    documents = [d for d in (corpus.sentences(i) for i in range(corpus.num_documents)) if d]
    if len(documents) < 2:
        raise DataError(
            f"the {split} split has {len(documents)} non-empty document(s); NSP needs at least two "
            "(raise data.eval_documents or use a corpus with more documents)"
        )
    train = split == "train"
    # Eval pairs also take `dupe_factor` passes: one pass over a dozen held-out documents gives
    # only a few hundred pairs, and an eval longer than that would count the same NSP labels twice.
    dupe_factor = int(_setting(data, "dupe_factor", 1))
    short_seq_prob = float(_setting(data, "short_seq_prob", 0.1))
    random_next_prob = float(_setting(data, "random_next_prob", 0.5))
    pair_seed = [seed, _TAGS["pairs"]] if train else [EVAL_SEED, _TAGS["eval"]]
    key = (
        "bert",
        corpus_key,
        split,
        tuple(pair_seed),
        seq_len,
        dupe_factor,
        short_seq_prob,
        random_next_prob,
    )
    pairs = _cached(
        key,
        lambda: mlm_nsp.create_pairs(
            documents,
            dupe_factor=dupe_factor,
            max_seq_length=seq_len,
            short_seq_prob=short_seq_prob,
            random_next_prob=random_next_prob,
            rng=np.random.default_rng(pair_seed),
        ),
    )
    spec = mlm_nsp.masking_spec(
        tokenizer,
        mask_prob=float(_setting(data, "mask_prob", 0.15)),
        max_predictions=max_predictions,
        whole_word=bool(_setting(data, "whole_word_masking", False)),
    )
    # Static masks are keyed by the pair, so every epoch sees the same mask; dynamic ones by the
    # position in the stream, which differs each epoch. Eval always uses the stream position with a
    # fixed seed.
    dynamic = bool(_setting(data, "dynamic_masking", False)) or not train
    mask_seed = seed if train else EVAL_SEED
    ids = dict(
        seq_len=seq_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id
    )

    def make(position: int, item: tuple[int, Any]) -> dict[str, np.ndarray]:
        index, pair = item
        rng = _rng(mask_seed, _TAGS["mask"], position if dynamic else index)
        return mlm_nsp.make_example(
            pair.tokens_a, pair.tokens_b, pair.is_random_next, rng, spec, **ids
        )

    return _Records(pairs), make


def _gpt_stream(
    data: Any,
    tokenizer: Tokenizer,
    corpus: TokenizedCorpus,
    split: str,
    *,
    seed: int,
    seq_len: int,
    corpus_key: str,
) -> tuple[_Records, Callable[[int, tuple[int, Any]], dict[str, np.ndarray]]]:
    causal_lm = objectives.get("gpt")
    if tokenizer.eos_id is None:
        raise DataError(f"GPT needs a tokenizer with an end-of-text token; got {tokenizer!r}")
    separate = bool(_setting(data, "separate_documents", False))
    windows = _cached(
        ("gpt", corpus_key, split, seq_len, separate),
        lambda: causal_lm.pack_documents(
            [corpus.tokens(i) for i in range(corpus.num_documents)],
            seq_len,
            tokenizer.eos_id,
            separate,
        ),
    )
    return _Records(windows), lambda position, item: item[1]


def _t5_stream(
    data: Any,
    tokenizer: Tokenizer,
    corpus: TokenizedCorpus,
    split: str,
    *,
    seed: int,
    seq_len: int,
    corpus_key: str,
) -> tuple[_Records, Callable[[int, tuple[int, Any]], dict[str, np.ndarray]]]:
    span_corruption = objectives.get("t5")
    if not tokenizer.sentinel_ids or tokenizer.eos_id is None:
        raise DataError(f"T5 needs a SentencePiece tokenizer with sentinels; got {tokenizer!r}")
    noise_density = float(_setting(data, "noise_density", 0.15))
    mean_span = float(_setting(data, "mean_noise_span_length", 3.0))
    raw_len, decoder_len = span_corruption.input_and_target_lengths(
        seq_len, noise_density, mean_span
    )
    # T5 concatenates documents with no separator and cuts the stream into raw_len chunks.
    stream = corpus.ids
    chunks = stream[: len(stream) // raw_len * raw_len].reshape(-1, raw_len)
    options = dict(
        noise_density=noise_density,
        mean_noise_span_length=mean_span,
        sentinel_start_id=tokenizer.sentinel_id(0),
        eos_id=tokenizer.eos_id,
        encoder_len=seq_len,
        decoder_len=decoder_len,
        pad_id=tokenizer.pad_id,
    )
    noise_seed = seed if split == "train" else EVAL_SEED

    def make(position: int, item: tuple[int, Any]) -> dict[str, np.ndarray]:
        return span_corruption.corrupt(
            item[1], _rng(noise_seed, _TAGS["noise"], position), **options
        )

    return _Records(list(chunks)), make


_STREAMS = {"bert": _bert_stream, "gpt": _gpt_stream, "t5": _t5_stream}


# ----------------------------------------------------------------------------------------- batches


def check_batch(batch: dict[str, np.ndarray], vocab_size: int, max_len: int | None = None) -> None:
    """Raises DataError if any token id is outside [0, vocab_size) or a position is ≥ max_len.

    XLA clamps out-of-range gathers silently, so this must happen on the host.
    """
    for key in _ID_KEYS:
        if key in batch and batch[key].size:
            low, high = int(batch[key].min()), int(batch[key].max())
            if low < 0 or high >= vocab_size:
                raise DataError(
                    f"batch[{key!r}] has token id {high if high >= vocab_size else low} outside "
                    f"[0, {vocab_size}): the tokenizer's vocabulary is larger than model.vocab_size"
                )
    if max_len is not None and "positions" in batch and batch["positions"].size:
        if int(batch["positions"].max()) >= max_len:
            raise DataError(
                f"batch['positions'] reaches {int(batch['positions'].max())} >= max_len={max_len}"
            )


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
    config: Any,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    max_predictions: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    documents: Sequence[Sequence[str]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    prefetch: int = 2,
) -> DataIterator:
    """This process's `batch_size` rows of each global batch of batch_size * process_count rows.

    config: the run config (config.model.family/vocab_size/max_len and config.data). The global
    batch is the same for any process_count; each process builds only its rows. split 'train'
    repeats forever, reshuffled each epoch; 'eval' yields `num_batches` batches (default: one pass
    over the held-out examples, at least one batch), the same ones on every call. documents: this
    split's documents (else config.data.corpus is loaded and split by `split_documents(docs,
    data.eval_documents, data.split_seed)`); cache_dir: where token ids are cached (else
    data.cache_dir).
    """
    family = config.model.family
    data = config.data
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if family not in _STREAMS:
        raise DataError(f"unknown model family {family!r}; valid families are {sorted(_STREAMS)}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if batch_size <= 0:
        raise DataError(f"batch_size (rows per process) must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count})")
    vocab_size = int(config.model.vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}: "
            "ids would fall outside the embedding table; raise model.vocab_size"
        )
    max_len = int(config.model.max_len) if family != "t5" else None
    if max_len is not None and seq_len > max_len:
        raise DataError(f"seq_len={seq_len} exceeds model.max_len={max_len}")
    if family == "bert":
        max_predictions = int(max_predictions or _setting(data, "max_predictions", 20))

    if documents is None:
        all_documents = load_documents(data.corpus, min_documents=2 if family == "bert" else 1)
        eval_documents = int(_setting(data, "eval_documents", 0))
        if split == "eval" and not eval_documents:
            raise DataError("data.eval_documents is 0: there is no eval split")
        split_seed = int(_setting(data, "split_seed", 0))
        train_docs, eval_docs = split_documents(all_documents, eval_documents, split_seed)
        documents = train_docs if split == "train" else eval_docs
    cache_dir = cache_dir or _setting(data, "cache_dir", "") or None
    corpus = tokenize_documents(documents, tokenizer, cache_dir)
    corpus_key = f"{tokenizer.fingerprint}|{corpus_hash(documents)}"
    extra = {"max_predictions": max_predictions} if family == "bert" else {}
    records, make = _STREAMS[family](
        data,
        tokenizer,
        corpus,
        split,
        seed=seed,
        seq_len=seq_len,
        corpus_key=corpus_key,
        **extra,
    )
    if not len(records):
        raise DataError(f"the {split} split yields no {family} examples of seq_len={seq_len}")

    global_batch = batch_size * process_count
    # Train: a new permutation each epoch. Eval: one fixed order (it never reaches a second epoch
    # unless it is longer than the held-out set), so any number of eval batches is a uniform sample
    # of the held-out examples rather than the first documents.
    order = [seed, _TAGS["shuffle"]] if split == "train" else [EVAL_SEED, _TAGS["eval"]]
    shuffle_seed = int(np.random.SeedSequence(order).generate_state(1)[0])
    source = grain.MapDataset.source(records).shuffle(seed=shuffle_seed)
    total = sys.maxsize if split == "train" else num_batches or max(1, len(records) // global_batch)
    examples = source.repeat().map_with_index(make)

    offset = process_index * batch_size

    def batch(index: int) -> dict[str, np.ndarray]:
        start = index * global_batch + offset
        rows = _collate([examples[start + j] for j in range(batch_size)])
        check_batch(rows, vocab_size, max_len)
        return rows

    signature = {
        "family": family,
        "split": split,
        "seed": seed,
        "global_batch_size": global_batch,
        "seq_len": seq_len,
        "max_predictions": max_predictions,
        "num_records": len(records),
    }
    batches = grain.MapDataset.range(total).map(batch)
    return DataIterator(batches, signature, None if split == "train" else total, prefetch)


def pipeline_throughput(
    config: Any,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    max_predictions: int | None = None,
    num_batches: int = 20,
    documents: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Times the data path from raw text to batches: tokenization (uncached), then batch making.

    Returns tokenize_seconds, tokenize_tokens_per_sec, first_batch_seconds (pair creation etc.),
    examples_per_sec and batches_per_sec (steady state, no prefetch threads).
    """
    family = config.model.family
    if documents is None:
        documents = load_documents(config.data.corpus, min_documents=2 if family == "bert" else 1)
    start = time.perf_counter()
    corpus = tokenize_documents(documents, tokenizer, use_cache=False)
    tokenize_seconds = time.perf_counter() - start
    _RECORD_CACHE.clear()
    start = time.perf_counter()
    iterator = build_dataset(
        config,
        tokenizer,
        "train",
        seed=0,
        batch_size=batch_size,
        seq_len=seq_len,
        max_predictions=max_predictions,
        documents=documents,
        prefetch=0,
    )
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
        "examples_per_sec": num_batches * batch_size / seconds,
        "batches_per_sec": num_batches / seconds,
    }
