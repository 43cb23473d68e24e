"""The grain pipeline over prepared records: batch layout per family, determinism, resume, process
slicing, the eval split, checks."""

import json

import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.data import pipeline, prepare
from jaxgen.data.corpus import document_hash, list_inputs, read_documents
from jaxgen.data.pipeline import DataError, build_dataset
from jaxgen.data.reader import PreparedSource

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


def make(family, prepared, split="train", seed=0, overrides=(), corpus="builtin", **kwargs):
    """An iterator over a split of the built-in corpus, prepared with these overrides."""
    data = prepared(family, *overrides, corpus=corpus)
    kwargs.setdefault("global_batch_size", BATCH)
    return build_dataset(
        objectives.get(family),
        data.run.model,
        data.run.data,
        data.tokenizer,
        PreparedSource(data.root, split, data.run.data),
        split,
        seed=seed,
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
def test_batch_keys_shapes_and_ranges(family, prepared):
    batch = next(make(family, prepared))
    assert set(batch) == set(KEYS[family])
    for key, (shape, dtype) in KEYS[family].items():
        assert batch[key].dtype == dtype, key
        assert batch[key].shape[0] == shape[0] and (
            shape[1:] in ((), (None,)) or batch[key].shape == shape
        ), key
    for key in ("input_ids", "encoder_input_ids", "target_ids", "decoder_target_ids"):
        if key in batch:
            assert batch[key].max() < prepared(family).tokenizer.vocab_size


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_same_seed_same_batches(family, prepared):
    a = take(make(family, prepared, seed=3), 4)
    b = take(make(family, prepared, seed=3), 4)
    assert_same(a, b)
    c = take(make(family, prepared, seed=4), 1)
    first = "input_ids" if family != "t5" else "encoder_input_ids"
    assert not np.array_equal(a[0][first], c[0][first])


@pytest.mark.parametrize(
    "family,dynamic", [("bert", False), ("bert", True), ("gpt", False), ("t5", False)]
)
def test_resume_from_state(family, dynamic, prepared):
    overrides = ["data.dynamic_masking=true"] if dynamic else []
    first = make(family, prepared, seed=5, overrides=overrides)
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # must survive a JSON round trip
    expected = take(first, 3)
    resumed = make(family, prepared, seed=5, overrides=overrides)
    resumed.set_state(state)
    assert_same(take(resumed, 3), expected)


def test_state_from_other_settings_is_rejected(prepared):
    state = make("bert", prepared).get_state()
    other = make("bert", prepared, global_batch_size=4)
    with pytest.raises(DataError, match="global_batch_size: saved 8 now 4"):
        other.set_state(state)
    state["signature"]["records"] = "another-manifest"
    with pytest.raises(DataError, match="records: saved 'another-manifest'"):
        make("bert", prepared).set_state(state)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_processes_slice_the_same_global_batch(family, prepared):
    whole = take(make(family, prepared), 2)
    parts = [take(make(family, prepared, process_index=p, process_count=4), 2) for p in range(4)]
    for step in range(2):
        for key in whole[step]:
            joined = np.concatenate([parts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[step][key], err_msg=key)
    with pytest.raises(DataError, match="process_index"):
        make(family, prepared, process_index=3, process_count=3)


def test_static_masks_repeat_each_epoch_dynamic_do_not(prepared, builtin_docs, tmp_path):
    small = tmp_path / "small.txt"  # a small corpus: one epoch is a few dozen pairs
    small.write_text("\n\n".join("\n".join(doc) for doc in builtin_docs[:10]) + "\n")

    def epochs(dynamic):
        overrides = [f"data.dynamic_masking={dynamic}", "data.dupe_factor=1",
                     "data.eval_documents=2"]  # fmt: skip
        it = make("bert", prepared, overrides=overrides, corpus=str(small), global_batch_size=1)
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


def _split_texts(prepared) -> tuple[list[str], list[str]]:
    """The token texts of the built-in corpus's (train, held-out) documents, by the manifest."""
    data = prepared("bert")
    threshold = prepare.records.load_manifest(data.root)["split"]["threshold"]
    texts: tuple[list[str], list[str]] = ([], [])
    for file in list_inputs("builtin"):
        for doc in read_documents(file):
            held_out = document_hash(doc.text, data.run.data.split_seed) < threshold
            ids = [i for s in data.tokenizer.encode_batch(doc.sentences) for i in s]
            texts[held_out].append(_text(ids))
    return texts


def test_eval_is_fixed_finite_and_held_out(prepared):
    a = list(make("bert", prepared, split="eval", seed=1))
    b = list(make("bert", prepared, split="eval", seed=2))
    assert len(a) >= 1
    assert_same(a, b)  # independent of the training seed and of how often it is built
    assert len(list(make("bert", prepared, split="eval", num_batches=3))) == 3

    # Every A segment of an eval example is text from a held-out document and from no training one.
    train_text, eval_text = _split_texts(prepared)
    assert len(eval_text) == 6
    sep_id = prepared("bert").tokenizer.sep_id
    checked = 0
    for batch in a:
        for row in range(BATCH):
            ids = _unmasked(batch, row)
            sep = int(np.flatnonzero(ids == sep_id)[0])
            segment_a = _text(ids[1:sep])
            if sep > 12:
                assert any(segment_a in t for t in eval_text)
                assert not any(segment_a in t for t in train_text)
                checked += 1
    assert checked > 10


def test_eval_pairs_are_distinct_beyond_one_pass(prepared):
    # One pairing pass over the held-out documents gives `one_pass` pairs; an eval of more rows
    # must draw from further passes (dupe_factor 2 here) rather than score the same pairs twice.
    one_pass = make("bert", prepared, split="eval", overrides=["data.dupe_factor=1"])
    one_pass = one_pass.get_state()["signature"]["num_records"]
    rows = one_pass * 3 // 2
    batches = list(make("bert", prepared, split="eval", num_batches=rows // BATCH))
    pairs = {
        (tuple(_unmasked(b, r)), tuple(b["segment_ids"][r])) for b in batches for r in range(BATCH)
    }
    # More distinct pairs than one pass has (small documents may repeat a pair across passes).
    assert len(pairs) > one_pass


def test_eval_order_is_shuffled_across_documents(prepared):
    # Pairs are made document by document; unshuffled, the first eval rows would all come from the
    # first held-out documents in order, and a short eval would never see the others.
    _, texts = _split_texts(prepared)
    sep_id = prepared("bert").tokenizer.sep_id
    sources = []
    # One batch: fewer rows than one pass over the documents makes.
    for batch in make("bert", prepared, split="eval", num_batches=1):
        for r in range(BATCH):
            ids = _unmasked(batch, r)
            sep = int(np.flatnonzero(ids == sep_id)[0])
            segment_a = _text(ids[1:sep])
            found = [d for d, text in enumerate(texts) if segment_a in text]
            if len(found) == 1:
                sources.append(found[0])
    assert len(sources) >= 5
    assert sources != sorted(sources) and len(set(sources)) >= 3


def test_vocabulary_larger_than_the_model_is_refused(prepared):
    data = prepared("bert")
    small = data.run.model.__class__.from_mapping({**data.run.model.to_dict(), "vocab_size": 1000})
    with pytest.raises(DataError, match="model.vocab_size=1000"):
        build_dataset(
            objectives.get("bert"), small, data.run.data, data.tokenizer,
            PreparedSource(data.root, "train", data.run.data), "train", seed=0,
            global_batch_size=BATCH,
        )  # fmt: skip


def test_throughput_helper(prepared):
    stats = pipeline.pipeline_throughput(make("bert", prepared, prefetch=0), num_batches=3)
    assert stats["examples_per_sec"] > 0 and stats["first_batch_seconds"] > 0
