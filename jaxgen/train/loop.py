"""The training loop: plan the phases, build or restore the state, run the steps, evaluate, save.

`train` reads top-down: `prepare_workdir`, `plan_phases`, `build_trainer`, `restore_or_init`,
then `run_steps`, which evaluates with `evaluate` and saves with `save`. Every function takes what
it needs as arguments; nothing is rebound in a closure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh
from tqdm import tqdm

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.config import DataConfig, RunConfig
from jaxgen.data import records
from jaxgen.data.pipeline import DataIterator
from jaxgen.data.source import DataSource
from jaxgen.models import lora as lora_lib
from jaxgen.objectives import StepObjective
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import faults, optim
from jaxgen.train import step as step_lib
from jaxgen.train.metrics import MetricsWriter
from jaxgen.train.state import TrainState

log = logging.getLogger("jaxgen")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; the last good checkpoint is left untouched."""


class Preempted(Exception):
    """Raised after a final checkpoint when SIGTERM or Ctrl-C stopped the run."""


# ------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class Phase:
    """A contiguous range of steps with one data setting and one global batch size.

    start_example: where this phase's train stream begins (phases of a batch ramp continue one
    stream; a phase with new data settings starts its own).
    """

    index: int
    start: int
    end: int
    data: DataConfig
    batch_size: int
    start_example: int = 0


def batch_granule(run: RunConfig, mesh: Mesh) -> int:
    """The unit every global batch size must be a multiple of: micro-batches over data x fsdp
    devices, and whole rows per process."""
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    granule = math.lcm(data_parallel * run.train.grad_accum, jax.process_count())
    if run.train.batch_size % granule:
        raise config_lib.ConfigError(
            f"train.batch_size={run.train.batch_size} must be divisible by data*fsdp="
            f"{data_parallel} times train.grad_accum={run.train.grad_accum} (and by the "
            f"{jax.process_count()} processes)"
        )
    return granule


def _ramp_batches(run: RunConfig, seq_len: int, granule: int) -> list[tuple[int, float]]:
    """[(batch size, tokens it trains on)] of the batch ramp's stages ([] without a ramp).

    Stage k of K has the batch nearest start + (full - start) * k / K tokens (a multiple of the
    granule, at least one granule) and trains on batch_ramp_tokens / K tokens, so the batch grows
    linearly in tokens seen, in K steps.
    """
    train = run.train
    if not train.batch_ramp_tokens:
        return []
    full = train.batch_size * seq_len
    stages = []
    for k in range(train.batch_ramp_stages):
        tokens = train.batch_ramp_start_tokens + (full - train.batch_ramp_start_tokens) * (
            k / train.batch_ramp_stages
        )
        rows = max(granule, round(tokens / seq_len / granule) * granule)
        share = train.batch_ramp_tokens / train.batch_ramp_stages
        stages.append((min(rows, train.batch_size), share))
    if stages[0][0] * seq_len > train.batch_ramp_start_tokens:
        log.warning(
            "the batch ramp starts at %d sequences (%d tokens), not %d tokens: a global batch "
            "must be a multiple of %d (data x fsdp x grad_accum)",
            stages[0][0], stages[0][0] * seq_len, train.batch_ramp_start_tokens, granule,
        )  # fmt: skip
    return stages


def plan_phases(run: RunConfig, granule: int) -> list[Phase]:
    """The run's phases: `train.phases` fractions as step ranges, each split where the batch ramp
    changes the batch size (consecutive equal batch sizes merged). No phases: one over all steps."""
    num_steps = run.train.num_steps
    specs = list(run.train.phases) or [{"fraction": 1.0}]
    ranges, start = [], 0
    for i, spec in enumerate(specs):
        last = i == len(specs) - 1
        end = num_steps if last else start + round(float(spec["fraction"]) * num_steps)
        ranges.append((start, end, run.phase_data(spec)))
        start = end
    ramp: list[tuple[int, float]] = []
    pieces: list[tuple[int, int, DataConfig, int]] = []
    for start, end, data in ranges:
        if not ramp and not pieces:
            ramp = _ramp_batches(run, data.seq_len, granule)
        step = start
        while step < end:
            if ramp:
                rows, tokens = ramp[0]
                steps = min(math.ceil(tokens / (rows * data.seq_len)), end - step)
                left = tokens - steps * rows * data.seq_len
                ramp = [(rows, left), *ramp[1:]] if left > 0 else ramp[1:]
            else:
                rows, steps = run.train.batch_size, end - step
            if pieces and pieces[-1][2] == data and pieces[-1][3] == rows:
                pieces[-1] = (pieces[-1][0], step + steps, data, rows)
            else:
                pieces.append((step, step + steps, data, rows))
            step += steps
    phases: list[Phase] = []
    for start, end, data, rows in pieces:
        offset = 0
        if phases and phases[-1].data == data:
            previous = phases[-1]
            offset = previous.start_example + (previous.end - previous.start) * previous.batch_size
        phases.append(Phase(len(phases), start, end, data, rows, offset))
    return phases


# --------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What steps a run: its model, objective, optimizer, state shardings and jitted steps."""

    run: RunConfig
    mesh: Mesh
    module: nn.Module
    objective: StepObjective
    optimizer: optax.GradientTransformation
    shardings: TrainState
    train_step: Any
    eval_step: Any


def build_trainer(run: RunConfig, mesh: Mesh) -> tuple[Trainer, TrainState]:
    """The run's trainer and a freshly initialised state (seed train.seed) in its shardings."""
    module = models.build(run.model, run.lora)
    objective = objectives.of_run(run)
    schedule = optim.make_schedule(run.optim, run.train.num_steps)
    optimizer = optim.make_optimizer(run.optim, run.train.num_steps)
    if run.lora.rank:
        optimizer = optim.adapters_only(optimizer)
        if not run.train.init_from:
            log.warning("lora.rank=%d without train.init_from: the frozen base model is the "
                        "random initialisation", run.lora.rank)  # fmt: skip
    options = step_lib.StepOptions(
        grad_accum=run.train.grad_accum,
        z_loss=run.train.z_loss,
        skip_nonfinite_or_spike=run.train.skip_nonfinite_or_spike,
        trained=lora_lib.trained if run.lora.rank else None,
    )
    state, shardings = step_lib.create_train_state(
        module, objective, optimizer, run.data, run.train.seed, mesh
    )
    trainer = Trainer(
        run=run,
        mesh=mesh,
        module=module,
        objective=objective,
        optimizer=optimizer,
        shardings=shardings,
        train_step=step_lib.build_train_step(
            module, objective, optimizer, schedule, mesh, shardings, options
        ),
        eval_step=step_lib.build_eval_step(module, objective, mesh, shardings, options),
    )
    return trainer, state


def config_hash(run: RunConfig) -> str:
    """A short hash of the settings a resumed run may not change: the model and data sections."""
    data = {k: v for k, v in run.data.to_dict().items() if k != "cache_dir"}  # where, not what
    settings = json.dumps({"model": run.model.to_dict(), "data": data}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def run_identity(run: RunConfig, source: DataSource) -> dict[str, str]:
    """What each checkpoint of this run records and a restore requires: the config's hash, the
    prepared data's manifest hash and, for adapters-only checkpoints, the base run they adapt
    (the config's name is for people reading it)."""
    identity = {
        "config": run.meta.name,
        "config_hash": config_hash(run),
        "data_manifest_hash": records.manifest_hash(source.manifest()),
    }
    if adapters_only(run):
        identity["lora_base"] = str(Path(run.train.init_from).expanduser().absolute())
    return identity


def adapters_only(run: RunConfig) -> bool:
    """Whether the run's checkpoints hold only its LoRA adapters: the frozen base is a saved run
    (train.init_from), read again on resume instead of stored at every step."""
    return bool(run.lora.rank and run.train.init_from)


def saved_state(run: RunConfig, state: Any) -> Any:
    """The part of a TrainState (or of its shardings) that the run's checkpoints hold."""
    if not adapters_only(run):
        return state
    return state.replace(params=lora_lib.adapters(state.params))


def load_run_params(
    workdir: str | os.PathLike, run: RunConfig, step: int | None = None
) -> tuple[int, Any]:
    """(step, the model's parameters) of a run's latest (or given) checkpoint, a LoRA run's
    adapters joined to the base run they adapt."""
    step, params = checkpoint_lib.load_params(workdir, step)
    if adapters_only(run):
        _, base = checkpoint_lib.load_params(run.train.init_from, model=run.model)
        params = lora_lib.with_adapters(base, params)
    return step, params


def _agree_damaged(damaged: bool) -> bool:
    """Whether any process found the checkpoint damaged (each reads its own shards)."""
    if jax.process_count() == 1:
        return damaged
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(damaged))))


def initial_state(trainer: Trainer, state: TrainState) -> TrainState:
    """The freshly initialised `state` with train.init_from's parameters when it names a run, in
    the trainer's shardings; a LoRA run's adapters and a new task head (one the saved run lacks)
    keep their fresh initialisation."""
    run = trainer.run
    if not run.train.init_from:
        return state
    # Stacked or unrolled as this run's model.scan_layers asks, whichever way it was saved.
    _, params = checkpoint_lib.load_params(run.train.init_from, model=run.model)
    params = lora_lib.with_base(state.params, params)
    return state.replace(params=jax.device_put(params, trainer.shardings.params))


def restore_or_init(
    trainer: Trainer, state: TrainState, ckpt: checkpoint_lib.Checkpointer
) -> tuple[TrainState, int, dict[str, Any]]:
    """(state, first step, saved data state): the newest readable checkpoint, else
    `train.init_from`'s parameters, else the fresh state.

    A checkpoint that cannot be read is moved to `checkpoints_damaged/` with a warning and the one
    before is tried (unless train.resume_damaged is False); its data position comes with it, so
    the resumed run repeats exactly the steps after that checkpoint.
    """
    run = trainer.run
    abstract = checkpoint_lib.abstract_like(
        saved_state(run, state), saved_state(run, trainer.shardings)
    )
    for step in ckpt.steps():
        error: checkpoint_lib.CheckpointDamaged | None = None
        try:
            restored, data_state = ckpt.restore(step, abstract)
        except checkpoint_lib.CheckpointDamaged as err:
            error = err
        if not _agree_damaged(error is not None):
            if adapters_only(run):  # the saved adapters on the base run's parameters
                base = initial_state(trainer, state).params
                restored = restored.replace(params=lora_lib.with_adapters(base, restored.params))
            log.info("resumed from %s at step %d", ckpt.directory / str(step), step)
            return restored, step, data_state
        if not trainer.run.train.resume_damaged:
            cause = error or f"another process cannot restore {ckpt.directory / str(step)}"
            raise checkpoint_lib.CheckpointDamaged(
                f"{cause}. train.resume_damaged=false: move that directory away (or set it to "
                "true) to resume from the checkpoint before"
            )
        moved = ckpt.set_aside(step)
        older = [s for s in ckpt.steps() if s < step]
        log.warning(
            "skipping checkpoint step %d (%s): moved it to %s; resuming from %s "
            "(train.resume_damaged=false stops instead)",
            step,
            error or "unreadable on another process",
            moved,
            f"step {older[0]}" if older else "the start",
        )
    fresh = initial_state(trainer, state)
    if run.train.init_from:
        log.info("initialised parameters from %s", run.train.init_from)
    return fresh, 0, {}


# ------------------------------------------------------------------------------------- evaluate


class EvalSets:
    """The held-out batches of each phase's data settings, built once per run."""

    def __init__(self, source: DataSource) -> None:
        self.source = source
        self._sets: dict[DataConfig, list[dict[str, np.ndarray]]] = {}

    def batches(self, data: DataConfig) -> list[dict[str, np.ndarray]]:
        """This process's rows of every eval batch of `data`."""
        if data not in self._sets:
            self._sets[data] = list(self.source.dataset("eval", data))
        return self._sets[data]


def evaluate(trainer: Trainer, params: Any, batches: Sequence[dict[str, np.ndarray]]) -> dict:
    """The objective's metrics over all eval batches, each weighted by its real targets."""
    sums = [trainer.eval_step(params, parallel.global_batch(b, trainer.mesh)) for b in batches]
    return objectives.reduce_metrics(trainer.objective, jax.device_get(sums))


def check_finite(state: TrainState, step: int, run: RunConfig, ckpt: Any) -> None:
    """Raises NonFiniteLossError if a loss became NaN/Inf (unless such updates are skipped)."""
    bad = int(state.nonfinite_step)
    if bad >= 0 and not run.train.skip_nonfinite_or_spike:
        last = ckpt.latest_step()
        where = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
        raise NonFiniteLossError(
            f"the loss became NaN or Inf at step {bad + 1}; training stopped at step {step} "
            f"without saving. Last good checkpoint: {where}. Lower optim.learning_rate, check "
            "the data, or set train.skip_nonfinite_or_spike=true to skip such updates."
        )


def save(
    ckpt: checkpoint_lib.Checkpointer,
    step: int,
    state: TrainState,
    phase: Phase,
    iterator: DataIterator,
    run: RunConfig,
) -> None:
    """Saves the state and the data position at `step`, never a state with a NaN loss."""
    check_finite(state, step, run, ckpt)
    data_state = {"phase": phase.index, "iterator": iterator.get_state()}
    ckpt.save(step, saved_state(run, state), data_state, force=True)
    faults.at("save", step)  # the asynchronous write is under way


# ------------------------------------------------------------------------------------------ steps


class _StopSignal:
    """Turns SIGTERM and Ctrl-C into a flag checked between steps; the loop saves before exiting.

    sigterm_to_jax: leave SIGTERM to jax's preemption notifier (installed by
    `jax.distributed.initialize`, a C++ handler that a Python one would replace), and turn Ctrl-C
    into a SIGTERM to this process so that it reaches every host the same way.
    """

    def __init__(self, *, sigterm_to_jax: bool = False) -> None:
        self.received: str | None = None
        self.sigterm_to_jax = sigterm_to_jax
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        signals = (signal.SIGINT,) if self.sigterm_to_jax else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave handlers alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.received = signal.Signals(signum).name
        if self.sigterm_to_jax:
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _preemption_service() -> bool:
    """Whether jax's coordination service runs its preemption sync manager in this run."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


def _report_resume_step(step: int) -> None:
    """Tells jax's preemption sync manager the step this run resumes from, before it trains."""
    # The sync point is one past the furthest host's last reported step, and a host counts as at
    # step 0 until it first reports: a notice during the restore or the first compile would pick
    # step 1, which a resumed run has passed. Reported first, the resume step makes it the run's
    # first step. A notice before this (during data setup or init) still picks step 1: the run
    # then trains on until the scheduler kills it, losing the steps since the checkpoint it
    # resumed from.
    if jax.process_count() > 1 and _preemption_service():
        from jax.experimental import multihost_utils

        multihost_utils.reached_preemption_sync_point(step)


class _StopAgreement:
    """Decides after each step whether every process stops there; no per-step collective.

    One process: its own flag. Several: jax's preemption sync point (what orbax and MaxText
    use). A SIGTERM on any host is propagated by the coordination service in the background,
    which picks the step after the furthest host's as the one where all save;
    `reached_preemption_sync_point` is a local check until then. It is asked with the run's own
    step, not steps since start: orbax's `CheckpointManager.save` reports its step to the same
    manager. Without that service (`jax_enable_preemption_service=False`) processes compare flags
    at checkpoint steps only.
    """

    def __init__(self, stop: _StopSignal, checkpoint_every: int) -> None:
        self.stop = stop
        self.checkpoint_every = checkpoint_every
        self.multi = jax.process_count() > 1
        self.service = self.multi and _preemption_service()

    def __call__(self, done: int) -> bool:
        """Whether all processes stop after step `done` (called once per step, on all of them)."""
        from jax.experimental import multihost_utils

        if not self.multi:
            return self.stop.received is not None
        if self.service:
            return multihost_utils.reached_preemption_sync_point(done)
        if done % self.checkpoint_every:
            return False
        flag = np.array(self.stop.received is not None)
        return bool(np.any(multihost_utils.process_allgather(flag)))

    def reason(self) -> str:
        """What stopped the run, as far as this process knows."""
        if self.stop.received:
            return self.stop.received
        # jax's notifier, not jaxgen, takes a SIGTERM under the service: no host knows whose it was.
        if self.service:
            return "preemption notice (SIGTERM on this or another host)"
        return "SIGTERM on another host"


def _train_iterator(source: DataSource, phase: Phase, data_state: dict[str, Any]) -> DataIterator:
    """The phase's train stream, at the saved position when the checkpoint was taken in it."""
    iterator = source.dataset(
        "train", phase.data, global_batch_size=phase.batch_size, start_example=phase.start_example
    )
    if data_state.get("phase") == phase.index and "iterator" in data_state:
        iterator.set_state(data_state["iterator"])
    return iterator


def train_row(
    objective: StepObjective, pending: list[dict[str, Any]], tokens: int, seconds: float, steps: int
) -> dict[str, float]:
    """The train metrics of the steps since the last log: their means, the derived metrics,
    tokens/s and steps/s."""
    stacked = jax.device_get({k: jnp.stack([m[k] for m in pending]) for k in pending[0]})
    values = {k: float(np.mean(v)) for k, v in stacked.items()}
    values.update(objective.derived_metrics(values))
    seconds = max(seconds, 1e-9)
    values.update(tokens_per_sec=tokens / seconds, steps_per_sec=steps / seconds)
    return values


def eval_row(
    trainer: Trainer,
    state: TrainState,
    step: int,
    data: DataConfig,
    eval_sets: EvalSets,
    writer: MetricsWriter,
    ckpt: checkpoint_lib.Checkpointer,
) -> dict[str, Any]:
    """Evaluates the state, writes the eval row, keeps the best checkpoint; returns the row."""
    batches = eval_sets.batches(data)
    faults.at("eval", step)  # the eval set read, no eval row written
    metrics = evaluate(trainer, state.params, batches)
    ckpt.save_best(step, saved_state(trainer.run, state), metrics["loss"])
    return writer.write(step, "eval", metrics)


def drive(
    trainer: Trainer,
    state: TrainState,
    start: int,
    next_batch: Callable[[int], tuple[dict[str, np.ndarray], int]],
    evaluate: Callable[[int, TrainState], str | None],
    save_at: Callable[[int, TrainState], None],
    writer: MetricsWriter,
    ckpt: checkpoint_lib.Checkpointer,
    desc: str,
) -> TrainState:
    """Steps from `start` to train.num_steps on `next_batch(step) -> (this process's rows, global
    batch size)`: logs, `evaluate(done, state)` (a line to print, or None) and `save_at(done,
    state)` on their intervals and at the end; after SIGTERM/Ctrl-C on any host every process
    saves at the same step and Preempted is raised. Returns the final state."""
    run, train = trainer.run, trainer.run.train
    pending: list[dict[str, Any]] = []
    last_time, last_step, tokens = time.perf_counter(), start, 0
    bar = tqdm(
        total=train.num_steps,
        initial=start,
        desc=desc,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    try:
        multi = jax.process_count() > 1
        with _StopSignal(sigterm_to_jax=multi and _preemption_service()) as stop:
            agreed_stop = _StopAgreement(stop, train.checkpoint_every)
            for step in range(start, train.num_steps):
                local, batch_size = next_batch(step)
                tokens += trainer.objective.count_tokens(local) * jax.process_count()
                state, metrics = trainer.train_step(
                    state, parallel.global_batch(local, trainer.mesh)
                )
                pending.append(metrics)
                done = step + 1
                faults.at("step", done)
                last = done == train.num_steps
                if done % train.log_every == 0 or last:
                    check_finite(state, done, run, ckpt)
                    elapsed = time.perf_counter() - last_time
                    values = train_row(
                        trainer.objective, pending, tokens, elapsed, done - last_step
                    )
                    writer.write(done, "train", {**values, "batch_size": batch_size})
                    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
                    pending, last_time, last_step, tokens = [], time.perf_counter(), done, 0
                if done % train.eval_every == 0 or last:
                    check_finite(state, done, run, ckpt)
                    line = evaluate(done, state)
                    if line:
                        bar.write(line)
                if done % train.checkpoint_every == 0 or last:
                    save_at(done, state)
                bar.update(1)
                if agreed_stop(done):
                    save_at(done, state)
                    ckpt.wait()
                    raise Preempted(
                        f"{agreed_stop.reason()} received: saved a checkpoint at step {done} in "
                        f"{ckpt.directory}; run the same command again to resume"
                    )
    finally:
        bar.close()
    return state


def run_steps(
    trainer: Trainer,
    state: TrainState,
    start: int,
    phases: Sequence[Phase],
    data_state: dict[str, Any],
    source: DataSource,
    eval_sets: EvalSets,
    writer: MetricsWriter,
    ckpt: checkpoint_lib.Checkpointer,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains from `start` to train.num_steps through the batch-ramp phases (`drive`), saving the
    data position with each checkpoint. Returns the state and the eval rows."""
    phase = next((p for p in phases if p.start <= start < p.end), phases[-1])
    eval_rows = (
        [eval_row(trainer, state, 0, phase.data, eval_sets, writer, ckpt)] if not start else []
    )
    iterator = _train_iterator(source, phase, data_state)

    def next_batch(step: int) -> tuple[dict[str, np.ndarray], int]:
        nonlocal phase, iterator
        if step >= phase.end:
            phase = phases[phase.index + 1]
            iterator = _train_iterator(source, phase, {})
        faults.at("data", step + 1)
        return faults.poison(next(iterator), step + 1), phase.batch_size

    def evaluate(done: int, state: TrainState) -> str:
        row = eval_row(trainer, state, done, phase.data, eval_sets, writer, ckpt)
        eval_rows.append(row)
        return f"step {done}: eval loss {float(row['loss']):.4f}"

    def save_at(done: int, state: TrainState) -> None:
        save(ckpt, done, state, phase, iterator, trainer.run)

    state = drive(trainer, state, start, next_batch, evaluate, save_at, writer, ckpt,
                  f"train {trainer.run.family}")  # fmt: skip
    return state, eval_rows


# ------------------------------------------------------------------------------------------ train


def prepare_workdir(run: RunConfig, workdir: Path) -> None:
    """Creates the workdir and writes config.json; refuses to resume with other model or data
    settings (other changes are logged)."""
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    if saved.exists() and (workdir / "checkpoints").exists():
        old = config_lib.load_saved_config(saved).to_dict()
        changes = config_lib.diff(old, run.to_dict())
        fatal = [c for c in changes if c.startswith(("model.", "data."))]
        if fatal:
            raise config_lib.ConfigError(
                f"{workdir} holds a run with a different model or data config "
                f"({'; '.join(fatal)}); use a new --workdir, or the saved settings"
            )
        for change in changes:
            log.warning("resuming with a changed setting: %s", change)
    if jax.process_index() == 0:
        config_lib.save_config(run, saved)


def train(run: RunConfig, workdir: str | Path) -> list[dict[str, Any]]:
    """Trains (or resumes) the run in `workdir` to train.num_steps; returns the eval rows."""
    workdir = Path(workdir)
    prepare_workdir(run, workdir)
    mesh = parallel.make_mesh(run.mesh)
    phases = plan_phases(run, batch_granule(run, mesh))
    source = DataSource(run, workdir)
    trainer, state = build_trainer(run, mesh)
    # Made after the config has been checked: its directory marks the workdir as holding a run.
    ckpt = checkpoint_lib.Checkpointer(
        workdir,
        max_to_keep=run.train.max_to_keep,
        keep_best=run.train.keep_best,
        identity=run_identity(run, source),
    )
    try:
        _report_resume_step(ckpt.latest_step() or 0)
        state, start, data_state = restore_or_init(trainer, state, ckpt)
        writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
        try:
            state, eval_rows = run_steps(
                trainer, state, start, phases, data_state, source, EvalSets(source), writer, ckpt
            )
        finally:
            writer.close()
        ckpt.wait()
        if jax.process_index() == 0:
            (workdir / "DONE").write_text(f"{run.train.num_steps}\n")
    finally:
        ckpt.close()
    return eval_rows
