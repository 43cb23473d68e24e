"""GPT packing (windows, document boundaries) and the weighted next-token loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.objectives import causal_lm


def loss_and_metrics(outputs, batch, z_loss=0.0):
    """(the optimized loss, the metric sums) of the objective."""
    sums = causal_lm.loss_and_metrics(outputs, batch, z_loss)
    return objectives.objective_value(causal_lm, sums), sums


F32_RTOL = 1e-5  # float32 sums over a few dozen terms
EOS = 0
KEYS = ("input_ids", "target_ids", "positions", "segment_ids", "weights")
DOCS = [np.array([5, 6, 7]), np.array([8, 9]), np.array([10, 11, 12, 13])]  # stream of 12 tokens


def test_hand_packed_example_with_separate_documents():
    # stream: 5 6 7 E 8 | 9 E 10 11 12 | 13 E (tail dropped); windows of seq_len + 1 = 5 tokens.
    out = causal_lm.pack_documents(DOCS, seq_len=4, eos_id=EOS, separate_documents=True)
    np.testing.assert_array_equal(out["input_ids"], [[5, 6, 7, EOS], [9, EOS, 10, 11]])
    np.testing.assert_array_equal(out["target_ids"], [[6, 7, EOS, 8], [EOS, 10, 11, 12]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 1, 2, 2]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3], [0, 1, 0, 1]])
    # The eos ending a document is predicted; the next document's first token is not.
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 0], [1, 0, 1, 1]])
    for key in KEYS:
        assert out[key].shape == (2, 4)
        assert out[key].dtype == (np.float32 if key == "weights" else np.int32)


def test_without_separation_everything_is_one_segment():
    out = causal_lm.pack_documents(DOCS, seq_len=4, eos_id=EOS, separate_documents=False)
    np.testing.assert_array_equal(out["input_ids"], [[5, 6, 7, EOS], [9, EOS, 10, 11]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3]] * 2)
    assert (out["segment_ids"] == 1).all() and (out["weights"] == 1).all()
    assert out["positions"].dtype == np.int32 and out["weights"].dtype == np.float32


@pytest.mark.parametrize("separate", [True, False])
def test_random_documents_pack_into_shifted_windows(separate):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=int(rng.integers(0, 20))) for _ in range(40)]
    seq_len = 16
    out = causal_lm.pack_documents(docs, seq_len, EOS, separate)
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    owner = np.concatenate([np.full(d.size + 1, i) for i, d in enumerate(docs)])
    num_seqs = stream.size // (seq_len + 1)  # the incomplete tail is dropped
    assert out["input_ids"].shape == (num_seqs, seq_len)
    windows = stream[: num_seqs * (seq_len + 1)].reshape(num_seqs, seq_len + 1)
    np.testing.assert_array_equal(out["input_ids"], windows[:, :-1])
    np.testing.assert_array_equal(out["target_ids"], windows[:, 1:])
    if not separate:
        return
    owners = owner[: num_seqs * (seq_len + 1)].reshape(num_seqs, seq_len + 1)
    np.testing.assert_array_equal(out["weights"], owners[:, :-1] == owners[:, 1:])
    for seq in range(num_seqs):
        seg, pos = out["segment_ids"][seq], out["positions"][seq]
        new_doc = np.concatenate([[True], np.diff(owners[seq, :-1]) != 0])
        np.testing.assert_array_equal(seg, np.cumsum(new_doc))
        np.testing.assert_array_equal(pos[new_doc], 0)
        np.testing.assert_array_equal(pos[1:][~new_doc[1:]], pos[:-1][~new_doc[1:]] + 1)
    # Every weighted-out target starts a new document, i.e. follows an eos.
    assert (out["input_ids"][out["weights"] == 0] == EOS).all()


def test_too_short_stream_gives_no_sequences():
    out = causal_lm.pack_documents(
        [np.array([1, 2])], seq_len=8, eos_id=EOS, separate_documents=True
    )
    assert all(out[key].shape == (0, 8) for key in KEYS)
    assert causal_lm.pack_documents([], 8, EOS, False)["input_ids"].shape == (0, 8)


def test_model_inputs_keys():
    batch = causal_lm.pack_documents(DOCS, 4, EOS, True)
    assert set(causal_lm.model_inputs(batch)) == {"input_ids", "positions", "segment_ids"}


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(2, 6, 13)) * 3).astype(np.float32)
    targets = rng.integers(0, 13, size=(2, 6)).astype(np.int32)
    weights = np.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.float32)
    return logits, {"target_ids": targets, "weights": weights}


def test_weighted_cross_entropy_and_accuracy_match_hand_computation():
    logits, batch = make_batch()
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, batch["target_ids"][..., None], -1)[..., 0]
    w = batch["weights"]
    loss, metrics = jax.jit(loss_and_metrics)(logits, batch)
    np.testing.assert_allclose(loss, (ce * w).sum() / w.sum(), rtol=F32_RTOL)
    np.testing.assert_allclose(metrics["loss"][0], (ce * w).sum(), rtol=F32_RTOL)
    assert metrics["loss"][1] == w.sum() == metrics["accuracy"][1]
    correct = (logits.argmax(-1) == batch["target_ids"]) * w
    assert metrics["accuracy"][0] == correct.sum()


def test_perfect_prediction_has_full_accuracy():
    _, batch = make_batch()
    logits = jax.nn.one_hot(batch["target_ids"], 13) * 50.0
    loss, metrics = loss_and_metrics(logits, batch)
    assert metrics["accuracy"][0] == metrics["accuracy"][1] and float(loss) < 1e-6


def test_padding_is_ignored_and_gets_no_gradient():
    logits, batch = make_batch()
    changed = logits.copy()
    changed[batch["weights"] == 0] += (
        np.random.default_rng(1).normal(size=13).astype(np.float32) * 10
    )
    a, _ = loss_and_metrics(logits, batch)
    b, _ = loss_and_metrics(changed, batch)
    np.testing.assert_allclose(a, b, rtol=F32_RTOL)
    grads = jax.grad(lambda x: loss_and_metrics(x, batch)[0])(jnp.asarray(logits))
    assert (grads[batch["weights"] == 0] == 0).all()


def test_all_padding_batch_gives_zero_not_nan():
    logits, batch = make_batch()
    batch = dict(batch, weights=np.zeros_like(batch["weights"]))
    loss, metrics = loss_and_metrics(logits, batch)
    assert float(loss) == 0.0 and metrics["loss"][1] == 0
    assert np.isfinite(jax.grad(lambda x: loss_and_metrics(x, batch)[0])(logits)).all()


def test_z_loss_adds_weighted_squared_log_partition():
    logits, batch = make_batch()
    w = batch["weights"]
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    plain, _ = loss_and_metrics(logits, batch)
    loss, metrics = loss_and_metrics(logits, batch, z_loss=1e-2)
    expected_z = 1e-2 * (log_z**2 * w).sum() / w.sum()
    # The difference of two float32 losses loses a few digits.
    np.testing.assert_allclose(loss - plain, expected_z, rtol=1e-4)
    np.testing.assert_allclose(
        metrics["z_loss"][0] / metrics["z_loss"][1], expected_z, rtol=F32_RTOL
    )


def test_bfloat16_logits_are_upcast():
    logits, batch = make_batch()
    loss, _ = loss_and_metrics(jnp.asarray(logits, jnp.bfloat16), batch)
    assert loss.dtype == jnp.float32
