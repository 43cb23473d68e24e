"""What a BERT run's held-out figures mean: the same eval batches scored by count-based baselines.

    python experiments/bert_baselines.py --workdir runs/bert-smoke

Reads a finished (or running) BERT workdir's config and tokenizer, rebuilds exactly the eval batches
the trainer scores, and prints:
- MLM: the loss of a uniform guess over the model's vocabulary (the step-0 level), over the
  tokenizer's own entries, and of a unigram model counted on the train split (add-one smoothed),
  beside the run's own final eval MLM loss;
- NSP: the accuracy of always answering the eval set's majority label, and of one lexical
  feature (the share of A's distinct tokens that also occur in B) with its threshold fitted on
  train batches, beside the run's final eval NSP accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import config as config_lib
from jaxgen.data.source import DataSource
from jaxgen.objectives import mlm_nsp
from jaxgen.train.metrics import read_metrics


def _batches(source: DataSource, split: str, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of `split` at the run's last phase, exactly as the trainer builds them."""
    phases = source.run.train.phases
    data = source.run.phase_data(phases[-1]) if phases else source.run.data
    iterator = source.dataset(split, data)
    return [next(iterator) for _ in range(count)]


def train_tokens(source: DataSource) -> np.ndarray:
    """Every token of the train split's sentence pairs (all dupe_factor passes: the proportions
    of a single pass)."""
    records = source.source("train", source.run.data)
    pairs = records.read(range(len(records)))
    return np.concatenate([np.concatenate([p.tokens_a, p.tokens_b]) for p in pairs])


def unigram_loss(train_ids: np.ndarray, eval_batches: list[dict], vocab_size: int) -> float:
    """Mean cross-entropy at the eval masked positions of add-one unigram counts from train_ids."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    total, weight = 0.0, 0.0
    for batch in eval_batches:
        w = batch["masked_weights"].astype(np.float64)
        total -= float((log_probs[batch["masked_ids"]] * w).sum())
        weight += float(w.sum())
    return total / weight


def overlap_feature(batches: list[dict], special_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of A's distinct tokens that B also has, NSP label) per example; specials ignored."""
    features, labels = [], []
    for batch in batches:
        for ids, segments, mask, label in zip(
            batch["input_ids"],
            batch["segment_ids"],
            batch["attention_mask"],
            batch["next_sentence_labels"],
            strict=True,
        ):
            real = (mask > 0) & ~np.isin(ids, special_ids)
            a = set(ids[real & (segments == 0)].tolist())
            b = set(ids[real & (segments == 1)].tolist())
            features.append(len(a & b) / max(1, len(a)))
            labels.append(int(label))
    return np.asarray(features), np.asarray(labels)


def fit_threshold(features: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """The (threshold, sign) whose rule `sign * (f - threshold) > 0 → label 1` fits best."""
    candidates = [(t, s) for t in np.unique(features) for s in (1, -1)]
    return max(candidates, key=lambda ts: ((ts[1] * (features - ts[0]) > 0) == labels).mean())


def baselines(workdir: Path, train_batches: int = 40) -> dict[str, Any]:
    """The baselines of one BERT workdir, beside its last eval row (empty if none yet)."""
    config = config_lib.load_saved_config(workdir / "config.json")
    if not isinstance(config.data, mlm_nsp.Data):
        raise ValueError(f"{workdir} is a {config.family} run; this script reads BERT runs")
    source = DataSource(config, workdir)
    tokenizer, manifest = source.tokenizer, source.manifest()
    eval_batches = _batches(source, "eval", int(config.train.eval_steps))
    train_ids = train_tokens(source)
    special = np.asarray(tokenizer.special_ids)
    threshold, sign = fit_threshold(
        *overlap_feature(_batches(source, "train", train_batches), special)
    )
    features, labels = overlap_feature(eval_batches, special)
    evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
    return {
        "eval_examples": len(labels),
        "eval_documents": manifest["split"]["eval_documents"],
        "model_vocab_size": int(config.model.vocab_size),
        "tokenizer_vocab_size": int(tokenizer.vocab_size),
        "uniform_model_vocab": float(np.log(config.model.vocab_size)),
        "uniform_tokenizer_vocab": float(np.log(tokenizer.vocab_size)),
        "unigram": unigram_loss(train_ids, eval_batches, tokenizer.vocab_size),
        "majority_label": float(max(labels.mean(), 1 - labels.mean())),
        "overlap_rule": float(((sign * (features - threshold) > 0) == labels).mean()),
        "run": evals[-1] if evals else {},
    }


def main() -> None:
    """Prints the baselines for one workdir."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--train_batches", type=int, default=40)
    args = parser.parse_args()
    try:
        b = baselines(Path(args.workdir), args.train_batches)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None
    run = b["run"]
    print(f"eval set: {b['eval_examples']} examples from {b['eval_documents']} held-out documents")
    print("MLM cross-entropy at the masked positions (nats):")
    print(
        f"  uniform over model.vocab_size={b['model_vocab_size']}: {b['uniform_model_vocab']:.3f}"
    )
    print(
        f"  uniform over the tokenizer's {b['tokenizer_vocab_size']} entries: "
        f"{b['uniform_tokenizer_vocab']:.3f}"
    )
    print(f"  unigram counts of the train split: {b['unigram']:.3f}")
    if run:
        below = b["unigram"] - run["mlm_loss"]
        print(f"  the run, step {run['step']}: {run['mlm_loss']:.3f} ({below:+.3f} below unigram)")
    print("NSP accuracy on the same eval batches:")
    print(f"  majority label: {b['majority_label']:.3f}")
    print(f"  token overlap of A and B, threshold fitted on train: {b['overlap_rule']:.3f}")
    if run:
        print(f"  the run, step {run['step']}: {run['nsp_accuracy']:.3f}")


if __name__ == "__main__":
    main()
