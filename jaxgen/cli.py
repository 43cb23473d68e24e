"""`jaxgen` command line: argument parsing only; every command calls into the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxgen import host


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (automatic on TPU slices and under SLURM)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    group.add_argument("--num_processes", type=int, default=None)
    group.add_argument("--process_id", type=int, default=None)


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from jaxgen import config as config_lib
    from jaxgen.train import loop

    config = config_lib.load_config(args.config, extra)
    try:
        rows = loop.train(config, args.workdir)
    except loop.Preempted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    if rows:
        print(
            "final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items() if k != "split")
        )
    return 0


def _cmd_configs(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import catalog

    if extra:
        raise SystemExit(f"unexpected arguments: {' '.join(extra)}")
    if args.action == "list":
        fmt = "json" if args.json else "markdown" if args.markdown else "table"
        print(catalog.list_configs(args.family, fmt))
    else:
        if not args.name:
            raise SystemExit(
                "jaxgen configs show NAME (e.g. bert.py:base); see `jaxgen configs list`"
            )
        print(catalog.show_config(args.name))
    return 0


def _cmd_sample(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen import sample

    if extra:
        raise SystemExit(f"unexpected arguments: {' '.join(extra)}")
    for text in sample.sample_from_workdir(args):
        print(text)
    return 0


def _cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    from jaxgen.interop import hf

    if extra:
        raise SystemExit(f"unexpected arguments: {' '.join(extra)}")
    return hf.convert_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every jaxgen command."""
    parser = argparse.ArgumentParser(
        prog="jaxgen", description="Pretrain BERT, GPT and T5 with JAX/Flax."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train or resume a run",
        epilog=(
            "Override any config key: --config.optim.learning_rate=3e-4 --config.model.num_layers=2"
        ),
    )
    train.add_argument(
        "--config", required=True, help="configs/<family>.py:<row>, e.g. configs/bert.py:smoke"
    )
    train.add_argument(
        "--workdir", required=True, help="run directory (resumes if it has checkpoints)"
    )
    _add_distributed_flags(train)
    train.set_defaults(func=_cmd_train)

    configs = sub.add_parser("configs", help="list or show the built-in configs")
    configs.add_argument("action", choices=("list", "show"))
    configs.add_argument("name", nargs="?", help="for show: e.g. bert.py:base")
    configs.add_argument("--family", choices=("bert", "gpt", "t5"))
    fmt = configs.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    configs.set_defaults(func=_cmd_configs)

    sample = sub.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("--workdir", required=True)
    sample.add_argument(
        "--prompt", default="", help="GPT/BERT prompt, or T5 input with <extra_id_N>"
    )
    sample.add_argument("--max_new_tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top_k", type=int, default=0)
    sample.add_argument("--top_p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num_samples", type=int, default=1)
    sample.add_argument("--greedy", action="store_true", help="argmax decoding (GPT/T5)")
    sample.add_argument("--gibbs_steps", type=int, default=50, help="BERT: resampling sweeps")
    sample.add_argument("--gibbs_order", choices=("sequential", "parallel"), default="parallel")
    sample.add_argument("--length", type=int, default=32, help="BERT: tokens to generate")
    sample.set_defaults(func=_cmd_sample)

    convert = sub.add_parser("convert", help="import/export HuggingFace-format checkpoints")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="src_format", choices=("hf",))
    direction.add_argument("--to", dest="dst_format", choices=("hf",))
    convert.add_argument("--src", help="HuggingFace model directory (with --from hf)")
    convert.add_argument("--dst", help="output directory (with --to hf)")
    convert.add_argument("--workdir", required=True, help="jaxgen run directory")
    convert.set_defaults(func=_cmd_convert)

    for name in ("sweep", "launch"):
        try:
            module = __import__(f"jaxgen.{name}", fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `jaxgen` console script."""
    if argv is None:  # a real process start (tests call main(argv) in-process)
        host.reexec_with_hugepages()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown and args.command in ("train",):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = args.func(args, extra)
    except Exception as err:
        # jaxgen's own errors carry a message meant for the user; anything else keeps its traceback.
        if type(err).__module__.startswith("jaxgen") or isinstance(err, ValueError):
            if args.verbose:
                raise
            print(f"jaxgen: {type(err).__name__}: {err}", file=sys.stderr)
            code = 2 if type(err).__name__ == "ConfigError" else 1
        else:
            raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
