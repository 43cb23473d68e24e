"""Reading a prepared directory: random access to the decoded records of one split.

The source is grain's `ArrayRecordDataSource` over the split's non-empty files, opened with the
record counts the manifest holds (`path[0:n]`), so start-up does not open every file; batches are
read with one `__getitems__` call (ArrayRecord's batched reads run in parallel in C++).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import objectives
from jaxgen.config import DataConfig
from jaxgen.data import records
from jaxgen.objectives import DataError


class PreparedSource:
    """The decoded records of one split of a prepared directory; index i is a global record."""

    def __init__(self, root: str | os.PathLike, split: str, data: DataConfig) -> None:
        import grain

        self.root = str(root)
        self.manifest = records.load_manifest(root)
        self.objective = objectives.get(self.manifest["family"])
        self.data = data
        self.dtype = np.dtype(self.manifest["token_dtype"])
        entries = [e for e in self.manifest["files"][split] if e["records"]]
        if not entries:
            raise DataError(f"the {split} split of {root} has no records")
        self.paths = [_join(self.root, e["path"]) for e in entries]
        for path, entry in zip(self.paths, entries, strict=True):
            _check_size(path, entry["bytes"])
        instructions = [f"{p}[0:{e['records']}]" for p, e in zip(self.paths, entries, strict=True)]
        try:
            self._source = grain.sources.ArrayRecordDataSource(instructions)
        except Exception as err:  # array_record raises plain RuntimeErrors naming no file
            raise _corrupt(self.root, ", ".join(self.paths), err) from err
        self._length = sum(e["records"] for e in entries)
        self.hash = records.manifest_hash(self.manifest)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        return self.read([index])[0]

    def read(self, indices: Sequence[int]) -> list[Any]:
        """The decoded records at these global indices, in one batched read."""
        try:
            raw = self._source.__getitems__([int(i) for i in indices])
        except Exception as err:
            raise _corrupt(self.root, self.root, err) from err
        decode = self.objective.decode_record
        return [decode(r, self.dtype, self.data) for r in raw]


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _check_size(path: str, expected: int) -> None:
    """A local shard whose size differs from the manifest's is truncated or replaced."""
    if "://" in path:
        return  # a stat per file costs a request on object stores; read errors still name it
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != expected:
        found = "missing" if size is None else f"{size} bytes, the manifest says {expected}"
        raise _corrupt(str(Path(path).parent.parent), path, f"the file is {found}")


def _corrupt(root: str, what: str, err: Any) -> DataError:
    return DataError(
        f"prepared shard {what} is corrupt or truncated ({err}); run the `jaxgen prepare` command "
        f"that made {root} again: it checks every shard and writes the broken ones again"
    )
