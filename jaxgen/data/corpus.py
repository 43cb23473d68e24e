"""Corpora as streams of documents: the built-in Python reference text, BERT-format text and JSONL
files (optionally gzip), local or `gs://`, named by paths, directories or globs.

A document is a list of sentences (strings). NSP needs sentence boundaries, so every source is split
into sentences here; the GPT and T5 objectives simply join them again.

Inputs are read as byte ranges: `read_documents(file, start, end)` yields the documents that start
in [start, end), so any number of readers can each take a range of a large file and together see
every document exactly once. Gzip files and the built-in corpus are read whole.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
GZIP_SUFFIX = ".gz"

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


# ------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input of a corpus: 'builtin', a local path or a URL (gs://...), and its size in bytes."""

    path: str
    size: int

    @property
    def compressed(self) -> bool:
        """Gzip: read whole, never split into byte ranges."""
        return self.path.lower().endswith(GZIP_SUFFIX)

    @property
    def jsonl(self) -> bool:
        """JSONL with a 'text' field per line (else BERT-format text)."""
        name = self.path.lower().removesuffix(GZIP_SUFFIX)
        return name.endswith(JSONL_SUFFIXES)

    @property
    def splittable(self) -> bool:
        """Whether readers may take byte ranges of it."""
        return self.path != BUILTIN and not self.compressed


@dataclasses.dataclass(frozen=True)
class Document:
    """A document: where it starts in its file and its sentences."""

    offset: int
    sentences: list[str]

    @property
    def text(self) -> str:
        """The sentences, one per line (what the document hash is taken of)."""
        return "\n".join(self.sentences)


def _is_url(path: str) -> bool:
    return "://" in path


def _corpus_suffix(name: str) -> bool:
    name = name.lower().removesuffix(GZIP_SUFFIX)
    return name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def _expand(pattern: str) -> list[tuple[str, int]]:
    """(path, size) of the files a path, directory or glob names (local or a URL)."""
    if _is_url(pattern):
        from etils import epath

        path = epath.Path(pattern)
        if any(c in pattern for c in "*?["):
            base = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)]
            base = base[: base.rindex("/") + 1]
            matches = list(epath.Path(base).glob(pattern[len(base) :]))
        elif path.is_dir():
            matches = [p for p in path.rglob("*") if _corpus_suffix(p.name)]
        else:
            matches = [path] if path.exists() else []
        return [(str(p), p.stat().length) for p in matches if not p.is_dir()]
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        found = [str(p) for p in Path(pattern).rglob("*") if p.is_file() and _corpus_suffix(p.name)]
        if not found:
            raise CorpusError(
                f"corpus directory {pattern} has no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                "files (optionally .gz)"
            )
    elif any(c in pattern for c in "*?["):
        found = [p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)]
    else:
        found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise CorpusError(f"corpus path {pattern} does not exist")
    return [(p, os.path.getsize(p)) for p in found]


def list_inputs(patterns: str | Sequence[str]) -> list[InputFile]:
    """The sorted, distinct input files of 'builtin', paths, directories and globs.

    Raises CorpusError for a glob that matches nothing or an empty file, naming it.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise CorpusError("no corpus input given")
    files: dict[str, int] = {}
    for pattern in patterns:
        if pattern == BUILTIN:
            files[BUILTIN] = sum(len(s) + 1 for doc in builtin_documents() for s in doc)
            continue
        matches = _expand(pattern)
        if not matches:
            raise CorpusError(f"the input glob {pattern!r} matches no file")
        files.update(matches)
    for path, size in files.items():
        if size == 0:
            raise CorpusError(f"input file {path} is empty")
    return [InputFile(path, files[path]) for path in sorted(files)]


def _open(path: str) -> IO[bytes]:
    if _is_url(path):
        from etils import epath

        handle = epath.Path(path).open("rb")
    else:
        handle = open(path, "rb")
    return gzip.open(handle) if path.lower().endswith(GZIP_SUFFIX) else handle


def _check_text(path: str, offset: int, data: bytes) -> None:
    """Refuses bytes read at `offset` that hold a NUL: the file is binary, not text."""
    if b"\x00" in data:
        raise CorpusError(
            f"{path} is not a text file (a NUL byte near offset {offset + data.index(0)})"
        )


def _decode(path: str, offset: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {offset + err.start}: {err.reason})"
        ) from err


def _previous_line_blank(handle: IO[bytes], line_start: int) -> bool:
    """Whether the line before the one starting at `line_start` (> 0) is blank."""
    end = line_start - 1  # the newline that ends the previous line
    while end > 0:
        begin = max(0, end - 4096)
        handle.seek(begin)
        block = handle.read(end - begin)
        newline = block.rfind(b"\n")
        if block[newline + 1 :].strip():
            return False
        if newline >= 0:
            return True
        end = begin
    return True


def _line_start(handle: IO[bytes], start: int) -> int:
    """The offset of the first line that starts at or after `start`."""
    if start == 0:
        return 0
    handle.seek(start - 1)
    if handle.read(1) != b"\n":
        handle.readline()  # the rest of a line that began before `start`
    return handle.tell()


def _lines(handle: IO[bytes], offset: int, path: str) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every line from `offset` (a line start) on."""
    handle.seek(offset)
    for line in iter(handle.readline, b""):
        _check_text(path, offset, line)
        yield offset, line
        offset += len(line)


def _blocks(handle: IO[bytes], offset: int, path: str) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) from `offset` (a line start) on, read in 1 MiB blocks."""
    handle.seek(offset)
    pending = b""
    while True:
        block = handle.read(1 << 20)
        data = pending + block
        if not block:
            if data:
                _check_text(path, offset, data)
                yield offset, data
            return
        cut = data.rfind(b"\n") + 1
        pending = data[cut:]
        _check_text(path, offset, data[:cut])
        for line in data[:cut].split(b"\n")[:-1]:
            yield offset, line
            offset += len(line) + 1


def _bert_format(path: str, handle: IO[bytes], start: int, end: float) -> Iterator[Document]:
    """One sentence per line, blank lines between documents (google-research/bert's format)."""
    first = _line_start(handle, start)
    # A document that began before `start` belongs to the range before this one: skip its lines.
    inside_earlier = first > 0 and not _previous_line_blank(handle, first)
    current: Document | None = None
    for offset, raw in _blocks(handle, first, path):
        line = _decode(path, offset, raw).strip()
        if not line:
            if current is not None:
                yield current
            current, inside_earlier = None, False
        elif inside_earlier:
            continue
        elif current is None:
            if offset >= end:
                return
            current = Document(offset, [line])
        else:
            current.sentences.append(line)
    if current is not None:
        yield current


def _jsonl(path: str, handle: IO[bytes], start: int, end: float) -> Iterator[Document]:
    """One JSON object per line with a string 'text' field; each text is split into sentences."""
    for offset, raw in _lines(handle, _line_start(handle, start), path):
        if offset >= end:
            return
        line = _decode(path, offset, raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path} at byte {offset}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path} at byte {offset}: each JSONL line needs a string 'text'")
        sentences = [s for para in record["text"].split("\n") for s in split_sentences(para)]
        if sentences:
            yield Document(offset, sentences)


def read_documents(file: InputFile, start: int = 0, end: int | None = None) -> Iterator[Document]:
    """The documents of `file` that start in the byte range [start, end) (whole unsplittable
    files: start must be 0)."""
    end = file.size if end is None else end
    if file.path == BUILTIN:
        offset = 0
        for sentences in builtin_documents():
            yield Document(offset, sentences)
            offset += sum(len(s) + 1 for s in sentences)
        return
    if start and not file.splittable:
        raise ValueError(f"{file.path} is read whole; got a range starting at {start}")
    end = float("inf") if not file.splittable else end
    with _open(file.path) as raw:
        handle = raw if file.splittable else io.BufferedReader(raw)
        reader = _jsonl if file.jsonl else _bert_format
        yield from reader(file.path, handle, start, end)


def load_documents(spec: str | Sequence[str], min_documents: int = 1) -> list[list[str]]:
    """Every document (a list of sentences) of 'builtin', files, directories or globs, in memory;
    for small corpora and tests (training streams through `jaxgen.data.prepare`)."""
    files = list_inputs(spec)
    docs = [doc.sentences for file in files for doc in read_documents(file)]
    where = ", ".join(f.path for f in files)
    if not docs:
        raise CorpusError(f"corpus {where} is empty (no documents with text)")
    if len(docs) < min_documents:
        raise CorpusError(
            f"corpus {where} has {len(docs)} document(s) but at least {min_documents} are needed "
            "(NSP pairs sentences from different documents; separate documents with a blank line)"
        )
    return docs


def document_hash(text: str, key: int = 0) -> int:
    """A stable 64-bit hash of a document's text, keyed (e.g. by data.split_seed)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")
