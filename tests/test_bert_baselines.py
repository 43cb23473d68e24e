"""experiments/bert_baselines.py: count-based baselines that put a BERT run's eval in context."""

import numpy as np
import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def baselines():
    return load_script("bert_baselines")


def test_unigram_loss_by_hand(baselines):
    # Train counts of ids 0..3: [3, 1, 0, 0] + 1 each = [4, 2, 1, 1] / 8.
    train_ids = np.array([0, 0, 0, 1])
    batch = {
        "masked_ids": np.array([[0, 1, 3]]),
        "masked_weights": np.array([[1.0, 1.0, 0.0]]),  # the padding prediction does not count
    }
    expected = -(np.log(4 / 8) + np.log(2 / 8)) / 2
    assert baselines.unigram_loss(train_ids, [batch], 4) == pytest.approx(expected)


def test_overlap_feature_and_threshold(baselines):
    # [CLS]=2 A [SEP]=3 B [SEP]; pad 0; A = {7, 8}, B shares 7 in the first row and nothing in
    # the second.
    batch = {
        "input_ids": np.array([[2, 7, 8, 3, 7, 9, 3, 0], [2, 7, 8, 3, 5, 6, 3, 0]]),
        "segment_ids": np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 0]]),
        "attention_mask": np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]]),
        "next_sentence_labels": np.array([0, 1]),
    }
    features, labels = baselines.overlap_feature([batch], np.array([0, 1, 2, 3, 4]))
    np.testing.assert_allclose(features, [0.5, 0.0])
    np.testing.assert_array_equal(labels, [0, 1])
    threshold, sign = baselines.fit_threshold(features, labels)
    assert list((sign * (features - threshold) > 0).astype(int)) == [0, 1]


def test_rejects_a_run_of_another_family(baselines, tmp_path):
    from jaxgen import config as config_lib

    config_lib.save_config(config_lib.load_config("configs/gpt.py:smoke"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="gpt run"):
        baselines.baselines(tmp_path)
