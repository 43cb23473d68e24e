"""Shared fixtures: the built-in corpus and one small trained tokenizer of each kind, cached per
session, and the small data settings the pipeline tests use (from the real smoke rows)."""

import types

import pytest

from jaxgen import config as config_lib
from jaxgen.data.corpus import load_documents
from jaxgen.data.tokenizer import build_tokenizer

VOCAB_SIZE = 2000
SHARED = ["model.vocab_size=2000", "model.max_len=128", "data.seq_len=64", "data.eval_documents=6"]
OWN = {
    "bert": ["data.max_predictions=10", "data.dupe_factor=2", "data.dynamic_masking=false"],
    "gpt": ["data.separate_documents=true"],
    "t5": [],
}


def data_config(family: str = "bert", *overrides: str) -> types.SimpleNamespace:
    """(model, data) sections of configs/<family>.py:smoke at the tests' small sizes."""
    overrides = SHARED + OWN[family] + list(overrides)
    run = config_lib.load_config(f"configs/{family}.py:smoke", overrides)
    return types.SimpleNamespace(model=run.model, data=run.data)


@pytest.fixture(scope="session")
def builtin_docs():
    return load_documents("builtin")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jaxgen-cache")


@pytest.fixture(scope="session")
def tokenizers(builtin_docs, cache_dir):
    """{family: tokenizer} trained once on the built-in corpus."""
    return {
        family: build_tokenizer(data_config(family).data, builtin_docs, VOCAB_SIZE, cache_dir)
        for family in OWN
    }
