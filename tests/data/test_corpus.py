"""Corpus loading: the built-in corpus, BERT-format text, JSONL, directories, and clear errors."""

import gzip
import json
import random

import pytest

from jaxgen.data.corpus import (
    CorpusError,
    InputFile,
    document_hash,
    list_inputs,
    load_documents,
    read_documents,
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
    path.write_text("")
    with pytest.raises(CorpusError, match=f"input file {path} is empty"):
        list_inputs([str(path)])


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
    # A NUL only in a last line without its newline, and one in a JSONL line: both readers check.
    tail = tmp_path / "tail.txt"
    tail.write_bytes(b"One sentence.\nTwo sentences.\n\nA second document.\nends \x00here")
    with pytest.raises(CorpusError, match=f"{tail} is not a text file"):
        load_documents(str(tail))
    jsonl = tmp_path / "nul.jsonl"
    jsonl.write_bytes(b'{"text": "A document."}\n{"text": "Another\x00 one."}\n')
    with pytest.raises(CorpusError, match=f"{jsonl} is not a text file"):
        load_documents(str(jsonl))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_documents(str(latin))


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine."}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CorpusError, match=f"{path} at byte 18: each JSONL line needs a string"):
        load_documents(str(path))
    path.write_text("{not json\n")
    with pytest.raises(CorpusError, match="not valid JSON"):
        load_documents(str(path))


def test_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="has no"):
        load_documents(str(tmp_path))


def test_globs_are_sorted_and_a_glob_without_matches_is_named(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("Text.\n" if name.endswith("txt") else '{"text": "x"}\n')
    files = list_inputs([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "a*")])
    assert [f.path for f in files] == [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.jsonl")]
    with pytest.raises(CorpusError, match=r"the input glob '.*/\*\.md' matches no file"):
        list_inputs([str(tmp_path / "*.md")])
    assert list_inputs("builtin")[0].path == "builtin"


def test_gzip_files_are_read_whole(tmp_path):
    path = tmp_path / "part.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "One doc. Two sentences."}) + "\n" + '{"text": "Next."}\n')
    (file,) = list_inputs([str(path)])
    assert file.compressed and file.jsonl and not file.splittable
    assert [d.sentences for d in read_documents(file)] == [
        ["One doc.", "Two sentences."],
        ["Next."],
    ]
    text = tmp_path / "plain.txt.gz"
    with gzip.open(text, "wt") as f:
        f.write("A.\nB.\n\nC.\n")
    assert load_documents(str(text)) == [["A.", "B."], ["C."]]


def _random_text(rng: random.Random) -> str:
    lines = [""] * rng.randint(0, 2)
    for d in range(rng.randint(1, 8)):
        for s in range(rng.randint(1, 4)):
            lines.append("x" * rng.randint(0, 300) + f" doc{d} s{s}" + " " * rng.randint(0, 2))
        lines += [rng.choice(["", "  ", " \t", "\r"]) for _ in range(rng.randint(1, 3))]
    return "\n".join(lines) + rng.choice(["", "\n"])


def test_byte_ranges_read_every_document_exactly_once(tmp_path):
    """Any cut of a file into ranges yields its documents once each, in order (text and JSONL),
    documents longer than the read-back block (4 KiB) included."""
    rng = random.Random(0)
    for trial in range(150):
        text = _random_text(rng)
        if trial % 3 == 0:
            docs = [t for t in text.split("\n\n") if t.strip()]
            text = "".join(json.dumps({"text": t.replace("\n", " ")}) + "\n" for t in docs)
            path = tmp_path / f"t{trial}.jsonl"
        else:
            path = tmp_path / f"t{trial}.txt"
        if trial % 10 == 0:
            text = text.replace("x" * 50, "x" * 5000)
        path.write_bytes(text.encode())
        file = InputFile(str(path), path.stat().st_size)
        whole = [(d.offset, d.sentences) for d in read_documents(file)]
        cuts = (
            sorted(rng.sample(range(1, file.size), min(4, file.size - 1))) if file.size > 1 else []
        )
        bounds = [0, *cuts, file.size]
        parts = [
            (d.offset, d.sentences)
            for start, end in zip(bounds, bounds[1:], strict=False)
            for d in read_documents(file, start, end)
        ]
        assert parts == whole, (trial, cuts)


def test_document_hash_is_stable_and_keyed():
    assert document_hash("some text") == document_hash("some text")
    assert document_hash("some text", 1) != document_hash("some text", 0)
    # Pinned: a prepared directory's eval split must not move between jaxgen versions.
    assert document_hash("some text") == 0xFA5902383E05E1EC
