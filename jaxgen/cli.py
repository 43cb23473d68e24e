"""`jaxgen` command line: every argument parser of every command; each command calls plain
library functions (`jaxgen.train.loop`, `jaxgen.tools.*`, `jaxgen.interop.hf`)."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxgen import host


class UsageError(ValueError):
    """Arguments a command does not take; the message names them."""


def _config_overrides(extra: list[str], command: str) -> list[str]:
    """The `--config.a.b=v` arguments; anything else is an error naming it."""
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        raise UsageError(f"jaxgen {command}: unrecognized arguments: {' '.join(unknown)}")
    return extra


def _metric(key: str, value: object) -> str:
    return f"{key}={value:.4g}" if isinstance(value, (int, float)) else f"{key}={value}"


def _no_extra(extra: list[str], command: str) -> None:
    if extra:
        raise UsageError(f"jaxgen {command}: unrecognized arguments: {' '.join(extra)}")


# ------------------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import distributed

    overrides = _config_overrides(extra, "train")
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from jaxgen import config as config_lib
    from jaxgen import objectives
    from jaxgen.train import finetune, loop

    run = config_lib.load_config(args.config, overrides)
    try:
        if objectives.is_task(run):  # a config whose data names a task fine-tunes on it
            results = finetune.finetune(run, args.workdir)
            lines = [(f"best eval (step {results['best_step']} of {results['num_steps']})",
                      results["best"]), ("last eval", results["last"])]  # fmt: skip
        else:
            rows = loop.train(run, args.workdir)
            lines = [("final eval", rows[-1])] if rows else []
    except loop.Preempted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    for label, row in lines:
        print(f"{label}: " + ", ".join(_metric(k, v) for k, v in row.items() if k != "split"))
    return 0


def _cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import config as config_lib
    from jaxgen.data import prepare

    overrides = [a for a in extra if a.startswith("--config.")]
    runner_args = [a for a in extra if not a.startswith("--config.")]
    if runner_args and args.runner != "beam":
        raise UsageError(
            f"jaxgen prepare: unrecognized arguments: {' '.join(runner_args)} (pipeline options "
            "are for --runner beam)"
        )
    run = config_lib.load_config(args.config, overrides)
    output = prepare.prepare(
        run,
        args.input,
        args.output,
        num_shards=args.num_shards,
        workers=args.workers,
        runner=args.runner,
        runner_args=runner_args,
        seed=args.seed,
        tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 2**20),
    )
    print(f"prepared {output}: train with --config.data.corpus={output}")
    return 0


def _cmd_configs(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.tools import catalog

    _no_extra(extra, "configs")
    if args.action == "list":
        fmt = "json" if args.json else "markdown" if args.markdown else "table"
        print(catalog.list_configs(args.family, fmt))
        return 0
    if not args.name:
        raise SystemExit("jaxgen configs show NAME (e.g. bert.py:base); see `jaxgen configs list`")
    print(catalog.show_config(args.name))
    return 0


def _cmd_checkpoints(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import config as config_lib
    from jaxgen.train import checkpoint, loop

    _no_extra(extra, "checkpoints")
    workdir = Path(args.workdir)
    saved = workdir / "config.json"
    expected = loop.config_hash(config_lib.load_saved_config(saved)) if saved.is_file() else None
    checks = checkpoint.verify(workdir, expected)
    if not checks:
        raise checkpoint.CheckpointError(f"no complete checkpoint in {workdir}")
    width = max(len(c.directory) for c in checks)
    print(f"{'directory':<{width}}  {'step':>8}  {'status':<9}  detail")
    for c in checks:
        print(f"{c.directory:<{width}}  {c.step:>8}  {c.status:<9}  {c.detail}")
    bad = [c for c in checks if c.status != "good"]
    if bad:
        print(f"{len(bad)} of {len(checks)} checkpoints cannot be resumed from", file=sys.stderr)
    return 1 if bad else 0


def _cmd_compile(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.tools import compile as aot

    overrides = _config_overrides(extra, "compile")
    aot.use_host_platform()  # before any backend starts: the target's devices are compile-only
    import json

    from jaxgen import config as config_lib

    run = config_lib.load_config(args.config, overrides)
    target = aot.parse_target(args.topology or run.meta.hardware, args.num_slices)
    report = aot.compile_run(run, target)
    print(json.dumps(report.to_json(), indent=2) if args.json else aot.format_report(report))
    failure = report.failure()
    if failure is not None and args.json:
        print(f"jaxgen compile: {failure}", file=sys.stderr)
    return 0 if failure is None else 1


# `jaxgen sample` flag -> the sampler keyword it sets (flags not given keep the samplers' defaults)
SAMPLE_SETTINGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                   "seed": "seed", "gibbs_steps": "num_sweeps", "gibbs_order": "order",
                   "beam_size": "num_beams", "length_penalty": "alpha"}  # fmt: skip


def _cmd_sample(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.tools import generate

    _no_extra(extra, "sample")
    given = vars(args)
    settings = {key: given[flag] for flag, key in SAMPLE_SETTINGS.items() if flag in given}
    lengths = {k: given[k] for k in ("num_samples", "max_new_tokens", "length") if k in given}
    texts = generate.generate(args.workdir, args.prompt, greedy=args.greedy, **lengths, **settings)
    for text in texts:
        print(text)
    return 0


def _cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.interop import hf

    _no_extra(extra, "convert")
    if args.src_format == "hf":
        if not args.src:
            raise hf.InteropError("--from hf needs --src DIR (a HuggingFace model directory)")
        workdir = hf.import_workdir(args.src, args.workdir)
        print(f"wrote {workdir} (step 0): sample with `jaxgen sample --workdir {workdir}`, or "
              f"continue pretraining with --config.train.init_from={workdir}")  # fmt: skip
        return 0
    if not args.dst:
        raise hf.InteropError("--to hf needs --dst DIR (the output directory)")
    step = hf.export_workdir(args.workdir, args.dst)
    print(f"exported step {step} of {args.workdir} to {args.dst}")
    return 0


def _cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.tools import sweep

    overrides = _config_overrides(extra, "sweep")
    if not args.sweep and not args.sweep_file:
        raise sweep.SweepError("give at least one --sweep KEY=V1,V2 or a --sweep_file")
    points = sweep.load_sweep_file(args.sweep_file) if args.sweep_file else None
    tpu = None
    if args.launch == "tpu":
        from jaxgen.tools.launch import TpuVm

        tpu = TpuVm(args.tpu_name or "", args.zone or "", args.accelerator, args.version,
                    args.spot, args.project)  # fmt: skip
    results = sweep.run_sweep(
        args.config,
        args.sweep,
        args.workdir,
        overrides,
        args.parallel,
        points=points,
        metric=args.metric,
        mode=args.mode,
        launch=args.launch,
        tpu=tpu,
        dry_run=args.dry_run,
    )
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_launch(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from jaxgen.tools import launch

    overrides = _config_overrides(extra, "launch")
    try:
        if args.target == "tpu":
            vm = launch.TpuVm(args.name, args.zone, args.accelerator, args.version, args.spot,
                              args.project)  # fmt: skip
            if args.delete:
                return launch.delete_tpu(vm, dry_run=args.dry_run)
            if not args.config or not args.workdir:
                raise launch.LaunchError(
                    "jaxgen launch tpu needs --config and --workdir (or --delete)"
                )
            return launch.launch_tpu(
                vm, args.config, args.workdir, overrides, dry_run=args.dry_run, stream=args.stream
            )
        script = launch.slurm_script(
            args.config, args.workdir, overrides, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, job_name=args.job_name, partition=args.partition,
            time=args.time, port=args.port, python=args.python,
        )  # fmt: skip
        if args.dry_run:
            print(script, end="")
            return 0
        # sbatch needs the --output folder to exist before the job starts.
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return launch.launch_slurm(
            script, args.script or Path(args.workdir) / "launch.sbatch", submit=args.submit
        )
    except launch.LaunchError as err:
        print(f"jaxgen launch: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------- parsers


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (automatic on TPU slices and under SLURM)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    group.add_argument("--num_processes", type=int, default=None)
    group.add_argument("--process_id", type=int, default=None)


def _default(function: Callable[..., Any], name: str) -> Any:
    """The default of a keyword of `function`: help texts quote it, flags never restate it."""
    return inspect.signature(function).parameters[name].default


def _add_train(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train or resume a run",
        epilog="Override any config key: --config.optim.learning_rate=3e-4 "
        "--config.model.num_layers=2",
    )
    train.add_argument(
        "--config", required=True, help="configs/<family>.py:<row>, e.g. configs/bert.py:smoke"
    )
    train.add_argument(
        "--workdir", required=True, help="run directory (resumes if it has checkpoints)"
    )
    _add_distributed_flags(train)
    train.set_defaults(func=_cmd_train)


def _add_checkpoints(sub: Any) -> None:
    checkpoints = sub.add_parser(
        "checkpoints",
        help="verify a workdir's checkpoints without training",
        epilog="Reads every array of each checkpoint (one at a time, in host memory); exits 1 "
        "when any is damaged or belongs to another run.",
    )
    checkpoints.add_argument("action", choices=["verify"])
    checkpoints.add_argument("--workdir", required=True, help="a run directory")
    checkpoints.set_defaults(func=_cmd_checkpoints)


def _add_compile(sub: Any) -> None:
    compile_ = sub.add_parser(
        "compile",
        help="compile a row's train and eval steps for a TPU slice or GPU host, on this machine",
        epilog="Targets: v4-1024, v5e-256, v5p-128, v6e-64, v3-64, v5e:2x2, h100x8, h100:2x8, cpu. "
        "Needs the tpu-compile or gpu-compile extra. Override any config key as for train.",
    )
    compile_.add_argument("--config", required=True, help="configs/<family>.py:<row>")
    compile_.add_argument(
        "--topology", default=None, help="target name (default: the row's meta.hardware)"
    )
    compile_.add_argument("--num_slices", type=int, default=1, help="multi-slice TPU targets")
    compile_.add_argument("--json", action="store_true", help="one JSON object on stdout")
    compile_.set_defaults(func=_cmd_compile)


def _add_prepare(sub: Any) -> None:
    from jaxgen.data import prepare

    parser = sub.add_parser(
        "prepare",
        help="write a corpus as sharded ArrayRecord files of a family's records",
        epilog="--config.a.b=v overrides the data settings; with --runner beam, other arguments "
        "are Beam pipeline options (e.g. --runner=DataflowRunner --project=... --region=...).",
    )
    parser.add_argument("--config", required=True, help="configs/<family>.py:<row>")
    parser.add_argument(
        "--input", action="append", required=True,
        help="files, directories or globs (local or gs://), BERT-format text or JSONL, optionally "
        ".gz; 'builtin' for the built-in corpus; repeatable",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="the prepared directory (or gs:// URL)")
    per_shard = prepare.DEFAULT_SHARD_BYTES >> 20
    parser.add_argument("--num_shards", type=int, default=None,
                        help=f"default: one per {per_shard} MiB of input")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="local worker processes")
    parser.add_argument("--runner", choices=("local", "beam"), default="local")
    parser.add_argument("--seed", type=int, default=None, help="default: the row's train.seed")
    parser.add_argument(
        "--tokenizer_sample_mb", type=float,
        default=prepare.DEFAULT_TOKENIZER_SAMPLE_BYTES / 2**20,
        help="train the tokenizer on a seeded sample of this much train text",
    )  # fmt: skip
    parser.set_defaults(func=_cmd_prepare)


def _add_configs(sub: Any) -> None:
    from jaxgen.objectives import FAMILIES

    configs = sub.add_parser("configs", help="list or show the built-in configs")
    configs.add_argument("action", choices=("list", "show"))
    configs.add_argument("name", nargs="?", help="for show: e.g. bert.py:base")
    configs.add_argument("--family", choices=FAMILIES)
    fmt = configs.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    configs.set_defaults(func=_cmd_configs)


def _add_sample(sub: Any) -> None:
    from jaxgen import sample as samplers
    from jaxgen.tools.generate import generate

    sample = sub.add_parser(
        "sample",
        help="generate text from a trained run",
        argument_default=argparse.SUPPRESS,  # flags not given keep the samplers' own defaults
    )
    sample.add_argument("--workdir", required=True)
    sample.add_argument(
        "--prompt", default="", help="GPT/BERT prompt, or T5 input with <extra_id_N>"
    )
    sample.add_argument("--greedy", action="store_true", default=False, help="argmax decoding")
    for flag, what in (("num_samples", "texts"), ("max_new_tokens", "GPT/T5: tokens to generate"),
                       ("length", "BERT: tokens to generate")):  # fmt: skip
        sample.add_argument(
            f"--{flag}", type=int, help=f"{what}, default {_default(generate, flag)}"
        )
    gpt = samplers.sample_gpt
    sample.add_argument("--temperature", type=float, help=f"default {_default(gpt, 'temperature')}")
    sample.add_argument("--top_k", type=int, help=f"default {_default(gpt, 'top_k')} (off)")
    sample.add_argument("--top_p", type=float, help=f"default {_default(gpt, 'top_p')} (off)")
    sample.add_argument("--seed", type=int, help=f"default {_default(gpt, 'seed')}")
    sample.add_argument("--beam_size", type=int, help="GPT/T5: beam search with this many beams")
    sample.add_argument("--length_penalty", type=float,
                        help="GPT/T5 beam search: t5x's brevity penalty alpha, default "
                        f"{_default(samplers.beam_search_t5, 'alpha')} (none)")  # fmt: skip
    gibbs = samplers.gibbs_bert
    sample.add_argument(
        "--gibbs_steps", type=int, help=f"BERT: sweeps, default {_default(gibbs, 'num_sweeps')}"
    )
    sample.add_argument(
        "--gibbs_order", choices=("sequential", "parallel"),
        help=f"BERT: default {_default(gibbs, 'order')}",
    )  # fmt: skip
    sample.set_defaults(func=_cmd_sample)


def _add_convert(sub: Any) -> None:
    convert = sub.add_parser("convert", help="import/export HuggingFace-format checkpoints")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="src_format", choices=("hf",))
    direction.add_argument("--to", dest="dst_format", choices=("hf",))
    convert.add_argument("--src", help="HuggingFace model directory (with --from hf)")
    convert.add_argument("--dst", help="output directory (with --to hf)")
    convert.add_argument("--workdir", required=True, help="jaxgen run directory")
    convert.set_defaults(func=_cmd_convert)


def _add_tpu_vm_flags(parser: Any, name_flag: str, required: bool) -> None:
    parser.add_argument(name_flag, required=required, default=None, help="TPU VM name")
    parser.add_argument("--zone", required=required, default=None, help="e.g. us-central2-b")
    parser.add_argument("--accelerator", default="v4-8", help="accelerator type, e.g. v4-32")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
    parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")


def _add_sweep(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of config overrides, one workdir per point, and summarise",
        epilog="Extra --config.a.b=v arguments apply to every point.",
    )
    sweep.add_argument("--config", required=True, help="configs/<family>.py:<row>")
    sweep.add_argument("--workdir", required=True, help="sweep folder; one subfolder per point")
    sweep.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                       help="swept config key and its values (repeat for a grid)")  # fmt: skip
    sweep.add_argument("--sweep_file", default=None, help="Python file with get_sweep() -> list")
    sweep.add_argument("--parallel", type=int, default=1, help="points run at once (local)")
    sweep.add_argument("--launch", choices=("local", "tpu"), default="local")
    sweep.add_argument("--dry-run", "--dry_run", action="store_true", help="print commands only")
    sweep.add_argument("--metric", default="eval/loss", help="ranks the summary, e.g. eval/loss")
    sweep.add_argument("--mode", choices=("min", "max"), default="min")
    tpu = sweep.add_argument_group("--launch tpu (one TPU VM per point: NAME-<index>)")
    _add_tpu_vm_flags(tpu, "--tpu_name", required=False)
    sweep.set_defaults(func=_cmd_sweep)


def _add_launch(sub: Any) -> None:
    launch = sub.add_parser("launch", help="start training on Cloud TPU or a SLURM cluster")
    targets = launch.add_subparsers(dest="target", required=True)
    tpu = targets.add_parser(
        "tpu",
        help="create/reuse a TPU VM slice, install jaxgen on all workers and train",
        epilog="Extra --config.a.b=v arguments are passed to `jaxgen train` on every worker.",
    )
    _add_tpu_vm_flags(tpu, "--name", required=True)
    tpu.add_argument("--config", help="configs/<family>.py:<row>")
    tpu.add_argument("--workdir", help="gs://bucket/run (shared by all workers)")
    tpu.add_argument(
        "--no-stream", dest="stream", action="store_false", help="don't follow the log"
    )
    tpu.add_argument("--delete", action="store_true", help="delete the TPU VM and exit")
    tpu.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    tpu.set_defaults(func=_cmd_launch)

    slurm = targets.add_parser(
        "slurm",
        help="write (and --submit) an sbatch script for N GPU nodes",
        epilog="Extra --config.a.b=v arguments are passed to `jaxgen train`.",
    )
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="wall-clock limit, e.g. 24:00:00")
    slurm.add_argument("--job-name", default="jaxgen")
    slurm.add_argument("--port", type=int, default=None, help="coordinator port (default: job id)")
    slurm.add_argument("--python", default="python", help="python on the compute nodes")
    slurm.add_argument("--script", default=None, help="where to write it (WORKDIR/launch.sbatch)")
    slurm.add_argument("--config", required=True, help="configs/<family>.py:<row>")
    slurm.add_argument("--workdir", required=True, help="run directory on the shared filesystem")
    slurm.add_argument("--submit", action="store_true", help="run sbatch on the script")
    slurm.add_argument("--dry-run", action="store_true", help="print the script only")
    slurm.set_defaults(func=_cmd_launch)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every jaxgen command."""
    parser = argparse.ArgumentParser(
        prog="jaxgen", description="Pretrain BERT, GPT and T5 with JAX/Flax."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_prepare, _add_configs, _add_sample, _add_convert, _add_sweep,
                _add_launch, _add_compile, _add_checkpoints):  # fmt: skip
        add(sub)
    return parser


def _exit_now(code: int) -> None:
    """Ends the process after a handled error without running interpreter shutdown: threads of
    an abandoned checkpoint read (tensorstore) would print tracebacks into the error's output."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `jaxgen` console script."""
    if argv is None:  # a real process start (tests call main(argv) in-process)
        host.reexec_with_hugepages()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # an imported library may have set up the root logger already
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = args.func(args, extra)
    except Exception as err:
        # jaxgen's own errors carry a message meant for the user; anything else keeps its traceback.
        if type(err).__module__.startswith("jaxgen") or isinstance(err, ValueError):
            if args.verbose:
                raise
            print(f"jaxgen: {type(err).__name__}: {err}", file=sys.stderr)
            code = 2 if type(err).__name__ in ("ConfigError", "UsageError") else 1
            if argv is None:
                _exit_now(code)
        else:
            raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
