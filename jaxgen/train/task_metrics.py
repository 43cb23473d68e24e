"""Fine-tuning metrics in numpy: GLUE's per-task metrics and score, SQuAD's official EM/F1, and
run_squad.py's n-best span decoding across windows (with v2.0's no-answer threshold).

GLUE metrics are fractions in [0, 1] (as HF `evaluate`'s glue metric returns them; T5 reports
them times 100); SQuAD's aggregate scores are percentages, as the official eval scripts print.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxgen.data.tasks import GLUE_TASKS, SquadExample, SquadWindow, glue_task

# Tasks the GLUE score averages over as one: MNLI's matched and mismatched accuracies (t5's
# `compute_avg_glue` groups them as "MNLI"). The diagnostic set is not part of the score.
_SCORE_GROUPS = {"mnli_mismatched": "mnli"}
_UNSCORED = ("ax",)


def _pair(predictions: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Both as 1-D arrays of one length, at least one element."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape or not predictions.size:
        raise ValueError(
            f"predictions and labels must be non-empty 1-D arrays of one length; got "
            f"{predictions.shape=} and {labels.shape=}"
        )
    return predictions, labels


def accuracy(predictions: object, labels: object) -> float:
    """The fraction of predictions equal to their labels; both [N]."""
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def binary_f1(predictions: object, labels: object, positive: object = 1) -> float:
    """F1 of the `positive` class, 2·TP / (2·TP + FP + FN); 0 when there is no positive at all
    (as sklearn); both [N]."""
    predictions, labels = _pair(predictions, labels)
    predicted, actual = predictions == positive, labels == positive
    tp = np.sum(predicted & actual)
    denominator = 2 * tp + np.sum(predicted & ~actual) + np.sum(~predicted & actual)
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corr(predictions: object, labels: object) -> float:
    """The Matthews correlation of class predictions (multi-class form, as sklearn's); 0 when a
    side is constant; both [N]."""
    predictions, labels = _pair(predictions, labels)
    classes, index = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true, pred = index[: labels.size], index[labels.size :]
    confusion = np.zeros([classes.size, classes.size], np.float64)  # [true, predicted]
    np.add.at(confusion, (true, pred), 1)
    n, correct = confusion.sum(), np.trace(confusion)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denominator) if denominator else 0.0


def pearson(predictions: object, labels: object) -> float:
    """The Pearson correlation of two [N] float arrays; NaN when one is constant (as scipy)."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator else math.nan


def average_ranks(values: object) -> np.ndarray:
    """1-based ranks of an [N] array, tied values sharing the mean of their ranks; [N] float."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.r_[starts[1:], values.size]  # exclusive
    ranks = np.empty(values.size, np.float64)
    ranks[order] = ((starts + ends - 1) / 2 + 1)[run]
    return ranks


def spearman(predictions: object, labels: object) -> float:
    """The Spearman correlation: Pearson of the average ranks; both [N]."""
    predictions, labels = _pair(predictions, labels)
    return pearson(average_ranks(predictions), average_ranks(labels))


# -------------------------------------------------------------------------------------------- GLUE


def _class_ids(task: str, values: object) -> np.ndarray:
    """Class ids [N] of predictions or labels given as ids or as the task's label strings."""
    values = np.asarray(values)
    if values.dtype.kind not in "UO":
        return values.astype(np.int64)
    labels = GLUE_TASKS[task].labels
    unknown = sorted({str(v) for v in values} - set(labels))
    if unknown:
        raise ValueError(f"{task} labels are {', '.join(labels)}; got {', '.join(unknown)}")
    return np.array([labels.index(v) for v in values], np.int64)


def glue_metrics(task: str, predictions: object, labels: object) -> dict[str, float]:
    """The task's GLUE metrics from [N] predictions and labels (class ids or label strings;
    floats for STS-B): CoLA and AX mcc; MRPC and QQP accuracy, f1 of class "1" and their mean
    `combined_score`; STS-B pearson, spearman and `combined_score`; the others accuracy."""
    spec = glue_task(task)
    if spec.regression:
        p, s = pearson(predictions, labels), spearman(predictions, labels)
        return {"pearson": p, "spearman": s, "combined_score": (p + s) / 2}
    predictions, labels = _class_ids(task, predictions), _class_ids(task, labels)
    if task in ("cola", "ax"):
        return {"mcc": matthews_corr(predictions, labels)}
    acc = accuracy(predictions, labels)
    if task in ("mrpc", "qqp"):
        f1 = binary_f1(predictions, labels, positive=spec.labels.index("1"))
        return {"accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2}
    return {"accuracy": acc}


def glue_score(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE average: each task's mean metric (`combined_score` where given), MNLI matched and
    mismatched averaged as one task, then the mean over tasks; AX is left out."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for task, metrics in per_task.items():
        glue_task(task)
        if task in _UNSCORED:
            continue
        if not metrics:
            raise ValueError(f"no metrics for {task}")
        if "combined_score" in metrics:
            score = metrics["combined_score"]
        else:
            score = float(np.mean(list(metrics.values())))
        groups[_SCORE_GROUPS.get(task, task)].append(score)
    if not groups:
        raise ValueError(f"no scored GLUE task among {', '.join(per_task) or 'none'}")
    return float(np.mean([np.mean(scores) for scores in groups.values()]))


def task_scores(
    task: str, predictions: object, labels: object, regression: bool
) -> dict[str, float]:
    """A fine-tuning task's metrics and its `score`: a GLUE task's `glue_metrics`; a generic
    file's accuracy (two classes: with F1 of class 1 and matthews) or pearson and spearman.
    `score` is combined_score where there is one, else the mean of the metrics (a GLUE task's
    share of the GLUE score)."""
    if task in GLUE_TASKS:
        metrics = glue_metrics(task, predictions, labels)
    elif regression:
        p, s = pearson(predictions, labels), spearman(predictions, labels)
        metrics = {"pearson": p, "spearman": s, "combined_score": (p + s) / 2}
    else:
        predictions, labels = np.asarray(predictions, np.int64), np.asarray(labels, np.int64)
        metrics = {"accuracy": accuracy(predictions, labels)}
        if np.max(labels) <= 1:
            metrics["f1"] = binary_f1(predictions, labels, positive=1)
            metrics["mcc"] = matthews_corr(predictions, labels)
        return {**metrics, "score": metrics["accuracy"]}
    score = metrics.get("combined_score", float(np.mean(list(metrics.values()))))
    return {**metrics, "score": score}


def write_glue_predictions(path: str | Path, task: str, predictions: object) -> None:
    """Writes [N] test predictions in the GLUE server's format: an `index\\tprediction` header,
    then one row per example with the label string (STS-B: the score as `%.3f`).

    Predictions are class ids or label strings (floats for STS-B); name the file
    `GLUE_TASKS[task].submission_file` for the server.
    """
    spec = glue_task(task)
    predictions = np.asarray(predictions)
    if predictions.ndim != 1:
        raise ValueError(f"predictions must be 1-D; got {predictions.shape=}")
    if spec.regression:
        rows = [f"{float(value):.3f}" for value in predictions]
    else:
        ids = _class_ids(task, predictions)
        if ids.size and (ids.min() < 0 or ids.max() >= len(spec.labels)):
            raise ValueError(f"{task} class ids must be in [0, {len(spec.labels)}); got {ids}")
        rows = [spec.labels[i] for i in ids]
    text = "index\tprediction\n" + "".join(f"{i}\t{row}\n" for i, row in enumerate(rows))
    Path(path).write_text(text)


# ------------------------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower-case, drop punctuation and articles, and collapse
    whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(gold_answers: Sequence[str]) -> list[str]:
    """Gold answers that normalise to something; [""] for a v2.0 impossible question."""
    return [a for a in gold_answers if normalize_answer(a)] or [""]


def _token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of two answers (1 when both are empty, 0 when one is)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if not same:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0 (no golds: the
    empty prediction is the right one)."""
    target = normalize_answer(prediction)
    return float(any(normalize_answer(gold) == target for gold in _golds(gold_answers)))


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """The best token F1 of the prediction against any gold answer (no golds: [""])."""
    return max(_token_f1(prediction, gold) for gold in _golds(gold_answers))


def squad_scores(
    predictions: Mapping[str, str], examples: Sequence[SquadExample]
) -> dict[str, float]:
    """exact_match and f1 in percent over all examples; a question without a prediction scores
    0, as in the official scripts."""
    if not examples:
        raise ValueError("no SQuAD examples to score")
    exact = f1 = 0.0
    for example in examples:
        if example.qid not in predictions:
            continue
        golds = [text for text, _ in example.answers]
        exact += squad_exact_match(predictions[example.qid], golds)
        f1 += squad_f1(predictions[example.qid], golds)
    return {"exact_match": 100 * exact / len(examples), "f1": 100 * f1 / len(examples)}


@dataclasses.dataclass(frozen=True)
class NBestEntry:
    """One candidate answer: its text, softmax probability among the n best, and logits."""

    text: str
    probability: float
    start_logit: float
    end_logit: float


@dataclasses.dataclass(frozen=True)
class SquadPrediction:
    """The decoded answer of a question ("" for no answer), the n best candidates, and v2.0's
    null score minus the best non-null score (`null_odds.json`; None for v1.1)."""

    text: str
    nbest: tuple[NBestEntry, ...]
    score_diff: float | None = None


def _best_indexes(logits: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest logits, largest first (ties: the lower position first)."""
    return np.argsort(-logits, kind="stable")[:n]


def squad_nbest(
    start_logits: object,
    end_logits: object,
    windows: Sequence[SquadWindow],
    examples: Sequence[SquadExample],
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, SquadPrediction]:
    """The answer of each example from its windows' [W, L] start and end logits (row w belongs to
    windows[w]), decoded as run_squad.py's `write_predictions`.

    Candidates are the n_best start x n_best end positions of each window that lie in the context,
    start where this window has the token's max context, and span at most `max_answer_len`
    tokens. With `version_2_with_negative` the null answer scores the smallest start[0] + end[0]
    over windows, and "" is predicted when null minus the best non-null score exceeds
    `null_score_diff_threshold`.
    """
    start_logits = np.asarray(start_logits, np.float64)
    end_logits = np.asarray(end_logits, np.float64)
    if start_logits.shape != end_logits.shape or start_logits.shape[:1] != (len(windows),):
        raise ValueError(
            f"start and end logits must be [W, L] for W={len(windows)} windows; got "
            f"{start_logits.shape=} and {end_logits.shape=}"
        )
    by_qid: dict[str, list[int]] = collections.defaultdict(list)
    for w, window in enumerate(windows):
        by_qid[window.qid].append(w)
    contexts = {example.qid: example.context for example in examples}
    strays = sorted(set(by_qid) - set(contexts))
    missing = [example.qid for example in examples if example.qid not in by_qid]
    if strays or missing:
        raise ValueError(
            f"windows and examples disagree: windows of unknown questions {strays[:5]}, "
            f"questions without windows {missing[:5]}"
        )
    return {
        qid: _decode(
            contexts[qid],
            [windows[w] for w in ws],
            start_logits[ws],
            end_logits[ws],
            n_best=n_best,
            max_answer_len=max_answer_len,
            with_negative=version_2_with_negative,
            threshold=null_score_diff_threshold,
        )
        for qid, ws in by_qid.items()
    }


def _whole_words(context: str, start: int, end: int) -> str:
    """context[start:end] widened to the letters and digits of the words it cuts into: a span
    from a WordPiece continuation ('##sert') answers with the whole word ('assert'), as
    run_squad.py's whitespace tokens do; punctuation around a word (quotes) stays out."""
    while start > 0 and context[start - 1].isalnum() and context[start].isalnum():
        start -= 1
    while end < len(context) and context[end].isalnum() and context[end - 1].isalnum():
        end += 1
    return context[start:end]


def _decode(
    context: str,
    windows: Sequence[SquadWindow],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best: int,
    max_answer_len: int,
    with_negative: bool,
    threshold: float,
) -> SquadPrediction:
    """One question's prediction from its windows' logits [W', L]."""
    candidates = []  # (score, text, start logit, end logit)
    null = (math.inf, 0.0, 0.0)  # (score, start logit, end logit) of the weakest [CLS]
    for window, starts, ends in zip(windows, start_logits, end_logits, strict=True):
        if with_negative and starts[0] + ends[0] < null[0]:
            null = (starts[0] + ends[0], starts[0], ends[0])
        offsets = window.token_offsets
        for s in _best_indexes(starts, n_best):
            if offsets[s, 0] < 0 or not window.token_is_max_context[s]:
                continue
            for e in _best_indexes(ends, n_best):
                if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_len:
                    continue
                text = _whole_words(context, offsets[s, 0], offsets[e, 1])
                candidates.append((starts[s] + ends[e], text, starts[s], ends[e]))
    if with_negative:
        candidates.append((null[0], "", null[1], null[2]))
    # Sorted by score alone (stable), so equal scores keep run_squad.py's window-major order.
    candidates.sort(key=lambda c: c[0], reverse=True)
    nbest, seen = [], set()
    for _, text, start, end in candidates:
        if len(nbest) >= n_best:
            break
        if text in seen:
            continue
        seen.add(text)
        nbest.append((text, start, end))
    if with_negative and "" not in seen:
        nbest.append(("", null[1], null[2]))
    if not nbest:
        nbest.append(("", 0.0, 0.0))  # run_squad.py writes "empty" here; "" is what v2.0 scores
    scores = np.array([start + end for _, start, end in nbest])
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    entries = tuple(
        NBestEntry(text, float(p), float(start), float(end))
        for (text, start, end), p in zip(nbest, probabilities, strict=True)
    )
    best = next((entry for entry in entries if entry.text), None)
    if not with_negative:
        return SquadPrediction(entries[0].text, entries)
    if best is None:
        return SquadPrediction("", entries, math.inf)
    score_diff = float(null[0] - best.start_logit - best.end_logit)
    return SquadPrediction("" if score_diff > threshold else best.text, entries, score_diff)
