"""Task metrics against values worked out by hand, SQuAD EM/F1 on known pairs, run_squad.py's
n-best decoding across windows with the no-answer threshold, and the GLUE submission file."""

import math
import re

import numpy as np
import pytest

from jaxgen.data.tasks import SquadExample, squad_windows
from jaxgen.train.task_metrics import (
    accuracy,
    average_ranks,
    binary_f1,
    glue_metrics,
    glue_score,
    matthews_corr,
    normalize_answer,
    pearson,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_nbest,
    squad_scores,
    write_glue_predictions,
)

# float64 arithmetic on a handful of numbers: only rounding separates these from the hand values.
TOL = 1e-12

PREDS = [1, 0, 1, 1]
LABELS = [1, 1, 1, 0]  # TP = 2 (0, 2), FN = 1 (1), FP = 1 (3), TN = 0


def test_accuracy_f1_mcc():
    assert accuracy(PREDS, LABELS) == 0.5  # 2 of 4
    assert binary_f1(PREDS, LABELS) == pytest.approx(2 / 3, abs=TOL)  # 2·2 / (2·2 + 1 + 1)
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (0 − 1) / sqrt(3·3·1·1)
    assert matthews_corr(PREDS, LABELS) == pytest.approx(-1 / 3, abs=TOL)
    # TP 2 (0, 4), TN 2 (2, 3), FP 1 (1), FN 1 (5): (4 − 1) / sqrt(3·3·3·3) = 1/3.
    assert matthews_corr([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3, abs=TOL)
    assert matthews_corr([1, 1, 1], [0, 1, 0]) == 0.0  # a constant side: 0, as sklearn
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere
    # Three classes, rows true / columns predicted: [[2,0,0],[0,0,1],[0,0,1]]; n = 4, trace 3,
    # t = (2,1,1), p = (2,0,2): (3·4 − t·p) / sqrt((16 − p·p)(16 − t·t)) = (12 − 6) / sqrt(8·10).
    assert matthews_corr([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80), abs=TOL)
    with pytest.raises(ValueError, match="one length"):
        accuracy([1, 0], [1])


def test_pearson_spearman():
    # x − mean = (−1.5, −.5, .5, 1.5), y − mean = (−3, −1, 0, 4): Σxy = 11, Σx² = 5, Σy² = 26.
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=TOL)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # Tied values share the mean of their ranks: 20 takes ranks 3, 4, 5 → 4.
    assert average_ranks([10, 20, 10, 30, 20, 20]).tolist() == [1.5, 4, 1.5, 6, 4, 4]
    # Ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): deviations (−1.5, 0, 0, 1.5), (−1.5, .5, −.5, 1.5):
    # Σxy = 4.5, Σx² = 4.5, Σy² = 5 → 4.5 / sqrt(22.5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=TOL)


def test_glue_metrics_per_task():
    assert glue_metrics("cola", [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(
        {"mcc": 1 / 3}, abs=TOL
    )
    mrpc = glue_metrics("mrpc", ["1", "0", "1", "1"], ["1", "1", "1", "0"])  # = PREDS, LABELS
    assert mrpc == pytest.approx(
        {"accuracy": 0.5, "f1": 2 / 3, "combined_score": (0.5 + 2 / 3) / 2}, abs=TOL
    )
    assert glue_metrics("qqp", PREDS, LABELS)["f1"] == pytest.approx(2 / 3, abs=TOL)
    # No ties and both increasing: Spearman 1.
    r = 11 / math.sqrt(130)
    assert glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]) == pytest.approx(
        {"pearson": r, "spearman": 1.0, "combined_score": (r + 1) / 2}, abs=TOL
    )
    # Ids index the label list: 0 contradiction, 1 entailment, 2 neutral; 2 of 3 right.
    mnli = glue_metrics("mnli_mismatched", [0, 1, 2], ["contradiction", "neutral", "neutral"])
    assert mnli == pytest.approx({"accuracy": 2 / 3}, abs=TOL)
    with pytest.raises(ValueError, match="rte labels are entailment, not_entailment; got yes"):
        glue_metrics("rte", ["yes"], ["entailment"])


def test_glue_score_averages_tasks_then_mnli_halves():
    score = glue_score({
        "cola": {"mcc": 0.5},
        "mrpc": {"accuracy": 0.8, "f1": 0.9, "combined_score": 0.85},
        "stsb": {"pearson": 0.8, "spearman": 0.6},  # task score 0.7
        "mnli": {"accuracy": 0.8},
        "mnli_mismatched": {"accuracy": 0.7},  # one MNLI task: 0.75
        "ax": {"mcc": 0.1},  # not in the score
    })  # fmt: skip
    assert score == pytest.approx((0.5 + 0.85 + 0.7 + 0.75) / 4, abs=TOL)  # 0.7


def test_squad_normalize_em_f1():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert squad_exact_match("the Eiffel Tower.", ["Eiffel Tower", "tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # [big, red, dog] vs [red, dog, barked]: 2 shared, P = R = 2/3, F1 = 2/3; vs [dog]: P = 1/3,
    # R = 1, F1 = 0.5. The best gold counts.
    assert squad_f1("the big red dog", ["red dog barked", "dog"]) == pytest.approx(2 / 3, abs=TOL)
    assert squad_f1("a cat", ["the dog"]) == 0.0
    # v2.0: no gold answers means the right prediction is the empty string.
    assert squad_exact_match("", []) == 1.0 and squad_f1("", []) == 1.0
    assert squad_exact_match("Paris", []) == 0.0 and squad_f1("Paris", []) == 0.0
    examples = [
        SquadExample("a", "?", "Paris.", (("Paris", 0),)),
        SquadExample("b", "?", "Rome.", (("Rome", 0),)),
        SquadExample("c", "?", "None.", (), is_impossible=True),
    ]
    # a right, b unanswered (0), c right ("" for an impossible question): 2 of 3.
    assert squad_scores({"a": "paris", "c": ""}, examples) == pytest.approx(
        {"exact_match": 200 / 3, "f1": 200 / 3}, abs=TOL
    )


VOCAB: dict[str, int] = {}


def whitespace_tokenize(text):
    """Words as tokens with char offsets; ids assigned on first sight (from 10, above specials)."""
    return [
        (VOCAB.setdefault(m.group(), 10 + len(VOCAB)), (m.start(), m.end()))
        for m in re.finditer(r"\S+", text)
    ]


def squad_setup():
    """Four windows of 10 tokens over w0..w9: doc tokens at positions 5..8, spans 0-3, 2-5, 4-7,
    6-9; max-context tokens per window (0,1,2), (3,4), (5,6), (7,8,9)."""
    context = " ".join(f"w{i}" for i in range(10))
    example = SquadExample("q", "q0 q1 q2", context, (("w4 w5", context.index("w4")),))
    windows = squad_windows(
        example,
        whitespace_tokenize,
        cls_id=2,
        sep_id=3,
        max_seq_len=10,
        max_query_len=3,
        doc_stride=2,
    )
    start, end = np.zeros([4, 10]), np.zeros([4, 10])
    start[1, 7], end[1, 8] = 6.0, 5.0  # window 1: w4 (position 7) .. w5 (8), score 11
    start[0, 8], end[0, 8] = 20.0, 3.0  # window 0, w3: not its max context; w2 w3 scores 0 + 3
    start[2, 2] = 30.0  # window 2, a query token: never an answer
    start[3, 6], end[3, 8] = 9.0, 9.0  # window 3: w7 .. w9 is 3 tokens, over max_answer_len
    return example, windows, start, end


def test_squad_nbest_picks_window_and_span():
    example, windows, start, end = squad_setup()
    predictions = squad_nbest(start, end, windows, [example], max_answer_len=2)
    assert list(predictions) == ["q"]
    prediction = predictions["q"]
    assert prediction.text == "w4 w5" and prediction.score_diff is None
    first, second = prediction.nbest[:2]
    assert (first.start_logit, first.end_logit) == (6.0, 5.0)
    # Next best: w7 (start 9) with an end logit of 0 at w7, score 9.
    assert second.text == "w7" and second.start_logit + second.end_logit == 9.0
    assert first.probability / second.probability == pytest.approx(math.exp(11 - 9), rel=1e-9)
    assert sum(e.probability for e in prediction.nbest) == pytest.approx(1.0, abs=TOL)
    assert len({e.text for e in prediction.nbest}) == len(prediction.nbest) <= 20
    # Without the length cap, w7 w8 w9 (9 + 9 = 18) wins.
    assert squad_nbest(start, end, windows, [example])["q"].text == "w7 w8 w9"


def test_squad_answers_are_whole_words_without_the_quotes_around_them():
    """A span that starts or ends inside a word (a WordPiece continuation) answers with the whole
    word; punctuation next to a word is not part of it."""

    def pieces(text):  # letters in pieces of 3, punctuation alone: "assert" -> "ass", "ert"
        return [(VOCAB.setdefault(m.group(), 10 + len(VOCAB)), (m.start(), m.end()))
                for m in re.finditer(r"[a-z]{1,3}|[^a-z\s]", text)]  # fmt: skip

    context = 'use "assert" here'
    example = SquadExample("w", "q", context, (("assert", 5),))
    windows = squad_windows(example, pieces, cls_id=2, sep_id=3, max_seq_len=16, max_query_len=2)
    doc = int(np.argmax(windows[0].segment_ids))  # where the context's first token sits
    start, end = np.zeros([1, 16]), np.zeros([1, 16])
    start[0, doc + 3], end[0, doc + 3] = 5.0, 5.0  # "ert" alone, the second piece of "assert"
    assert squad_nbest(start, end, windows, [example])["w"].text == "assert"
    start[0, doc + 1], end[0, doc + 4] = 9.0, 9.0  # from '"' through the closing '"'
    assert squad_nbest(start, end, windows, [example])["w"].text == '"assert"'


def test_squad_null_threshold_both_ways():
    example, windows, start, end = squad_setup()
    # [CLS] scores per window: 8, 6, 10, 14; the null score is the smallest, 6 (window 1).
    for w, logit in enumerate([4.0, 3.0, 5.0, 7.0]):
        start[w, 0] = end[w, 0] = logit

    def decode(threshold):
        return squad_nbest(
            start,
            end,
            windows,
            [example],
            max_answer_len=2,
            version_2_with_negative=True,
            null_score_diff_threshold=threshold,
        )["q"]

    # null − best non-null = 6 − 11 = −5.
    kept = decode(0.0)
    assert kept.text == "w4 w5" and kept.score_diff == pytest.approx(-5.0, abs=TOL)
    assert "" in {e.text for e in kept.nbest}
    assert decode(-5.5).text == ""  # −5 > −5.5: no answer
    assert decode(-5.0).text == "w4 w5"  # not strictly greater


def test_squad_nbest_checks_windows_against_examples():
    example, windows, start, end = squad_setup()
    other = SquadExample("other", "?", "x", (("x", 0),))
    with pytest.raises(ValueError, match=r"questions without windows \['other'\]"):
        squad_nbest(start, end, windows, [example, other])
    with pytest.raises(ValueError, match=r"\[W, L\] for W=4"):
        squad_nbest(start[:2], end[:2], windows, [example])


def test_glue_submission_files(tmp_path):
    path = tmp_path / "MNLI-m.tsv"
    write_glue_predictions(path, "mnli", [0, 2, 1])
    assert path.read_text() == "index\tprediction\n0\tcontradiction\n1\tneutral\n2\tentailment\n"
    write_glue_predictions(path, "stsb", [3.4, 0.12345, 5])
    assert path.read_text() == "index\tprediction\n0\t3.400\n1\t0.123\n2\t5.000\n"
    write_glue_predictions(path, "mrpc", ["1", "0"])
    assert path.read_text() == "index\tprediction\n0\t1\n1\t0\n"
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\)"):
        write_glue_predictions(path, "rte", [2])
