"""The prepared-data format: ArrayRecord shards of encoded records and the manifest describing them.

    <prepared>/manifest.json     format version, family, the settings that shaped the records, the
                                 split rule, the tokenizer, the inputs and every file's counts
    <prepared>/tokenizer/        the tokenizer the records were made with
    <prepared>/train/part-00000-of-00004.array_record   group_size:1 (random access)
    <prepared>/eval/part-00000-of-00004.array_record
    <prepared>/COMPLETED         written last: a directory without it is not read

A record is one objective record (`encode_record`/`decode_record` of the family's objective), tokens
stored as uint16 when the vocabulary fits. Shard i of both splits is a pure function of the inputs
dealt to it, the seed and i.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig
from jaxgen.objectives import DataError, Objective

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPLETED = "COMPLETED"
SPLITS = ("train", "eval")
# group_size:1 keeps every record randomly accessible (grain's requirement). snappy: BERT-base
# records shrink 1.4x (zstd 1.7x) and each write costs 4 us instead of 14, a sixth of the write pass
# (experiments/bench_data.py times the whole prepare).
WRITER_OPTIONS = "group_size:1,snappy"
# Data keys every family's records depend on (the objective adds its RECORD_KEYS).
SHARED_RECORD_KEYS = ("tokenizer", "lowercase", "eval_fraction", "eval_documents", "split_seed")


def shard_path(split: str, shard: int, num_shards: int) -> str:
    """A shard's path inside a prepared directory, e.g. train/part-00003-of-00016.array_record."""
    return f"{split}/part-{shard:05d}-of-{num_shards:05d}.array_record"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def record_settings(objective: Objective, data: DataConfig) -> dict[str, Any]:
    """The data settings that shape a family's records (what a manifest and a run must agree on)."""
    values = data.to_dict()
    return {key: values[key] for key in (*SHARED_RECORD_KEYS, *objective.RECORD_KEYS)}


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a prepared directory (it has a manifest)."""
    return _exists(path, MANIFEST)


def _exists(root: str | os.PathLike, name: str) -> bool:
    if "://" in str(root):
        from etils import epath

        return (epath.Path(str(root)) / name).exists()
    return (Path(root) / name).exists()


def read_text(root: str | os.PathLike, name: str) -> str:
    """A file of a prepared directory (local or a URL) as text."""
    if "://" in str(root):
        from etils import epath

        return (epath.Path(str(root)) / name).read_text()
    return (Path(root) / name).read_text()


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Writes JSON atomically (a temporary file renamed): a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """A short hash of a manifest's content: binds a data iterator's state to these records."""
    text = json.dumps(manifest, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished prepared directory; a clear error for anything else."""
    if not _exists(root, MANIFEST):
        raise DataError(f"{root} is not a prepared directory (no {MANIFEST}); run `jaxgen prepare`")
    manifest = json.loads(read_text(root, MANIFEST))
    if not _exists(root, COMPLETED):
        raise DataError(
            f"prepared directory {root} has no {COMPLETED}: its `jaxgen prepare` did not finish; "
            "run the same prepare command again to finish it"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{root} holds prepared data of format {manifest.get('format_version')}, this jaxgen "
            f"reads format {FORMAT_VERSION}: prepare it again"
        )
    return manifest


def check_manifest(
    manifest: Mapping[str, Any], root: str | os.PathLike, family: str, data: DataConfig
) -> None:
    """Raises DataError when prepared records were made for another family or other settings,
    naming the key and both values."""
    if manifest["family"] != family:
        raise DataError(
            f"{root} was prepared for model.family={manifest['family']!r}; this run is {family!r}"
        )
    wanted = record_settings(objectives.get(family), data)
    for key, value in wanted.items():
        have = manifest["settings"].get(key)
        if have != value:
            raise DataError(
                f"{root} was prepared with data.{key}={have!r}, this run has data.{key}={value!r}: "
                f"prepare the corpus with this setting, or run with --config.data.{key}={have!r}"
            )
