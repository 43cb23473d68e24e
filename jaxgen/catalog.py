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

import functools
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxgen import models, parallel
from jaxgen.config import REPO_ROOT
from jaxgen.objectives import span_corruption
from jaxgen.train import optim as optim_lib

FAMILIES = ("bert", "gpt", "t5")
FORMATS = ("table", "json", "markdown")
GIB = 2**30
# HBM per JAX device. v2/v3: a device is one TensorCore and "vN-K" has K of them; v4/v5p: a device
# is a chip (two cores as one, megacore) and "vN-K" counts cores, so K/2 devices; v5e/v6e count
# chips.
TPU_HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
CORES_PER_DEVICE = {"v2": 1, "v3": 1, "v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Model keys that never change a parameter shape: normalised away so shape traces are shared and
# cheap.
SHAPE_FREE = {"dtype": "float32", "remat": False, "attention": "xla", "dropout": 0.0,
              "attention_dropout": 0.0}  # fmt: skip


# ------------------------------------------------------------------------------------------- names


def configs_dir() -> Path:
    """The folder with bert.py, gpt.py and t5.py: ./configs if it has them, else the repo's."""
    for candidate in (Path.cwd() / "configs", REPO_ROOT / "configs"):
        if all((candidate / f"{family}.py").is_file() for family in FAMILIES):
            return candidate
    raise FileNotFoundError(
        f"no configs/ folder with {FAMILIES} files in {Path.cwd()} or {REPO_ROOT}"
    )


@functools.cache
def load_family(family: str) -> ModuleType:
    """Imports configs/<family>.py (it is a file, not a package module)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    path = configs_dir() / f"{family}.py"
    spec = importlib.util.spec_from_file_location(f"jaxgen_catalog_{family}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_name(name: str) -> tuple[str, str]:
    """'configs/bert.py:base', 'bert.py:base' or 'bert:base' -> ('bert', 'base'); default smoke."""
    path, _, arg = name.partition(":")
    family = Path(path).name.removesuffix(".py")
    if family not in FAMILIES:
        raise ValueError(f"unknown config {name!r}; names look like configs/bert.py:base")
    return family, arg or "smoke"


def config_name(family: str, arg: str) -> str:
    """The canonical name, which is also the `--config` spec: configs/<family>.py:<arg>."""
    return f"configs/{family}.py:{arg}"


def list_names(family: str | None = None) -> list[str]:
    """Every catalogued config name, in table order (one family, or all)."""
    families = FAMILIES if family is None else (family,)
    return [config_name(f, arg) for f in families for arg in load_family(f).list_rows()]


def load_row(name: str) -> ml_collections.ConfigDict:
    """The config of one named row."""
    family, arg = parse_name(name)
    return load_family(family).get_config(arg)


# ----------------------------------------------------------------------------------- shape tracing


def _shape_key(model_config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    items = {**dict(model_config.items()), **SHAPE_FREE}
    return tuple(sorted(items.items()))


@functools.cache
def _abstract_params_cached(key: tuple[tuple[str, Any], ...]) -> Any:
    model_config = dict(key)
    module = models.build(model_config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    family = model_config["family"]
    if family == "bert":
        init = lambda x: module.init(rngs, x, x, x)  # input_ids, segment_ids, attention_mask
    elif family == "gpt":
        init = lambda x: module.init(rngs, x)
    else:
        init = lambda x: module.init(rngs, x, x)  # encoder and decoder ids
    return jax.eval_shape(init, ids)["params"]


def abstract_params(model_config: Mapping[str, Any]) -> Any:
    """The parameter pytree of the model as ShapeDtypeStructs in logical-axis boxes (no memory)."""
    return _abstract_params_cached(_shape_key(model_config))


def _depths(model_config: Mapping[str, Any]) -> list[str]:
    return (
        ["num_layers", "num_decoder_layers"] if model_config["family"] == "t5" else ["num_layers"]
    )


def extrapolate_over_depth(
    model_config: Mapping[str, Any], stat: Callable[[Any], tuple[float, ...]]
) -> tuple[float, ...]:
    """`stat(abstract_params)` at the full depth, from traces at depth 1 and 2 of each stack.

    Valid for any stat that is a sum over parameter leaves (counts, bytes): all layers of a stack
    have the same leaves, so it is affine in each stack's depth.
    """
    config = dict(model_config.items())
    keys = _depths(config)
    ones = {k: 1 for k in keys}
    base = stat(abstract_params({**config, **ones}))
    total = list(base)
    for k in keys:
        depth = int(config[k])
        if depth == 1:
            continue
        deeper = stat(abstract_params({**config, **ones, k: 2}))
        total = [t + (depth - 1) * (d - b) for t, d, b in zip(total, deeper, base, strict=True)]
    return tuple(total)


def _leaf_sizes(tree: Any) -> list[int]:
    return [math.prod(x.shape) for x in jax.tree.leaves(parallel.strip_boxes(tree))]


def count_params(model_config: Mapping[str, Any]) -> int:
    """The model's parameter count, from `jax.eval_shape` of its init (see the module docstring)."""
    (count,) = extrapolate_over_depth(model_config, lambda tree: (sum(_leaf_sizes(tree)),))
    return int(round(count))


def count_params_full_depth(model_config: Mapping[str, Any]) -> int:
    """The parameter count from one trace at the full depth (slower; checks the extrapolation)."""
    return sum(_leaf_sizes(abstract_params(model_config)))


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


def _optimizer_bytes(tree: Any, config: ml_collections.ConfigDict) -> tuple[float]:
    optimizer = optim_lib.make_optimizer(config.optim, config.train.num_steps)
    state = jax.eval_shape(optimizer.init, parallel.strip_boxes(tree))
    return (sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)),)


def activation_bytes(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> float:
    """Activation bytes kept for the backward pass of one micro-batch on one device (an estimate).

    Counting of Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4), generalised to
    any d_ff, attention width and cross-attention: per layer, the inputs of every matmul, norm and
    nonlinearity plus dropout masks (1 byte); attention scores and their dropout only with the XLA
    kernel (flash keeps none); tensor parallelism splits the head and MLP terms. With remat only
    each layer's input is kept, plus one layer's activations while it is recomputed. Plus the
    float32 logits and their gradient.
    """
    model, data, train = config.model, config.data, config.train
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
    gated = model.get("feed_forward", "") == "gated-gelu"

    def attention(s: int, s_kv: int) -> float:
        matmul_inputs = el * s * h + el * inner * (s + 2 * s_kv) / t + el * s * inner / t
        return matmul_inputs + mask * s * h + score_bytes * heads * s * s_kv / t

    def mlp(s: int) -> float:
        return el * s * h + el * s * ff * (3 if gated else 2) / t + mask * s * h

    def norms(s: int, n: int) -> float:
        return n * el * s * h

    phases = list(train.phases) or [{}]
    seq = max(int(p.get("seq_len", data.seq_len)) for p in phases)
    vocab_split = t if model.vocab_size % t == 0 else 1
    if model.family == "t5":
        _, dec = span_corruption.input_and_target_lengths(
            seq, data.noise_density, data.mean_noise_span_length
        )
        layers = [(model.num_layers, seq, attention(seq, seq) + mlp(seq) + norms(seq, 2))]
        dec_layer = attention(dec, dec) + attention(dec, seq) + mlp(dec) + norms(dec, 3)
        layers.append((model.num_decoder_layers, dec, dec_layer))
        logits = dec * model.vocab_size * 8 / vocab_split
    else:
        layers = [(model.num_layers, seq, attention(seq, seq) + mlp(seq) + norms(seq, 2))]
        if model.family == "bert":  # the MLM head scores the masked positions only
            predictions = max(int(p.get("max_predictions", data.max_predictions)) for p in phases)
            logits = predictions * model.vocab_size * 8 / vocab_split
        else:
            logits = seq * model.vocab_size * 8 / vocab_split
    if model.remat:
        kept = sum(n * el * s * h for n, s, _ in layers) + max(
            per_layer for _, _, per_layer in layers
        )
    else:
        kept = sum(n * per_layer for n, _, per_layer in layers)
    return micro * (kept + logits)


def memory_estimate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Per-device bytes of params, grads, optimizer state and activations on the row's hardware.

    Params, grads and optimizer state are float32 and sharded by `parallel.LOGICAL_RULES` (optimizer
    state is assumed to shard like its params; Adafactor's factored rows and columns are counted
    from the real optax state); a second grad buffer is counted when accumulating micro-batches.
    """
    devices, hbm = hardware_devices(config.hardware)
    shape = parallel.mesh_shape(config.mesh, devices)
    sizes = dict(zip(parallel.MESH_AXES, shape, strict=True))
    total, per_device = extrapolate_over_depth(config.model, lambda tr: _param_stats(tr, sizes))
    (optimizer_total,) = extrapolate_over_depth(
        config.model, lambda tr: _optimizer_bytes(tr, config)
    )
    optimizer = optimizer_total * per_device / total
    grads = per_device * (2 if config.train.grad_accum > 1 else 1)
    activations = activation_bytes(config, sizes)
    estimate = {
        "hardware": config.hardware,
        "devices": devices,
        "mesh": sizes,
        "micro_batch_per_device": max(
            1, config.train.batch_size // (config.train.grad_accum * sizes["data"] * sizes["fsdp"])
        ),
        "params_bytes": per_device,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activation_bytes": activations,
        "total_bytes": per_device + grads + optimizer + activations,
        "hbm_bytes": hbm,
    }
    return estimate


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
    config = load_row(name)
    model, optim, train = config.model, config.optim, config.train
    params = count_params(model)
    reference = config.published_params or config.released_params
    entry = {
        "name": name,
        "family": model.family,
        "num_layers": model.num_layers,
        "d_model": model.d_model,
        "num_heads": model.num_heads,
        "head_dim": model.head_dim,
        "d_ff": model.d_ff,
        "vocab_size": model.vocab_size,
        "max_len": model.max_len,
        "seq_len": config.data.seq_len,
        "params": params,
        "published_params": config.published_params,
        "released_params": config.released_params,
        "ratio": round(params / reference, 4) if reference else None,
        "batch_size": train.batch_size,
        "num_steps": train.num_steps,
        "learning_rate": optim.learning_rate,
        "optimizer": optim.name,
        "schedule": optim.schedule,
        "warmup_steps": optim.warmup_steps,
        "hardware": config.hardware,
    }
    if model.family == "t5":
        entry["num_decoder_layers"] = model.num_decoder_layers
        entry["recipe"] = config.recipe
    return entry


COLUMNS = ("name", "layers", "d_model", "heads", "head_dim", "d_ff", "vocab", "context", "params",
           "published", "released", "ratio", "batch", "steps", "lr", "schedule")  # fmt: skip


def _cells(entry: dict[str, Any]) -> list[str]:
    layers = str(entry["num_layers"])
    if entry["family"] == "t5":
        layers += f"+{entry['num_decoder_layers']}"
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
    config = load_family(family).get_config(arg)
    params = count_params(config.model)
    lines = [f"# {config_name(family, arg)}", str(config).rstrip(), ""]
    line = f"params: {params:,} ({_human(params)})"
    for label, reference in (
        ("published", config.published_params),
        ("released", config.released_params),
    ):
        if reference:
            line += f"; {label} {_human(reference)} (ratio {params / reference:.3f})"
    lines.append(line)
    try:
        est = memory_estimate(config)
    except ValueError as err:  # a mesh that does not fit the named hardware
        lines.append(f"memory estimate unavailable: {err}")
        return "\n".join(lines) + "\n"
    mesh = " ".join(f"{k}={v}" for k, v in est["mesh"].items())
    lines.append(
        f"per device on {est['hardware']} ({est['devices']} devices, mesh {mesh}, "
        f"micro-batch {est['micro_batch_per_device']} sequences, {config.model.dtype} activations, "
        f"remat {config.model.remat}):"
    )
    labels = {"params_bytes": "params (float32)", "grads_bytes": "grads (float32)",
              "optimizer_bytes": f"optimizer state ({config.optim.name})",
              "activation_bytes": "activations (estimate)", "total_bytes": "total"}  # fmt: skip
    for key, label in labels.items():
        lines.append(f"  {label:<28} {est[key] / GIB:9.2f} GiB")
    if est["hbm_bytes"]:
        lines.append(f"  {'HBM per device':<28} {est['hbm_bytes'] / GIB:9.2f} GiB")
    return "\n".join(lines) + "\n"
