"""What a run reads: its corpus split into train and held-out documents, its tokenizer, its batches.

The corpus is loaded and split here and nowhere else; the tokenizer is trained once on the train
documents (or loaded from `data.vocab_path`) and kept in `workdir/tokenizer/`, so a resumed run and
`jaxgen sample` use exactly the same one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

from jaxgen import objectives
from jaxgen.config import DataConfig, RunConfig
from jaxgen.data import corpus as corpus_lib
from jaxgen.data import pipeline
from jaxgen.data import tokenizer as tokenizer_lib


class DataSource:
    """Corpus split, tokenizer and datasets of one run (the tokenizer cached in the workdir)."""

    def __init__(self, run: RunConfig, workdir: str | os.PathLike) -> None:
        workdir = Path(workdir)
        data = run.data
        self.run = run
        self.objective = objectives.get(run.family)
        documents = corpus_lib.load_documents(
            data.corpus, min_documents=self.objective.MIN_DOCUMENTS
        )
        self.train_docs, self.eval_docs = corpus_lib.split_documents(
            documents, data.eval_documents, data.split_seed
        )
        self.cache_dir = Path(data.cache_dir) if data.cache_dir else workdir / "cache"
        tokenizer_dir = workdir / "tokenizer"
        if tokenizer_dir.exists():
            self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        else:
            self.tokenizer = tokenizer_lib.build_tokenizer(
                data, self.train_docs, run.model.vocab_size, self.cache_dir
            )
            if jax.process_index() == 0:
                # Saved under a temporary name and renamed: the other processes of a multi-host run
                # check for this directory at the same moment and must never load half of it.
                tmp = Path(tempfile.mkdtemp(prefix="tokenizer.tmp", dir=workdir))
                self.tokenizer.save(tmp)
                os.replace(tmp, tokenizer_dir)
        if self.tokenizer.vocab_size > run.model.vocab_size:
            raise pipeline.DataError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{run.model.vocab_size}; raise model.vocab_size or use a smaller vocabulary"
            )

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
        train = self.run.train
        return pipeline.build_dataset(
            self.objective,
            self.run.model,
            data or self.run.data,
            self.tokenizer,
            self.train_docs if split == "train" else self.eval_docs,
            split,
            seed=train.seed,
            global_batch_size=global_batch_size or train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_batches=train.eval_steps if split == "eval" else None,
            start_example=start_example,
            cache_dir=self.cache_dir,
        )
