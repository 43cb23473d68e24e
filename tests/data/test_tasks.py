"""Task readers: every GLUE layout, generic TSV/CSV/JSONL, SQuAD JSON and its sliding windows,
prompt/response JSONL, and errors that name the file and line."""

import json
import re

import numpy as np
import pytest

from jaxgen.data.tasks import (
    GLUE_TASKS,
    Example,
    SquadExample,
    TaskError,
    is_regression,
    label_names,
    read_generic,
    read_glue,
    read_prompt_response,
    read_squad,
    squad_windows,
)

MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(*lines):
    return "".join("\t".join(line) + "\n" for line in lines)


# -------------------------------------------------------------------------------------------- GLUE


def test_cola_train_has_no_header_and_test_has_one(tmp_path):
    write(tmp_path / "train.tsv", rows(
        ("gj04", "1", "", "Our friends won't buy this analysis."),
        ("gj04", "0", "*", "They drank the pub."),
    ))  # fmt: skip
    write(tmp_path / "test.tsv", rows(("index", "sentence"), ("0", "Bill whistled.")))
    train = read_glue(tmp_path, "cola", "train")
    assert train == [
        Example("train-0", "Our friends won't buy this analysis.", None, "1"),
        Example("train-1", "They drank the pub.", None, "0"),
    ]
    assert read_glue(tmp_path, "cola", "test") == [Example("test-0", "Bill whistled.")]


def test_sst2_mrpc_qnli_rte_wnli_layouts(tmp_path):
    write(tmp_path / "SST-2/train.tsv", rows(("sentence", "label"), ("a charming journey ", "1")))
    write(tmp_path / "SST-2/test.tsv", rows(("index", "sentence"), ("0", "it 's dull")))
    write(tmp_path / "MRPC/dev.tsv", rows(
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        ("1", "702876", "702977", 'He called " the witness " a liar .', "He lied ."),
    ))  # fmt: skip
    write(tmp_path / "QNLI/train.tsv", rows(
        ("index", "question", "sentence", "label"), ("0", "Who?", "Nobody.", "not_entailment"),
    ))  # fmt: skip
    write(tmp_path / "RTE/test.tsv", rows(("index", "sentence1", "sentence2"), ("0", "A.", "B.")))
    write(tmp_path / "WNLI/train.tsv", rows(
        ("index", "sentence1", "sentence2", "label"), ("0", "I saw it.", "It was seen.", "1"),
    ))  # fmt: skip
    # The glue_data root works as well as the task's own directory.
    assert read_glue(tmp_path, "sst2", "train") == [
        Example("train-0", "a charming journey ", None, "1")
    ]
    assert read_glue(tmp_path / "SST-2", "sst2", "test")[0].text == "it 's dull"
    assert read_glue(tmp_path, "mrpc", "dev") == [
        Example("dev-0", 'He called " the witness " a liar .', "He lied .", "1")
    ]
    assert read_glue(tmp_path, "qnli", "train")[0].label == "not_entailment"
    assert read_glue(tmp_path, "rte", "test") == [Example("test-0", "A.", "B.", None)]
    assert read_glue(tmp_path, "wnli", "train")[0].text_pair == "It was seen."


def test_mnli_columns_and_a_stray_quote(tmp_path):
    # A sentence opening with an unclosed `"`: with csv quoting on, the reader would swallow every
    # line after it into that field.
    write(tmp_path / "train.tsv", rows(
        tuple(MNLI_HEADER.split("\t")) + ("label1", "gold_label"),
        ("0", "31193", "31193n", "government", "(", "(", "(", "(", '"He said no.', "He agreed.",
         "contradiction", "contradiction"),
        ("1", "101457", "101457e", "telephone", "(", "(", "(", "(", "Yes.", "Yes indeed.",
         "entailment", "entailment"),
    ))  # fmt: skip
    labels5 = ("label1", "label2", "label3", "label4", "label5", "gold_label")
    write(tmp_path / "dev_mismatched.tsv", rows(
        tuple(MNLI_HEADER.split("\t")) + labels5,
        ("0", "63735", "63735n", "letters", "(", "(", "(", "(", "P.", "H.",
         "neutral", "entailment", "neutral", "neutral", "neutral", "neutral"),
    ))  # fmt: skip
    write(tmp_path / "test_matched.tsv", rows(
        tuple(MNLI_HEADER.split("\t")),
        ("0", "31", "31e", "fiction", "(", "(", "(", "(", "P.", "H."),
    ))  # fmt: skip
    train = read_glue(tmp_path, "mnli", "train")
    assert train == [
        Example("train-0", '"He said no.', "He agreed.", "contradiction"),
        Example("train-1", "Yes.", "Yes indeed.", "entailment"),
    ]
    assert read_glue(tmp_path, "mnli_mismatched", "dev") == [
        Example("dev-0", "P.", "H.", "neutral")
    ]
    assert read_glue(tmp_path, "mnli", "test") == [Example("test-0", "P.", "H.", None)]
    assert GLUE_TASKS["mnli"].labels == ("contradiction", "entailment", "neutral")


def test_stsb_is_regression_and_qqp_skips_short_rows(tmp_path):
    header = ("index", "genre", "filename", "year", "old_index", "source1", "source2")
    write(tmp_path / "STS-B/train.tsv", rows(
        header + ("sentence1", "sentence2", "score"),
        ("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane.",
         "An air plane.", "5.000"),
        ("1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man.", "A cat.",
         "0.500"),
    ))  # fmt: skip
    stsb = read_glue(tmp_path, "stsb", "train")
    assert [e.label for e in stsb] == [5.0, 0.5]
    assert is_regression(stsb) and GLUE_TASKS["stsb"].regression
    write(tmp_path / "QQP/train.tsv", rows(
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        ("0", "1", "2", "How?", "Why?", "0"),
        ("1", "3", "4", "Truncated"),
        ("2", "5", "6", "Where?", "Where, then?", "1"),
    ))  # fmt: skip
    qqp = read_glue(tmp_path, "qqp", "train")
    assert [(e.text, e.label) for e in qqp] == [("How?", "0"), ("Where?", "1")]
    assert not is_regression(qqp)


def test_ax_reads_either_file_name(tmp_path):
    write(tmp_path / "diagnostic/diagnostic.tsv", rows(
        ("index", "sentence1", "sentence2"), ("0", "The cat sat.", "A cat sat."),
    ))  # fmt: skip
    assert read_glue(tmp_path, "ax", "test") == [Example("test-0", "The cat sat.", "A cat sat.")]


def test_glue_errors_name_file_line_and_fix(tmp_path):
    with pytest.raises(TaskError, match=r"no rte train file .*expected train\.tsv"):
        read_glue(tmp_path, "rte", "train")
    with pytest.raises(TaskError, match="unknown GLUE task 'sst-2'.*did you mean 'sst2'"):
        read_glue(tmp_path, "sst-2", "train")
    with pytest.raises(TaskError, match="no split 'validation'"):
        read_glue(tmp_path, "rte", "validation")

    path = write(tmp_path / "MRPC/train.tsv", rows(
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        ("1", "1", "2", "One.", "Two."),
        ("0", "3", "4 Three."),
    ))  # fmt: skip
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: ") + r".*at least 5 .*found 3"):
        read_glue(tmp_path, "mrpc", "train")

    path = write(tmp_path / "RTE/dev.tsv", rows(
        ("index", "sentence1", "sentence2", "label"), ("0", "A.", "B.", "maybe"),
    ))  # fmt: skip
    with pytest.raises(
        TaskError, match=re.escape(f"{path}:2: unknown rte label 'maybe'; valid labels: entailment")
    ):
        read_glue(tmp_path, "rte", "dev")

    path = write(tmp_path / "RTE/train.tsv", rows(("index", "sentence1", "sentence2", "label")))
    with pytest.raises(TaskError, match=re.escape(f"{path} has no rte train examples")):
        read_glue(tmp_path, "rte", "train")

    header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "s1", "s2")
    path = write(tmp_path / "STS-B/dev.tsv", rows(
        header + ("score",), ("0", "g", "f", "y", "o", "s", "s", "A.", "B.", "high"),
    ))  # fmt: skip
    with pytest.raises(TaskError, match=re.escape(f"{path}:2: stsb label 'high' is not a number")):
        read_glue(tmp_path, "stsb", "dev")


# ----------------------------------------------------------------------------------------- generic


def test_generic_tsv_csv_and_jsonl(tmp_path):
    tsv = write(tmp_path / "pairs.tsv", rows(
        ("id", "text", "text_pair", "label"), ("7", '"a quoted', "b", "yes"), ("8", "c", "d", "no"),
    ))  # fmt: skip
    examples = read_generic(tsv)
    assert examples == [
        Example("pairs-0", '"a quoted', "b", "yes"),
        Example("pairs-1", "c", "d", "no"),
    ]
    assert label_names(examples) == ("no", "yes") and not is_regression(examples)

    csv_path = write(tmp_path / "single.csv", 'label,text\n1,"one, two"\n0,"line\nbreak"\n')
    assert read_generic(csv_path) == [
        Example("single-0", "one, two", None, "1"),
        Example("single-1", "line\nbreak", None, "0"),
    ]

    jsonl = write(
        tmp_path / "scores.jsonl", '{"text": "x", "label": 3}\n\n{"text": "y", "label": 4.5}\n'
    )
    scores = read_generic(jsonl)
    assert [e.label for e in scores] == [3.0, 4.5] and is_regression(scores)
    classes = write(tmp_path / "classes.jsonl", '{"text": "x", "text_pair": "z", "label": 1}\n')
    assert read_generic(classes) == [Example("classes-0", "x", "z", "1")]
    # A fraction in a TSV label makes the whole file regression.
    reg = write(tmp_path / "reg.tsv", rows(("text", "label"), ("a", "1"), ("b", "2.5")))
    assert [e.label for e in read_generic(reg)] == [1.0, 2.5]
    unlabeled = write(tmp_path / "test.tsv", rows(("text",), ("only text",)))
    assert read_generic(unlabeled, require_label=False) == [Example("test-0", "only text")]


def test_generic_errors_name_file_and_line(tmp_path):
    path = write(tmp_path / "a.tsv", rows(("sentence", "label"), ("x", "1")))
    with pytest.raises(TaskError, match=re.escape(f"{path}:1: the header row has no 'text'")):
        read_generic(path)
    path = write(tmp_path / "b.csv", "text,label\nx,1\ny\n")
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: 1 column(s) where the header has 2")):
        read_generic(path)
    path = write(tmp_path / "c.jsonl", '{"text": "x", "label": "a"}\n\n{"text": "y", label}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: not valid JSON")):
        read_generic(path)
    path = write(tmp_path / "d.jsonl", '{"text": "x", "label": 0.5}\n{"text": "y", "label": "b"}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:2: label 'b' is not a number")):
        read_generic(path)
    path = write(tmp_path / "e.jsonl", '{"text": "x"}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:1: no 'label'")):
        read_generic(path)
    path = write(tmp_path / "f.tsv", "")
    with pytest.raises(TaskError, match=re.escape(f"{path} is empty")):
        read_generic(path)
    path = write(tmp_path / "g.jsonl", "\n")
    with pytest.raises(TaskError, match=re.escape(f"{path} is empty")):
        read_generic(path)
    path = write(tmp_path / "h.txt", "text\n")
    with pytest.raises(TaskError, match="unknown task file type '.txt'"):
        read_generic(path)


def test_prompt_response(tmp_path):
    path = write(
        tmp_path / "sft.jsonl", json.dumps({"prompt": "Hi?", "response": " Hello."}) + "\n"
    )
    assert read_prompt_response(path) == [("Hi?", " Hello.")]
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(TaskError, match=re.escape(f"{bad}:2: ") + r".*'response' is missing"):
        read_prompt_response(bad)
    with pytest.raises(TaskError, match="does not exist"):
        read_prompt_response(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------------------------- SQuAD


def squad_file(path, qas, context="Paris is the capital of France."):
    return write(path, json.dumps({
        "version": "v2.0",
        "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}],
    }, indent=1))  # fmt: skip


def test_read_squad_v1_and_v2(tmp_path):
    v1 = squad_file(tmp_path / "v1.json", [{
        "id": "q1", "question": "What is Paris?",
        "answers": [{"text": "the capital of France", "answer_start": 9},
                    {"text": "capital", "answer_start": 13}],
    }])  # fmt: skip
    assert read_squad(v1) == [
        SquadExample(
            "q1",
            "What is Paris?",
            "Paris is the capital of France.",
            (("the capital of France", 9), ("capital", 13)),
        )
    ]
    v2 = squad_file(tmp_path / "v2.json", [
        {"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}],
         "is_impossible": False},
        {"id": "q2", "question": "Moon?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "France", "answer_start": 24}]},
    ])  # fmt: skip
    examples = read_squad(v2)
    assert [(e.qid, e.answers, e.is_impossible) for e in examples] == [
        ("q1", (("Paris", 0),), False),
        ("q2", (), True),
    ]


def test_squad_errors(tmp_path):
    path = squad_file(tmp_path / "a.json", [
        {"id": "q1", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "?", "answers": [{"text": "France", "answer_start": 3}]},
    ])  # fmt: skip
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"q2"' in text)
    with pytest.raises(
        TaskError, match=re.escape(f"{path}:{line}: question 'q2'") + ".*not at answer_start 3"
    ):
        read_squad(path)
    path = squad_file(tmp_path / "b.json", [{"id": "q1", "question": "?", "answers": []}])
    with pytest.raises(TaskError, match="has no answers; give one or mark it"):
        read_squad(path)
    path = write(tmp_path / "c.json", '{"data": [\n{"paragraphs": [}\n]}')
    with pytest.raises(TaskError, match=re.escape(f"{path}:2: not valid JSON")):
        read_squad(path)
    path = write(tmp_path / "d.json", '{"articles": []}')
    with pytest.raises(TaskError, match="expected an object with a 'data' list"):
        read_squad(path)


def whitespace_tokenizer(vocab):
    """Words as tokens with char offsets; ids assigned on first sight (from 10, above specials)."""

    def tokenize(text):
        return [
            (vocab.setdefault(m.group(), 10 + len(vocab)), (m.start(), m.end()))
            for m in re.finditer(r"\S+", text)
        ]

    return tokenize


CLS, SEP = 2, 3


def test_squad_windows_follow_run_squad():
    context = " ".join(f"w{i}" for i in range(10))  # 10 tokens
    start = context.index("w4")
    example = SquadExample("q", "q0 q1 q2 q3 q4", context, (("w4 w5", start),))
    vocab: dict[str, int] = {}
    tokenize = whitespace_tokenizer(vocab)
    windows = squad_windows(
        example, tokenize, cls_id=CLS, sep_id=SEP, max_seq_len=10, max_query_len=3, doc_stride=2
    )
    # 10 - 3 query - 3 specials = 4 doc tokens per window; spans start 0, 2, 4, 6 (the last one
    # reaches token 9).
    assert len(windows) == 4
    ids = lambda *words: [vocab[w] for w in words]
    query, doc = ids("q0", "q1", "q2"), ids("w2", "w3", "w4", "w5")
    assert windows[1].input_ids.tolist() == [CLS, *query, SEP, *doc, SEP]
    assert windows[1].segment_ids.tolist() == [0] * 5 + [1] * 5
    assert windows[1].input_mask.tolist() == [1] * 10
    # The doc starts at position 5 ([CLS] + 3 query + [SEP]); w4 w5 are doc tokens 4 and 5.
    # Window 1 (tokens 2..5): 4 - 2 + 5 = 7, 8. Window 2 (tokens 4..7): 5, 6. Others: [CLS].
    assert [(w.start_position, w.end_position) for w in windows] == [(0, 0), (7, 8), (5, 6), (0, 0)]
    # Max context, score min(left, right) + 0.01 * length: token 3 scores 0.04 in span 0 and 1.04
    # in span 1; token 2 scores 1.04 in span 0 and 0.04 in span 1; and so on.
    assert [w.token_is_max_context[5:9].tolist() for w in windows] == [
        [True, True, True, False],
        [False, True, True, False],
        [False, True, True, False],
        [False, True, True, True],
    ]
    assert not windows[0].token_is_max_context[:5].any()
    assert windows[1].token_offsets[5].tolist() == [context.index("w2"), context.index("w2") + 2]
    assert (windows[1].token_offsets[:5] == -1).all() and (windows[1].token_offsets[9] == -1).all()


def test_squad_window_padding_and_impossible():
    example = SquadExample("q", "Where?", "Nowhere at all", (), is_impossible=True)
    (window,) = squad_windows(
        example, whitespace_tokenizer({}), cls_id=CLS, sep_id=SEP, pad_id=0, max_seq_len=8
    )
    # [CLS] Where? [SEP] Nowhere at all [SEP] = 7 tokens, one pad.
    assert window.input_mask.tolist() == [1] * 7 + [0]
    assert window.segment_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert window.input_ids[-1] == 0 and window.input_ids[-2] == SEP
    assert (window.start_position, window.end_position) == (0, 0)
    assert window.token_is_max_context.tolist() == [False] * 3 + [True] * 3 + [False] * 2
    with pytest.raises(ValueError, match="max_seq_len=3 leaves no room"):
        squad_windows(example, whitespace_tokenizer({}), cls_id=CLS, sep_id=SEP, max_seq_len=3)
    assert np.issubdtype(window.input_ids.dtype, np.integer)
