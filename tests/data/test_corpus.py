"""Corpus loading: the built-in corpus, BERT-format text, JSONL, directories, and clear errors."""

import json

import pytest

from jaxgen.data.corpus import (
    CorpusError,
    corpus_hash,
    load_documents,
    split_documents,
    split_indices,
    split_sentences,
)


def test_builtin_corpus(builtin_docs):
    from pydoc_data.topics import topics

    # Documents are the entries' sections: more of them than entries, each text in one place.
    assert len(topics) < len(builtin_docs) <= 4 * len(topics)
    sentences = [s for doc in builtin_docs for s in doc]
    assert len(sentences) > 2000
    assert all(s and s == s.strip() for s in sentences)
    # Code and grammar rules are left out.
    assert not any(s.startswith(">>>") or "::=" in s for s in sentences)
    assert len(set(sentences)) == len(sentences)
    assert load_documents("builtin") == builtin_docs  # deterministic


def test_split_sentences():
    text = "The first one. And the second!  Is it a third? Yes, e.g. this\n one continues."
    assert split_sentences(text) == [
        "The first one.",
        "And the second!",
        "Is it a third?",
        "Yes, e.g. this one continues.",
    ]


def test_text_file_in_bert_format(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("A first sentence.\nA second one.\n\n\nOther document.\n  \nThird doc.\n")
    assert load_documents(str(path)) == [
        ["A first sentence.", "A second one."],
        ["Other document."],
        ["Third doc."],
    ]


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        {"text": "One sentence. Two sentences."},
        {"text": "Another doc.", "id": 3},
        {"text": " "},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert load_documents(str(path)) == [["One sentence.", "Two sentences."], ["Another doc."]]


def test_directory_sorted_and_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("Zed.\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Ay."}) + "\n")
    (tmp_path / "c.txt").write_text("See.\n\nSea.\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_documents(str(tmp_path)) == [["Ay."], ["Zed."], ["See."], ["Sea."]]


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match=f"{path}.*empty"):
        load_documents(str(path))


def test_one_document_when_two_needed(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Only one.\nDocument here.\n")
    assert len(load_documents(str(path))) == 1
    with pytest.raises(CorpusError, match=r"1 document.*at least 2"):
        load_documents(str(path), min_documents=2)


def test_binary_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorpusError, match=f"{path} is not a text file"):
        load_documents(str(path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_documents(str(latin))


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine."}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CorpusError, match=f"{path}:2.*'text'"):
        load_documents(str(path))
    path.write_text("{not json\n")
    with pytest.raises(CorpusError, match="not valid JSON"):
        load_documents(str(path))


def test_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="has no"):
        load_documents(str(tmp_path))


def test_split_is_deterministic_and_disjoint(builtin_docs):
    train, held_out = split_indices(len(builtin_docs), 6, seed=0)
    assert len(held_out) == 6 and len(train) == len(builtin_docs) - 6
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(range(len(builtin_docs)))
    a = split_documents(builtin_docs, 6, seed=0)
    assert a == split_documents(builtin_docs, 6, seed=0)
    assert a[1] != split_documents(builtin_docs, 6, seed=1)[1]
    with pytest.raises(CorpusError, match="eval_documents"):
        split_documents(builtin_docs, len(builtin_docs), seed=0)


def test_corpus_hash_sees_boundaries():
    assert corpus_hash([["a", "b"]]) != corpus_hash([["a"], ["b"]])
    assert corpus_hash([["a", "b"]]) == corpus_hash([["a", "b"]])
