"""Metrics output: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (2.2 s of
    every run's start-up where torch is installed, `python -X importtime`); jaxgen logs floats.
    A None entry in sys.modules makes that import fail as if torch were absent, and is removed
    again, so torch stays importable.
    """
    if "torch" in sys.modules:  # already paid for (or already blocked)
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metric rows to `workdir/metrics.jsonl` and TensorBoard; no-op off the primary."""

    def __init__(
        self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int = 0
    ) -> None:
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        # Rows past the checkpoint we resume from were logged by a run that died before saving
        # again: drop them so the file reads exactly like an uninterrupted run.
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if (row := _parse_row(line)) is not None and row["step"] <= resume_step
            ]
            if resume_step == 0:
                kept = []
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tb = _summary_writer_class()(str(Path(workdir)), flush_secs=30)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Records one row {"step", "split", **metrics} and returns it."""
        row: dict[str, Any] = {"step": int(step), "split": split}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in metrics.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
        return row

    def close(self) -> None:
        """Flushes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl."""
    path = Path(workdir) / "metrics.jsonl"
    rows = (_parse_row(line) for line in path.read_text().splitlines())
    return [row for row in rows if row is not None]


def _parse_row(line: str) -> dict[str, Any] | None:
    """A metrics row, or None for a blank line or the partial last line of a killed process."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
