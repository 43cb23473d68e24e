"""Shared fixtures: the built-in corpus and one small trained tokenizer of each kind, cached per
session."""

import ml_collections
import pytest

from jaxgen.data.corpus import load_documents
from jaxgen.data.tokenizer import build_tokenizer

VOCAB_SIZE = 2000
KIND_OF_FAMILY = {"bert": "wordpiece", "gpt": "bpe", "t5": "sentencepiece"}


def data_config(family: str = "bert", **overrides) -> ml_collections.ConfigDict:
    """A small run config with the keys the data pipeline reads."""
    config = ml_collections.ConfigDict()
    config.model = {"family": family, "vocab_size": VOCAB_SIZE, "max_len": 128}
    config.data = {
        "corpus": "builtin",
        "tokenizer": KIND_OF_FAMILY[family],
        "vocab_path": "",
        "lowercase": family == "bert",
        "seq_len": 64,
        "eval_documents": 6,
        "cache_dir": "",
        "mask_prob": 0.15,
        "max_predictions": 10,
        "short_seq_prob": 0.1,
        "dupe_factor": 2,
        "dynamic_masking": False,
        "whole_word_masking": False,
        "random_next_prob": 0.5,
        "separate_documents": True,
        "noise_density": 0.15,
        "mean_noise_span_length": 3.0,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        config[section][leaf] = value
    return config


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
        for family in KIND_OF_FAMILY
    }
