"""The metrics writer: rows in metrics.jsonl and TensorBoard events, without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys


def test_metrics_and_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX would import torch (seconds of every run's start-up) where it is installed."""
    code = (
        "import sys; from jaxgen.train.metrics import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r}); w.write(3, 'train', {{'loss': 1.5}}); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch  # still importable afterwards\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "split": "train", "loss": 1.5}]
    assert list(tmp_path.glob("events.out.tfevents.*"))
