"""MLM + NSP: pair creation, truncation, layout, masking statistics and the loss, on synthetic token
ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.objectives import mlm_nsp


def loss_and_metrics(outputs, batch, z_loss=0.0):
    """(the optimized loss, the metric sums) of the objective."""
    sums = mlm_nsp.loss_and_metrics(outputs, batch, z_loss)
    return objectives.objective_value(mlm_nsp, sums), sums


PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000
NUM_DOCS = 20
SEQ_LEN = 64
MAX_PREDICTIONS = 20


def synthetic_documents(seed: int = 0) -> list[list[np.ndarray]]:
    """Documents whose every token is ≡ document index (mod NUM_DOCS), so any span names its
    source."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(NUM_DOCS):
        sentences = []
        for _ in range(rng.integers(3, 15)):
            k = rng.integers(0, (VOCAB - 10 - d) // NUM_DOCS, size=rng.integers(3, 40))
            sentences.append((10 + d + NUM_DOCS * k).astype(np.int32))
        docs.append(sentences)
    return docs


def spec(whole_word: bool = False, word_starts: np.ndarray | None = None) -> mlm_nsp.MaskingSpec:
    excluded = np.zeros(VOCAB, bool)
    excluded[[PAD, CLS, SEP, MASK]] = True
    return mlm_nsp.MaskingSpec(
        mask_prob=0.15,
        max_predictions=MAX_PREDICTIONS,
        mask_id=MASK,
        excluded=excluded,
        random_ids=np.arange(5, VOCAB, dtype=np.int32),
        word_starts=word_starts if whole_word else None,
    )


@pytest.fixture(scope="module")
def pairs() -> list[mlm_nsp.SentencePair]:
    return mlm_nsp.create_pairs(
        synthetic_documents(),
        dupe_factor=25,
        max_seq_length=SEQ_LEN,
        short_seq_prob=0.1,
        random_next_prob=0.5,
        rng=np.random.default_rng(1),
    )


@pytest.fixture(scope="module")
def examples(pairs) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [
        mlm_nsp.make_example(
            p.tokens_a,
            p.tokens_b,
            p.is_random_next,
            rng,
            spec(),
            seq_len=SEQ_LEN,
            cls_id=CLS,
            sep_id=SEP,
            pad_id=PAD,
        )
        for p in pairs
    ]


def test_pairs_fit_and_are_nonempty(pairs):
    assert len(pairs) > 1500
    for p in pairs:
        assert len(p.tokens_a) >= 1 and len(p.tokens_b) >= 1
        assert len(p.tokens_a) + len(p.tokens_b) + 3 <= SEQ_LEN


def test_nsp_balance_and_random_next_from_another_document(pairs):
    random_next = np.array([p.is_random_next for p in pairs])
    assert abs(random_next.mean() - 0.5) < 0.05
    for p in pairs:
        assert np.all(p.tokens_a % NUM_DOCS == (10 + p.a_document) % NUM_DOCS)
        assert np.all(p.tokens_b % NUM_DOCS == (10 + p.b_document) % NUM_DOCS)
        assert (p.b_document != p.a_document) == p.is_random_next


def test_is_next_b_continues_a():
    # One long document of single-token sentences 10, 11, 12...: B must start right after A ends.
    docs = [[np.array([10 + i], np.int32) for i in range(200)], [np.array([500], np.int32)] * 5]
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(20):
        for p in mlm_nsp.create_instances_from_document(docs, 0, 16, 0.0, rng):
            if not p.is_random_next:
                found += 1
                assert p.tokens_b[0] == p.tokens_a[-1] + 1
    assert found > 0


def test_layout_and_segment_ids(examples, pairs):
    for p, e in zip(pairs[:200], examples[:200], strict=True):
        la, lb = len(p.tokens_a), len(p.tokens_b)
        n = la + lb + 3
        ids = e["input_ids"].copy()
        real = e["masked_weights"] > 0
        ids[e["masked_positions"][real]] = e["masked_ids"][real]  # undo masking
        assert ids[0] == CLS and ids[la + 1] == SEP and ids[n - 1] == SEP
        np.testing.assert_array_equal(ids[1 : la + 1], p.tokens_a)
        np.testing.assert_array_equal(ids[la + 2 : n - 1], p.tokens_b)
        assert np.all(ids[n:] == PAD)
        np.testing.assert_array_equal(
            e["segment_ids"], [0] * (la + 2) + [1] * (lb + 1) + [0] * (SEQ_LEN - n)
        )
        np.testing.assert_array_equal(e["attention_mask"], [1] * n + [0] * (SEQ_LEN - n))
        assert e["next_sentence_labels"] == (1 if p.is_random_next else 0)


def test_masking_statistics(examples, pairs):
    selected = candidates = 0
    masked = kept = random = 0
    for p, e in zip(pairs, examples, strict=True):
        w = e["masked_weights"]
        n = int(w.sum())
        positions = e["masked_positions"][:n]
        labels = e["masked_ids"][:n]
        n_candidates = len(p.tokens_a) + len(p.tokens_b)
        assert n == min(MAX_PREDICTIONS, max(1, round(n_candidates * 0.15)))
        assert np.all(w[:n] == 1.0) and np.all(w[n:] == 0.0)
        assert np.all(e["masked_positions"][n:] == 0) and np.all(e["masked_ids"][n:] == 0)
        assert np.all(np.diff(positions) > 0)  # sorted, unique
        assert np.all(e["attention_mask"][positions] == 1)
        assert not np.isin(labels, [PAD, CLS, SEP, MASK]).any()  # no special token selected
        out = e["input_ids"][positions]
        masked += np.sum(out == MASK)
        kept += np.sum(out == labels)
        random += np.sum((out != MASK) & (out != labels))
        assert not np.isin(out[out != MASK], [PAD, CLS, SEP, UNK]).any()
        selected += n
        candidates += n_candidates
    assert abs(selected / candidates - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.02
    assert abs(kept / selected - 0.1) < 0.02
    assert abs(random / selected - 0.1) < 0.02


def test_whole_word_masking_keeps_words_together():
    word_starts = np.ones(VOCAB, bool)
    word_starts[500:] = False  # ids ≥ 500 continue the previous piece's word
    s = spec(whole_word=True, word_starts=word_starts)
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(10, VOCAB, size=50).astype(np.int32)
        e = mlm_nsp.make_example(
            tokens[:25],
            tokens[25:],
            False,
            rng,
            s,
            seq_len=SEQ_LEN,
            cls_id=CLS,
            sep_id=SEP,
            pad_id=PAD,
        )
        n = int(e["masked_weights"].sum())
        assert 1 <= n <= MAX_PREDICTIONS
        chosen = set(e["masked_positions"][:n].tolist())
        ids = np.concatenate([[CLS], tokens[:25], [SEP], tokens[25:], [SEP]])
        for pos in chosen:
            # Every piece of a chosen word is chosen: its neighbours inside the same word too.
            if not word_starts[ids[pos]] and ids[pos - 1] not in (CLS, SEP):
                assert pos - 1 in chosen
            if pos + 1 < len(ids) and not word_starts[ids[pos + 1]] and ids[pos + 1] != SEP:
                assert pos + 1 in chosen


def test_truncate_seq_pair():
    rng = np.random.default_rng(0)
    fronts = backs = 0
    for _ in range(200):
        a = np.arange(100, 100 + rng.integers(1, 60))
        b = np.arange(500, 500 + rng.integers(1, 60))
        ta, tb = mlm_nsp.truncate_seq_pair(a, b, 40, rng)
        assert len(ta) + len(tb) == min(40, len(a) + len(b))
        assert len(ta) >= 1 and len(tb) >= 1
        for orig, cut in ((a, ta), (b, tb)):
            start = int(cut[0] - orig[0])
            np.testing.assert_array_equal(cut, orig[start : start + len(cut)])  # contiguous slice
            fronts += start > 0
            backs += cut[-1] < orig[-1]
        if len(a) + len(b) > 40:
            # The longer side is trimmed first, so neither ends up much longer than the other unless
            # it was the shorter side that already fit.
            assert len(ta) >= min(len(a), 20) and len(tb) >= min(len(b), 20)
    assert fronts > 20 and backs > 20
    # Ties trim A, as max(tokens_a, tokens_b, key=len) does in the original.
    ta, tb = mlm_nsp.truncate_seq_pair(np.arange(5), np.arange(5), 9, np.random.default_rng(0))
    assert (len(ta), len(tb)) == (4, 5)


def _outputs_and_batch(seed=0, B=4, P=6, V=50):
    rng = np.random.default_rng(seed)
    weights = np.ones((B, P), np.float32)
    weights[:, 4:] = 0.0
    weights[0, 2:] = 0.0
    batch = {
        "masked_ids": rng.integers(0, V, (B, P)).astype(np.int32),
        "masked_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, B).astype(np.int32),
    }
    outputs = {
        "mlm_logits": rng.normal(size=(B, P, V)).astype(np.float32),
        "nsp_logits": rng.normal(size=(B, 2)).astype(np.float32),
    }
    return outputs, batch


def test_loss_matches_reference_and_ignores_padding_predictions():
    outputs, batch = _outputs_and_batch()
    loss, metrics = loss_and_metrics(outputs, batch)

    logits, labels, w = outputs["mlm_logits"], batch["masked_ids"], batch["masked_weights"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mlm = (nll * w).sum() / w.sum()
    nlogits = outputs["nsp_logits"]
    nlogp = nlogits - np.log(np.exp(nlogits).sum(-1, keepdims=True))
    nsp = -np.take_along_axis(nlogp, batch["next_sentence_labels"][:, None], -1).mean()
    np.testing.assert_allclose(loss, mlm + nsp, rtol=1e-5)
    s, wt = metrics["mlm_loss"]
    np.testing.assert_allclose(s / wt, mlm, rtol=1e-5)
    assert float(wt) == w.sum()
    assert set(metrics) == {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}
    # The reported loss is the sum of the two weighted means, as the optimized one.
    reduced = objectives.reduce_metrics(mlm_nsp, [jax.device_get(metrics)])
    np.testing.assert_allclose(reduced["loss"], mlm + nsp, rtol=1e-5)
    assert all(v.dtype == jnp.float32 for pair in metrics.values() for v in pair)

    changed = dict(outputs)
    changed["mlm_logits"] = np.where(w[..., None] == 0, 100.0 * np.sign(logits), logits)
    changed_loss, changed_metrics = loss_and_metrics(changed, batch)
    assert float(changed_loss) == float(loss)
    assert float(changed_metrics["mlm_accuracy"][0]) == float(metrics["mlm_accuracy"][0])
    changed["mlm_logits"] = logits + 5.0 * (w[..., None] > 0) * np.eye(logits.shape[-1])[0]
    assert float(loss_and_metrics(changed, batch)[0]) != float(loss)


def test_z_loss_adds_squared_log_partition_of_real_predictions():
    outputs, batch = _outputs_and_batch()
    plain, _ = loss_and_metrics(outputs, batch)
    loss, metrics = loss_and_metrics(outputs, batch, z_loss=1e-2)
    logits, w = outputs["mlm_logits"], batch["masked_weights"]
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    expected = 1e-2 * (np.square(log_z) * w).sum() / w.sum()
    np.testing.assert_allclose(float(loss) - float(plain), expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["z_loss"][0] / metrics["z_loss"][1], expected, rtol=1e-4)


def test_model_inputs_keys():
    batch = {k: np.zeros(1) for k in mlm_nsp.batch_spec(mlm_nsp.Data(), 1)}
    assert set(mlm_nsp.model_inputs(batch)) == {
        "input_ids",
        "segment_ids",
        "attention_mask",
        "masked_positions",
    }


def test_objectives_get():
    assert objectives.get("bert") is mlm_nsp
    with pytest.raises(ValueError, match="bert.*gpt.*t5"):
        objectives.get("xlnet")


# ------------------------------------------------------------------ the fast pair maker vs the loop


def reference_truncate(a, b, max_num_tokens, rng):
    """google-research/bert's truncate_seq_pair: one token and one draw at a time."""
    a_start, a_end, b_start, b_end = 0, len(a), 0, len(b)
    while (a_end - a_start) + (b_end - b_start) > max_num_tokens:
        trim_a = (a_end - a_start) >= (b_end - b_start)
        from_front = rng.random() < 0.5
        if trim_a:
            a_start, a_end = (a_start + 1, a_end) if from_front else (a_start, a_end - 1)
        else:
            b_start, b_end = (b_start + 1, b_end) if from_front else (b_start, b_end - 1)
    return a[a_start:a_end], b[b_start:b_end]


def reference_instances(documents, index, max_seq_length, short_seq_prob, rng, random_next_prob):
    """The sentence-by-sentence loop of create_pretraining_data.py (with jaxgen's one-sentence
    deviation), copying tokens: what the chunk-by-chunk `_instances` must equal."""
    randint = mlm_nsp._randint
    document, max_num_tokens = documents[index], max_seq_length - 3
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = randint(rng, 2, max_num_tokens + 1)
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = randint(rng, 1, len(chunk)) if len(chunk) >= 2 else 1
            tokens_a = np.concatenate(chunk[:a_end])
            b_document, random_next = index, rng.random() < random_next_prob
            if len(chunk) == 1 and not random_next:
                if i + 1 == len(document):
                    break
                i += 1
                chunk.append(document[i])
            if random_next:
                b_document = randint(rng, 0, len(documents) - 1)
                b_document += b_document >= index
                other = documents[b_document]
                pieces, got = [], 0
                for j in range(randint(rng, 0, len(other)), len(other)):
                    pieces.append(other[j])
                    got += len(other[j])
                    if got >= target - len(tokens_a):
                        break
                tokens_b = np.concatenate(pieces)
                i -= len(chunk) - a_end
            else:
                tokens_b = np.concatenate(chunk[a_end:])
            tokens_a, tokens_b = mlm_nsp.truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            if len(tokens_a) and len(tokens_b):
                pairs.append((tokens_a.tolist(), tokens_b.tolist(), random_next, b_document))
            chunk, length = [], 0
        i += 1
    return pairs


def test_truncation_equals_the_token_at_a_time_loop():
    rng = np.random.default_rng(0)
    for trial in range(3000):
        len_a, len_b, limit = rng.integers(0, 40), rng.integers(0, 40), rng.integers(0, 60)
        a, b = np.arange(len_a), np.arange(100, 100 + len_b)
        want = reference_truncate(a, b, limit, np.random.default_rng(trial))
        got = mlm_nsp.truncate_seq_pair(a, b, limit, np.random.default_rng(trial))
        assert [x.tolist() for x in got] == [x.tolist() for x in want], (len_a, len_b, limit)


@pytest.mark.parametrize("max_seq_length", [5, 8, 16, 64, 512])
def test_pairs_equal_the_sentence_by_sentence_loop(max_seq_length):
    rng = np.random.default_rng(max_seq_length)
    for trial in range(10):
        docs = [
            [rng.integers(5, 100, rng.integers(1, 40)).astype(np.int32)
             for _ in range(rng.integers(1, 12))]
            for _ in range(rng.integers(2, 25))
        ]  # fmt: skip
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        want = [p for d in range(len(docs)) for p in reference_instances(docs, d, max_seq_length,
                                                                        0.3, a, 0.5)]  # fmt: skip
        got = [
            (p.tokens_a.tolist(), p.tokens_b.tolist(), p.is_random_next, p.b_document)
            for d in range(len(docs))
            for p in mlm_nsp.create_instances_from_document(docs, d, max_seq_length, 0.3, b, 0.5)
        ]
        assert got == want
