"""Tokenizers: training, the special ids each kind promises, save/load and vocabulary-file round
trips."""

import pytest

from jaxgen.config import ConfigError
from jaxgen.data.tokenizer import (
    NUM_SENTINELS,
    TokenizerError,
    load_tokenizer,
    load_vocabulary,
    train_tokenizer,
)

from .conftest import VOCAB_SIZE, data_config


@pytest.fixture(scope="module")
def tokenizers(prepared):
    """{family: the tokenizer its prepared built-in corpus was made with}."""
    return {family: prepared(family).tokenizer for family in ("bert", "gpt", "t5")}


TEXT = "The assignment statement binds names to values, doesn't it?"


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_encode_decode_and_save_load(family, tokenizers, tmp_path):
    tok = tokenizers[family]
    assert tok.vocab_size <= VOCAB_SIZE
    ids = tok.encode(TEXT)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch([TEXT, "x"])[0] == ids
    expected = TEXT.lower() if tok.lowercase else TEXT
    assert tok.decode(ids).replace(" ", "") == expected.replace(" ", "")
    assert len(tok.word_starts) == tok.vocab_size
    if (
        family != "gpt"
    ):  # GPT-2 marks word starts by a leading space, which the text's first word lacks
        assert tok.is_word_start(ids[0])

    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
    assert again.fingerprint == tok.fingerprint
    assert again.encode(TEXT) == ids
    assert again.special_ids == tok.special_ids


def test_wordpiece_specials(tokenizers):
    tok = tokenizers["bert"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.encode("[MASK]") == [tok.mask_id]
    pieces = [tok.id_to_token(i) for i in tok.encode("unrecognisably")]
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])
    assert [tok.is_word_start(i) for i in tok.encode("unrecognisably")] == [True] + [False] * (
        len(pieces) - 1
    )


def test_bpe_specials(tokenizers):
    tok = tokenizers["gpt"]
    assert tok.eos_id is not None and tok.pad_id == tok.eos_id
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    assert tok.decode(tok.encode("  odd   spacing\tkept ")) == "  odd   spacing\tkept "


def test_sentencepiece_sentinels_at_top(tokenizers):
    tok = tokenizers["t5"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.sentinel_id(0) == tok.vocab_size - 1
    assert tok.sentinel_ids == tuple(
        range(tok.vocab_size - 1, tok.vocab_size - 1 - NUM_SENTINELS, -1)
    )
    ids = tok.encode("values <extra_id_0> names <extra_id_1>")
    assert tok.sentinel_id(0) in ids and tok.sentinel_id(1) in ids
    assert max(i for i in tok.encode(TEXT)) < tok.vocab_size - NUM_SENTINELS
    assert "<extra_id_1>" in tok.decode(ids)


def test_training_is_deterministic(builtin_docs, tokenizers):
    # Trained again on the same sentences, each kind gives the same vocabulary (bit-identical
    # reruns and identical prepared directories depend on it).
    sentences = [s for doc in builtin_docs for s in doc]
    for family, kind in (("bert", "wordpiece"), ("gpt", "bpe"), ("t5", "sentencepiece")):
        lowercase = tokenizers[family].lowercase
        first = train_tokenizer(kind, sentences, VOCAB_SIZE, lowercase)
        assert (
            first.fingerprint == train_tokenizer(kind, sentences, VOCAB_SIZE, lowercase).fingerprint
        )


def test_load_plain_vocabulary_files(tokenizers, tmp_path):
    for family, kind in (("bert", "wordpiece"), ("gpt", "bpe"), ("t5", "sentencepiece")):
        tok = tokenizers[family]
        folder = tmp_path / family
        tok.save(folder)
        (folder / "jaxgen_tokenizer.json").unlink()  # only the plain vocabulary files remain
        source = {
            "wordpiece": folder / "vocab.txt",
            "bpe": folder,
            "sentencepiece": folder / "spiece.model",
        }
        loaded = load_vocabulary(kind, source[kind], tok.lowercase)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_bad_vocabulary(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_vocabulary("wordpiece", tmp_path / "missing.txt", True)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="lacks special tokens"):
        load_vocabulary("wordpiece", tmp_path / "vocab.txt", True)
    with pytest.raises(TokenizerError, match="holds no saved tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'chars'"):
        load_vocabulary("chars", tmp_path / "vocab.txt", True)
    with pytest.raises(ConfigError, match="data.tokenizer must be one of wordpiece, bpe"):
        data_config("bert", "data.tokenizer=chars")
