"""The grain pipeline: batch layout per family, determinism, resume, process slicing, eval split,
checks."""

import json

import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.data import pipeline
from jaxgen.data.corpus import split_documents
from jaxgen.data.pipeline import DataError, build_dataset

from .conftest import data_config

BATCH = 8
SEQ_LEN = 64
KEYS = {
    "bert": {
        "input_ids": ((BATCH, SEQ_LEN), np.int32),
        "segment_ids": ((BATCH, SEQ_LEN), np.int32),
        "attention_mask": ((BATCH, SEQ_LEN), np.int32),
        "masked_positions": ((BATCH, 10), np.int32),
        "masked_ids": ((BATCH, 10), np.int32),
        "masked_weights": ((BATCH, 10), np.float32),
        "next_sentence_labels": ((BATCH,), np.int32),
    },
    "gpt": {
        "input_ids": ((BATCH, SEQ_LEN), np.int32),
        "target_ids": ((BATCH, SEQ_LEN), np.int32),
        "positions": ((BATCH, SEQ_LEN), np.int32),
        "segment_ids": ((BATCH, SEQ_LEN), np.int32),
        "weights": ((BATCH, SEQ_LEN), np.float32),
    },
    "t5": {
        "encoder_input_ids": ((BATCH, SEQ_LEN), np.int32),
        "decoder_input_ids": ((BATCH, None), np.int32),
        "decoder_target_ids": ((BATCH, None), np.int32),
        "encoder_mask": ((BATCH, SEQ_LEN), np.int32),
        "decoder_mask": ((BATCH, None), np.int32),
        "decoder_weights": ((BATCH, None), np.float32),
    },
}


def make(family, tokenizers, docs, cache_dir, split="train", seed=0, **kwargs):
    """An iterator over the train or eval part of `docs` (6 documents held out)."""
    config = kwargs.pop("config", None) or data_config(family)
    kwargs.setdefault("global_batch_size", BATCH)
    documents = kwargs.pop("documents", None) or split_documents(docs, 6, seed=0)[split == "eval"]
    return build_dataset(
        objectives.get(family),
        config.model,
        config.data,
        tokenizers[family],
        documents,
        split,
        seed=seed,
        cache_dir=cache_dir,
        **kwargs,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_batch_keys_shapes_and_ranges(family, tokenizers, builtin_docs, cache_dir):
    batch = next(make(family, tokenizers, builtin_docs, cache_dir))
    assert set(batch) == set(KEYS[family])
    for key, (shape, dtype) in KEYS[family].items():
        assert batch[key].dtype == dtype, key
        assert batch[key].shape[0] == shape[0] and (
            shape[1:] in ((), (None,)) or batch[key].shape == shape
        ), key
    for key in ("input_ids", "encoder_input_ids", "target_ids", "decoder_target_ids"):
        if key in batch:
            assert batch[key].max() < tokenizers[family].vocab_size


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_same_seed_same_batches(family, tokenizers, builtin_docs, cache_dir):
    a = take(make(family, tokenizers, builtin_docs, cache_dir, seed=3), 4)
    b = take(make(family, tokenizers, builtin_docs, cache_dir, seed=3), 4)
    assert_same(a, b)
    c = take(make(family, tokenizers, builtin_docs, cache_dir, seed=4), 1)
    first = "input_ids" if family != "t5" else "encoder_input_ids"
    assert not np.array_equal(a[0][first], c[0][first])


@pytest.mark.parametrize(
    "family,dynamic", [("bert", False), ("bert", True), ("gpt", False), ("t5", False)]
)
def test_resume_from_state(family, dynamic, tokenizers, builtin_docs, cache_dir):
    config = data_config(family, *([f"data.dynamic_masking={dynamic}"] if dynamic else []))
    first = make(family, tokenizers, builtin_docs, cache_dir, config=config, seed=5)
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # must survive a JSON round trip
    expected = take(first, 3)
    resumed = make(family, tokenizers, builtin_docs, cache_dir, config=config, seed=5)
    resumed.set_state(state)
    assert_same(take(resumed, 3), expected)


def test_state_from_other_settings_is_rejected(tokenizers, builtin_docs, cache_dir):
    state = make("bert", tokenizers, builtin_docs, cache_dir).get_state()
    other = make("bert", tokenizers, builtin_docs, cache_dir, global_batch_size=4)
    with pytest.raises(DataError, match="global_batch_size: saved 8 now 4"):
        other.set_state(state)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_processes_slice_the_same_global_batch(family, tokenizers, builtin_docs, cache_dir):
    whole = take(make(family, tokenizers, builtin_docs, cache_dir), 2)
    parts = [
        take(
            make(
                family,
                tokenizers,
                builtin_docs,
                cache_dir,
                process_index=p,
                process_count=4,
            ),
            2,
        )
        for p in range(4)
    ]
    for step in range(2):
        for key in whole[step]:
            joined = np.concatenate([parts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[step][key], err_msg=key)
    with pytest.raises(DataError, match="process_index"):
        make(family, tokenizers, builtin_docs, cache_dir, process_index=3, process_count=3)


def test_static_masks_repeat_each_epoch_dynamic_do_not(tokenizers, builtin_docs, cache_dir):
    docs = builtin_docs[:8]  # a small corpus: one epoch is a few dozen pairs

    def epochs(dynamic):
        config = data_config(
            "bert", f"data.dynamic_masking={dynamic}", "data.dupe_factor=1", "data.eval_documents=2"
        )
        it = make(
            "bert", tokenizers, docs, cache_dir, config=config, global_batch_size=1, documents=docs
        )
        n = it.signature["num_records"]
        rows = [next(it)["input_ids"][0].tobytes() for _ in range(2 * n)]
        return sorted(rows[:n]), sorted(rows[n:])

    first, second = epochs(dynamic=False)
    assert first == second  # same pairs, same masks, new order
    first, second = epochs(dynamic=True)
    assert first != second


def _text(ids) -> str:
    """Token ids as a space-padded string, so `in` finds whole-token runs."""
    return " " + " ".join(map(str, ids)) + " "


def _unmasked(batch, row: int) -> np.ndarray:
    """[seq_len] input ids of one BERT example with its masked positions put back."""
    ids = batch["input_ids"][row].copy()
    real = batch["masked_weights"][row] > 0
    ids[batch["masked_positions"][row][real]] = batch["masked_ids"][row][real]
    return ids


def test_eval_is_fixed_finite_and_held_out(tokenizers, builtin_docs, cache_dir):
    a = list(make("bert", tokenizers, builtin_docs, cache_dir, split="eval", seed=1))
    b = list(make("bert", tokenizers, builtin_docs, cache_dir, split="eval", seed=2))
    assert len(a) >= 1
    assert_same(a, b)  # independent of the training seed and of how often it is built
    assert (
        len(list(make("bert", tokenizers, builtin_docs, cache_dir, split="eval", num_batches=3)))
        == 3
    )

    # Every A segment of an eval example is text from a held-out document and from no training one.
    splits = split_documents(builtin_docs, 6, seed=0)
    train_corpus, eval_corpus = (pipeline.tokenize_documents(d, tokenizers["bert"]) for d in splits)
    eval_text = [_text(eval_corpus.tokens(d)) for d in range(eval_corpus.num_documents)]
    train_text = [_text(train_corpus.tokens(d)) for d in range(train_corpus.num_documents)]
    checked = 0
    for batch in a:
        for row in range(BATCH):
            ids = _unmasked(batch, row)
            sep = int(np.flatnonzero(ids == tokenizers["bert"].sep_id)[0])
            segment_a = _text(ids[1:sep])
            if sep > 12:
                assert any(segment_a in t for t in eval_text)
                assert not any(segment_a in t for t in train_text)
                checked += 1
    assert checked > 10


def test_eval_pairs_are_distinct_beyond_one_pass(tokenizers, builtin_docs, cache_dir):
    # One pairing pass over the held-out documents gives `one_pass` pairs; an eval of more rows
    # must draw from further passes (dupe_factor 2 here) rather than score the same pairs twice.
    config = data_config("bert", "data.dupe_factor=1")
    one_pass = make("bert", tokenizers, builtin_docs, cache_dir, split="eval", config=config)
    one_pass = one_pass.get_state()["signature"]["num_records"]
    rows = one_pass * 3 // 2
    batches = list(
        make("bert", tokenizers, builtin_docs, cache_dir, split="eval", num_batches=rows // BATCH)
    )
    pairs = {
        (tuple(_unmasked(b, r)), tuple(b["segment_ids"][r])) for b in batches for r in range(BATCH)
    }
    # More distinct pairs than one pass has (small documents may repeat a pair across passes).
    assert len(pairs) > one_pass


def test_eval_order_is_shuffled_across_documents(tokenizers, builtin_docs, cache_dir):
    # Pairs are made document by document; unshuffled, the first eval rows would all come from the
    # first held-out documents in order, and a short eval would never see the others.
    held_out = split_documents(builtin_docs, 6, seed=0)[1]
    corpus = pipeline.tokenize_documents(held_out, tokenizers["bert"])
    texts = [_text(corpus.tokens(d)) for d in range(corpus.num_documents)]
    sources = []
    # One batch: fewer rows than one pass over the documents makes.
    for batch in make("bert", tokenizers, builtin_docs, cache_dir, split="eval", num_batches=1):
        for r in range(BATCH):
            ids = _unmasked(batch, r)
            sep = int(np.flatnonzero(ids == tokenizers["bert"].sep_id)[0])
            segment_a = _text(ids[1:sep])
            found = [d for d, text in enumerate(texts) if segment_a in text]
            if len(found) == 1:
                sources.append(found[0])
    assert len(sources) >= 5
    assert sources != sorted(sources) and len(set(sources)) >= 3


def test_token_cache_written_and_reused(tokenizers, builtin_docs, tmp_path):
    pipeline._TOKEN_CACHE.clear()
    first = pipeline.tokenize_documents(builtin_docs, tokenizers["gpt"], tmp_path)
    files = list(tmp_path.glob("tokens-*.npz"))
    assert len(files) == 1
    pipeline._TOKEN_CACHE.clear()
    second = pipeline.tokenize_documents(builtin_docs, tokenizers["gpt"], tmp_path)
    np.testing.assert_array_equal(first.ids, second.ids)
    np.testing.assert_array_equal(first.sentence_starts, second.sentence_starts)


def test_ids_and_lengths_are_validated(tokenizers, builtin_docs, cache_dir):
    config = data_config("bert", "model.vocab_size=1000")
    with pytest.raises(DataError, match="model.vocab_size=1000"):
        make("bert", tokenizers, builtin_docs, cache_dir, config=config)
    with pytest.raises(DataError, match="NSP needs at least two"):
        make("bert", tokenizers, builtin_docs, cache_dir, split="eval", documents=builtin_docs[:1])


def test_throughput_helper(tokenizers, builtin_docs):
    config = data_config("bert")
    stats = pipeline.pipeline_throughput(
        objectives.get("bert"), config.model, config.data, tokenizers["bert"], builtin_docs,
        global_batch_size=8, num_batches=3,
    )  # fmt: skip
    assert stats["examples_per_sec"] > 0 and stats["tokenize_tokens_per_sec"] > 0
