"""`jaxgen compile`: a row's train and eval steps compiled for a named TPU slice or GPU host, on a
machine that has neither.

The mesh is built over compile-only devices of the target (libtpu's topology description for TPU,
XLA's deviceless GPU client from a shipped device description for H100), the trainer is built by
`loop.build_trainer` exactly as `jaxgen train` builds it (on compile-only devices its state stays
abstract, see `step.create_train_state`), and each step is lowered from ShapeDtypeStructs in their
shardings and compiled. Nothing runs. The compiler's per-device bytes (`memory_analysis`) say
whether the row fits the device's HBM; a row that does not fit usually fails inside the compiler
already, with its own RESOURCE_EXHAUSTED message.

Target names (`--topology`, default the row's `meta.hardware`):
  v2-N v3-N v4-N v5p-N   N counts TensorCores (two per chip). v2/v3 have a JAX device per core;
                         v4/v5p one per chip, its two cores run as one ("megacore"): v4-8 has 4.
  v5e-N v6e-N            N counts chips, one core and one JAX device each (v5litepod-N is v5e-N).
  v5e:2x2, v4:2x2x1 ...  libtpu topology strings: chips along each axis of the slice.
  h100x8, h100:2x8       H100 SXM GPUs: G on one host, or H hosts x G per host.
  cpu                    this machine's own devices, host memory shared among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxgen import parallel
from jaxgen.config import DataConfig, RunConfig
from jaxgen.tools import catalog
from jaxgen.train import loop

log = logging.getLogger("jaxgen")

TARGETS_DIR = Path(__file__).with_name("targets")
GPU_TARGETS = {"h100": TARGETS_DIR / "h100_sxm.txtpb"}
EXTRAS = {
    "tpu": ("libtpu", "tpu-compile", "jax[tpu]==0.10.2"),
    "cuda": ("jax_plugins.xla_cuda12", "gpu-compile", "jax[cuda12]==0.10.2"),
}
VALID_FORMS = (
    "v2-N, v3-N, v4-N, v5p-N (N TensorCores: v3-8, v4-1024, v5p-128), v5e-N, v6e-N (N chips: "
    "v5e-256, v6e-64), a libtpu topology (v5e:2x2, v4:2x2x1, v3:4x4), h100xG or h100:HxG (H hosts "
    "of G GPUs: h100x8, h100:2x8), cpu"
)


class CompileError(ValueError):
    """A target that cannot be named or built (bad name, missing extra)."""


# ----------------------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """How a TPU generation's slices are shaped: what libtpu needs beyond the topology string.

    pod: the extent of a full pod along each axis of a 2-D generation; an axis that long wraps
    around (a torus), shorter ones do not. 3-D generations wrap every axis from 4x4x4 chips up.
    """

    prefix: str
    dims: int
    cores_per_chip: int
    min_chips: int
    max_chips: int
    pod: tuple[int, ...] = ()


# HBM per device and cores per device come from catalog.TPU_HBM_GIB / CORES_PER_DEVICE.
TPU_GENERATIONS = {
    "v2": TpuGeneration("v2", 2, 2, 4, 256, (16, 16)),
    "v3": TpuGeneration("v3", 2, 2, 4, 1024, (32, 32)),
    "v4": TpuGeneration("v4", 3, 2, 4, 4096),
    "v5p": TpuGeneration("v5p", 3, 2, 4, 8960),
    "v5e": TpuGeneration("v5e", 2, 1, 1, 256, (16, 16)),
    "v6e": TpuGeneration("v6e", 2, 1, 1, 256, (16, 16)),
}
# Below 64 chips a 3-D slice is one of these; from 64 up its axes are multiples of 4.
SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to compile for: how to make its compile-only devices, and their memory.

    topology: libtpu's string ('v5e:2x2'), or the GPU client's 'slices x hosts x GPUs' ('1x1x8').
    hbm_bytes: per device (None for cpu: host memory is read when the devices are made).
    """

    name: str
    platform: str
    topology: str = ""
    num_devices: int = 0
    hbm_bytes: int | None = None
    num_slices: int = 1
    chip_config: str = ""
    chips_per_host_bounds: tuple[int, int, int] = (1, 1, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)


def slice_shape(generation: str, chips: int) -> tuple[int, ...]:
    """The chips along each axis of a slice: 2-D the squarest power-of-two grid, 3-D the most
    cube-like grid of multiples of 4 (the shapes Cloud TPU offers, e.g. v4 512 chips: 8x8x8)."""
    gen = TPU_GENERATIONS[generation]
    if gen.dims == 2:
        log2 = chips.bit_length() - 1
        if chips != 1 << log2 or chips == 2:
            raise ValueError(f"{chips} chips")
        return (1 << (log2 // 2), 1 << (log2 - log2 // 2))
    if chips in SMALL_3D:
        return SMALL_3D[chips]
    if chips % 64:
        raise ValueError(f"{chips} chips")
    units = chips // 64  # 4x4x4 blocks
    grids = [
        (a, b, units // (a * b))
        for a in range(1, units + 1)
        for b in range(a, units // a + 1)
        if units % (a * b) == 0 and units // (a * b) >= b
    ]
    # Most cube-like: the shortest longest axis, then the smallest perimeter (MaxText's table of
    # Cloud TPU shapes follows this rule: v5p 4608 chips is 12x16x24, not 8x24x24).
    a, b, c = min(grids, key=lambda grid: (max(grid), sum(grid)))
    return (4 * a, 4 * b, 4 * c)


def _wrap(generation: str, shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
    gen = TPU_GENERATIONS[generation]
    if gen.dims == 2:
        return (shape[0] == gen.pod[0], shape[1] == gen.pod[1], False)
    return (all(extent % 4 == 0 for extent in shape),) * 3


def _valid_sizes(generation: str) -> str:
    gen = TPU_GENERATIONS[generation]
    sizes = []
    for chips in range(gen.min_chips, gen.max_chips + 1):
        with contextlib.suppress(ValueError):
            slice_shape(generation, chips)
            sizes.append(chips * gen.cores_per_chip)
    shown = sizes if len(sizes) <= 10 else [*sizes[:6], "...", sizes[-1]]
    return ", ".join(str(s) for s in shown)


def _tpu_target(name: str, generation: str, shape: tuple[int, ...], num_slices: int) -> Target:
    gen = TPU_GENERATIONS[generation]
    chips = math.prod(shape)
    devices_per_chip = gen.cores_per_chip // catalog.CORES_PER_DEVICE[generation]
    return Target(
        name=name,
        platform="tpu",
        topology=f"{gen.prefix}:{'x'.join(str(s) for s in shape)}",
        num_devices=chips * devices_per_chip * num_slices,
        hbm_bytes=catalog.TPU_HBM_GIB[generation] * catalog.GIB,
        num_slices=num_slices,
        # megacore: libtpu runs a chip's two cores as one device, as v4/v5p VMs do.
        chip_config="megacore" if catalog.CORES_PER_DEVICE[generation] > 1 else "default",
        chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1),
        wrap=_wrap(generation, shape),
    )


def _gpu_target(name: str, model: str, hosts: int, gpus: int, num_slices: int) -> Target:
    text = GPU_TARGETS[model].read_text()
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    return Target(
        name=name,
        platform="cuda",
        topology=f"{num_slices}x{hosts}x{gpus}",
        num_devices=num_slices * hosts * gpus,
        hbm_bytes=int(memory.group(1)) if memory else None,
        num_slices=num_slices,
    )


def parse_target(name: str, num_slices: int = 1) -> Target:
    """The target a name stands for (see the module docstring); ValueError names the valid forms."""
    if num_slices < 1:
        raise CompileError(f"--num_slices must be >= 1, got {num_slices}")
    text = name.strip().lower()
    if text == "cpu":
        if num_slices != 1:
            raise CompileError("--num_slices is for TPU and GPU targets, not cpu")
        return Target(name="cpu", platform="cpu")
    gpu = re.fullmatch(r"([a-z]\d+)(?:x(\d+)|:(\d+)x(\d+))", text)
    if gpu and gpu.group(1) in GPU_TARGETS:
        hosts, gpus = (1, gpu.group(2)) if gpu.group(2) else (gpu.group(3), gpu.group(4))
        return _gpu_target(text, gpu.group(1), int(hosts), int(gpus), num_slices)
    raw = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)+)", text)
    named = re.fullmatch(r"(v\d+[a-z]?|v5litepod)-(\d+)", text)
    if raw:
        generation = "v5p" if raw.group(1) == "v5" else raw.group(1)
        shape = tuple(int(s) for s in raw.group(2).split("x"))
        if generation in TPU_GENERATIONS:
            if len(shape) != TPU_GENERATIONS[generation].dims:
                example = _tpu_target("", generation, slice_shape(generation, 4), 1).topology
                raise CompileError(
                    f"{name!r}: {generation} topologies have {TPU_GENERATIONS[generation].dims} "
                    f"axes, e.g. {example}"
                )
            return _tpu_target(text, generation, shape, num_slices)
    elif named:
        generation = "v5e" if named.group(1) == "v5litepod" else named.group(1)
        if generation in TPU_GENERATIONS:
            gen = TPU_GENERATIONS[generation]
            cores = int(named.group(2))
            chips = cores // gen.cores_per_chip
            try:
                if cores % gen.cores_per_chip or not gen.min_chips <= chips <= gen.max_chips:
                    raise ValueError(f"{chips} chips")
                shape = slice_shape(generation, chips)
            except ValueError:
                raise CompileError(
                    f"no {generation} slice is named {name!r}; {generation}-N takes N in "
                    f"{_valid_sizes(generation)}"
                ) from None
            return _tpu_target(f"{generation}-{cores}", generation, shape, num_slices)
    raise CompileError(f"unknown target {name!r}; valid forms: {VALID_FORMS}")


# ----------------------------------------------------------------------------------------- devices


def use_host_platform() -> None:
    """Keeps jax on the CPU backend: compile-only devices come from their own clients, and a TPU
    or GPU on this machine is never opened. Call before anything touches a jax backend."""
    jax.config.update("jax_platforms", "cpu")


def require_extra(platform: str) -> None:
    """Raises CompileError naming the pip command when the target platform's compiler is missing."""
    if platform not in EXTRAS:
        return
    module, extra, package = EXTRAS[platform]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (jax_plugins)
        found = False
    if not found:
        raise CompileError(
            f"compiling for {platform.upper()} needs {package}: pip install '{package}' (the "
            f"'{extra}' extra: pip install -e '.[{extra}]')"
        )


@contextlib.contextmanager
def _libtpu_environment(target: Target) -> Iterator[None]:
    """The variables libtpu reads when it starts, set only while it starts (they would tell
    `jaxgen.distributed` this is a TPU VM).

    ALLOW_MULTIPLE_LIBTPU_LOAD: compile-only processes share no chip, so several may run at once
    (libtpu otherwise locks /tmp/libtpu_lockfile). The rest keep it from querying the GCE metadata
    server and from logging errors about a TPU VM it is not on.
    """
    names = {
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": target.name.replace("v5e-", "v5litepod-"),
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
    }
    previous = {name: os.environ.get(name) for name in names}
    for name, value in names.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def target_devices(target: Target) -> list[jax.Device]:
    """The target's devices: compile-only for TPU and GPU, this host's own for cpu."""
    if target.platform == "cpu":
        return jax.devices()
    require_extra(target.platform)
    from jax.experimental import topologies

    if target.platform == "tpu":
        with _libtpu_environment(target):
            topology = topologies.get_topology_desc(
                topology_name=target.topology,
                platform="tpu",
                chip_config_name=target.chip_config,
                chips_per_host_bounds=target.chips_per_host_bounds,
                num_slices=target.num_slices,
                wrap=target.wrap,
            )
    else:
        model = target.name.split(":")[0].split("x")[0]
        # "cuda", never "gpu": the alias resolves only against initialised backends (jax #23971).
        topology = topologies.get_topology_desc(
            platform="cuda",
            target_config=GPU_TARGETS[model].read_text(),
            topology=target.topology,
        )
    return list(topology.devices)


def _host_memory_per_device(num_devices: int) -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // num_devices


# ----------------------------------------------------------------------------------------- compile


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compiled step: its batch, the compiler's bytes per device, FLOPs and times.

    total_bytes: arguments + outputs - aliased (the donated state) + temporaries, the peak the
    compiler plans for (generated code aside). flops: per device, from cost_analysis (None where
    the compiler gives none: deviceless GPU). error: the compiler's message when it failed.
    """

    step: str
    phase: int
    batch_size: int
    lengths: dict[str, int]
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    total_bytes: int = 0
    flops: float | None = None
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """A row compiled for a target: its steps, the HBM they must fit, and the verdict."""

    config: str
    target: Target
    device_kind: str
    mesh: dict[str, int]
    hbm_bytes: int
    steps: tuple[StepReport, ...]

    @property
    def peak_bytes(self) -> int:
        """The largest step's total bytes per device."""
        return max((s.total_bytes for s in self.steps), default=0)

    @property
    def fits(self) -> bool:
        """Every step compiled and fits the device's memory."""
        return all(s.error is None for s in self.steps) and self.peak_bytes <= self.hbm_bytes

    def failure(self) -> str | None:
        """Why the row does not fit or compile, naming the row, the target and its HBM."""
        if self.fits:
            return None
        where = f"{self.config} on {self.target.name} (HBM {_bytes(self.hbm_bytes)} per device)"
        for step in self.steps:
            if step.error is not None:
                kind = "does not fit" if _out_of_memory(step.error) else "does not compile"
                return f"{where} {kind}: the {step.step} step failed to compile: {step.error}"
        worst = max(self.steps, key=lambda s: s.total_bytes)
        return (
            f"{where} does not fit: the {worst.step} step needs {_bytes(worst.total_bytes)} per "
            f"device, {_bytes(worst.total_bytes - self.hbm_bytes)} more than HBM"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        target = self.target
        return {
            "config": self.config,
            "target": target.name,
            "platform": target.platform,
            "topology": target.topology,
            "num_slices": target.num_slices,
            "num_devices": math.prod(self.mesh.values()),
            "device_kind": self.device_kind,
            "mesh": self.mesh,
            "hbm_bytes": self.hbm_bytes,
            "peak_bytes": self.peak_bytes,
            "headroom_bytes": self.hbm_bytes - self.peak_bytes,
            "fits": self.fits,
            "error": self.failure(),
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }


def _out_of_memory(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def _bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; negative numbers keep their sign."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def step_shapes(run: RunConfig, mesh: jax.sharding.Mesh) -> list[tuple[int, DataConfig, int]]:
    """[(first phase, data, largest train batch)] per distinct data setting of the run's phases.

    The trainer compiles each phase's (data, batch size); a batch ramp's smaller batches need less
    memory than the full one, so the largest batch of each data setting is the one to check.
    """
    phases = loop.plan_phases(run, loop.batch_granule(run, mesh))
    shapes: dict[DataConfig, tuple[int, int]] = {}
    for phase in phases:
        first, batch = shapes.get(phase.data, (phase.index, 0))
        shapes[phase.data] = (first, max(batch, phase.batch_size))
    return [(first, data, batch) for data, (first, batch) in shapes.items()]


def _abstract_batch(objective: Any, data: DataConfig, batch_size: int, mesh: Any) -> dict:
    sharding = parallel.batch_sharding(mesh)
    return {
        key: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
        for key, spec in objective.batch_spec(data, batch_size).items()
    }


def _compile_step(
    jitted: Any, args: Sequence[Any], mesh: Any, report: StepReport, label: str
) -> StepReport:
    """Lowers and compiles a jitted step from abstract args; `report` with the compiler's bytes."""
    log.info("compiling the %s ...", label)
    start = time.perf_counter()
    try:
        with parallel.mesh_context(mesh):
            lowered = jitted.lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
    except Exception as err:  # the compiler's message is the answer (OOM, unsupported op, ...)
        log.debug("compiling the %s failed", label, exc_info=True)
        message = f"{type(err).__name__}: {err}".strip()
        return dataclasses.replace(report, error=message)
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    step = dataclasses.replace(
        report,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        total_bytes=memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
        flops=float(cost["flops"]) if cost and "flops" in cost else None,
        lower_seconds=round(lowered_at - start, 2),
        compile_seconds=round(done - lowered_at, 2),
    )
    log.info("compiled the %s in %.1f s: %s per device", label, done - start,
             _bytes(step.total_bytes))  # fmt: skip
    return step


def compile_run(run: RunConfig, target: Target) -> CompileReport:
    """Compiles the run's train step (each data setting's largest batch) and eval step for the
    target; compiler failures are recorded in the steps, not raised."""
    devices = target_devices(target)
    mesh = parallel.make_mesh(run.mesh, devices)
    sizes = dict(zip(parallel.MESH_AXES, mesh.devices.shape, strict=True))
    hbm = target.hbm_bytes or _host_memory_per_device(len(devices))
    log.info("%s on %s: %d x %s, mesh %s", run.meta.name or run.family, target.name,
             len(devices), devices[0].device_kind, sizes)  # fmt: skip
    trainer, state = loop.build_trainer(run, mesh)
    steps = []
    shapes = step_shapes(run, mesh)
    for i, (phase, data, batch_size) in enumerate(shapes):
        lengths = dict(trainer.objective.sequence_lengths(data))
        where = f"phase {phase}" if len(shapes) > 1 else "run"
        train = StepReport("train", phase, batch_size, lengths)
        batch = _abstract_batch(trainer.objective, data, batch_size, mesh)
        label = f"train step ({i + 1}/{len(shapes)}: {where}, batch {batch_size})"
        steps.append(_compile_step(trainer.train_step.jitted, (state, batch), mesh, train, label))
        # Evaluation reads train.batch_size rows per batch in every phase, all at once.
        eval_batch = _abstract_batch(trainer.objective, data, run.train.batch_size, mesh)
        evaluation = StepReport("eval", phase, run.train.batch_size, lengths)
        label = f"eval step ({i + 1}/{len(shapes)}: {where}, batch {run.train.batch_size})"
        steps.append(
            _compile_step(
                trainer.eval_step.jitted, (state.params, eval_batch), mesh, evaluation, label
            )  # fmt: skip
        )
    return CompileReport(
        config=run.meta.name or run.family,
        target=target,
        device_kind=devices[0].device_kind,
        mesh=sizes,
        hbm_bytes=hbm,
        steps=tuple(steps),
    )


def format_report(report: CompileReport) -> str:
    """The report as aligned text: a line per step, then the verdict."""
    target = report.target
    topology = f" ({target.topology}" + (
        f", {target.num_slices} slices)" if target.num_slices > 1 else ")"
    )
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    lines = [
        f"{report.config} on {target.name}{topology if target.topology else ''}: "
        f"{math.prod(report.mesh.values())} x {report.device_kind}, mesh {mesh}, "
        f"{'host memory' if target.platform == 'cpu' else 'HBM'} {_bytes(report.hbm_bytes)} "
        "per device",
        "",
    ]
    header = ("step", "phase", "batch", "arguments", "outputs", "aliased", "temporaries",
              "total", "headroom", "GFLOP", "compile s")  # fmt: skip
    rows = [header]
    for s in report.steps:
        shape = "x".join(str(v) for v in (s.batch_size, *dict.fromkeys(s.lengths.values())))
        if s.error is not None:
            rows.append((s.step, str(s.phase), shape, "failed", *("",) * 7))
            continue
        gflop = "-" if s.flops is None else f"{s.flops / 1e9:,.1f}"
        rows.append((
            s.step, str(s.phase), shape, _bytes(s.argument_bytes), _bytes(s.output_bytes),
            _bytes(s.alias_bytes), _bytes(s.temp_bytes), _bytes(s.total_bytes),
            _bytes(report.hbm_bytes - s.total_bytes), gflop,
            f"{s.lower_seconds + s.compile_seconds:.1f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    failure = report.failure()
    if failure is None:
        share = report.peak_bytes / report.hbm_bytes
        lines.append(f"fits: peak {_bytes(report.peak_bytes)} per device, {share:.1%} of HBM")
    else:
        lines.append(f"does not fit or compile: {failure}")
    return "\n".join(lines)
