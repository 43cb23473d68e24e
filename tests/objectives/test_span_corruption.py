"""T5 span corruption: lengths helper, noise-mask statistics, sentinels, padding, decoder loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.objectives import span_corruption as sc


def loss_and_metrics(outputs, batch, z_loss=0.0):
    """(the optimized loss, the metric sums) of the objective."""
    sums = sc.loss_and_metrics(outputs, batch, z_loss)
    return objectives.objective_value(sc, sums), sums


F32_RTOL = 1e-5  # float32 sums over a few hundred terms
DENSITY, MEAN_SPAN = 0.15, 3.0
VOCAB = 1000
SENTINEL = VOCAB - 1  # <extra_id_0>
EOS, PAD = 1, 0


def corrupt(tokens, seed=0, encoder_len=None, decoder_len=None):
    if encoder_len is None:
        encoder_len, decoder_len = 512, 114
    return sc.corrupt(
        tokens,
        np.random.default_rng(seed),
        noise_density=DENSITY,
        mean_noise_span_length=MEAN_SPAN,
        sentinel_start_id=SENTINEL,
        eos_id=EOS,
        encoder_len=encoder_len,
        decoder_len=decoder_len,
        pad_id=PAD,
    )


def runs(mask):
    """(is_noise, length) of each maximal run of equal values."""
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [mask.size]])
    return [(bool(mask[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize(
    "encoder_len, density, expected",
    [
        (512, 0.15, (568, 114)),  # T5's pretraining lengths
        # 70 raw: round(10.5) = 10 noise (half to even), 60 + 3 spans + EOS = 64; 71 raw gives 65.
        (64, 0.15, (70, 14)),
        # 141 raw: 21 noise, 120 + round(7.0) + 1 = 128; 142 raw: 121 + 7 + 1 = 129.
        (128, 0.15, (141, 29)),
        # 95 raw fits 64 but gives 48 + 16 + 1 = 65 targets: T5 trims one token at density 0.5.
        (64, 0.5, (94, 64)),
    ],
)
def test_input_and_target_lengths_match_t5_helper(encoder_len, density, expected):
    assert sc.input_and_target_lengths(encoder_len, density, MEAN_SPAN) == expected


def test_raw_length_fills_encoder_and_decoder_exactly():
    raw_len, decoder_len = sc.input_and_target_lengths(512, DENSITY, MEAN_SPAN)
    out = corrupt(np.arange(2, 2 + raw_len), encoder_len=512, decoder_len=decoder_len)
    assert out["encoder_mask"].all() and out["decoder_mask"].all()


def test_noise_mask_counts_follow_t5_rounding():
    for length in [1, 2, 5, 10, 37, 100, 568]:
        mask = sc.random_spans_noise_mask(length, DENSITY, MEAN_SPAN, np.random.default_rng(length))
        padded = max(length, 2)
        num_noise = min(max(int(np.round(padded * DENSITY)), 1), padded - 1)
        num_spans = max(1, int(np.round(num_noise / MEAN_SPAN)))
        assert mask.shape == (length,) and mask.dtype == bool
        assert not mask[0]  # starts with non-noise
        if length >= 2:
            spans = runs(mask)
            assert mask.sum() == num_noise
            assert [noise for noise, _ in spans] == [False, True] * num_spans
    assert not sc.random_spans_noise_mask(10, 0.0, MEAN_SPAN, np.random.default_rng(0)).any()


def test_noise_statistics_over_many_sequences():
    rng = np.random.default_rng(0)
    noise_tokens = total_tokens = 0
    span_lengths, halves = [], np.zeros(2)
    for _ in range(2000):
        length = int(rng.integers(60, 600))
        mask = sc.random_spans_noise_mask(length, DENSITY, MEAN_SPAN, rng)
        noise_tokens += mask.sum()
        total_tokens += length
        span_lengths += [n for noise, n in runs(mask) if noise]
        halves += [mask[: length // 2].mean(), mask[length // 2 :].mean()]
    assert abs(noise_tokens / total_tokens - 0.15) <= 0.01
    assert abs(np.mean(span_lengths) - 3.0) <= 0.3
    # Span lengths are random (not all 3), and noise is spread over the whole sequence.
    assert min(span_lengths) == 1 and max(span_lengths) >= 8
    # Every mask ends in noise (T5 has no random roll by default), so the second half is a little
    # denser (about 0.16 against 0.14 here); both halves still carry their share.
    assert all(abs(h / 2000 - 0.15) < 0.02 for h in halves)


def test_unique_sentinels_on_a_hand_example():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18])
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 0, 0], bool)
    inputs = sc.noise_span_to_unique_sentinel(tokens, mask, SENTINEL)
    targets = sc.nonnoise_span_to_unique_sentinel(tokens, mask, SENTINEL)
    np.testing.assert_array_equal(inputs, [10, 11, SENTINEL, 14, 15, SENTINEL - 1, 17, 18])
    np.testing.assert_array_equal(targets, [SENTINEL, 12, 13, SENTINEL - 1, 16, SENTINEL - 2])


def reconstruct(inputs, targets):
    """Fills each input sentinel with the tokens that follow the same sentinel in the targets."""
    fills, current = {}, None
    for t in targets:
        if t > SENTINEL - 100:
            current = int(t)
            fills[current] = []
        else:
            fills[current].append(int(t))
    out = []
    for t in inputs:
        out += fills[int(t)] if t > SENTINEL - 100 else [int(t)]
    return out


def test_sentinels_pair_up_and_reconstruct_the_original():
    rng = np.random.default_rng(1)
    for seed in range(200):
        raw = rng.integers(2, 500, size=int(rng.integers(20, 569)))
        out = corrupt(raw, seed=seed)
        inputs = out["encoder_input_ids"][out["encoder_mask"] == 1]
        targets = out["decoder_target_ids"][out["decoder_mask"] == 1]
        assert inputs[-1] == EOS and targets[-1] == EOS
        inputs, targets = inputs[:-1], targets[:-1]
        in_sentinels = inputs[inputs > SENTINEL - 100]
        # Sentinels count down from the top of the vocabulary in order of appearance.
        np.testing.assert_array_equal(in_sentinels, SENTINEL - np.arange(in_sentinels.size))
        for s in in_sentinels:
            assert (targets == s).sum() == 1
        assert reconstruct(inputs, targets) == raw.tolist()


def test_output_shapes_dtypes_and_shifted_decoder_inputs():
    for raw_len in [1, 7, 300, 568]:
        out = corrupt(np.arange(2, 2 + raw_len))
        for key in ("encoder_input_ids", "encoder_mask"):
            assert out[key].shape == (512,) and out[key].dtype == np.int32
        for key in ("decoder_input_ids", "decoder_target_ids", "decoder_mask"):
            assert out[key].shape == (114,) and out[key].dtype == np.int32
        assert out["decoder_weights"].dtype == np.float32
        np.testing.assert_array_equal(out["decoder_weights"], out["decoder_mask"])
        assert out["decoder_input_ids"][0] == PAD
        np.testing.assert_array_equal(out["decoder_input_ids"][1:], out["decoder_target_ids"][:-1])
        n = out["decoder_mask"].sum()
        assert (out["decoder_target_ids"][n:] == PAD).all() and (out["decoder_mask"][:n] == 1).all()


def test_same_seed_same_output_and_different_seed_differs():
    raw = np.arange(2, 570)
    a, b, c = corrupt(raw, seed=3), corrupt(raw, seed=3), corrupt(raw, seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["encoder_input_ids"], c["encoder_input_ids"])


def test_too_many_raw_tokens_raise():
    with pytest.raises(ValueError, match="exceed"):
        corrupt(np.arange(2, 2 + 600))


def test_model_inputs_keys():
    batch = {k: np.zeros((2, 4), np.int32) for k in corrupt(np.arange(2, 50))}
    assert set(sc.model_inputs(batch)) == {
        "encoder_input_ids",
        "decoder_input_ids",
        "encoder_mask",
        "decoder_mask",
    }


def reference_ce(logits, targets):
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0], log_z


def test_decoder_loss_and_z_loss_match_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    batch = {"decoder_target_ids": targets, "decoder_weights": weights}
    ce, log_z = reference_ce(logits, targets)
    z = 1e-4
    loss, metrics = jax.jit(loss_and_metrics, static_argnums=2)(logits, batch, z)
    expected_ce = (ce * weights).sum() / weights.sum()
    expected_z = z * (log_z**2 * weights).sum() / weights.sum()
    np.testing.assert_allclose(loss, expected_ce + expected_z, rtol=F32_RTOL)
    np.testing.assert_allclose(metrics["loss"][0] / metrics["loss"][1], expected_ce, rtol=F32_RTOL)
    np.testing.assert_allclose(
        metrics["z_loss"][0] / metrics["z_loss"][1], expected_z, rtol=F32_RTOL
    )
    assert metrics["loss"][1] == 8
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(metrics["accuracy"][0], correct.sum(), rtol=F32_RTOL)
    # Without z-loss the optimised loss is the cross-entropy and no z_loss metric is reported.
    plain, plain_metrics = loss_and_metrics(jnp.asarray(logits), batch)
    np.testing.assert_allclose(plain, expected_ce, rtol=F32_RTOL)
    assert "z_loss" not in plain_metrics
