"""`jaxgen prepare`: deterministic shards (any number of workers, pool or Beam), resumable, a stable
eval split, refusals that name the setting, and bad input that loses nothing."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import pytest

from jaxgen.data import prepare, records
from jaxgen.data.corpus import CorpusError, document_hash, list_inputs, read_documents
from jaxgen.data.reader import PreparedSource
from jaxgen.objectives import DataError

from .conftest import data_config

SHARDS = 4


@pytest.fixture(scope="module")
def corpus(builtin_docs, tmp_path_factory) -> Path:
    """The built-in corpus as a multi-file corpus: three BERT-format files and a gzip JSONL."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        docs = builtin_docs[i::4]
        (root / f"part{i}.txt").write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
    with gzip.open(root / "part3.jsonl.gz", "wt") as f:
        for doc in builtin_docs[3::4]:
            f.write(json.dumps({"text": " ".join(doc)}) + "\n")
    return root


def files_of(root) -> dict[str, bytes]:
    """Every file of a prepared directory but the work files, by relative path."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and prepare.WORK not in p.parts and p.name != records.COMPLETED
    }


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    """BERT records of the corpus, 4 shards, one worker in this process."""
    output = tmp_path_factory.mktemp("reference")
    prepare.prepare(data_config("bert"), str(corpus / "*"), output, num_shards=SHARDS)
    return files_of(output)


def test_every_shard_holds_records_of_both_splits(reference):
    manifest = json.loads(reference[records.MANIFEST])
    assert manifest["family"] == "bert" and manifest["token_dtype"] == "uint16"
    assert len(manifest["files"]["train"]) == SHARDS and len(manifest["files"]["eval"]) == 1
    assert all(e["records"] > 0 for e in manifest["files"]["train"])
    assert sum(manifest["documents_per_shard"]) == 168 and manifest["split"]["eval_documents"] == 6
    assert [i["path"].rsplit("/", 1)[1] for i in manifest["inputs"]] == [
        "part0.txt", "part1.txt", "part2.txt", "part3.jsonl.gz"
    ]  # fmt: skip


@pytest.mark.slow
def test_bytes_do_not_depend_on_workers_or_runner(corpus, reference, tmp_path):
    run = data_config("bert")
    for name, options in {
        "pool of 2": dict(workers=2),
        "beam, in process": dict(runner="beam"),
        "beam, 2 processes": dict(runner="beam", workers=2),
    }.items():
        output = tmp_path / name.replace(" ", "_").replace(",", "")
        prepare.prepare(run, str(corpus / "*"), output, num_shards=SHARDS, **options)
        assert files_of(output) == reference, name


def test_an_interrupted_prepare_resumes_to_the_same_bytes(corpus, reference, tmp_path, monkeypatch):
    run = data_config("bert")
    real = prepare.write_shard
    calls = []

    def dies_on_the_third_shard(task):
        calls.append(task.shard)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a killed run: two shards finished, the third half-written
        return real(task)

    monkeypatch.setattr(prepare, "write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    monkeypatch.setattr(prepare, "write_shard", real)
    assert not (tmp_path / records.COMPLETED).exists()
    (tmp_path / "train" / "part-00002-of-00004.array_record.tmp").write_bytes(b"half")
    with pytest.raises(DataError, match="no COMPLETED"):
        records.load_manifest(tmp_path)
    redone = []
    monkeypatch.setattr(
        prepare, "write_shard", lambda task: redone.append((task.split, task.shard)) or real(task)
    )
    prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    assert redone == [("train", 2), ("train", 3), ("eval", 0)]  # finished shards were kept
    assert files_of(tmp_path) == reference
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_truncated_shard_is_named_and_rewritten(corpus, reference, tmp_path):
    run = data_config("bert")
    prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    broken = tmp_path / "train" / "part-00001-of-00004.array_record"
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(DataError, match=rf"prepared shard {broken} is corrupt or truncated .* run"):
        PreparedSource(tmp_path, "train", run.data)
    prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    assert files_of(tmp_path) == reference
    assert len(PreparedSource(tmp_path, "train", run.data)) > 0


def test_a_full_disk_keeps_the_finished_shards(corpus, reference, tmp_path, monkeypatch):
    run = data_config("bert")
    real = prepare._write_split

    def disk_full_in_shard_3(task, *args):
        if task.shard == 3 and task.split == "train":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(task, *args)

    monkeypatch.setattr(prepare, "_write_split", disk_full_in_shard_3)
    with pytest.raises(DataError, match="No space left on device. 3 of 4 train shards are"):
        prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    assert (tmp_path / "train" / "part-00002-of-00004.array_record").is_file()
    monkeypatch.setattr(prepare, "_write_split", real)
    prepare.prepare(run, str(corpus / "*"), tmp_path, num_shards=SHARDS)
    assert files_of(tmp_path) == reference


def test_another_command_into_the_same_output_is_refused(corpus, tmp_path):
    prepare.prepare(data_config("bert"), str(corpus / "*"), tmp_path, num_shards=SHARDS)
    with pytest.raises(DataError, match=r"prepared by another command \(settings: .*seq_len"):
        prepare.prepare(data_config("bert", "data.seq_len=32"), str(corpus / "*"), tmp_path,
                        num_shards=SHARDS)  # fmt: skip
    with pytest.raises(DataError, match="num_shards: prepared 4, now 2"):
        prepare.prepare(data_config("bert"), str(corpus / "*"), tmp_path, num_shards=2)


def test_a_run_with_other_settings_is_refused(corpus, tmp_path):
    prepare.prepare(data_config("gpt"), str(corpus / "*"), tmp_path, num_shards=SHARDS)
    manifest = records.load_manifest(tmp_path)
    with pytest.raises(DataError, match=r"data.seq_len=64, this run has data.seq_len=32"):
        records.check_manifest(
            manifest, tmp_path, "gpt", data_config("gpt", "data.seq_len=32").data
        )
    with pytest.raises(DataError, match="prepared for model.family='gpt'; this run is 'bert'"):
        records.check_manifest(manifest, tmp_path, "bert", data_config("bert").data)


def test_the_eval_split_is_stable_under_adding_files(builtin_docs, tmp_path):
    first = tmp_path / "first.txt"
    first.write_text("\n\n".join("\n".join(d) for d in builtin_docs[:100]) + "\n")
    added = tmp_path / "added.txt"
    added.write_text("\n\n".join("\n".join(d) for d in builtin_docs[100:]) + "\n")
    run = data_config("t5", "data.eval_fraction=0.1", "data.eval_documents=1")

    def held_out(inputs, output):
        prepare.prepare(run, inputs, output)
        threshold = records.load_manifest(output)["split"]["threshold"]
        return {
            doc.text: document_hash(doc.text, run.data.split_seed) < threshold
            for file in list_inputs(inputs)
            for doc in read_documents(file)
        }

    before = held_out([str(first)], tmp_path / "a")
    after = held_out([str(first), str(added)], tmp_path / "b")
    assert 2 <= sum(before.values()) < 30
    assert all(after[text] == split for text, split in before.items())


def test_a_small_corpus_keeps_its_minimum_eval_split(tmp_path):
    docs = [f"Document {d} talks about topic {d % 3}. It has a second sentence." for d in range(14)]
    path = tmp_path / "fourteen.txt"
    path.write_text("\n\n".join(docs) + "\n")
    run = data_config("bert", "data.eval_fraction=0.14", "data.eval_documents=2")
    prepare.prepare(run, str(path), tmp_path / "out")
    split = records.load_manifest(tmp_path / "out")["split"]
    assert split["eval_documents"] >= 2 and split["train_documents"] >= 2
    with pytest.raises(DataError, match=r"has 3 document\(s\): holding out 2 .* leaves 1 to train"):
        three = tmp_path / "three.txt"
        three.write_text("\n\n".join(docs[:3]) + "\n")
        prepare.prepare(run, str(three), tmp_path / "small")


def test_bad_inputs_are_named(tmp_path):
    run = data_config("gpt")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"some text\n" + bytes(range(256)))
    with pytest.raises(CorpusError, match=f"{binary} is not a text file"):
        prepare.prepare(run, str(binary), tmp_path / "a")
    with pytest.raises(CorpusError, match="matches no file"):
        prepare.prepare(run, str(tmp_path / "*.jsonl"), tmp_path / "b")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty.txt is empty"):
        prepare.prepare(run, str(tmp_path / "empty.txt"), tmp_path / "c")


def test_plan_deals_byte_shares_and_gzip_whole(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.jsonl.gz").write_bytes(b"z" * 30)
    (tmp_path / "c.txt").write_text("y" * 70)
    plan = prepare.plan_shards(list_inputs(str(tmp_path / "*")), 4)  # 200 bytes: 50 per shard
    spans = [[(Path(r.path).name, r.start, r.end) for r in shard] for shard in plan]
    assert spans == [
        [("a.txt", 0, 50)],
        [("a.txt", 50, 100)],
        [("b.jsonl.gz", 0, 30), ("c.txt", 0, 20)],  # b starts at byte 100: in shard 2, whole
        [("c.txt", 20, 70)],
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_training_reads_a_prepared_directory_via_the_cli(family, corpus, tmp_path, capsys):
    from jaxgen import cli
    from tests.tiny_runs import TINY

    output = tmp_path / "prepared"
    overrides = [f"--config.{o}" for o in TINY[family] if o.startswith(("model.", "data."))]
    config = f"configs/{family}.py:smoke"
    with pytest.raises(SystemExit) as done:
        cli.main(["prepare", "--config", config, "--input", str(corpus / "*"), "--output",
                  str(output), "--num_shards", "3", *overrides])  # fmt: skip
    assert done.value.code == 0 and "prepared" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--config", config, "--workdir", str(tmp_path / "run"),
                  f"--config.data.corpus={output}", "--config.train.num_steps=2",
                  "--config.train.batch_size=8", *overrides])  # fmt: skip
    assert done.value.code == 0
    assert (tmp_path / "run" / "DONE").is_file()
    assert (tmp_path / "run" / "tokenizer").is_dir()
    assert not (tmp_path / "run" / "cache").exists()  # read in place, nothing prepared again
    shutil.rmtree(tmp_path / "run")


def test_a_url_output_and_url_inputs_go_through_staging(corpus, reference, tmp_path, monkeypatch):
    """gs:// needs the network; a fake:// scheme mapped onto a local folder takes the same path:
    inputs read through etils.epath, files written locally, then copied to the URL."""
    from etils import epath

    local = epath.Path
    bucket = tmp_path / "bucket"
    shutil.copytree(corpus, bucket / "corpus")
    monkeypatch.setattr(epath, "Path", lambda p: local(str(p).replace("fake://", f"{bucket}/")))
    prepare.prepare(data_config("bert"), "fake://corpus/*", "fake://prep", num_shards=SHARDS)
    written = files_of(bucket / "prep")
    assert written.keys() == reference.keys()
    assert all(written[k] == v for k, v in reference.items() if k != records.MANIFEST)
    assert (bucket / "prep" / records.COMPLETED).is_file()
    assert records.is_prepared("fake://prep") and records.load_manifest("fake://prep")["files"]
    # A re-run finds the URL's directory complete and writes nothing.
    monkeypatch.setattr(prepare, "write_shard", lambda task: pytest.fail("rewrote a shard"))
    prepare.prepare(data_config("bert"), "fake://corpus/*", "fake://prep", num_shards=SHARDS)
