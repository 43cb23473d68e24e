"""Fine-tuning: a pretrained (or converted) run, a task's splits, epochs, task metrics and the best
checkpoint by the task's score.

`finetune` reads top-down: `prepare_workdir`, `task_tokenizer`, `TaskArrays.load` (every split
encoded once), the budget from train.epochs, `loop.build_trainer` and `loop.restore_or_init` (the
same trainer and checkpoints as pretraining; `train.init_from` supplies the base, a new head keeps
its fresh initialisation), then `run_epochs`. Each epoch visits the train examples in a fresh
permutation of (train.seed, epoch) and drops the incomplete last batch; a resumed run recomputes
the same order from the step alone. Evaluation covers the whole dev split, its last batch padded
with rows of weight 0 (`evaluate_split`), so every example counts once.

What a run leaves in its workdir besides pretraining's files: `eval_results.json` (the best
step, its metrics, and the last evaluation's) and the best evaluation's predictions:
`predictions/dev.tsv` (`index\\tprediction\\tlabel`) and, when the task has a test split, its
predictions in the GLUE server's format (`predictions/<task file>`, e.g. MRPC.tsv) or
`predictions/test.tsv`; for SQuAD `predictions/{dev,test}_predictions.json`, `_nbest.json` and
(v2.0) `_null_odds.json`, as run_squad.py writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxgen import config as config_lib
from jaxgen import objectives, parallel
from jaxgen.config import RunConfig
from jaxgen.data import tasks
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.objectives import task as task_lib
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import loop, task_metrics
from jaxgen.train import step as step_lib
from jaxgen.train.metrics import MetricsWriter
from jaxgen.train.state import TrainState

log = logging.getLogger("jaxgen")

RESULTS_FILE = "eval_results.json"
# What `task_metrics.glue_metrics` reports, the metrics the GLUE average reads.
GLUE_METRICS = ("mcc", "accuracy", "f1", "pearson", "spearman", "combined_score")
TAG_EPOCH = 6  # the host random stream of the epoch permutations (objectives' TAG_* go to 5)


# ------------------------------------------------------------------------------------------ data


def task_tokenizer(run: RunConfig, workdir: Path, train_texts: list[str]) -> Any:
    """The run's tokenizer, kept in `workdir/tokenizer/`: train.init_from's when that run has one,
    else data.vocab_path's, else one trained on the train split's texts (model.vocab_size)."""
    own = workdir / "tokenizer"
    if own.exists():
        tokenizer = tokenizer_lib.load_tokenizer(own)
    else:
        base = Path(run.train.init_from) / "tokenizer" if run.train.init_from else None
        data = run.data
        if base is not None and base.exists():
            tokenizer = tokenizer_lib.load_tokenizer(base)
        elif data.vocab_path:
            tokenizer = tokenizer_lib.load_vocabulary(
                data.tokenizer, data.vocab_path, data.lowercase
            )
        else:
            if run.train.init_from:
                log.warning("%s has no tokenizer/: training one on the task's texts, which the "
                            "pretrained embeddings do not know", run.train.init_from)  # fmt: skip
            tokenizer = tokenizer_lib.train_tokenizer(
                data.tokenizer, train_texts, run.model.vocab_size, data.lowercase
            )
        if jax.process_index() == 0:  # written whole under a temporary name, then renamed
            tmp = Path(tempfile.mkdtemp(prefix="tokenizer.tmp", dir=workdir))
            tokenizer.save(tmp)
            os.replace(tmp, own)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise objectives.DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{run.model.vocab_size}; raise model.vocab_size or use a smaller vocabulary"
        )
    return tokenizer


@dataclasses.dataclass(frozen=True)
class TaskArrays:
    """A task's splits and their encoded arrays (one row per example)."""

    splits: task_lib.Splits
    train: dict[str, np.ndarray]
    dev: dict[str, np.ndarray]
    test: dict[str, np.ndarray] | None

    @classmethod
    def load(cls, run: RunConfig, objective: Any, workdir: Path) -> tuple[TaskArrays, Any]:
        """(the encoded splits, the tokenizer) of a run's task."""
        splits = task_lib.load_splits(run.data)
        tokenizer = task_tokenizer(run, workdir, objective.texts(splits.train, run.data, splits))
        check_head(run, splits)

        def encode(examples: list[tasks.Example]) -> dict[str, np.ndarray]:
            arrays = objective.encode(examples, tokenizer, run.data, splits)
            objectives.check_batch(objective, arrays, run.model, run.data)
            return arrays

        test = encode(splits.test) if splits.test else None
        return cls(splits, encode(splits.train), encode(splits.dev), test), tokenizer


def check_head(run: RunConfig, splits: task_lib.Splits) -> None:
    """Raises ConfigError unless model.num_labels matches the task's classes (1: regression)."""
    if objectives.of_run(run).PREDICTS != "labels" or not run.model.num_labels:
        return  # SFT, SQuAD and T5's text have no classifier head
    want = task_lib.num_outputs(splits)
    if run.model.num_labels != want:
        what = "a regression task" if splits.regression else f"classes {list(splits.labels)}"
        raise config_lib.ConfigError(
            f"model.num_labels={run.model.num_labels}, but data.task={run.data.task!r} has "
            f"{what}: set --config.model.num_labels={want}"
        )


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    """Examples in a split's encoded arrays."""
    return len(next(iter(arrays.values())))


def steps_per_epoch(run: RunConfig, train_rows: int) -> int:
    """Full batches in one pass over the train split (the incomplete last batch is dropped)."""
    steps = train_rows // run.train.batch_size
    if steps < 1:
        raise objectives.DataError(
            f"the train split of data.task={run.data.task!r} has {train_rows} examples, fewer "
            f"than train.batch_size={run.train.batch_size}: lower the batch size"
        )
    return steps


def budget(run: RunConfig, train_rows: int) -> int:
    """The run's steps: int(examples / batch_size * train.epochs), or train.num_steps."""
    if not run.train.epochs:
        return run.train.num_steps
    return max(1, int(train_rows / run.train.batch_size * run.train.epochs))


def train_batch(run: RunConfig, arrays: Mapping[str, np.ndarray], step: int) -> dict:
    """This process's rows of the train batch of `step` (0-based)."""
    rows = num_rows(arrays)
    per_epoch, size = steps_per_epoch(run, rows), run.train.batch_size
    epoch, index = divmod(step, per_epoch)
    chosen = _epoch_order(run.train.seed, epoch, rows)[index * size : (index + 1) * size]
    local = size // jax.process_count()
    mine = chosen[jax.process_index() * local : (jax.process_index() + 1) * local]
    return {k: v[mine] for k, v in arrays.items()}


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, rows: int) -> np.ndarray:
    """The train rows in epoch `epoch`'s order, drawn once per epoch (a step of a small model
    takes less time than permuting MNLI's 393k rows)."""
    order = objectives.host_rng(seed, TAG_EPOCH, epoch).permutation(rows)
    order.flags.writeable = False  # shared by the epoch's steps
    return order


# ------------------------------------------------------------------------------------- evaluate


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """An evaluated split: its metrics and its predictions [N] (None when the task has none)."""

    metrics: dict[str, float]
    predictions: np.ndarray | None


EvalFn = Callable[[Any, dict], tuple[dict, Any]]


def evaluate_split(
    trainer: loop.Trainer, params: Any, arrays: Mapping[str, np.ndarray], evaluate: EvalFn
) -> tuple[dict[str, float], np.ndarray | None]:
    """(the objective's metrics, raw predictions of every row, or None) over a whole split of
    `evaluate(params, batch) -> (metric sums, predictions or None)` on batches of
    train.batch_size, the last one padded with rows of weight 0."""
    size = trainer.run.train.batch_size
    rows = num_rows(arrays)
    local = size // jax.process_count()
    sums, raw = [], []
    for start in range(0, rows, size):
        chunk = task_lib.pad_rows({k: v[start : start + size] for k, v in arrays.items()}, size)
        mine = {k: v[jax.process_index() * local : (jax.process_index() + 1) * local]
                for k, v in chunk.items()}  # fmt: skip
        batch_sums, predictions = evaluate(params, parallel.global_batch(mine, trainer.mesh))
        sums.append(batch_sums)
        if predictions is not None:  # a global array: every process gets all of it
            raw.append(multihost_utils.process_allgather(predictions, tiled=True))
    metrics = objectives.reduce_metrics(trainer.objective, jax.device_get(sums))
    return metrics, np.concatenate(raw)[:rows] if raw else None


def eval_fn(trainer: loop.Trainer, tokenizer: Any) -> EvalFn:
    """The task's `evaluate(params, batch) -> (metric sums, predictions or None)`: one forward
    where the objective predicts from it (`predict_outputs`), else the evaluation step and the
    objective's `predict_fn` (T5 decodes), or the evaluation step alone (no predictions)."""
    objective = trainer.objective
    if not objective.PREDICTS:
        return lambda params, batch: (trainer.eval_step(params, batch), None)
    if hasattr(objective, "predict_outputs"):
        return step_lib.build_eval_step(
            trainer.module, objective, trainer.mesh, trainer.shardings,
            step_lib.StepOptions(z_loss=trainer.run.train.z_loss), objective.predict_outputs,
        )  # fmt: skip
    predict = objective.predict_fn(trainer.module, trainer.run.data, tokenizer)

    def evaluate(params: Any, batch: dict) -> tuple[dict, Any]:
        with parallel.mesh_context(trainer.mesh):
            return trainer.eval_step(params, batch), predict(params, batch)

    return evaluate


def score_of(metrics: Mapping[str, float]) -> float:
    """The number the best checkpoint is chosen by: the task score, or minus the loss (-inf when
    not finite: a constant output's NaN correlation never wins)."""
    value = float(metrics["score"] if "score" in metrics else -float(metrics["loss"]))
    return value if math.isfinite(value) else -math.inf


class Evaluator:
    """Evaluates a state on the dev split (and predicts the test split) of a task."""

    def __init__(self, trainer: loop.Trainer, data: TaskArrays, tokenizer: Any) -> None:
        self.trainer, self.data, self.tokenizer = trainer, data, tokenizer
        self.kind = trainer.objective.PREDICTS
        self.evaluate = eval_fn(trainer, tokenizer)
        self._windows: dict[str, Any] = {}  # SQuAD's windows of a split, built once

    def predictions(self, raw: np.ndarray, split: str) -> Any:
        """Split `split`'s raw predictions decoded: labels [N], or {question id:
        SquadPrediction}."""
        run, objective = self.trainer.run, self.trainer.objective
        examples = getattr(self.data.splits, split)
        if self.kind == "spans":
            data = run.data
            if split not in self._windows:
                self._windows[split] = objective.windows(examples, self.tokenizer, data)
            return task_metrics.squad_nbest(
                raw[:, :, 0], raw[:, :, 1], self._windows[split],
                examples, n_best=data.n_best_size, max_answer_len=data.max_answer_length,
                version_2_with_negative=data.version_2_with_negative,
                null_score_diff_threshold=data.null_score_diff_threshold,
            )  # fmt: skip
        return objective.postprocess(raw, examples, self.tokenizer, run.data, self.data.splits)

    def dev(self, params: Any) -> SplitResult:
        """The dev split's loss, objective metrics, task metrics and `score`."""
        metrics, raw = evaluate_split(self.trainer, params, self.data.dev, self.evaluate)
        if raw is None:
            return SplitResult(metrics, None)
        splits = self.data.splits
        predictions = self.predictions(raw, "dev")
        if self.kind == "spans":
            texts = {qid: p.text for qid, p in predictions.items()}
            scores = task_metrics.squad_scores(texts, splits.dev)
            scores["score"] = scores["f1"]  # what SQuAD leaderboards rank by
        else:
            scores = task_metrics.task_scores(
                self.trainer.run.data.task, predictions, self.data.dev["label"], splits.regression
            )
        return SplitResult({**metrics, **scores}, predictions)

    def test(self, params: Any) -> Any:
        """Predictions of the test split (None without one, or for a task without predictions)."""
        if self.data.test is None or not self.kind:
            return None
        _, raw = evaluate_split(self.trainer, params, self.data.test, self.evaluate)
        return self.predictions(raw, "test")


def write_predictions(
    workdir: Path, run: RunConfig, splits: task_lib.Splits, dev: SplitResult, test: Any
) -> None:
    """The best evaluation's prediction files in `workdir/predictions/` (see the module doc)."""
    if dev.predictions is None or jax.process_index() != 0:
        return
    out = workdir / "predictions"
    out.mkdir(exist_ok=True)
    if isinstance(dev.predictions, dict):
        _write_squad(out, "dev", dev.predictions)
        if test is not None:
            _write_squad(out, "test", test)
        return

    def text(value: Any) -> str:
        if splits.regression:
            return f"{float(value):.3f}"
        return splits.labels[int(value)] if 0 <= int(value) < len(splits.labels) else "invalid"

    rows = "".join(f"{i}\t{text(p)}\t{e.label}\n" for i, (p, e) in
                   enumerate(zip(dev.predictions, splits.dev, strict=True)))  # fmt: skip
    _write_atomic(out / "dev.tsv", "index\tprediction\tlabel\n" + rows)
    if test is None:
        return
    if run.data.task in task_lib.GLUE:
        spec = tasks.glue_task(run.data.task)
        # An undecodable T5 prediction is submitted as the first class (the server needs one).
        ids = test if splits.regression else np.maximum(test, 0)
        tmp = out / f".{spec.submission_file}.tmp"
        task_metrics.write_glue_predictions(tmp, run.data.task, ids)
        os.replace(tmp, out / spec.submission_file)
    else:
        body = "".join(f"{i}\t{text(p)}\n" for i, p in enumerate(test))
        _write_atomic(out / "test.tsv", "index\tprediction\n" + body)


def _write_squad(out: Path, split: str, predictions: Mapping[str, Any]) -> None:
    """run_squad.py's files: {split}_predictions.json (id -> answer), {split}_nbest.json and,
    for v2.0, {split}_null_odds.json (the score difference evaluate-v2.0.py's --na-prob-file
    reads)."""
    answers = {qid: p.text for qid, p in predictions.items()}
    nbest = {qid: [dataclasses.asdict(e) for e in p.nbest] for qid, p in predictions.items()}
    _write_atomic(out / f"{split}_predictions.json", json.dumps(answers, indent=1) + "\n")
    _write_atomic(out / f"{split}_nbest.json", json.dumps(nbest, indent=1) + "\n")
    odds = {qid: p.score_diff for qid, p in predictions.items() if p.score_diff is not None}
    if odds:
        odds = {qid: v if math.isfinite(v) else 1e9 for qid, v in odds.items()}
        _write_atomic(out / f"{split}_null_odds.json", json.dumps(odds, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ train


def identity(run: RunConfig, data: TaskArrays) -> dict[str, str]:
    """What each checkpoint of the run records and a restore requires: the config, its hash, the
    encoded train split's fingerprint and (LoRA) the base run."""
    out = {"config": run.meta.name, "config_hash": loop.config_hash(run),
           "task_data_hash": task_lib.fingerprint(data.train)}  # fmt: skip
    if loop.adapters_only(run):
        out["lora_base"] = str(Path(run.train.init_from).expanduser().absolute())
    return out


def _read_results(workdir: Path) -> dict[str, Any]:
    path = workdir / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is unreadable; the best result is recomputed from here on", path)
        return {}


def glue_average(workdirs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """{'glue_score', 'tasks': {task: metrics}} of fine-tuning runs on GLUE tasks, one run per
    task: each run's best evaluation (its eval_results.json), averaged as the GLUE benchmark
    averages (`task_metrics.glue_score`: two-metric tasks by their mean, MNLI's two splits as
    one task)."""
    per_task: dict[str, dict[str, float]] = {}
    for workdir in workdirs:
        results = _read_results(Path(workdir))
        if "best" not in results:
            raise ValueError(f"{workdir} has no {RESULTS_FILE}: fine-tune a GLUE task there first")
        task = results["task"]
        if task not in task_lib.GLUE:
            raise ValueError(f"{workdir} fine-tuned data.task={task!r}, not a GLUE task")
        if task in per_task:
            raise ValueError(f"two runs of {task} among {[str(w) for w in workdirs]}; keep one")
        best = results["best"]
        per_task[task] = {k: float(best[k]) for k in GLUE_METRICS if k in best}
    return {"glue_score": task_metrics.glue_score(per_task), "tasks": per_task}


def run_epochs(
    trainer: loop.Trainer,
    state: TrainState,
    start: int,
    data: TaskArrays,
    evaluator: Evaluator,
    writer: MetricsWriter,
    ckpt: checkpoint_lib.Checkpointer,
    workdir: Path,
) -> dict[str, Any]:
    """Trains from `start` to train.num_steps; evaluates every train.eval_every steps and at the
    end, keeping the best evaluation's checkpoint, predictions and results. Returns the results."""
    run, train = trainer.run, trainer.run.train
    results = _read_results(workdir) if start else {}

    def evaluate(step: int, state: TrainState) -> str:
        dev = evaluator.dev(state.params)
        row = writer.write(step, "eval", dev.metrics)
        results["last"] = row
        if "best" not in results or score_of(dev.metrics) > score_of(results["best"]):
            results["best"] = row
            ckpt.save_best(step, loop.saved_state(run, state), score_of(dev.metrics))
            write_predictions(workdir, run, data.splits, dev, evaluator.test(state.params))
        results.update(task=run.data.task, num_steps=train.num_steps,
                       best_step=results["best"]["step"])  # fmt: skip
        if jax.process_index() == 0:
            _write_atomic(workdir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
        return (
            f"step {step}: eval loss {dev.metrics['loss']:.4f}, score {score_of(dev.metrics):.4f}"
        )

    def save_at(done: int, state: TrainState) -> None:
        loop.check_finite(state, done, run, ckpt)
        ckpt.save(done, loop.saved_state(run, state), {"step": done}, force=True)

    if not start or "best" not in results:
        evaluate(start, state)
    loop.drive(
        trainer, state, start, lambda step: (train_batch(run, data.train, step), train.batch_size),
        evaluate, save_at, writer, ckpt, f"finetune {run.data.task}",
    )  # fmt: skip
    return results


def finetune(run: RunConfig, workdir: str | Path) -> dict[str, Any]:
    """Fine-tunes (or resumes) the run in `workdir` on its task; returns eval_results.json's
    content: the best evaluation, the last one and the best step."""
    workdir = Path(workdir)
    loop.prepare_workdir(run, workdir)
    objective = objectives.of_run(run)
    data, tokenizer = TaskArrays.load(run, objective, workdir)
    rows = num_rows(data.train)
    steps_per_epoch(run, rows)
    run = dataclasses.replace(
        run, train=dataclasses.replace(run.train, num_steps=budget(run, rows))
    )
    mesh = parallel.make_mesh(run.mesh)
    loop.batch_granule(run, mesh)
    trainer, state = loop.build_trainer(run, mesh)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, max_to_keep=run.train.max_to_keep, keep_best=run.train.keep_best,
        identity=identity(run, data), best_mode="max",
    )  # fmt: skip
    try:
        state, start, _ = loop.restore_or_init(trainer, state, ckpt)
        log.info("fine-tuning %s: %d train examples, %d dev, %d steps (%.3g epochs)",
                 run.data.task, rows, num_rows(data.dev), run.train.num_steps,
                 run.train.num_steps * run.train.batch_size / rows)  # fmt: skip
        writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
        try:
            results = run_epochs(
                trainer, state, start, data, Evaluator(trainer, data, tokenizer), writer, ckpt,
                workdir,
            )  # fmt: skip
        finally:
            writer.close()
        ckpt.wait()
        if jax.process_index() == 0:
            (workdir / "DONE").write_text(f"{run.train.num_steps}\n")
    finally:
        ckpt.close()
    return results
