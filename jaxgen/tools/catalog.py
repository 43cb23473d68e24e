"""The config catalog behind `jaxgen configs list|show`: every row of configs/{bert,gpt,t5}.py.

A config is named by the spec `jaxgen train --config` takes, `configs/<family>.py:<row>` (e.g.
`configs/bert.py:base`, `configs/t5.py:t5-base,final`); `show_config` also accepts `bert.py:base`
and `bert:base`. Config files are found in ./configs when it holds all three, else in the configs/
folder next to the jaxgen package (the repository of an editable install).

Parameter counts come from `jax.eval_shape` of the real model's `init` (shapes only, no memory).
All layers of a stack have the same parameter shapes, so the model is traced at depth 1 and 2 per
stack and the counts are extrapolated linearly to the full depth: exact (tests compare with
full-depth traces) and fast enough to tabulate GPT-3 175B. Memory per device is an estimate,
explained in `memory_estimate` and `activation_bytes`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_collections

from jaxgen import config as config_lib
from jaxgen import models, objectives, parallel
from jaxgen.config import REPO_ROOT, RunConfig
from jaxgen.models.config import ModelConfig
from jaxgen.train import optim as optim_lib
from jaxgen.train import step as step_lib

FORMATS = ("table", "json", "markdown")
GIB = 2**30
# HBM per JAX device. v2/v3: a device is one TensorCore and "vN-K" has K of them; v4/v5p: a device
# is a chip (two cores as one, megacore) and "vN-K" counts cores, so K/2 devices; v5e/v6e count
# chips.
TPU_HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
CORES_PER_DEVICE = {"v2": 1, "v3": 1, "v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Model keys that never change a parameter count or how it shards: normalised away so shape traces
# are shared and cheap. scan_layers only stacks each layer's leaves on an unsharded `layers` axis,
# and the depth-1 traces of `extrapolate_over_depth` cannot scan GPT-3's (dense, local) pairs.
SHAPE_FREE = {"dtype": "float32", "remat": False, "attention": "xla", "dropout": 0.0,
              "attention_dropout": 0.0, "scan_layers": False}  # fmt: skip


# ------------------------------------------------------------------------------------------- names


def configs_dir() -> Path:
    """The folder with a config file per family: ./configs if it has them, else the repo's."""
    for candidate in (Path.cwd() / "configs", REPO_ROOT / "configs"):
        if all((candidate / f"{name}.py").is_file() for name in objectives.FAMILIES):
            return candidate
    raise FileNotFoundError(
        f"no configs/ folder with {objectives.FAMILIES} files in {Path.cwd()} or {REPO_ROOT}"
    )


@functools.cache
def load_family(family: str) -> ModuleType:
    """Imports configs/<family>.py (it is a file, not a package module)."""
    objectives.get(family)  # an unknown family fails here, naming the valid ones
    return config_lib.load_python_file(configs_dir() / f"{family}.py")


def parse_name(name: str) -> tuple[str, str]:
    """'configs/bert.py:base', 'bert.py:base' or 'bert:base' -> ('bert', 'base'); default smoke."""
    path, _, arg = name.partition(":")
    family = Path(path).name.removesuffix(".py")
    try:
        objectives.get(family)
    except ValueError:
        raise ValueError(f"unknown config {name!r}; names look like configs/bert.py:base") from None
    return family, arg or "smoke"


def config_name(family: str, arg: str) -> str:
    """The canonical name, which is also the `--config` spec: configs/<family>.py:<arg>."""
    return f"configs/{family}.py:{arg}"


def list_names(family: str | None = None) -> list[str]:
    """Every catalogued config name, in table order (one family, or all)."""
    families = objectives.FAMILIES if family is None else (family,)
    return [config_name(f, arg) for f in families for arg in load_family(f).list_rows()]


def load_row(name: str) -> ml_collections.ConfigDict:
    """The ConfigDict of one named row."""
    family, arg = parse_name(name)
    return load_family(family).get_config(arg)


def load_run(name: str) -> RunConfig:
    """The typed config of one named row."""
    return config_lib.run_config(load_row(name))


# ----------------------------------------------------------------------------------- shape tracing


@functools.cache
def _abstract_params_cached(model: ModelConfig) -> Any:
    objective = objectives.get(model.family)
    data = objective.Data(seq_len=min(8, model.max_len))
    return step_lib.abstract_params(models.build(model), objective, data)


def abstract_params(model: ModelConfig) -> Any:
    """The parameter pytree of the model as ShapeDtypeStructs in logical-axis boxes (no memory)."""
    return _abstract_params_cached(dataclasses.replace(model, **SHAPE_FREE))


def extrapolate_over_depth(
    model: ModelConfig, stat: Callable[[Any], tuple[float, ...]]
) -> tuple[float, ...]:
    """`stat(abstract_params)` at the full depth, from traces at depth 1 and 2 of each stack.

    Valid for any stat that is a sum over parameter leaves (counts, bytes): all layers of a stack
    have the same leaves, so it is affine in each stack's depth.
    """
    depths = model.stack_depths
    ones = {k: 1 for k in depths}
    base = stat(abstract_params(dataclasses.replace(model, **ones)))
    total = list(base)
    for key, depth in depths.items():
        if depth == 1:
            continue
        deeper = stat(abstract_params(dataclasses.replace(model, **{**ones, key: 2})))
        total = [t + (depth - 1) * (d - b) for t, d, b in zip(total, deeper, base, strict=True)]
    return tuple(total)


def _leaf_sizes(tree: Any) -> list[int]:
    return [math.prod(x.shape) for x in jax.tree.leaves(parallel.strip_boxes(tree))]


def count_params(model: ModelConfig) -> int:
    """The model's parameter count, from `jax.eval_shape` of its init (see the module docstring)."""
    (count,) = extrapolate_over_depth(model, lambda tree: (sum(_leaf_sizes(tree)),))
    return int(round(count))


def count_params_full_depth(model: ModelConfig) -> int:
    """The parameter count from one trace at the full depth (slower; checks the extrapolation)."""
    return sum(_leaf_sizes(abstract_params(model)))


# ------------------------------------------------------------------------------------------ memory


def hardware_devices(hardware: str) -> tuple[int, int | None]:
    """'v3-64' -> (64 devices, 16 GiB HBM each); 'v4-1024' -> (512, 32 GiB); 'cpu' -> (1, None)."""
    match = re.fullmatch(r"(v\d+[a-z]*?)(?:litepod)?-(\d+)", hardware)
    if not match:
        return 1, None
    generation, cores = match.group(1), int(match.group(2))
    generation = "v5e" if hardware.startswith("v5litepod") else generation
    if generation not in TPU_HBM_GIB:
        raise ValueError(
            f"unknown TPU generation in hardware={hardware!r}; known: {list(TPU_HBM_GIB)}"
        )
    return cores // CORES_PER_DEVICE[generation], TPU_HBM_GIB[generation] * GIB


def _param_stats(tree: Any, sizes: Mapping[str, int]) -> tuple[float, float]:
    """(float32 bytes in all, float32 bytes per device) of a boxed parameter tree on a mesh."""
    leaves = jax.tree.leaves(parallel.strip_boxes(tree))
    specs = jax.tree.leaves(
        parallel.logical_partition_specs(tree, sizes),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    total = per_device = 0.0
    for leaf, spec in zip(leaves, specs, strict=True):
        size = math.prod(leaf.shape) * 4
        total += size
        per_device += size / parallel.shard_count(spec, sizes)
    return total, per_device


def _optimizer_bytes(tree: Any, run: RunConfig) -> tuple[float]:
    optimizer = optim_lib.make_optimizer(run.optim, run.train.num_steps)
    state = jax.eval_shape(optimizer.init, parallel.strip_boxes(tree))
    return (sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)),)


def activation_bytes(run: RunConfig, sizes: Mapping[str, int]) -> float:
    """Activation bytes kept for the backward pass of one micro-batch on one device (an estimate).

    Counting of Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4), generalised to
    any d_ff, attention width and cross-attention: per layer, the inputs of every matmul, norm and
    nonlinearity plus dropout masks (1 byte); attention scores and their dropout only with the XLA
    kernel (flash keeps none); tensor parallelism splits the head and MLP terms. With remat only
    each layer's input is kept, plus one layer's activations while it is recomputed. Plus the
    float32 logits of the scored positions and their gradient. Lengths are the longest phase's.
    """
    model, train = run.model, run.train
    objective = objectives.get(model.family)
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = max(1, train.batch_size // (train.grad_accum * batch_shards))
    t = sizes["tensor"]
    el = 2 if model.dtype == "bfloat16" else 4
    h, inner, ff, heads = (
        model.d_model,
        model.num_heads * model.head_dim,
        model.d_ff,
        model.num_heads,
    )
    mask = 1 if model.dropout > 0 else 0
    score_bytes = (
        0 if model.attention != "xla" else el + ((1 + el) if model.attention_dropout > 0 else 0)
    )
    gated = model.feed_forward == "gated-gelu"

    def attention(s: int, s_kv: int) -> float:
        matmul_inputs = el * s * h + el * inner * (s + 2 * s_kv) / t + el * s * inner / t
        return matmul_inputs + mask * s * h + score_bytes * heads * s * s_kv / t

    def mlp(s: int) -> float:
        return el * s * h + el * s * ff * (3 if gated else 2) / t + mask * s * h

    lengths: dict[str, int] = {}
    for phase in train.phases or ({"fraction": 1.0},):
        for key, value in objective.sequence_lengths(run.phase_data(phase)).items():
            lengths[key] = max(lengths.get(key, 0), value)
    layers = []
    for depth_key, sequence, cross in model.stacks:
        s, src = lengths[sequence], lengths["inputs"]
        per_layer = attention(s, s) + mlp(s) + (2 + cross) * el * s * h  # + norms
        if cross:
            per_layer += attention(s, src)
        layers.append((getattr(model, depth_key), s, per_layer))
    vocab_split = t if model.vocab_size % t == 0 else 1
    logits = lengths["scored"] * model.vocab_size * 8 / vocab_split
    if model.remat:
        kept = sum(n * el * s * h for n, s, _ in layers) + max(p for _, _, p in layers)
    else:
        kept = sum(n * per_layer for n, _, per_layer in layers)
    return micro * (kept + logits)


def memory_estimate(run: RunConfig) -> dict[str, Any]:
    """Per-device bytes of params, grads, optimizer state and activations on the row's hardware.

    Params, grads and optimizer state are float32 and sharded by `parallel.LOGICAL_RULES` (optimizer
    state is assumed to shard like its params; Adafactor's factored rows and columns are counted
    from the real optax state); a second grad buffer is counted when accumulating micro-batches.
    """
    devices, hbm = hardware_devices(run.meta.hardware)
    shape = parallel.mesh_shape(run.mesh, devices)
    sizes = dict(zip(parallel.MESH_AXES, shape, strict=True))
    total, per_device = extrapolate_over_depth(run.model, lambda tr: _param_stats(tr, sizes))
    (optimizer_total,) = extrapolate_over_depth(run.model, lambda tr: _optimizer_bytes(tr, run))
    optimizer = optimizer_total * per_device / total
    grads = per_device * (2 if run.train.grad_accum > 1 else 1)
    activations = activation_bytes(run, sizes)
    return {
        "hardware": run.meta.hardware,
        "devices": devices,
        "mesh": sizes,
        "micro_batch_per_device": max(
            1, run.train.batch_size // (run.train.grad_accum * sizes["data"] * sizes["fsdp"])
        ),
        "params_bytes": per_device,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activation_bytes": activations,
        "total_bytes": per_device + grads + optimizer + activations,
        "hbm_bytes": hbm,
    }


# ------------------------------------------------------------------------------------------ tables


def _human(n: float) -> str:
    """110106428 -> '110M', 1542000000 -> '1.54B' (three significant digits); 0 -> '-'."""
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def catalog_entry(name: str) -> dict[str, Any]:
    """One row of the catalog as a JSON-ready dict (`params` computed from the model)."""
    run = load_run(name)
    model, optim, train, meta = run.model, run.optim, run.train, run.meta
    params = count_params(model)
    reference = meta.published_params or meta.released_params
    entry = {
        "name": name,
        "family": model.family,
        **model.stack_depths,
        "d_model": model.d_model,
        "num_heads": model.num_heads,
        "head_dim": model.head_dim,
        "d_ff": model.d_ff,
        "vocab_size": model.vocab_size,
        "max_len": model.max_len,
        "seq_len": run.data.seq_len,
        "params": params,
        "published_params": meta.published_params,
        "released_params": meta.released_params,
        "ratio": round(params / reference, 4) if reference else None,
        "batch_size": train.batch_size,
        "num_steps": train.num_steps,
        "learning_rate": optim.learning_rate,
        "optimizer": optim.name,
        "schedule": optim.schedule,
        "warmup_steps": optim.warmup_steps,
        "hardware": meta.hardware,
    }
    if meta.recipe:
        entry["recipe"] = meta.recipe
    return entry


COLUMNS = ("name", "layers", "d_model", "heads", "head_dim", "d_ff", "vocab", "context", "params",
           "published", "released", "ratio", "batch", "steps", "lr", "schedule")  # fmt: skip


def _cells(entry: dict[str, Any]) -> list[str]:
    layers = "+".join(str(entry[k]) for k in ("num_layers", "num_decoder_layers") if k in entry)
    ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}"
    schedule = entry["schedule"]
    if entry["warmup_steps"]:
        schedule += f", warmup {entry['warmup_steps']:,}"
    e = entry
    return [
        e["name"], layers, str(e["d_model"]), str(e["num_heads"]), str(e["head_dim"]),
        str(e["d_ff"]), f"{e['vocab_size']:,}", str(e["seq_len"]), _human(e["params"]),
        _human(e["published_params"]), _human(e["released_params"]), ratio,
        f"{entry['batch_size']}x{entry['seq_len']}", f"{entry['num_steps']:,}",
        f"{entry['learning_rate']:g}", f"{entry['optimizer']} {schedule}",
    ]  # fmt: skip


def list_configs(family: str | None = None, fmt: str = "table") -> str:
    """The catalog as text: an aligned table, a JSON list of dicts, or a Markdown table (README).

    `ratio` is params / published (params / released where nothing was published); `context` and the
    batch's second factor are data.seq_len (T5: the encoder length).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    entries = [catalog_entry(name) for name in list_names(family)]
    if fmt == "json":
        return json.dumps(entries, indent=2)
    rows = [list(COLUMNS)] + [_cells(e) for e in entries]
    if fmt == "markdown":
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def show_config(name: str) -> str:
    """The whole resolved config of one row, its parameter count and per-device memory estimate."""
    family, arg = parse_name(name)
    run = load_run(config_name(family, arg))
    params = count_params(run.model)
    lines = [
        f"# {config_name(family, arg)}",
        str(ml_collections.ConfigDict(run.to_dict())).rstrip(),
    ]
    line = f"params: {params:,} ({_human(params)})"
    for label, reference in (
        ("published", run.meta.published_params),
        ("released", run.meta.released_params),
    ):
        if reference:
            line += f"; {label} {_human(reference)} (ratio {params / reference:.3f})"
    lines += ["", line]
    try:
        est = memory_estimate(run)
    except ValueError as err:  # a mesh that does not fit the named hardware
        lines.append(f"memory estimate unavailable: {err}")
        return "\n".join(lines) + "\n"
    mesh = " ".join(f"{k}={v}" for k, v in est["mesh"].items())
    lines.append(
        f"per device on {est['hardware']} ({est['devices']} devices, mesh {mesh}, "
        f"micro-batch {est['micro_batch_per_device']} sequences, {run.model.dtype} activations, "
        f"remat {run.model.remat}):"
    )
    labels = {"params_bytes": "params (float32)", "grads_bytes": "grads (float32)",
              "optimizer_bytes": f"optimizer state ({run.optim.name})",
              "activation_bytes": "activations (estimate)", "total_bytes": "total"}  # fmt: skip
    for key, label in labels.items():
        lines.append(f"  {label:<28} {est[key] / GIB:9.2f} GiB")
    if est["hbm_bytes"]:
        lines.append(f"  {'HBM per device':<28} {est['hbm_bytes'] / GIB:9.2f} GiB")
    return "\n".join(lines) + "\n"
