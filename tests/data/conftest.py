"""Shared fixtures: the built-in corpus prepared once per family (and variant) per session, and the
small data settings the data tests use (from the real smoke rows)."""

from __future__ import annotations

import types

import pytest

from jaxgen import config as config_lib
from jaxgen.data import prepare
from jaxgen.data.corpus import load_documents
from jaxgen.data.tokenizer import load_tokenizer

VOCAB_SIZE = 2000
EVAL_DOCUMENTS = 6
SHARED = ["model.vocab_size=2000", "model.max_len=128", "data.seq_len=64", "data.eval_fraction=0",
          f"data.eval_documents={EVAL_DOCUMENTS}"]  # fmt: skip
OWN = {
    "bert": ["data.max_predictions=10", "data.dupe_factor=2", "data.dynamic_masking=false"],
    "gpt": ["data.separate_documents=true"],
    "t5": [],
}


def data_config(family: str = "bert", *overrides: str) -> config_lib.RunConfig:
    """configs/<family>.py:smoke at the data tests' small sizes."""
    return config_lib.load_config(
        f"configs/{family}.py:smoke", SHARED + OWN[family] + list(overrides)
    )


@pytest.fixture(scope="session")
def builtin_docs():
    return load_documents("builtin")


class Prepared:
    """Prepares a config's corpus once per distinct settings in a session directory."""

    def __init__(self, root) -> None:
        self.root = root
        self._done: dict[tuple, str] = {}

    def __call__(self, family: str = "bert", *overrides: str, corpus: str = "builtin"):
        """(run config, prepared directory, tokenizer)."""
        run = data_config(family, *overrides)
        key = (family, overrides, corpus)
        if key not in self._done:
            output = self.root / f"{family}-{len(self._done)}"
            self._done[key] = prepare.prepare(run, corpus, output)
        root = self._done[key]
        return types.SimpleNamespace(
            run=run, root=root, tokenizer=load_tokenizer(prepare.local_dir(root) / "tokenizer")
        )


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Prepared:
    return Prepared(tmp_path_factory.mktemp("prepared"))
