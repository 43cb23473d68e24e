"""`jaxgen sweep`: run a grid (or a list) of config overrides, one workdir per point, and summarise.

    jaxgen sweep --config configs/bert.py:smoke --workdir runs/sweep1 \\
        --sweep optim.learning_rate=1e-4,3e-4 --sweep model.num_layers=2,4 [--parallel 2]

Each point runs `python -m jaxgen train` in `<workdir>/<point name>` (named after its overrides),
logging to `<point>/train.log`. A point whose workdir holds `DONE` is skipped on re-runs, so a sweep
that was interrupted picks up where it stopped (unfinished points resume from their checkpoints).
At the end `summary.csv` and `summary.md` list every point's final train/eval metrics (and a
fine-tuning run's best evaluation, `best/<name>`), best first; when points differ only in
`train.seed`, `seeds.md` gives each setting's mean ± standard deviation over its seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import posixpath
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

DONE_FILE = "DONE"
RESULTS_FILE = "eval_results.json"  # a fine-tuning run's best evaluation (jaxgen.train.finetune)
SEED_KEY = "train.seed"
LOG_FILE = "train.log"
MAX_NAME_LENGTH = 200  # well under the 255-byte file-name limit of common filesystems

# Builds the argv that trains one point: (config spec, point workdir, ['--config.a.b=v', ...]).
TrainCommand = Callable[[str, str, Sequence[str]], Sequence[str]]


class SweepError(ValueError):
    """A sweep definition that cannot run (bad --sweep syntax, unknown key, empty grid)."""


@dataclasses.dataclass
class PointResult:
    """The outcome of one sweep point.

    status: 'done' | 'failed' | 'skipped-done' | 'dry-run' | 'launched'. metrics holds the last
    train and eval rows of metrics.jsonl as 'train/<name>' and 'eval/<name>'.
    """

    name: str
    overrides: dict[str, str]
    workdir: str
    status: str
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    step: int | None = None
    error: str = ""
    seconds: float | None = None


def train_command(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """argv that trains one point locally with this Python interpreter."""
    from jaxgen.tools.launch import train_argv

    return train_argv(config, workdir, overrides, python=sys.executable)


def _strip_key(key: str) -> str:
    return key.strip().removeprefix("--").removeprefix("config.")


def _split_values(text: str) -> list[str]:
    """Splits 'a,b,[1,2]' on commas outside brackets and quotes."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'optim.learning_rate=1e-4,3e-4' -> ('optim.learning_rate', ['1e-4', '3e-4'])."""
    key, sep, raw = text.partition("=")
    key = _strip_key(key)
    values = _split_values(raw) if sep else []
    if not key or not values or any(v == "" for v in values):
        raise SweepError(f"--sweep {text!r} must look like optim.learning_rate=1e-4,3e-4")
    return key, values


def format_value(value: Any) -> str:
    """A Python value as the text of a `--config.a.b=v` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def expand_grid(sweeps: Sequence[str] | Mapping[str, Sequence[Any]]) -> list[dict[str, str]]:
    """Cartesian product of swept values, first key outermost: one {key: value text} per point."""
    if isinstance(sweeps, Mapping):
        axes = [(_strip_key(k), [format_value(v) for v in vs]) for k, vs in sweeps.items()]
    else:
        axes = [parse_sweep(s) for s in sweeps]
    keys = [k for k, _ in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise SweepError(f"swept more than once: {', '.join(repeated)}")
    if any(not values for _, values in axes):
        raise SweepError("every swept key needs at least one value")
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def load_sweep_file(path: str | Path) -> list[dict[str, str]]:
    """Runs `get_sweep()` of a Python file: a list of {config key: value} dicts, one per point."""
    from jaxgen.config import load_python_file

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} not found")
    module = load_python_file(path)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} must define get_sweep() -> list[dict]")
    points = list(module.get_sweep())
    if not all(isinstance(p, Mapping) for p in points):
        raise SweepError(f"{path}: get_sweep() must return a list of dicts")
    return [{_strip_key(k): format_value(v) for k, v in p.items()} for p in points]


def combine(*point_lists: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Product of point lists (e.g. a sweep file's points × a grid); later lists vary fastest."""
    points: list[dict[str, str]] = [{}]
    for plist in point_lists:
        if plist:
            points = [{**a, **b} for a in points for b in plist]
    return points


def _name_value(text: str) -> str:
    # Numbers are normalised so 1e-4 and 0.0001 name the same point (and re-runs find it).
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def point_name(overrides: Mapping[str, str]) -> str:
    """Folder name of a point: 'optim.learning_rate=0.0001,model.num_layers=2' (sanitised)."""
    if not overrides:
        return "default"
    name = ",".join(f"{k}={_name_value(v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME_LENGTH - 11]}-{digest}"
    return name


def _join(root: str, name: str) -> str:
    # gs:// workdirs (TPU launches) are joined as URLs, local ones as paths.
    return posixpath.join(root, name) if "://" in root else str(Path(root) / name)


def read_final_metrics(workdir: str | Path) -> tuple[int | None, dict[str, float]]:
    """(last step, {'train/<k>': v, 'eval/<k>': v}) from metrics.jsonl's last train/eval rows."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return None, {}
    last: dict[str, dict[str, Any]] = {}
    step = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if not isinstance(row, dict):
            continue
        split = row.get("split", "train")
        last[split] = row
        if isinstance(row.get("step"), int):
            step = row["step"] if step is None else max(step, row["step"])
    rows = {split: last.get(split, {}) for split in ("train", "eval")}
    results = Path(workdir) / RESULTS_FILE
    if results.is_file():
        try:
            rows["best"] = json.loads(results.read_text()).get("best", {})
        except json.JSONDecodeError:
            pass  # written atomically; unreadable only when damaged, and then not reported
    metrics = {}
    for split, row in rows.items():
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                metrics[f"{split}/{key}"] = float(value)
    return step, metrics


def last_log_line(path: str | Path, start: int = 0) -> str:
    """Last non-empty line of a log after byte `start` (a failed run's error), '' if none."""
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(start, f.tell() - 16384))  # the tail is enough; logs can be large
        lines = f.read().decode(errors="replace").splitlines()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def _metric_key(metric: str) -> str:
    metric = metric.replace(".", "/", 1) if "/" not in metric else metric
    return metric if "/" in metric else f"eval/{metric}"


def sort_results(
    results: Sequence[PointResult], metric: str = "eval/loss", mode: str = "min"
) -> list[PointResult]:
    """Best first by `metric` ('eval/loss', 'train/accuracy'); points without it last, in order."""
    if mode not in ("min", "max"):
        raise SweepError(f"--mode must be min or max, got {mode!r}")
    key = _metric_key(metric)

    def value(r: PointResult) -> float | None:
        v = r.metrics.get(key)
        return v if v is not None and math.isfinite(v) else None

    scored = [r for r in results if value(r) is not None]
    unscored = [r for r in results if value(r) is None]
    scored.sort(key=lambda r: value(r), reverse=mode == "max")
    return scored + unscored


def _metric_columns(results: Sequence[PointResult]) -> list[str]:
    present = {k for r in results for k in r.metrics}
    first = [k for k in ("train/loss", "eval/loss") if k in present]
    order = {"best": 0, "eval": 1}
    rest = sorted(present - set(first), key=lambda k: (order.get(k.split("/")[0], 2), k))
    return first + rest


def seed_rows(results: Sequence[PointResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of each setting's mean ± std (sample, over its seeds) of every eval and
    best metric; only settings run with more than one train.seed, none when there are none."""
    groups: dict[str, list[PointResult]] = {}
    for r in results:
        if r.status in ("done", "skipped-done") and SEED_KEY in r.overrides:
            setting = {k: v for k, v in r.overrides.items() if k != SEED_KEY}
            groups.setdefault(json.dumps(setting, sort_keys=True), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return [], []
    keys = list(dict.fromkeys(k for g in groups.values() for r in g for k in r.overrides
                              if k != SEED_KEY))  # fmt: skip
    metrics = [m for m in _metric_columns([r for g in groups.values() for r in g])
               if m.startswith(("eval/", "best/"))]  # fmt: skip
    rows = []
    for members in groups.values():
        cells = []
        for metric in metrics:
            values = [r.metrics[metric] for r in members if metric in r.metrics]
            if not values:
                cells.append("")
                continue
            std = float(sample_std(values))
            cells.append(f"{sum(values) / len(values):.4g} ± {std:.2g}")
        rows.append([*(members[0].overrides.get(k, "") for k in keys), len(members), *cells])
    return [*keys, "seeds", *metrics], rows


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1) of two or more values."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def summary_rows(results: Sequence[PointResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the summary: point, swept keys, status, step, time, metrics, error."""
    keys = list(dict.fromkeys(k for r in results for k in r.overrides))
    metrics = _metric_columns(results)
    header = ["point", *keys, "status", "step", "time_s", *metrics, "error"]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                *(r.overrides.get(k, "") for k in keys),
                r.status,
                "" if r.step is None else r.step,
                "" if r.seconds is None else round(r.seconds, 1),
                *(r.metrics.get(m, "") for m in metrics),
                r.error,
            ]
        )
    return header, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def format_markdown(results: Sequence[PointResult]) -> str:
    """The summary as a Markdown table (and the mean ± std over seeds, when there are seeds)."""
    text = _markdown_table(*summary_rows(results))
    header, rows = seed_rows(results)
    if rows:
        text += "\nmean ± std over seeds:\n\n" + _markdown_table(header, rows)
    return text


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(results: Sequence[PointResult], workdir: str | Path) -> tuple[Path, Path]:
    """Writes summary.csv and summary.md into the sweep workdir; returns their paths."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    header, rows = summary_rows(results)
    csv_path, md_path = workdir / "summary.csv", workdir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    md_path.write_text(format_markdown(results))
    header, rows = seed_rows(results)
    if rows:
        (workdir / "seeds.md").write_text(_markdown_table(header, rows))
    return csv_path, md_path


def _validate_points(
    config: str, overrides: Sequence[str], points: Sequence[Mapping[str, str]]
) -> list[str]:
    """Config error per point ('' = valid), by loading each point's config without training."""
    from jaxgen.config import load_config

    errors = []
    for point in points:
        try:
            load_config(config, [*overrides, *(f"{k}={v}" for k, v in point.items())])
            errors.append("")
        except ValueError as err:  # ConfigError is a ValueError
            errors.append(f"{type(err).__name__}: {err}")
    if errors and all(errors):
        raise SweepError(f"no sweep point has a valid config; first: {errors[0]}")
    return errors


def _run_point(
    argv: Sequence[str], result: PointResult, env: Mapping[str, str] | None
) -> PointResult:
    workdir = Path(result.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(workdir / LOG_FILE, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        header = log.tell()
        try:
            code = subprocess.run(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                check=False,
            ).returncode
        except OSError as err:  # the command itself could not start
            log.write(f"{err}\n")
            code = 127
    result.seconds = time.monotonic() - start
    result.step, result.metrics = read_final_metrics(workdir)
    if code == 0:
        result.status = "done"
    else:
        result.status = "failed"
        last = last_log_line(workdir / LOG_FILE, header)
        if code < 0:
            result.error = f"killed by signal {-code}" + (f" after: {last}" if last else "")
        else:
            result.error = last or f"exit code {code}"
    return result


def run_sweep(
    config: str,
    sweeps: Sequence[str] | Mapping[str, Sequence[Any]] = (),
    workdir: str | Path = "runs/sweep",
    overrides: Sequence[str] = (),
    parallel: int = 1,
    *,
    points: Sequence[Mapping[str, Any]] | None = None,
    metric: str = "eval/loss",
    mode: str = "min",
    command: TrainCommand = train_command,
    launch: str = "local",
    tpu: Any = None,
    dry_run: bool = False,
    validate: bool = True,
    progress: bool = True,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> list[PointResult]:
    """Runs every sweep point (grid of `sweeps` × explicit `points`) and returns results best first.

    sweeps: ['optim.learning_rate=1e-4,3e-4', ...] or {'optim.learning_rate': [1e-4, 3e-4]}.
    overrides: applied to every point before the point's own ('a.b=v' or '--config.a.b=v').
    command: builds each point's argv (inject a fake trainer in tests).
    launch: 'local' runs subprocesses (`parallel` at a time); 'tpu' starts each point on its own TPU
    VM named `<tpu.name>-<index>` (tpu: a `jaxgen.launch.TpuVm` template) and returns 'launched'.
    Writes summary.csv and summary.md for local runs. Raises SweepError for unusable definitions.
    """
    out = out or sys.stdout
    if parallel < 1:
        raise SweepError(f"--parallel must be at least 1, got {parallel}")
    if launch not in ("local", "tpu"):
        raise SweepError(f"--launch must be local or tpu, got {launch!r}")
    grid = expand_grid(sweeps) if sweeps else []
    explicit = [{_strip_key(k): format_value(v) for k, v in p.items()} for p in points or []]
    all_points = combine(explicit, grid)
    if points is not None and not explicit:
        raise SweepError("the sweep file gave no points")
    common = [f"--config.{_strip_key(o)}" for o in overrides]
    workdir = str(workdir)

    names = [point_name(p) for p in all_points]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            if all_points[i] in all_points[:i]:
                raise SweepError(f"sweep point {name!r} appears more than once")
            digest = hashlib.sha1(json.dumps(all_points[i]).encode()).hexdigest()[:8]
            names[i] = f"{name}-{digest}"
    results = [
        PointResult(name, dict(p), _join(workdir, name), "pending")
        for name, p in zip(names, all_points, strict=True)
    ]

    def argv_of(r: PointResult) -> list[str]:
        point = [f"--config.{k}={v}" for k, v in r.overrides.items()]
        return list(command(config, r.workdir, [*common, *point]))

    if launch == "tpu":
        return _launch_tpu_points(config, common, results, tpu, dry_run, out)
    if dry_run:
        for r in results:
            print(shlex.join(argv_of(r)), file=out)
            r.status = "dry-run"
        return results

    errors = _validate_points(config, common, all_points) if validate else [""] * len(results)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "sweep.json").write_text(
        json.dumps({"config": config, "overrides": common, "points": all_points}, indent=2) + "\n"
    )
    todo = []
    for r, error in zip(results, errors, strict=True):
        if (Path(r.workdir) / DONE_FILE).exists():
            r.status = "skipped-done"
            r.step, r.metrics = read_final_metrics(r.workdir)
        elif error:
            r.status, r.error = "failed", error
        else:
            todo.append((r, argv_of(r)))

    bar = tqdm(
        total=len(results),
        initial=len(results) - len(todo),
        desc="sweep",
        unit="point",
        disable=not progress,
        file=sys.stderr,
    )
    failed = sum(r.status == "failed" for r in results)
    executor = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = [executor.submit(_run_point, argv, r, env) for r, argv in todo]
        for future in as_completed(futures):
            r = future.result()
            failed += r.status == "failed"
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            loss = r.metrics.get(_metric_key(metric))
            detail = f"{_metric_key(metric)}={loss:.4g}" if loss is not None else r.error
            tqdm.write(f"[{r.status}] {r.name} {detail}".rstrip(), file=sys.stderr)
    except KeyboardInterrupt:
        # The children got the same SIGINT and stop (checkpointing); don't start queued points.
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        executor.shutdown(wait=True)
        bar.close()

    ranked = sort_results(results, metric, mode)
    csv_path, md_path = write_summary(ranked, workdir)
    print(format_markdown(ranked), file=out, end="")
    print(f"wrote {csv_path} and {md_path}", file=out)
    return ranked


def _launch_tpu_points(
    config: str,
    common: Sequence[str],
    results: list[PointResult],
    tpu: Any,
    dry_run: bool,
    out,
) -> list[PointResult]:
    from jaxgen.tools import launch

    if tpu is None or not tpu.name or not tpu.zone:
        raise SweepError("--launch tpu needs --tpu_name and --zone")
    for i, r in enumerate(results):
        vm = dataclasses.replace(tpu, name=f"{tpu.name}-{i}")
        point_overrides = [*common, *(f"--config.{k}={v}" for k, v in r.overrides.items())]
        print(f"# point {i}: {r.name} on TPU VM {vm.name}", file=out, flush=True)
        code = launch.launch_tpu(
            vm, config, r.workdir, point_overrides, dry_run=dry_run, stream=False
        )
        r.status = "dry-run" if dry_run else ("launched" if code == 0 else "failed")
        if code != 0:
            r.error = f"launch exit code {code}"
    return results
