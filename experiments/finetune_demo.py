"""Fine-tunes every task head on the built-in corpus's demo tasks and prints what each learned.

    python experiments/finetune_demo.py [--workdir /tmp/finetune-demo]

The tasks are `jaxgen.data.demo_tasks` (the ones tests/train/test_finetune.py trains on): which of
two documents a passage comes from, in GLUE's SST-2 layout (BERT and GPT classifiers, T5 as text),
a score per document as generic JSONL with float labels (GPT regression), the same as
prompt/response SFT (GPT), and SQuAD v2.0 spans (which name a sentence quotes, or
none). Models are the smoke rows, trained from scratch with the tests' settings, so the numbers
show each head learning, not pretrained quality. Each line reads `RESULT task=<name> steps=<n>
seconds=<s> metric=<name> start=<value at step 0> best=<best value>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from jaxgen import config as config_lib
from jaxgen.data import demo_tasks
from jaxgen.train import finetune

FAST = ["model.vocab_size=2000", "data.seq_len=32", "train.batch_size=16",
        "optim.learning_rate=1e-3", "train.epochs=3", "train.eval_every=21"]  # fmt: skip


def runs(data: Path) -> list[tuple[str, str, list[str], str]]:
    """(name, config spec, overrides, the metric to report) of each demo run."""
    sst2 = data / "SST-2"
    demo_tasks.write_sst2(sst2)
    sft_train, sft_dev = demo_tasks.write_prompt_response(data / "sft")
    squad_train, squad_dev = demo_tasks.write_squad(data / "squad", impossible=True)
    scores_train, scores_dev = demo_tasks.write_topic_scores(data / "scores")
    glue = [f"data.task_dir={sst2}"]
    return [
        ("bert-classifier", "sst2@smoke", glue, "accuracy"),
        ("gpt-classifier", "gpt-sst2@smoke", glue, "accuracy"),
        (
            "gpt-regression",
            "gpt-files@smoke",
            [
                f"data.train_file={scores_train}",
                f"data.validation_file={scores_dev}",
                "model.num_labels=1",
                "optim.learning_rate=3e-3",
            ],
            "pearson",
        ),  # fmt: skip
        (
            "t5-text-to-text",
            "t5-sst2@smoke",
            [
                *glue,
                "model.vocab_size=1000",
                "optim.name=adamw",
                "data.seq_len=64",
                "train.batch_size=8",
                "train.epochs=1.5",
                "model.dropout=0",
                "model.attention_dropout=0",
            ],
            "accuracy",
        ),  # fmt: skip
        (
            "gpt-sft",
            "sft@smoke",
            [f"data.train_file={sft_train}", f"data.validation_file={sft_dev}"],
            "loss",
        ),  # fmt: skip
        (
            "bert-squad-v2",
            "squad_v2@smoke",
            [
                f"data.train_file={squad_train}",
                f"data.validation_file={squad_dev}",
                "optim.learning_rate=2e-3",
                "train.epochs=0",
                "train.num_steps=30",
                "train.eval_every=30",
            ],
            "exact_match",
        ),  # fmt: skip
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-demo."))
    lines = []
    for name, spec, overrides, metric in runs(root / "data"):
        run = config_lib.load_config(f"configs/finetune.py:{spec}", [*FAST, *overrides])
        start = time.perf_counter()
        results = finetune.finetune(run, root / name)
        seconds = time.perf_counter() - start
        rows = [
            json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()
        ]
        first = next(r for r in rows if r["split"] == "eval")
        lines.append(
            f"RESULT task={name} steps={results['num_steps']} seconds={seconds:.0f} "
            f"metric={metric} start={first[metric]:.3f} best={results['best'][metric]:.3f}"
        )
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
