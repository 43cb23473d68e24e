"""What a run reads: a prepared directory per data setting, its tokenizer, its batches.

`data.corpus` names a directory made by `jaxgen prepare`, or anything `jaxgen.data.corpus` reads
('builtin', files, directories, globs); the latter is prepared into the cache on first use, so
every run reads prepared records the same way. The run keeps its tokenizer in `workdir/tokenizer/`
(what `jaxgen sample` and a resumed run use); every prepared directory it reads must have been
made with that same tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax

from jaxgen import objectives
from jaxgen.config import DataConfig, RunConfig
from jaxgen.data import corpus as corpus_lib
from jaxgen.data import pipeline, prepare, records
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.data.reader import PreparedSource
from jaxgen.objectives import DataError


class DataSource:
    """The prepared records, tokenizer and datasets of one run."""

    def __init__(self, run: RunConfig, workdir: str | os.PathLike) -> None:
        self.run = run
        self.objective = objectives.get(run.family)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = run.data
        self.cache_dir = Path(data.cache_dir) if data.cache_dir else self.workdir / "cache"
        self._roots: dict[DataConfig, str] = {}
        self._sources: dict[tuple[DataConfig, str], PreparedSource] = {}
        root = self.prepared(data)
        tokenizer_dir = self.workdir / "tokenizer"
        if not tokenizer_dir.exists() and jax.process_index() == 0:
            # Copied under a temporary name and renamed: the other processes of a multi-host run
            # check for this directory at the same moment and must never load half of it.
            tmp = Path(tempfile.mkdtemp(prefix="tokenizer.tmp", dir=self.workdir))
            tokenizer_lib.load_tokenizer(prepare.fetch(root, "tokenizer")).save(tmp)
            os.replace(tmp, tokenizer_dir)
        self.tokenizer = tokenizer_lib.load_tokenizer(
            tokenizer_dir if tokenizer_dir.exists() else prepare.fetch(root, "tokenizer")
        )
        self._check_tokenizer(root)
        if self.tokenizer.vocab_size > run.model.vocab_size:
            raise DataError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{run.model.vocab_size}; raise model.vocab_size or use a smaller vocabulary"
            )

    def manifest(self, data: DataConfig | None = None) -> dict:
        """The manifest of the prepared directory of `data` (default the run's)."""
        return records.load_manifest(self.prepared(data or self.run.data))

    def prepared(self, data: DataConfig) -> str:
        """The prepared directory of these data settings: `data.corpus` itself, or the cache's
        copy of it, prepared now when missing."""
        if data in self._roots:
            return self._roots[data]
        if records.is_prepared(data.corpus):
            root = data.corpus
        else:
            root = str(self._prepare_into_cache(data))
        records.check_manifest(records.load_manifest(root), root, self.run.family, data)
        self._roots[data] = root
        return root

    def _prepare_into_cache(self, data: DataConfig) -> Path:
        run = self.run
        files = corpus_lib.list_inputs(data.corpus)
        stamp = [(f.path, f.size, _mtime(f.path)) for f in files]
        settings = prepare.command_settings(run, files, 0, run.train.seed)
        key = hashlib.sha256(json.dumps([stamp, settings], sort_keys=True).encode()).hexdigest()
        target = self.cache_dir / f"prepared-{run.family}-{key[:16]}"
        if (target / records.COMPLETED).is_file():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Every process of a multi-host run may prepare at once: each into its own directory, the
        # first to finish renames it into place (the content is the same).
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=self.cache_dir))
        phase_run = dataclasses.replace(run, data=data)
        try:
            prepare.prepare(phase_run, data.corpus, tmp)
            os.replace(tmp, target)
        except OSError:
            if not (target / records.COMPLETED).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _check_tokenizer(self, root: str) -> None:
        made_with = records.load_manifest(root)["tokenizer"]["fingerprint"]
        if made_with != self.tokenizer.fingerprint:
            raise DataError(
                f"{root} was prepared with another tokenizer than this run's "
                f"({self.workdir / 'tokenizer'}): prepare the corpus with the run's vocabulary "
                "(data.vocab_path), or use a new --workdir"
            )
        data = self.run.data
        if data.vocab_path:
            given = tokenizer_lib.load_vocabulary(data.tokenizer, data.vocab_path, data.lowercase)
            if given.fingerprint != made_with:
                raise DataError(
                    f"{root} was prepared with another vocabulary than data.vocab_path="
                    f"{data.vocab_path}: prepare it with that vocabulary, or leave vocab_path empty"
                )

    def source(self, split: str, data: DataConfig) -> PreparedSource:
        """Random access to the records of one split of the data's prepared directory."""
        key = (data, split)
        if key not in self._sources:
            root = self.prepared(data)
            self._check_tokenizer(root)
            self._sources[key] = PreparedSource(root, split, data)
        return self._sources[key]

    def dataset(
        self,
        split: str,
        data: DataConfig | None = None,
        *,
        global_batch_size: int | None = None,
        start_example: int = 0,
    ) -> pipeline.DataIterator:
        """This process's batches of the train (infinite, shuffled) or eval (fixed) split.

        data: a phase's data settings (default the run's); global_batch_size: default
        train.batch_size; eval yields train.eval_steps batches.
        """
        data = data or self.run.data
        train = self.run.train
        return pipeline.build_dataset(
            self.objective,
            self.run.model,
            data,
            self.tokenizer,
            self.source(split, data),
            split,
            seed=train.seed,
            global_batch_size=global_batch_size or train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_batches=train.eval_steps if split == "eval" else None,
            start_example=start_example,
        )


def _mtime(path: str) -> float:
    return os.path.getmtime(path) if os.path.isfile(path) else 0.0
