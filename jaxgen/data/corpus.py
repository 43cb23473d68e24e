"""Corpora as documents of sentences: the built-in Python reference text, BERT-format text, JSONL,
or a directory.

A document is a list of sentences (strings). NSP needs sentence boundaries, so every source is split
into sentences here; the GPT and T5 pipelines simply join them again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by whitespace and a
# capital letter, a digit, or an opening quote/bracket. Lower-case continuations ("e.g. the") do not
# split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]”’]*\s+(?=[A-Z0-9\"'(\[“‘*])")
_HEADING_RULE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_BULLET = re.compile(r"^\s*(?:[*\-•]|\d+\.|\(\d+\))\s+")
# Characters that prose is made of; paragraphs with many others are grammar rules, code or tables.
_PROSE_CHARS = re.compile(r"[A-Za-z\s.,;:'\"“”‘’()\-!?]")
_THREE_WORDS = re.compile(r"\b[a-z]+ [a-z]+ [a-z]+\b")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message names the path and what is wrong."""


def split_sentences(text: str) -> list[str]:
    """Splits a paragraph of prose into sentences with a deterministic regex."""
    text = " ".join(text.split())
    if not text:
        return []
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _is_prose(paragraph: list[str]) -> bool:
    """True for running text; False for code, grammar rules, tables and interpreter sessions."""
    if any(
        line.lstrip().startswith((">>>", "...", "$ ")) or "::=" in line or "+--" in line
        for line in paragraph
    ):
        return False
    text = " ".join(line.strip() for line in paragraph)
    words = text.split()
    if len(words) < 4:
        return False
    prose = len(_PROSE_CHARS.findall(text))
    # Three plain lower-case words in a row ("is used to") almost never occur in code.
    return (
        prose / len(text) >= 0.85
        and sum(w[:1].isalpha() or w[:1] in '"(“' for w in words) / len(words) >= 0.6
        and _THREE_WORDS.search(text) is not None
    )


def _prose_paragraphs(text: str) -> list[list[str]]:
    """Paragraphs (lists of lines) of prose; headings and code-like blocks are dropped."""
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if line.strip() and not _HEADING_RULE.match(line):
            current.append(line)
            continue
        if _HEADING_RULE.match(line) and current:
            current = current[:-1]  # the heading itself
        if current:
            paragraphs.append(current)
        current = []
    out = []
    for paragraph in paragraphs:
        # A bullet starts a new paragraph of its own; its continuation lines stay with it.
        for chunk in _split_bullets(paragraph):
            if _is_prose(chunk):
                out.append([_BULLET.sub("", line, count=1) for line in chunk])
    return out


def _split_bullets(paragraph: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = []
    for line in paragraph:
        if _BULLET.match(line) or not chunks:
            chunks.append([line])
        else:
            chunks[-1].append(line)
    return chunks


def text_to_sentences(text: str) -> list[str]:
    """Turns a free-text document (paragraphs separated by blank lines) into its prose sentences."""
    sentences = []
    for paragraph in _prose_paragraphs(text):
        sentences.extend(split_sentences(" ".join(line.strip() for line in paragraph)))
    return sentences


def _sections(text: str) -> list[str]:
    """A reference text cut before each line followed by a rule (a heading, or a blank line before a
    transition rule; sections without prose are dropped later)."""
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if _HEADING_RULE.match(line) and len(sections[-1]) > 1:
            heading = sections[-1].pop()
            sections.append([heading])
        sections[-1].append(line)
    return ["\n".join(lines) for lines in sections]


def builtin_documents() -> list[list[str]]:
    """The built-in corpus: the sections of the `pydoc_data.topics` entries (sorted by name, cut at
    their headings) as prose sentences, deduplicated.

    Sections rather than whole entries are the documents: NSP needs many documents, and the 79
    entries are few enough for a small model to learn which words belong to which entry instead of
    whether two segments continue each other (sections give ~170 documents of the same text). Many
    entries are also sections of bigger ones ('if' and 'while' inside 'compound'): left in, a
    held-out document would also be training text. Going from the shortest section up, sentences
    already seen are removed, so each text stays whole in its smallest home.
    """
    from pydoc_data.topics import topics

    docs = [
        text_to_sentences(section) for name in sorted(topics) for section in _sections(topics[name])
    ]
    seen: set[str] = set()
    kept: dict[int, list[str]] = {}
    for index in sorted(range(len(docs)), key=lambda i: (len(docs[i]), i)):
        fresh = [s for s in dict.fromkeys(docs[index]) if s not in seen]
        seen.update(fresh)
        if fresh:
            kept[index] = fresh
    return [kept[i] for i in sorted(kept)]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CorpusError(f"{path} is not a text file (it contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from err


def _bert_format_documents(path: Path) -> list[list[str]]:
    """One sentence per line, blank lines between documents (google-research/bert's format)."""
    docs: list[list[str]] = [[]]
    for line in _read_text(path).splitlines():
        line = line.strip()
        if not line:
            docs.append([])
        else:
            docs[-1].append(line)
    return [doc for doc in docs if doc]


def _jsonl_documents(path: Path) -> list[list[str]]:
    """One JSON object per line with a string 'text' field; each text is split into sentences."""
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{number}: each JSONL line needs a string 'text' field")
        sentences = [s for para in record["text"].split("\n") for s in split_sentences(para)]
        if sentences:
            docs.append(sentences)
    return docs


def _file_documents(path: Path) -> list[list[str]]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_documents(path)
    return _bert_format_documents(path)


def load_documents(spec: str, min_documents: int = 1) -> list[list[str]]:
    """Documents (lists of sentences) of 'builtin', a text/JSONL file, or a directory of them."""
    if spec == BUILTIN:
        docs, where = builtin_documents(), "the built-in corpus"
    else:
        path = Path(spec).expanduser()
        where = str(path)
        if not path.exists():
            raise CorpusError(f"corpus path {path} does not exist")
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not files:
                raise CorpusError(
                    f"corpus directory {path} has no "
                    f"{'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files"
                )
            docs = [doc for file in files for doc in _file_documents(file)]
        else:
            docs = _file_documents(path)
    if not docs:
        raise CorpusError(f"corpus {where} is empty (no documents with text)")
    if len(docs) < min_documents:
        raise CorpusError(
            f"corpus {where} has {len(docs)} document(s) but at least {min_documents} are needed "
            "(NSP pairs sentences from different documents; separate documents with a blank line)"
        )
    return docs


def split_indices(
    num_documents: int, eval_documents: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out split of document indices: (train [N - E], eval [E]), each sorted."""
    if not 0 <= eval_documents < num_documents:
        raise CorpusError(
            f"eval_documents={eval_documents} must be in [0, {num_documents}) for a corpus of "
            f"{num_documents} documents"
        )
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_documents)
    return np.sort(order[eval_documents:]), np.sort(order[:eval_documents])


def split_documents(
    docs: Sequence[list[str]], eval_documents: int, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """(train, eval) documents: `eval_documents` held out, chosen deterministically by seed."""
    train, held_out = split_indices(len(docs), eval_documents, seed)
    return [docs[i] for i in train], [docs[i] for i in held_out]


def corpus_hash(docs: Sequence[Sequence[str]]) -> str:
    """A content hash of documents (sentences and boundaries), used as a cache key."""
    digest = hashlib.sha256()
    for doc in docs:
        for sentence in doc:
            digest.update(sentence.encode("utf-8"))
            digest.update(b"\n")
        digest.update(b"\x00")
    return digest.hexdigest()
