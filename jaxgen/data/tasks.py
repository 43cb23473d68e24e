"""Fine-tuning task data: GLUE TSVs, generic TSV/CSV/JSONL files, SQuAD v1.1/v2.0 JSON cut into
run_squad.py's sliding windows, and prompt/response JSONL for GPT supervised fine-tuning.

GLUE files are read the way HF's `transformers/data/processors/glue.py` reads them (the column
indices and label orders in `GLUE_TASKS`), tab-separated with quoting off: GLUE sentences hold
stray `"` that csv quoting would silently merge with the following lines. Test splits have no
labels (the GLUE server keeps them), so their examples carry `label=None`.

Labels are strings for classification (in the task's label order, BERT's and HF's, so `label2id`
round-trips through HF exports) and floats for regression (STS-B, or a generic file whose labels
are numbers with a fraction): `is_regression(examples)` tells which.

Every error is a `TaskError` naming the file, the 1-based line where there is one, and what to do.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

TSV_SUFFIXES = (".tsv",)
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".json")
GENERIC_COLUMNS = ("text", "text_pair", "label")

# A label written with a fraction or an exponent ("3.8", "1e-2") is a regression target; "0" and
# "1" stay class names.
_FLOAT_LABEL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?$")

# `text -> [(token_id, (char_start, char_end)), ...]`, char_end exclusive (as HF fast tokenizers'
# offset mappings), so SQuAD windows work with any tokenizer.
TokenizeWithOffsets = Callable[[str], Sequence[tuple[int, tuple[int, int]]]]


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file, the line and what to do."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One classification or regression example; `label` is None in unlabeled (test) splits."""

    guid: str
    text: str
    text_pair: str | None = None
    label: str | float | None = None


# -------------------------------------------------------------------------------------------- GLUE


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a split's fields sit in its rows: 0-based indices, -1 for the last column; `label`
    None for an unlabeled split."""

    text: int
    text_pair: int | None = None
    label: int | None = None

    @property
    def min_columns(self) -> int:
        """The fewest columns a row needs (a last-column label must come after the texts)."""
        texts = max(self.text, -1 if self.text_pair is None else self.text_pair) + 1
        if self.label is None:
            return texts
        return texts + 1 if self.label == -1 else max(texts, self.label + 1)


@dataclasses.dataclass(frozen=True)
class GlueSplit:
    """One split of a GLUE task: the accepted file names (first found wins), header, columns."""

    files: tuple[str, ...]
    header: bool
    columns: Columns


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its directory (download_glue_data.py's layout), splits, labels in BERT/HF
    order (empty for regression) and the file name the GLUE server expects for test predictions."""

    dirname: str
    splits: dict[str, GlueSplit]
    labels: tuple[str, ...]
    submission_file: str
    # HF's QQP processor drops rows too short to index (IndexError) instead of failing; kept so
    # example counts match HF's.
    skip_short_rows: bool = False

    @property
    def regression(self) -> bool:
        """STS-B: one float target instead of classes."""
        return not self.labels


def _glue_task(
    dirname: str,
    labels: tuple[str, ...],
    labeled: Columns,
    unlabeled: Columns,
    submission_file: str,
    *,
    dev: str = "dev.tsv",
    test: str = "test.tsv",
    labeled_header: bool = True,
    skip_short_rows: bool = False,
) -> GlueTask:
    """A task whose train and dev files share one layout and whose test file has another."""
    return GlueTask(
        dirname=dirname,
        splits={
            "train": GlueSplit(("train.tsv",), labeled_header, labeled),
            "dev": GlueSplit((dev,), labeled_header, labeled),
            "test": GlueSplit((test,), True, unlabeled),
        },
        labels=labels,
        submission_file=submission_file,
        skip_short_rows=skip_short_rows,
    )


_BINARY = ("0", "1")
_NLI = ("contradiction", "entailment", "neutral")
_ENTAILMENT = ("entailment", "not_entailment")


def _mnli(which: str, submission: str) -> GlueTask:
    """MNLI's matched or mismatched evaluation: one train set, its own dev and test files."""
    return _glue_task("MNLI", _NLI, Columns(8, 9, -1), Columns(8, 9), submission,
                      dev=f"dev_{which}.tsv", test=f"test_{which}.tsv")  # fmt: skip


GLUE_TASKS: dict[str, GlueTask] = {
    # CoLA train/dev: source, label, original mark, sentence; no header. Test: index, sentence.
    "cola": _glue_task(
        "CoLA", _BINARY, Columns(3, None, 1), Columns(1), "CoLA.tsv", labeled_header=False
    ),
    "sst2": _glue_task("SST-2", _BINARY, Columns(0, None, 1), Columns(1), "SST-2.tsv"),
    # Quality, #1 ID, #2 ID, #1 String, #2 String (test: index instead of Quality).
    "mrpc": _glue_task("MRPC", _BINARY, Columns(3, 4, 0), Columns(3, 4), "MRPC.tsv"),
    # index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
    "stsb": _glue_task("STS-B", (), Columns(7, 8, -1), Columns(7, 8), "STS-B.tsv"),
    # id, qid1, qid2, question1, question2, is_duplicate (test: id, question1, question2).
    "qqp": _glue_task(
        "QQP", _BINARY, Columns(3, 4, 5), Columns(1, 2), "QQP.tsv", skip_short_rows=True
    ),
    # index, promptID, pairID, genre, 4 parses, sentence1, sentence2, label1[..5], gold_label.
    "mnli": _mnli("matched", "MNLI-m.tsv"),
    "mnli_mismatched": _mnli("mismatched", "MNLI-mm.tsv"),
    "qnli": _glue_task("QNLI", _ENTAILMENT, Columns(1, 2, -1), Columns(1, 2), "QNLI.tsv"),
    "rte": _glue_task("RTE", _ENTAILMENT, Columns(1, 2, -1), Columns(1, 2), "RTE.tsv"),
    "wnli": _glue_task("WNLI", _BINARY, Columns(1, 2, -1), Columns(1, 2), "WNLI.tsv"),
    # The diagnostic set: test only (index, sentence1, sentence2), predicted by an MNLI model.
    # download_glue_data.py saves the server's AX.tsv as diagnostic/diagnostic.tsv.
    "ax": GlueTask(
        dirname="diagnostic",
        splits={"test": GlueSplit(("AX.tsv", "diagnostic.tsv"), True, Columns(1, 2))},
        labels=_NLI,
        submission_file="AX.tsv",
    ),
}


def glue_task(task: str) -> GlueTask:
    """The `GLUE_TASKS` row of `task`; an unknown name fails with the nearest valid one."""
    if task not in GLUE_TASKS:
        close = difflib.get_close_matches(task.lower().replace("-", ""), GLUE_TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TaskError(f"unknown GLUE task {task!r}{hint}; GLUE tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def _glue_file(task_dir: Path, task: str, split: str) -> tuple[Path, GlueSplit]:
    """The file of a split, in `task_dir` itself or in its `<dirname>/` (the glue_data root)."""
    spec = glue_task(task)
    if split not in spec.splits:
        raise TaskError(
            f"GLUE task {task!r} has no split {split!r}; its splits: {', '.join(spec.splits)}"
        )
    found = spec.splits[split]
    for directory in (task_dir, task_dir / spec.dirname):
        for name in found.files:
            if (directory / name).is_file():
                return directory / name, found
    names = " or ".join(found.files)
    every = ", ".join(name for s in spec.splits.values() for name in s.files)
    raise TaskError(
        f"no {task} {split} file in {task_dir}: expected {names} there or in "
        f"{task_dir / spec.dirname} (the {task} files are {every}, as download_glue_data.py "
        "writes them); pass the task's directory or the glue_data directory"
    )


def has_glue_split(task_dir: str | Path, task: str, split: str) -> bool:
    """Whether `task_dir` holds the file of a GLUE task's split (test files are optional)."""
    try:
        _glue_file(Path(task_dir), task, split)
    except TaskError:
        return False
    return True


def _rows(path: Path, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """(1-based line, fields) of every non-blank row; decoding problems become TaskErrors."""
    line = 1
    # utf-8-sig: a byte-order mark would otherwise glue itself to the first header name.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            for row in reader:
                if any(field.strip() for field in row):
                    yield line, row
                line = reader.line_num + 1
        except UnicodeDecodeError as err:
            raise TaskError(
                f"{path}:{reader.line_num + 1}: not UTF-8 text ({err.reason}); re-save the file "
                "as UTF-8"
            ) from err
        except csv.Error as err:
            raise TaskError(f"{path}:{reader.line_num}: unreadable row ({err})") from err


def read_glue(task_dir: str | Path, task: str, split: str) -> list[Example]:
    """The examples of a GLUE task's split ('train', 'dev' or 'test'); test labels are None.

    `task_dir` is the task's directory (glue_data/MNLI) or the glue_data directory holding it.
    """
    path, spec_split = _glue_file(Path(task_dir), task, split)
    spec, columns = GLUE_TASKS[task], spec_split.columns
    examples = []
    rows = _rows(path, "\t", csv.QUOTE_NONE)
    if spec_split.header:
        next(rows, None)
    for line, row in rows:
        if len(row) < columns.min_columns:
            if spec.skip_short_rows:
                continue
            raise TaskError(
                f"{path}:{line}: {task} {split} rows need at least {columns.min_columns} "
                f"tab-separated columns, found {len(row)}; check that this is the GLUE {task} "
                "file and that no sentence contains a tab or line break"
            )
        label = None if columns.label is None else row[columns.label]
        if label is not None:
            label = _glue_label(path, line, task, label)
        text_pair = None if columns.text_pair is None else row[columns.text_pair]
        examples.append(Example(f"{split}-{len(examples)}", row[columns.text], text_pair, label))
    if not examples:
        raise TaskError(f"{path} has no {task} {split} examples; the file is empty or header-only")
    return examples


def _glue_label(path: Path, line: int, task: str, label: str) -> str | float:
    """A row's label checked against the task: a known class name, or a float for STS-B."""
    spec = GLUE_TASKS[task]
    if spec.regression:
        try:
            return float(label)
        except ValueError:
            raise TaskError(
                f"{path}:{line}: {task} label {label!r} is not a number; STS-B scores are floats "
                "in the last column"
            ) from None
    if label not in spec.labels:
        raise TaskError(
            f"{path}:{line}: unknown {task} label {label!r}; valid labels: "
            f"{', '.join(spec.labels)} (fix the row, or check the task name and split)"
        )
    return label


# ----------------------------------------------------------------------------------------- generic


def is_regression(examples: Sequence[Example]) -> bool:
    """Whether the examples' labels are floats (regression) rather than class names."""
    return any(isinstance(example.label, float) for example in examples)


def label_names(examples: Sequence[Example]) -> tuple[str, ...]:
    """The sorted distinct class names of classification examples (for a generic file's head)."""
    if is_regression(examples):
        raise ValueError("regression examples have float labels, not class names")
    return tuple(sorted({e.label for e in examples if isinstance(e.label, str)}))


def read_generic(path: str | Path, *, require_label: bool = True) -> list[Example]:
    """The examples of a TSV/CSV file (header naming `text`, optional `text_pair`, `label`) or a
    JSONL file (.jsonl or .json, one object per line, the same keys); labels with a fraction (3.8)
    or JSON floats make it regression (`is_regression`), others are class names (ints as "0").

    TSV is read with quoting off, as GLUE is; CSV with standard quoting (fields holding commas,
    quotes or line breaks are quoted). With `require_label=False` a file without labels gives
    examples with `label=None`.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _generic_jsonl(path, require_label)
    elif suffix in TSV_SUFFIXES + CSV_SUFFIXES:
        tsv = suffix in TSV_SUFFIXES
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if tsv else (",", csv.QUOTE_MINIMAL)
        records = _generic_table(path, delimiter, quoting, require_label)
    else:
        known = ", ".join(TSV_SUFFIXES + CSV_SUFFIXES + JSONL_SUFFIXES)
        raise TaskError(f"{path}: unknown task file type {suffix!r}; use one of {known}")
    if not records:
        raise TaskError(f"{path} has no examples; the file is empty or header-only")
    labels = _resolve_labels(path, [(line, label) for line, _, _, label in records])
    return [
        Example(f"{path.stem}-{n}", text, pair, label)
        for n, ((_, text, pair, _), label) in enumerate(zip(records, labels, strict=True))
    ]


# (line, text, text_pair, raw label) of one row before labels are resolved.
_Record = tuple[int, str, str | None, str | int | float | None]


def _generic_table(path: Path, delimiter: str, quoting: int, require_label: bool) -> list[_Record]:
    """(line, text, text_pair, raw label) of each row of a TSV/CSV file with a header row."""
    rows = _rows(path, delimiter, quoting)
    first = next(rows, None)
    if first is None:
        raise TaskError(
            f"{path} is empty; it needs a header row naming {', '.join(GENERIC_COLUMNS)}"
        )
    header_line, header = first
    names = [name.strip() for name in header]
    required = ("text", "label") if require_label else ("text",)
    missing = [name for name in required if name not in names]
    if missing:
        raise TaskError(
            f"{path}:{header_line}: the header row has no {' or '.join(map(repr, missing))} "
            f"column (found {', '.join(map(repr, names))}); name the columns text, text_pair "
            "(optional) and label"
        )
    index = {name: names.index(name) for name in GENERIC_COLUMNS if name in names}
    records: list[_Record] = []
    for line, row in rows:
        if len(row) < len(names):
            raise TaskError(
                f"{path}:{line}: {len(row)} column(s) where the header has {len(names)}; "
                + (
                    "check for tabs inside a field (TSV is read with quoting off)"
                    if delimiter == "\t"
                    else "quote fields that hold commas"
                )
            )
        pair = row[index["text_pair"]] if "text_pair" in index else None
        label = row[index["label"]] if "label" in index else None
        records.append((line, row[index["text"]], pair, label))
    return records


def _generic_jsonl(path: Path, require_label: bool) -> list[_Record]:
    """(line, text, text_pair, raw label) of each object of a JSONL file."""
    records: list[_Record] = []
    for line, record in _json_lines(path):
        if not isinstance(record.get("text"), str):
            raise TaskError(f"{path}:{line}: each line needs a string 'text'")
        pair = record.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise TaskError(f"{path}:{line}: 'text_pair' must be a string or null")
        label = record.get("label")
        if label is None and require_label:
            raise TaskError(f"{path}:{line}: no 'label'; every line of a labeled file needs one")
        if isinstance(label, bool) or not isinstance(label, str | int | float | None):
            raise TaskError(
                f"{path}:{line}: label {label!r} must be a string, an integer class or a float"
            )
        records.append((line, record["text"], pair, label))
    return records


def _resolve_labels(
    path: Path, raw: Sequence[tuple[int, str | int | float | None]]
) -> list[str | float | None]:
    """Class names, or floats when any label has a fraction; a mix fails at the odd line."""
    regression = any(
        isinstance(label, float) or (isinstance(label, str) and _FLOAT_LABEL.match(label.strip()))
        for _, label in raw
    )
    out: list[str | float | None] = []
    for line, label in raw:
        if label is None:
            out.append(None)
        elif isinstance(label, str) and not label.strip():
            raise TaskError(f"{path}:{line}: empty label; fill it in or drop the row")
        elif not regression:
            out.append(label.strip() if isinstance(label, str) else str(label))
        else:
            try:
                out.append(float(label))
            except ValueError:
                raise TaskError(
                    f"{path}:{line}: label {label!r} is not a number, but other labels in the file "
                    "are (a float label means regression); make every label a number or every "
                    "label a class name"
                ) from None
    return out


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line, object) of every non-blank line of a JSONL file."""
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    count = 0
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskError(
                    f"{path}:{line}: not valid JSON ({err.msg}); JSONL needs one JSON object per "
                    "line"
                ) from err
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{line}: a JSONL line must be a JSON object")
            count += 1
            yield line, record
    if not count:
        raise TaskError(f"{path} is empty; it needs one JSON object per line")


def read_prompt_response(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file with string keys `prompt` and `response`."""
    path = Path(path)
    pairs = []
    for line, record in _json_lines(path):
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise TaskError(
                    f"{path}:{line}: each line needs string 'prompt' and 'response' keys "
                    f"({key!r} is {'missing' if key not in record else type(record[key]).__name__})"
                )
        pairs.append((record["prompt"], record["response"]))
    return pairs


# ------------------------------------------------------------------------------------------- SQuAD


@dataclasses.dataclass(frozen=True)
class SquadExample:
    """A SQuAD question: its context, gold answers as (text, char start) and v2.0's
    `is_impossible` (no answers then)."""

    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool = False


def _line_of(text: str, needle: str) -> int:
    """The 1-based line where `needle` first occurs in `text` (1 when it does not)."""
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def read_squad(path: str | Path) -> list[SquadExample]:
    """The questions of a SQuAD v1.1 or v2.0 JSON file (`{"data": [{"paragraphs": [...]}]}`)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"SQuAD file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    try:
        root = json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise TaskError(
            f"{path}:1: not a SQuAD file: expected an object with a 'data' list of articles "
            "(the train-v1.1.json / dev-v2.0.json layout)"
        )
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for i, article in enumerate(root["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TaskError(f"{path}: data[{i}] needs a 'paragraphs' list")
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise TaskError(f"{path}: {where} needs a string 'context'")
            if not isinstance(paragraph.get("qas"), list):
                raise TaskError(f"{path}: {where} needs a 'qas' list")
            for k, qa in enumerate(paragraph["qas"]):
                example = _squad_question(path, text, f"{where}.qas[{k}]", paragraph["context"], qa)
                if example.qid in seen:
                    line = _line_of(text, json.dumps(example.qid))
                    raise TaskError(f"{path}:{line}: question id {example.qid!r} occurs twice")
                seen.add(example.qid)
                examples.append(example)
    if not examples:
        raise TaskError(f"{path} has no questions")
    return examples


def _squad_question(path: Path, text: str, where: str, context: str, qa: object) -> SquadExample:
    """One `qas` entry, checked: string id and question, answers found at their offsets."""
    if not isinstance(qa, dict) or not isinstance(qa.get("id"), str):
        raise TaskError(f"{path}: {where} needs a string 'id'")
    qid = qa["id"]
    at = f"{path}:{_line_of(text, json.dumps(qid))}: question {qid!r} ({where})"
    if not isinstance(qa.get("question"), str):
        raise TaskError(f"{at} needs a string 'question'")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise TaskError(f"{at}: 'is_impossible' must be true or false")
    answers: list[tuple[str, int]] = []
    # v2.0 impossible questions carry `plausible_answers`, which are not answers.
    for answer in [] if impossible else qa.get("answers", []):
        if not (
            isinstance(answer, dict)
            and isinstance(answer.get("text"), str)
            and isinstance(answer.get("answer_start"), int)
        ):
            raise TaskError(f"{at}: each answer needs a string 'text' and an int 'answer_start'")
        start, answer_text = answer["answer_start"], answer["text"]
        found = context[start : start + len(answer_text)]
        if start < 0 or found != answer_text:
            raise TaskError(
                f"{at}: answer {answer_text!r} is not at answer_start {start} of the context "
                f"(found {found!r}); fix answer_start to the answer's character offset"
            )
        answers.append((answer_text, start))
    if not impossible and not answers:
        raise TaskError(f'{at} has no answers; give one or mark it "is_impossible": true')
    return SquadExample(qid, qa["question"], context, tuple(answers), impossible)


@dataclasses.dataclass(frozen=True, eq=False)
class SquadWindow:
    """One window of a SQuAD example, `[CLS] query [SEP] doc span [SEP]` padded to L tokens.

    input_ids, input_mask, segment_ids: [L] int32 (segment 1 on the doc span and its [SEP]);
    token_offsets: [L, 2] int32, each context token's (char_start, char_end) in the context, -1
    on query, special and padding tokens; token_is_max_context: [L] bool, whether this window
    gives the token more context than any other window holding it. start/end_position: the
    answer's token positions in this window, 0 ([CLS]) when it is impossible or not inside.
    """

    qid: str
    index: int
    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    token_offsets: np.ndarray
    token_is_max_context: np.ndarray
    start_position: int
    end_position: int


def _doc_spans(num_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of run_squad.py's overlapping spans over `num_tokens` context tokens."""
    spans, start = [], 0
    while start < num_tokens:
        length = min(num_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length == num_tokens:
            break
        start += min(length, doc_stride)
    return spans


def _is_max_context(spans: Sequence[tuple[int, int]], current: int, position: int) -> bool:
    """run_squad.py's `_check_is_max_context`: whether span `current` holds context token
    `position` with the most context (min of left and right, ties to the longer span)."""
    best_score, best_span = None, None
    for index, (start, length) in enumerate(spans):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best_span = score, index
    return best_span == current


def _answer_tokens(
    offsets: Sequence[tuple[int, int]], char_start: int, char_end: int
) -> tuple[int, int] | None:
    """The first and last context token overlapping chars [char_start, char_end), or None.

    Offsets align the answer to tokens directly, which is what run_squad.py's whitespace split
    plus `_improve_answer_span` approximate for WordPiece.
    """
    inside = [i for i, (start, end) in enumerate(offsets) if end > char_start and start < char_end]
    return (inside[0], inside[-1]) if inside else None


def squad_windows(
    example: SquadExample,
    tokenize_with_offsets: TokenizeWithOffsets,
    *,
    cls_id: int,
    sep_id: int,
    pad_id: int = 0,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_query_len: int = 64,
) -> list[SquadWindow]:
    """The sliding windows of an example as run_squad.py builds them (the query truncated to
    `max_query_len` tokens, the context cut into spans `doc_stride` apart); each is [L] long."""
    if doc_stride <= 0 or max_query_len <= 0:
        raise ValueError(f"{doc_stride=} and {max_query_len=} must be positive")
    query = [token for token, _ in tokenize_with_offsets(example.question)][:max_query_len]
    # Each span fits beside the query actually used, as in run_squad.py.
    max_doc_tokens = max_seq_len - len(query) - 3
    if max_doc_tokens <= 0:
        raise ValueError(
            f"{max_seq_len=} leaves no room for context after the {len(query)}-token query of "
            f"{example.qid!r} and 3 special tokens; lower max_query_len ({max_query_len})"
        )
    doc = list(tokenize_with_offsets(example.context))
    if not doc:
        raise ValueError(f"question {example.qid!r}: the context has no tokens")
    doc_ids = [token for token, _ in doc]
    doc_offsets = [tuple(offset) for _, offset in doc]
    answer = None
    if not example.is_impossible and example.answers:
        text, start = example.answers[0]
        answer = _answer_tokens(doc_offsets, start, start + len(text))
    spans = _doc_spans(len(doc), max_doc_tokens, doc_stride)
    doc_offset = len(query) + 2  # [CLS] query [SEP]
    windows = []
    for index, (span_start, length) in enumerate(spans):
        ids = [cls_id, *query, sep_id, *doc_ids[span_start : span_start + length], sep_id]
        n = len(ids)
        input_ids = np.full([max_seq_len], pad_id, np.int32)
        input_ids[:n] = ids
        input_mask = (np.arange(max_seq_len) < n).astype(np.int32)
        segment_ids = ((np.arange(max_seq_len) >= doc_offset) & (input_mask == 1)).astype(np.int32)
        token_offsets = np.full([max_seq_len, 2], -1, np.int32)
        token_offsets[doc_offset : doc_offset + length] = doc_offsets[
            span_start : span_start + length
        ]
        max_context = np.zeros([max_seq_len], bool)
        for i in range(length):
            max_context[doc_offset + i] = _is_max_context(spans, index, span_start + i)
        start_position = end_position = 0
        if answer is not None and span_start <= answer[0] and answer[1] < span_start + length:
            start_position = answer[0] - span_start + doc_offset
            end_position = answer[1] - span_start + doc_offset
        windows.append(
            SquadWindow(
                qid=example.qid,
                index=index,
                input_ids=input_ids,
                input_mask=input_mask,
                segment_ids=segment_ids,
                token_offsets=token_offsets,
                token_is_max_context=max_context,
                start_position=start_position,
                end_position=end_position,
            )
        )
    return windows
