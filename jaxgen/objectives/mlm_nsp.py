"""BERT pretraining: masked language modelling + next sentence prediction (Devlin et al. 2018).

Host side (numpy, explicit `np.random.Generator`) follows google-research/bert
`create_pretraining_data.py`: sentence pairs from consecutive sentences with `short_seq_prob`
shorter targets, a random B segment from another document with `random_next_prob` (unused sentences
put back), `truncate_seq_pair` trimming the longer side at a random end, layout `[CLS] A [SEP] B
[SEP]`, and 80/10/10 masking of `min(max_predictions, max(1, round(n_candidates * mask_prob)))`
positions, optionally whole words.

Device side (pure jnp): `model_inputs(batch)` and `loss_and_metrics(outputs, batch)`; the loss is
the MLM mean over real predictions plus the NSP mean over sequences (LOSS_TERMS). The module
implements `jaxgen.objectives.Objective`.
"""

from __future__ import annotations

import bisect
import dataclasses
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig, require
from jaxgen.objectives import causal_lm

if TYPE_CHECKING:
    from jaxgen.models.config import ModelConfig

IS_NEXT, NOT_NEXT = 0, 1  # google-research/bert's next_sentence_labels
# NSP pairs sentences of different documents.
MIN_DOCUMENTS = 2
LOSS_TERMS = ("mlm_loss", "nsp_loss")
# The data keys that shape the prepared records; masking acts when examples are read.
RECORD_KEYS = ("seq_len", "dupe_factor", "short_seq_prob", "random_next_prob")


@dataclasses.dataclass(frozen=True)
class Data(DataConfig):
    """BERT's data, as google-research/bert's create_pretraining_data.py names it.

    mask_prob of the non-special tokens are predicted, at most max_predictions per sequence;
    short_seq_prob of pairs aim at a random shorter length; dupe_factor passes over the documents
    pair their sentences anew; random_next_prob of B segments come from another document.
    dynamic_masking draws new masks every epoch (the paper masked statically); whole_word_masking
    masks every piece of a chosen word.
    """

    tokenizer: str = "wordpiece"
    lowercase: bool = True
    mask_prob: float = 0.15
    max_predictions: int = 20
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    dynamic_masking: bool = False
    whole_word_masking: bool = False
    random_next_prob: float = 0.5

    def check(self) -> None:
        """Probabilities in range, at least one prediction and one pass."""
        super().check()
        for key in ("mask_prob", "short_seq_prob", "random_next_prob"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"data.{key} must be in [0, 1], got {value}")
        for key in ("max_predictions", "dupe_factor"):
            value = getattr(self, key)
            require(value > 0, f"data.{key} must be positive, got {value}")
        require(self.seq_len >= 5, f"data.seq_len={self.seq_len} cannot hold [CLS] A [SEP] B [SEP]")


def check(model: ModelConfig, data: Data) -> None:
    """Raises ConfigError when the data cannot feed the model."""
    require(
        data.seq_len <= model.max_len,
        f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}",
    )


@dataclasses.dataclass
class SentencePair:
    """One NSP instance before masking; `b_document` is B's source (A's document for IsNext)."""

    tokens_a: np.ndarray  # [len_a] int32
    tokens_b: np.ndarray  # [len_b] int32
    is_random_next: bool
    a_document: int
    b_document: int


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """What masking needs to know about the vocabulary, fixed for a run."""

    mask_prob: float
    max_predictions: int
    mask_id: int
    excluded: (
        np.ndarray
    )  # [vocab] bool: ids never selected for prediction ([CLS], [SEP], [PAD], [MASK])
    random_ids: (
        np.ndarray
    )  # ids a "random token" replacement draws from: the non-special vocabulary
    word_starts: np.ndarray | None = None  # [vocab] bool; set for whole-word masking


def masking_spec(
    tokenizer: Any, mask_prob: float, max_predictions: int, whole_word: bool
) -> MaskingSpec:
    """The MaskingSpec of a WordPiece-style tokenizer (with cls_id, sep_id, mask_id, pad_id)."""
    excluded = np.zeros(tokenizer.vocab_size, dtype=bool)
    excluded[[tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id]] = True
    special = np.asarray(tokenizer.special_ids)
    random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), special).astype(np.int32)
    return MaskingSpec(
        mask_prob=float(mask_prob),
        max_predictions=int(max_predictions),
        mask_id=int(tokenizer.mask_id),
        excluded=excluded,
        random_ids=random_ids,
        word_starts=np.asarray(tokenizer.word_starts, dtype=bool) if whole_word else None,
    )


# ---------------------------------------------------------------------------------- sentence pairs


def truncate_seq_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Trims the longer of A and B one token at a time, from the front or back at random, to fit.

    Returns the trimmed views (A wins ties, as `max(tokens_a, tokens_b, key=len)` does in the
    original). The front-or-back draws are taken in one call, and which side each trim hits follows
    from the lengths: the longer side until it is shorter, then B and A by turns (A on ties).
    """
    len_a, len_b = len(tokens_a), len(tokens_b)
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    front = (rng.random(excess) < 0.5).tolist()
    if len_a >= len_b:  # A until it is one shorter than B, then B, A, B, ...
        run = min(len_a - len_b + 1, excess)
        a_flags, b_flags = front[:run] + front[run + 1 :: 2], front[run::2]
    else:  # B until both are as long, then A, B, A, ...
        run = min(len_b - len_a, excess)
        b_flags, a_flags = front[:run] + front[run + 1 :: 2], front[run::2]
    a_front, b_front = sum(a_flags), sum(b_flags)
    a_end, b_end = len_a - (len(a_flags) - a_front), len_b - (len(b_flags) - b_front)
    return tokens_a[a_front:a_end], tokens_b[b_front:b_end]


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high): one double draw (scalar `integers` is ~10x slower)."""
    return low + int(rng.random() * (high - low))


@dataclasses.dataclass(frozen=True)
class _Document:
    """A document's sentences as one token array and the sentence boundaries within it."""

    tokens: np.ndarray  # [len], the corpus's token dtype
    starts: list[int]  # [num_sentences + 1]

    @classmethod
    def of(cls, sentences: Sequence[np.ndarray]) -> _Document:
        """From a list of [len] sentences."""
        lengths = [len(s) for s in sentences]
        tokens = np.concatenate(sentences) if sentences else np.zeros(0, np.int32)
        return cls(tokens, [0, *np.cumsum(lengths).tolist()])


def create_instances_from_document(
    all_documents: Sequence[Sequence[np.ndarray]],
    document_index: int,
    max_seq_length: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    random_next_prob: float = 0.5,
) -> list[SentencePair]:
    """Sentence pairs from one document (a list of [len] int32 sentences), as google-research/bert
    makes them.

    Every pair fits `max_seq_length` with its [CLS] and two [SEP]. A random B always comes from a
    different document (the original retries 10 times and could rarely keep the same one).
    One-sentence chunks are not forced to be random nexts (see `_instances`), so NotNext pairs are
    `random_next_prob` of all pairs.
    """
    documents = [_Document.of(d) for d in all_documents]
    return _instances(
        documents, document_index, max_seq_length, short_seq_prob, rng, random_next_prob
    )


def _instances(
    documents: Sequence[_Document],
    document_index: int,
    max_seq_length: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    random_next_prob: float,
) -> list[SentencePair]:
    """`create_instances_from_document` over contiguous documents: a chunk is a range of
    sentences and A and B are slices of the document's tokens (no copies)."""
    document = documents[document_index]
    tokens, starts = document.tokens, document.starts
    num_sentences = len(starts) - 1
    max_num_tokens = max_seq_length - 3
    # Usually fill the whole sequence; sometimes (short_seq_prob) aim shorter, to match fine-tuning
    # lengths.
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = _randint(rng, 2, max_num_tokens + 1)

    instances = []
    chunk_start = 0  # the current chunk is sentences chunk_start..i
    while chunk_start < num_sentences:
        # The chunk ends at the first sentence that brings it to the target length (or at the
        # document's end): a binary search in the sentence boundaries.
        reached = bisect.bisect_left(
            starts, starts[chunk_start] + target_seq_length, chunk_start + 1
        )
        i = min(reached, num_sentences) - 1
        chunk = i + 1 - chunk_start
        # a_end: how many chunk sentences go into A.
        a_end = _randint(rng, 1, chunk) if chunk >= 2 else 1
        tokens_a = tokens[starts[chunk_start] : starts[chunk_start + a_end]]
        b_document = document_index
        is_random_next = rng.random() < random_next_prob
        if chunk == 1 and not is_random_next:
            # Deviation from the original, which turns every one-sentence chunk into a random next:
            # with long sentences, short sequences or short documents that skews labels towards
            # NotNext (58% at seq_len 64 on the built-in corpus). Here B is the following sentence
            # when there is one, and at a document's end the pair is skipped, so labels follow
            # random_next_prob exactly.
            if i + 1 == num_sentences:
                break
            i += 1
            chunk += 1
        if is_random_next:
            target_b_length = target_seq_length - len(tokens_a)
            b_document = _randint(rng, 0, len(documents) - 1)
            b_document += b_document >= document_index  # any document but this one
            other = documents[b_document]
            random_start = _randint(rng, 0, len(other.starts) - 1)
            # B takes sentences from random_start until it reaches its target length.
            need = other.starts[random_start] + target_b_length
            end = min(bisect.bisect_left(other.starts, need, random_start + 1),
                      len(other.starts) - 1)  # fmt: skip
            tokens_b = other.tokens[other.starts[random_start] : other.starts[end]]
            # The chunk's sentences after A were not used: put them back for the next pair.
            i -= chunk - a_end
        else:
            tokens_b = tokens[starts[chunk_start + a_end] : starts[chunk_start + chunk]]
        tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
        if len(tokens_a) >= 1 and len(tokens_b) >= 1:
            instances.append(
                SentencePair(tokens_a, tokens_b, is_random_next, document_index, b_document)
            )
        chunk_start = i + 1
    return instances


def iter_pairs(
    all_documents: Sequence[Sequence[np.ndarray]],
    *,
    dupe_factor: int,
    max_seq_length: int,
    short_seq_prob: float,
    random_next_prob: float,
    rng: np.random.Generator,
) -> Iterator[SentencePair]:
    """The pairs of `dupe_factor` passes over the documents (each pairs sentences anew), made one
    document at a time (a pass over a big shard never sits in memory)."""
    if len(all_documents) < 2:
        raise ValueError(f"NSP needs at least two documents, got {len(all_documents)}")
    documents = [_Document.of(d) for d in all_documents]
    for _ in range(dupe_factor):
        for index in range(len(documents)):
            yield from _instances(
                documents, index, max_seq_length, short_seq_prob, rng, random_next_prob
            )


def create_pairs(
    all_documents: Sequence[Sequence[np.ndarray]], **settings: Any
) -> list[SentencePair]:
    """All pairs of `iter_pairs` (the same settings), as a list."""
    return list(iter_pairs(all_documents, **settings))


def pack_pair(
    tokens_a: np.ndarray,
    tokens_b: np.ndarray,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """[CLS] A [SEP] B [SEP] padded to seq_len: input_ids, segment_ids (0 for A part, 1 for B part),
    attention_mask, each [seq_len] int32."""
    length = len(tokens_a) + len(tokens_b) + 3
    if length > seq_len:
        raise ValueError(f"pair of {length} tokens does not fit seq_len={seq_len}")
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    input_ids[0] = cls_id
    input_ids[1 : 1 + len(tokens_a)] = tokens_a
    input_ids[1 + len(tokens_a)] = sep_id
    input_ids[2 + len(tokens_a) : length - 1] = tokens_b
    input_ids[length - 1] = sep_id
    segment_ids = np.zeros(seq_len, dtype=np.int32)
    segment_ids[len(tokens_a) + 2 : length] = 1
    attention_mask = np.zeros(seq_len, dtype=np.int32)
    attention_mask[:length] = 1
    return {"input_ids": input_ids, "segment_ids": segment_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------- masking


def _whole_word_selection(
    candidates: np.ndarray,
    ids: np.ndarray,
    word_starts: np.ndarray,
    num_to_predict: int,
    rng: np.random.Generator,
) -> np.ndarray:
    # A candidate continues the previous word if it is a continuation piece directly after it.
    starts = word_starts[ids[candidates]]
    starts[1:] |= np.diff(candidates) != 1
    starts[0] = True
    groups = np.split(candidates, np.flatnonzero(starts)[1:])
    chosen: list[np.ndarray] = []
    count = 0
    for g in rng.permutation(len(groups)):
        if count >= num_to_predict:
            break
        # A word that would overshoot the budget is skipped, as in the original.
        if count + len(groups[g]) > num_to_predict:
            continue
        chosen.append(groups[g])
        count += len(groups[g])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=candidates.dtype)


def mask_tokens(
    input_ids: np.ndarray, attention_mask: np.ndarray, spec: MaskingSpec, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Masks one sequence: returns input_ids [T] (with replacements), masked_positions, masked_ids
    [P] int32 and masked_weights [P] float32 (P = max_predictions; padding predictions have weight
    0, position 0)."""
    real = attention_mask.astype(bool) & ~spec.excluded[input_ids]
    candidates = np.flatnonzero(real)
    num_to_predict = min(spec.max_predictions, max(1, round(len(candidates) * spec.mask_prob)))
    if spec.word_starts is None:
        positions = rng.permutation(candidates)[:num_to_predict]
    else:
        positions = _whole_word_selection(
            candidates, input_ids, spec.word_starts, num_to_predict, rng
        )
    positions = np.sort(positions)
    labels = input_ids[positions]

    # 80% [MASK], 10% unchanged, 10% a random non-special token.
    draw = rng.random(len(positions))
    random_tokens = spec.random_ids[rng.integers(0, len(spec.random_ids), len(positions))]
    replaced = np.where(draw < 0.8, spec.mask_id, np.where(draw < 0.9, labels, random_tokens))
    output_ids = input_ids.copy()
    output_ids[positions] = replaced

    n, P = len(positions), spec.max_predictions
    masked_positions = np.zeros(P, dtype=np.int32)
    masked_ids = np.zeros(P, dtype=np.int32)
    masked_weights = np.zeros(P, dtype=np.float32)
    masked_positions[:n], masked_ids[:n], masked_weights[:n] = positions, labels, 1.0
    return {
        "input_ids": output_ids,
        "masked_positions": masked_positions,
        "masked_ids": masked_ids,
        "masked_weights": masked_weights,
    }


def make_example(
    tokens_a: np.ndarray,
    tokens_b: np.ndarray,
    is_random_next: bool,
    rng: np.random.Generator,
    spec: MaskingSpec,
    *,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """One BERT example (the contract's batch keys, unbatched): packed pair, masks, NSP label."""
    example = pack_pair(tokens_a, tokens_b, seq_len, cls_id, sep_id, pad_id)
    example.update(mask_tokens(example["input_ids"], example["attention_mask"], spec, rng))
    example["next_sentence_labels"] = np.int32(NOT_NEXT if is_random_next else IS_NEXT)
    return example


# ---------------------------------------------------------------------------------------- batches


def batch_spec(data: Data, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Token arrays [B, T], predictions [B, P] (P = max_predictions) and NSP labels [B]."""
    b, t, p = batch_size, data.seq_len, data.max_predictions
    int32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    return {
        "input_ids": int32(b, t),
        "segment_ids": int32(b, t),
        "attention_mask": int32(b, t),
        "masked_positions": int32(b, p),
        "masked_ids": int32(b, p),
        "masked_weights": jax.ShapeDtypeStruct((b, p), jnp.float32),
        "next_sentence_labels": int32(b),
    }


def sequence_lengths(data: Data) -> dict[str, int]:
    """Tokens per row the model reads (inputs) and the positions it scores (the predictions)."""
    return {"inputs": data.seq_len, "scored": data.max_predictions}


def value_bounds(model: ModelConfig, data: Data) -> dict[str, int]:
    """Exclusive upper bounds of the integer arrays (XLA would clamp an out-of-range index)."""
    v = model.vocab_size
    return {"input_ids": v, "masked_ids": v, "segment_ids": model.type_vocab_size,
            "attention_mask": 2, "masked_positions": data.seq_len,
            "next_sentence_labels": 2}  # fmt: skip


def synthetic_batch(
    model: ModelConfig, data: Data, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random pairs of the spec's shapes: padded rows of random length, a random number of real
    predictions per row (at least one), random NSP labels."""
    b, t, p = batch_size, data.seq_len, data.max_predictions
    lengths = rng.integers(max(t // 2, 4), t + 1, b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    segments = (np.arange(t)[None, :] >= lengths[:, None] // 2).astype(np.int32) * mask
    positions = np.zeros((b, p), np.int32)
    weights = np.zeros((b, p), np.float32)
    for row, n in enumerate(lengths):
        count = int(rng.integers(1, min(p, n - 1) + 1))
        positions[row, :count] = np.sort(rng.choice(np.arange(1, n), count, replace=False))
        weights[row, :count] = 1.0
    return {
        "input_ids": rng.integers(0, model.vocab_size, (b, t), dtype=np.int32) * mask,
        "segment_ids": segments,
        "attention_mask": mask,
        "masked_positions": positions,
        "masked_ids": rng.integers(0, model.vocab_size, (b, p), dtype=np.int32),
        "masked_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, b, dtype=np.int32),
    }


def make_records(
    corpus: Any, tokenizer: Any, data: Data, split: str, seed: int, shard: int = 0
) -> Iterator[SentencePair]:
    """The sentence pairs of `dupe_factor` passes over the documents of one shard of a split
    (pairs are static; NotNext partners come from the same shard, as google-research/bert's
    per-file runs). The rng is keyed by (seed, shard): shards are independent of one another.

    Eval pairs also take `dupe_factor` passes: one pass over a dozen held-out documents gives only
    a few hundred pairs, and an eval longer than that would count the same NSP labels twice.
    """
    for name in ("cls_id", "sep_id", "mask_id"):
        if getattr(tokenizer, name, None) is None:
            raise objectives.DataError(
                f"BERT needs a WordPiece tokenizer with {name}; got {tokenizer!r}"
            )
    documents = [d for d in (corpus.sentences(i) for i in range(corpus.num_documents)) if d]
    if len(documents) < MIN_DOCUMENTS:
        raise objectives.DataError(
            f"the {split} split has {len(documents)} non-empty document(s); NSP needs at least two "
            "(raise data.eval_documents or use a corpus with more documents)"
        )
    if split == "train":
        pair_seed = [seed, objectives.TAG_PAIRS, shard]
    else:
        pair_seed = [objectives.EVAL_SEED, objectives.TAG_EVAL, shard]
    return iter_pairs(
        documents,
        dupe_factor=data.dupe_factor,
        max_seq_length=data.seq_len,
        short_seq_prob=data.short_seq_prob,
        random_next_prob=data.random_next_prob,
        rng=np.random.default_rng(pair_seed),
    )


def encode_record(record: SentencePair, dtype: np.dtype, data: Data) -> bytes:
    """A pair as bytes: uint32 [len_a, len_b, is_random_next], then A's and B's tokens."""
    a, b = record.tokens_a, record.tokens_b
    header = struct.pack("<3I", len(a), len(b), record.is_random_next)
    return b"".join((header, np.asarray(a, dtype).tobytes(), np.asarray(b, dtype).tobytes()))


def decode_record(raw: bytes, dtype: np.dtype, data: Data) -> SentencePair:
    """The inverse of `encode_record` (the source documents are not stored: -1)."""
    len_a, len_b, random_next = np.frombuffer(raw, np.uint32, count=3)
    tokens = np.frombuffer(raw, dtype, offset=12).astype(np.int32)
    return SentencePair(tokens[:len_a], tokens[len_a : len_a + len_b], bool(random_next), -1, -1)


def record_tokens(record: SentencePair) -> int:
    """Tokens a record holds."""
    return len(record.tokens_a) + len(record.tokens_b)


def example_fn(
    tokenizer: Any, data: Data, split: str, seed: int
) -> Callable[[int, int, SentencePair], dict[str, np.ndarray]]:
    """make(position, index, pair) -> a masked example.

    Static masks are keyed by the pair's index, so every epoch sees the same mask; dynamic ones by
    the position in the stream, which differs each epoch. Eval always uses the stream position with
    a fixed seed.
    """
    spec = masking_spec(tokenizer, data.mask_prob, data.max_predictions, data.whole_word_masking)
    train = split == "train"
    dynamic = data.dynamic_masking or not train
    mask_seed = seed if train else objectives.EVAL_SEED
    ids = dict(
        seq_len=data.seq_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
        pad_id=tokenizer.pad_id,
    )  # fmt: skip

    def make(position: int, index: int, pair: SentencePair) -> dict[str, np.ndarray]:
        rng = objectives.host_rng(mask_seed, objectives.TAG_MASK, position if dynamic else index)
        return make_example(pair.tokens_a, pair.tokens_b, pair.is_random_next, rng, spec, **ids)

    return make


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-padding) input tokens of a host batch."""
    return int(np.sum(batch["attention_mask"]))


# ------------------------------------------------------------------------------------- device side


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The BERT module's apply kwargs from a batch."""
    return {
        "input_ids": batch["input_ids"],
        "segment_ids": batch["segment_ids"],
        "attention_mask": batch["attention_mask"],
        "masked_positions": batch["masked_positions"],
    }


def loss_weights(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The weight of each loss term: real predictions (MLM, z-loss) and sequences (NSP)."""
    predictions = jnp.sum(batch["masked_weights"].astype(jnp.float32))
    sequences = jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32)
    return {"mlm_loss": predictions, "nsp_loss": sequences, "z_loss": predictions}


def loss_and_metrics(
    outputs: dict[str, jax.Array], batch: dict[str, jax.Array], z_loss: float = 0.0
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (sum, weight)}: MLM cross-entropy and accuracy over real predictions (+ z-loss), NSP
    cross-entropy and accuracy over sequences (float32).

    outputs: mlm_logits [B, P, V], nsp_logits [B, 2].
    """
    mlm = causal_lm.weighted_metrics(
        outputs["mlm_logits"], batch["masked_ids"], batch["masked_weights"], z_loss
    )
    nsp_logits = outputs["nsp_logits"].astype(jnp.float32)  # [B, 2]
    nsp_labels = batch["next_sentence_labels"].astype(jnp.int32)  # [B]
    log_probs = jax.nn.log_softmax(nsp_logits)
    nsp_nll = -jnp.take_along_axis(log_probs, nsp_labels[:, None], axis=-1)[:, 0]  # [B]
    sequences = loss_weights(batch)["nsp_loss"]
    nsp_correct = jnp.sum((jnp.argmax(nsp_logits, axis=-1) == nsp_labels).astype(jnp.float32))
    metrics = {
        "mlm_loss": mlm["loss"],
        "mlm_accuracy": mlm["accuracy"],
        "nsp_loss": (jnp.sum(nsp_nll), sequences),
        "nsp_accuracy": (nsp_correct, sequences),
    }
    if "z_loss" in mlm:
        metrics["z_loss"] = mlm["z_loss"]
    return metrics


def derived_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """No metric beyond the sums' means (the loss is the sum of LOSS_TERMS)."""
    return {}
