"""The training loop: data, sharded steps, evaluation, metrics, checkpoints, resume, preemption."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.data import corpus as corpus_lib
from jaxgen.data import pipeline
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import optim
from jaxgen.train import step as step_lib
from jaxgen.train.metrics import MetricsWriter

log = logging.getLogger("jaxgen")

ID_KEYS = (
    "input_ids",
    "masked_ids",
    "target_ids",
    "encoder_input_ids",
    "decoder_input_ids",
    "decoder_target_ids",
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; the last good checkpoint is left untouched."""


class Preempted(Exception):
    """Raised after a final checkpoint when SIGTERM or Ctrl-C stopped the run."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """A contiguous range of steps trained at one sequence length."""

    index: int
    start: int
    end: int
    seq_len: int
    max_predictions: int


def resolve_phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """Turns `train.phases` fractions into step ranges; no phases means one phase over all steps."""
    num_steps = int(config.train.num_steps)
    default_pred = int(config.data.get("max_predictions", 0))
    specs = list(config.train.phases) or [{"fraction": 1.0}]
    phases, start = [], 0
    for i, spec in enumerate(specs):
        end = (
            num_steps if i == len(specs) - 1 else start + round(float(spec["fraction"]) * num_steps)
        )
        phases.append(
            Phase(
                index=i,
                start=start,
                end=end,
                seq_len=int(spec.get("seq_len", config.data.seq_len)),
                max_predictions=int(spec.get("max_predictions", default_pred)),
            )
        )
        start = end
    return [p for p in phases if p.end > p.start]


def validate_batch(batch: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> None:
    """Checks ids and lengths on the host: XLA would silently clamp an out-of-range index."""
    for key in ID_KEYS:
        if key in batch:
            ids = batch[key]
            if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
                raise ValueError(
                    f"batch['{key}'] has ids in [{ids.min()}, {ids.max()}] but model.vocab_size is "
                    f"{model.vocab_size}: the tokenizer and the model disagree"
                )
    if model.family in ("bert", "gpt") and "input_ids" in batch:
        length = batch["input_ids"].shape[1]
        if length > model.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={model.max_len}")
        if (
            "positions" in batch
            and batch["positions"].size
            and batch["positions"].max() >= model.max_len
        ):
            raise ValueError(
                f"position {batch['positions'].max()} exceeds model.max_len={model.max_len}"
            )
    if model.family == "bert" and batch["segment_ids"].max() >= model.type_vocab_size:
        raise ValueError(f"segment id {batch['segment_ids'].max()} >= model.type_vocab_size")


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Number of real (non-padding) input tokens in a batch."""
    for key in ("attention_mask", "encoder_mask"):
        if key in batch:
            extra = int(np.sum(batch["decoder_mask"])) if key == "encoder_mask" else 0
            return int(np.sum(batch[key])) + extra
    return int(np.size(batch["input_ids"]))


class _StopSignal:
    """Turns SIGTERM and Ctrl-C into a flag checked between steps; the loop saves before exiting."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave handlers alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class DataSource:
    """Corpus, tokenizer and per-phase datasets for one run (tokenizer cached in the workdir)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path) -> None:
        data = config.data
        self.config = config
        family = config.model.family
        documents = corpus_lib.load_documents(
            data.corpus, min_documents=2 if family == "bert" else 1
        )
        self.train_docs, self.eval_docs = corpus_lib.split_documents(
            documents, int(data.eval_documents), int(data.get("split_seed", 0))
        )
        cache_dir = Path(data.cache_dir) if data.cache_dir else workdir / "cache"
        tokenizer_dir = workdir / "tokenizer"
        if tokenizer_dir.exists():
            self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        else:
            self.tokenizer = tokenizer_lib.build_tokenizer(
                data, self.train_docs, int(config.model.vocab_size), cache_dir
            )
            if jax.process_index() == 0:
                # Saved under a temporary name and renamed: the other processes of a multi-host run
                # check for this directory at the same moment and must never load half of it.
                tmp = Path(tempfile.mkdtemp(prefix="tokenizer.tmp", dir=workdir))
                self.tokenizer.save(tmp)
                os.replace(tmp, tokenizer_dir)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{config.model.vocab_size}; raise model.vocab_size or use a smaller vocabulary"
            )
        self.cache_dir = cache_dir

    def dataset(self, split: str, phase: Phase) -> Any:
        """A phase's train (infinite, shuffled) or eval (fixed) iterator of host-local batches."""
        return pipeline.build_dataset(
            self.config,
            self.tokenizer,
            split,
            documents=self.train_docs if split == "train" else self.eval_docs,
            seed=int(self.config.train.seed),
            batch_size=int(self.config.train.batch_size) // jax.process_count(),
            seq_len=phase.seq_len,
            max_predictions=phase.max_predictions,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_batches=int(self.config.train.eval_steps) if split == "eval" else None,
            cache_dir=self.cache_dir,
        )


def _reduce(sums_list: list[dict[str, tuple[Any, Any]]]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for sums in jax.device_get(sums_list):
        for key, (s, w) in sums.items():
            acc = totals.setdefault(key, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(w)
    return {k: s / max(w, 1e-8) for k, (s, w) in totals.items()}


def _derived(family: str, metrics: dict[str, float]) -> dict[str, float]:
    if family == "gpt" and "loss" in metrics:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Trains (or resumes) the run in `workdir` to `train.num_steps`; returns the eval rows."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    config_lib.validate(config)
    _check_saved_config(config, workdir)
    if primary:
        config_lib.save_config(config, workdir / "config.json")

    family = config.model.family
    mesh = parallel.make_mesh(config.mesh)
    batch_size = int(config.train.batch_size)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (data_parallel * config.train.grad_accum):
        raise config_lib.ConfigError(
            f"train.batch_size={batch_size} must be divisible by data*fsdp={data_parallel} "
            f"times train.grad_accum={config.train.grad_accum}"
        )
    data = DataSource(config, workdir)
    phases = resolve_phases(config)
    module = models.build(config.model)
    objective = objectives.get(family)
    num_steps = int(config.train.num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    optimizer = optim.make_optimizer(config.optim, num_steps)
    options = step_lib.StepOptions(
        grad_accum=int(config.train.grad_accum),
        z_loss=float(config.train.get("z_loss", 0.0)),
        skip_nonfinite_or_spike=bool(config.train.skip_nonfinite_or_spike),
    )

    eval_sets: dict[int, list[dict[str, np.ndarray]]] = {}

    def eval_batches(phase: Phase) -> list[dict[str, np.ndarray]]:
        if phase.seq_len not in eval_sets:
            eval_sets[phase.seq_len] = list(data.dataset("eval", phase))
        return eval_sets[phase.seq_len]

    sample = eval_batches(phases[0])[0]
    state, shardings = step_lib.create_train_state(
        module, objective, optimizer, sample, int(config.train.seed), mesh
    )
    ckpt = checkpoint_lib.Checkpointer(
        workdir,
        max_to_keep=int(config.train.max_to_keep),
        keep_best=bool(config.train.keep_best),
    )
    latest = ckpt.latest_step()
    start = latest or 0
    data_state: dict[str, Any] = {}
    # `is not None`: a converted checkpoint (jaxgen convert --from hf) is a real one at step 0.
    if latest is not None:
        state, data_state = ckpt.restore(latest, checkpoint_lib.abstract_like(state, shardings))
        log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
    elif config.train.get("init_from"):
        _, params = checkpoint_lib.load_params(config.train.init_from)
        state = state.replace(params=jax.device_put(params, shardings.params))
        log.info("initialised parameters from %s", config.train.init_from)

    train_step = step_lib.build_train_step(
        module, objective, optimizer, schedule, mesh, shardings, options
    )
    eval_step = step_lib.build_eval_step(module, objective, mesh, shardings, options)
    writer = MetricsWriter(workdir, enabled=primary, resume_step=start)
    eval_rows: list[dict[str, Any]] = []

    def evaluate(step: int, phase: Phase) -> dict[str, float]:
        sums = [
            eval_step(state.params, parallel.global_batch(b, mesh)) for b in eval_batches(phase)
        ]
        metrics = _derived(family, _reduce(sums))
        row = writer.write(step, "eval", metrics)
        eval_rows.append(row)
        ckpt.save_best(step, state, metrics["loss"])
        return metrics

    def check_finite(step: int) -> None:
        bad = int(state.nonfinite_step)
        if bad >= 0 and not options.skip_nonfinite_or_spike:
            last = ckpt.latest_step()
            where = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
            raise NonFiniteLossError(
                f"the loss became NaN or Inf at step {bad + 1}; training stopped at step {step} "
                f"without saving. Last good checkpoint: {where}. Lower optim.learning_rate, check "
                "the data, or set train.skip_nonfinite_or_spike=true to skip such updates."
            )

    def save(step: int) -> None:
        check_finite(step)
        ckpt.save(step, state, {"phase": phase.index, "iterator": iterator.get_state()}, force=True)

    phase = next(p for p in phases if p.start <= start < p.end) if start < num_steps else phases[-1]
    if start == 0:
        evaluate(0, phase)
    iterator = data.dataset("train", phase)
    if latest is not None and data_state.get("phase") == phase.index and "iterator" in data_state:
        iterator.set_state(data_state["iterator"])

    pending: list[dict[str, Any]] = []
    last_time, last_step, tokens = time.perf_counter(), start, 0
    bar = tqdm(
        total=num_steps,
        initial=start,
        desc=f"train {family}",
        disable=not primary,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    try:
        with _StopSignal() as stop:
            for step in range(start, num_steps):
                if step >= phase.end:
                    phase = phases[phase.index + 1]
                    iterator = data.dataset("train", phase)
                local = next(iterator)
                validate_batch(local, config.model)
                tokens += batch_tokens(local) * jax.process_count()
                state, metrics = train_step(state, parallel.global_batch(local, mesh))
                pending.append(metrics)
                done = step + 1
                if done % config.train.log_every == 0 or done == num_steps:
                    values = {
                        k: float(np.mean(v)) for k, v in jax.device_get(_stack(pending)).items()
                    }
                    pending.clear()
                    check_finite(done)
                    elapsed = time.perf_counter() - last_time
                    values["tokens_per_sec"] = tokens / max(elapsed, 1e-9)
                    values["steps_per_sec"] = (done - last_step) / max(elapsed, 1e-9)
                    writer.write(done, "train", _derived(family, values))
                    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
                    last_time, last_step, tokens = time.perf_counter(), done, 0
                if done % config.train.eval_every == 0 or done == num_steps:
                    check_finite(done)
                    metrics_eval = evaluate(done, phase)
                    bar.write(f"step {done}: eval loss {metrics_eval['loss']:.4f}")
                if done % config.train.checkpoint_every == 0 or done == num_steps:
                    save(done)
                bar.update(1)
                if _agreed_stop(stop.received is not None):
                    save(done)
                    ckpt.wait()
                    raise Preempted(
                        f"{stop.received or 'SIGTERM on another host'} received: "
                        f"saved a checkpoint at step {done} in "
                        f"{ckpt.directory}; run the same command again to resume"
                    )
        ckpt.wait()
        if primary:
            (workdir / "DONE").write_text(f"{num_steps}\n")
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return eval_rows


def _agreed_stop(local: bool) -> bool:
    """Whether any process was asked to stop: all processes must checkpoint at the same step."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}


def _check_saved_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses to resume a run whose model or data settings changed; other changes are reported."""
    saved = workdir / "config.json"
    if not saved.exists() or not (workdir / "checkpoints").exists():
        return
    old = config_lib.with_saved_defaults(config_lib.to_dict(config_lib.load_saved_config(saved)))
    new = config_lib.to_dict(config)
    new.setdefault("data", {}).setdefault("split_seed", 0)  # DataSource's default
    changes = config_lib.diff(old, new)
    fatal = [c for c in changes if c.startswith(("model.", "data."))]
    if fatal:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with a different model or data config ({'; '.join(fatal)}); "
            "use a new --workdir, or the saved settings"
        )
    for change in changes:
        log.warning("resuming with a changed setting: %s", change)
