"""Small fine-tuning tasks made from the built-in corpus, in the file layouts real tasks have, so
that every fine-tuning path runs with no download (the tests and experiments/finetune_demo.py).

`topic_examples`: which of two documents (the str methods section, the debugger commands section)
a window of three consecutive sentences comes from; the last fifth of each document is the dev
split, so dev windows are text the model never saw. `write_sst2` writes them in GLUE's SST-2
layout, `write_topic_scores` as a generic JSONL regression task (a score per document),
`write_prompt_response` as SFT JSONL whose response names the document, `write_squad` a span task
(which name a sentence quotes; v2.0: or none) as SQuAD JSON.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from jaxgen.data import corpus

TOPICS = (115, 62)  # builtin_documents() indices: str methods, pdb commands
NAMES = (" strings", " debugger")


def topic_examples() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, dev) lists of (three-sentence text, document label 0/1)."""
    docs = corpus.builtin_documents()
    train, dev = [], []
    for label, index in enumerate(TOPICS):
        sentences = docs[index]
        cut = int(len(sentences) * 0.8)
        for j in range(len(sentences) - 2):
            text = " ".join(sentences[j : j + 3]).replace("\t", " ")
            if j + 2 < cut:
                train.append((text, label))
            elif j >= cut:
                dev.append((text, label))
    random.Random(0).shuffle(train)
    return train, dev


def write_sst2(directory: Path) -> tuple[int, int]:
    """The topic task as GLUE SST-2 files (train/dev with `sentence\\tlabel`, test with
    `index\\tsentence`); returns (train, dev) sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    train, dev = topic_examples()
    for name, rows in (("train", train), ("dev", dev)):
        body = "".join(f"{text}\t{label}\n" for text, label in rows)
        (directory / f"{name}.tsv").write_text("sentence\tlabel\n" + body)
    test = "".join(f"{i}\t{text}\n" for i, (text, _) in enumerate(dev[:10]))
    (directory / "test.tsv").write_text("index\tsentence\n" + test)
    return len(train), len(dev)


SCORES = (1.0, 4.0)  # the regression target of each document


def write_topic_scores(directory: Path) -> tuple[Path, Path]:
    """The topic task as generic JSONL regression files (train, dev): `text` and a float `label`,
    SCORES[document]."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "dev"), topic_examples(), strict=True):
        lines = [json.dumps({"text": text, "label": SCORES[label]}) for text, label in rows]
        path = directory / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def write_prompt_response(directory: Path) -> tuple[Path, Path]:
    """SFT JSONL (train, dev): a sentence's start as the prompt, its document's name the answer."""
    directory.mkdir(parents=True, exist_ok=True)
    train, dev = topic_examples()
    paths = []
    for name, rows in (("train", train), ("dev", dev)):
        lines = [json.dumps({"prompt": f"{text[:60]}\nDocument:", "response": NAMES[label]})
                 for text, label in rows]  # fmt: skip
        path = directory / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def squad_examples(impossible: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, dev) SQuAD paragraphs: a sentence that quotes exactly one short name ("re",
    "str.format()"), the question which name it quotes, the answer that name; with `impossible`
    sentences without quotes join in as questions without an answer (v2.0). Every fifth
    document's sentences are the dev split."""
    splits: tuple[list[dict], list[dict]] = ([], [])
    for d, sentences in enumerate(corpus.builtin_documents()):
        for j, sentence in enumerate(sentences):
            quoted = re.findall(r'"([^"]+)"', sentence)
            qid = f"q{d}-{j}"
            if len(quoted) == 1 and len(quoted[0].split()) <= 3:
                start = sentence.index(f'"{quoted[0]}"') + 1
                answers = [{"text": quoted[0], "answer_start": start}]
                qa = {"id": qid, "question": "Which name is quoted?", "answers": answers}
            elif impossible and not quoted and j % 3 == 0:
                qa = {"id": qid, "question": "Which name is quoted?", "answers": [],
                      "is_impossible": True}  # fmt: skip
            else:
                continue
            splits[d % 5 == 0].append({"context": sentence, "qas": [qa]})
    return splits


def write_squad(directory: Path, impossible: bool = False) -> tuple[Path, Path]:
    """The synthetic SQuAD task as train.json and dev.json; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, paragraphs in zip(("train", "dev"), squad_examples(impossible), strict=True):
        path = directory / f"{name}.json"
        version = "v2.0" if impossible else "1.1"
        payload = {"version": version, "data": [{"title": "builtin", "paragraphs": paragraphs}]}
        path.write_text(json.dumps(payload))
        paths.append(path)
    return paths[0], paths[1]
