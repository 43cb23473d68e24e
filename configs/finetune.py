"""Fine-tuning rows: GLUE and generic classification, text-to-text and SFT from a pretrained run.

The argument is `[family-]task[@row]`: the task (a GLUE task, `files` for generic TSV/CSV/JSONL
files, `sft` for GPT prompt/response JSONL, `squad` and `squad_v2` for SQuAD JSON), the family
(bert when omitted, gpt for sft; `gpt-`, `t5-`) and the model row of that family's config file
whose dimensions the pretrained run has (bert `base`, gpt `gpt2-small`, t5 `t5-small` when
omitted). Point `--config.train.init_from` at the pretrained run (a `jaxgen train` workdir, or a
`jaxgen convert`ed HF checkpoint):

    jaxgen train --config configs/finetune.py:mrpc --workdir runs/mrpc \\
        --config.train.init_from=runs/bert-base-hf --config.data.task_dir=/data/glue_data/MRPC
    jaxgen train --config configs/finetune.py:t5-rte@t5-small ... --config.data.beam_size=4
    jaxgen train --config configs/finetune.py:sft@smoke --config.data.train_file=train.jsonl \\
        --config.data.validation_file=dev.jsonl --config.lora.rank=8

Recipes. BERT (Devlin et al. 2018 §4.1, App. A.3; run_classifier.py): AdamW (β 0.9/0.999, ε 1e-6,
weight decay 0.01 off biases and norms), lr 2e-5 (the paper's grid: 5e-5, 3e-5, 2e-5; sweep it
with `jaxgen sweep`), batch 32, 3 epochs, warmup 10% of the steps then linear decay to 0, gradient
clipping at 1.0, dropout 0.1, 128 tokens. SQuAD (§4.2-4.3): lr 5e-5, 384-token windows 128 apart,
v1.1 batch 32 for 3 epochs, v2.0 batch 48 for 2. GPT classification and SFT use the same recipe. T5
(Raffel et al. 2019 §3.1): Adafactor at a constant 1e-3, batch 128 (the paper's fine-tuning batch),
dropout 0.1, 3 epochs here (the paper counts 2^18 steps for the GLUE mixture). Every row evaluates
the whole dev split every 200 steps and at the end, and keeps the best checkpoint by the task's
score (`eval_results.json`, `checkpoints_best/`, `predictions/`).
"""

from pathlib import Path

import ml_collections

from jaxgen.config import load_python_file

common = load_python_file(Path(__file__).with_name("common.py"))
HERE = Path(__file__).parent

FAMILIES = ("bert", "gpt", "t5")
DEFAULT_ROW = {"bert": "base", "gpt": "gpt2-small", "t5": "t5-small"}
GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_mismatched", "qnli", "rte", "wnli")
TASKS = (*GLUE, "files", "sft", "squad", "squad_v2")
# GLUE class counts (STS-B: one regression output); 'files' takes --config.model.num_labels.
NUM_LABELS = {"stsb": 1, "mnli": 3, "mnli_mismatched": 3}
PAPER = {
    "bert": "Devlin et al. 2018, BERT (fine-tuning: §4.1, App. A.3)",
    "gpt": "Radford et al. 2018 (classification from the last token, as HF's GPT-2 classifier)",
    "t5": "Raffel et al. 2019, T5 (text-to-text fine-tuning, §2.4 and §3.1)",
}


def parse(arg: str) -> tuple[str, str, str]:
    """(family, task, model row) of an argument `[family-]task[@row]`."""
    spec, _, row = arg.partition("@")
    family, task = ("gpt" if spec == "sft" else "bert"), spec  # SFT is GPT's
    if spec.split("-")[0] in FAMILIES:
        family, _, task = spec.partition("-")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in {arg!r}; tasks: {', '.join(TASKS)}")
    return family, task, row or DEFAULT_ROW[family]


def base_model(family: str, row: str) -> ml_collections.ConfigDict:
    """The model section of a row of the family's pretraining config file."""
    rows = load_python_file(HERE / f"{family}.py")
    return rows.get_config(row).model


def get_config(arg: str = "mrpc") -> ml_collections.ConfigDict:
    """The fine-tuning config of `[family-]task[@row]` (see the module docstring)."""
    family, task, row = parse(arg)
    model = base_model(family, row).to_dict()
    squad = task.startswith("squad")
    if family != "t5":
        model["num_labels"] = 0 if task == "sft" or squad else NUM_LABELS.get(task, 2)
    if squad:
        model["span_head"] = True
    model.update(dropout=0.1, attention_dropout=0.1)
    data = {"task": task, "seq_len": min(128, model["max_len"])}
    batch_size, epochs, lr = 32, 3.0, 2e-5
    if squad:  # one objective for both versions; v2.0 allows questions without an answer
        data.update(task="squad", seq_len=min(384, model["max_len"]),
                    version_2_with_negative=task == "squad_v2")  # fmt: skip
        batch_size, epochs, lr = (48, 2.0, 5e-5) if task == "squad_v2" else (32, 3.0, 5e-5)
    if family == "t5":
        data.update(target_len=8)
        optim = common.optim("adafactor", learning_rate=1e-3, schedule="constant",
                             clip_norm=0.0)  # fmt: skip
        batch_size = 128
    else:
        optim = common.optim("adamw", learning_rate=lr, b1=0.9, b2=0.999, eps=1e-6,
                             weight_decay=0.01, clip_norm=1.0, schedule="linear",
                             warmup_ratio=0.1)  # fmt: skip
    smoke = row == "smoke"
    return common.config(
        meta=common.meta(
            name=f"configs/finetune.py:{arg}",
            paper=PAPER[family],
            hardware="cpu" if smoke else "v3-8",
        ),  # fmt: skip
        model=common.model(**model),
        data=common.task_data(family, **data),
        optim=optim,
        train=common.train(
            batch_size=8 if smoke else batch_size,
            epochs=epochs,
            eval_every=200,
            log_every=20,
            checkpoint_every=500,
            max_to_keep=1,
            keep_best=True,
            seed=0,
        ),  # fmt: skip
        mesh=common.mesh(),
        lora=common.lora(),
    )
