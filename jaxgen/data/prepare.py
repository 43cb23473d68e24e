"""`jaxgen prepare`: a corpus -> sharded ArrayRecord files of a family's records, and a manifest.

Two passes over the input, both as independent per-shard tasks run by a local process pool or an
Apache Beam pipeline (the same function, so the bytes are the same):

1. scan: each shard hashes its documents (`corpus.document_hash`, keyed by data.split_seed) and
   keeps a bounded, seeded sample of them for the tokenizer. The driver then fixes the eval rule
   (documents whose hash is below a threshold are held out), trains the tokenizer on the sample's
   train documents (or loads data.vocab_path) and writes the manifest without its files.
2. write: each shard reads its documents again, tokenizes them, makes the objective's records
   (BERT sentence pairs over dupe_factor passes with NotNext partners from the same shard, GPT
   windows, T5 raw chunks) for each split with an rng keyed by (seed, shard), and writes
   train/part-i and eval/part-i under temporary names, renamed when complete, then its marker.

Shard i reads the documents that start in the i-th equal share of the inputs' bytes (gzip files
and the built-in corpus are read whole by the shard their first byte falls in), so a shard's
bytes depend on the inputs, the seed and i only, never on the number of workers or machines, and
a worker holds one shard's documents at a time. Re-running the command skips finished shards and
redoes half-written ones; a directory prepared with other settings is an error, never overwritten.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgen import objectives
from jaxgen.config import DataConfig, RunConfig
from jaxgen.data import corpus as corpus_lib
from jaxgen.data import records
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.objectives import DataError

log = logging.getLogger(__name__)

# Input bytes per shard when --num_shards is not given: a shard's text, tokens and records stay a
# few hundred MB in a worker (experiments/bench_data.py measures the peak).
DEFAULT_SHARD_BYTES = 16 * 2**20
# The tokenizer is trained on at most this much of the train text (a seeded sample).
DEFAULT_TOKENIZER_SAMPLE_BYTES = 64 * 2**20
# Keys of the two document hashes: the split's (data.split_seed) and the tokenizer sample's.
SAMPLE_KEY = 0x5A3D1E
WORK = ".work"


# -------------------------------------------------------------------------------------- tokens


@dataclasses.dataclass
class TokenizedCorpus:
    """All token ids of some documents, flat, with sentence and document boundaries."""

    ids: np.ndarray  # [num_tokens] int32 (or the records' token dtype)
    sentence_starts: np.ndarray  # [num_sentences + 1] int64 offsets into ids
    document_starts: np.ndarray  # [num_documents + 1] int64 offsets into sentences

    @property
    def num_documents(self) -> int:
        """Number of documents (including any that lost all their sentences to tokenization)."""
        return len(self.document_starts) - 1

    def sentences(self, document: int) -> list[np.ndarray]:
        """The non-empty sentences of one document, each [len] int32."""
        first, last = self.document_starts[document], self.document_starts[document + 1]
        starts = self.sentence_starts[first : last + 1]
        return [self.ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a]

    def tokens(self, document: int) -> np.ndarray:
        """All token ids of one document, [len] int32."""
        first, last = self.document_starts[document], self.document_starts[document + 1]
        return self.ids[self.sentence_starts[first] : self.sentence_starts[last]]


def tokenize_documents(
    documents: Sequence[Sequence[str]],
    tokenizer: tokenizer_lib.Tokenizer,
    dtype: np.dtype | type = np.int32,
) -> TokenizedCorpus:
    """Tokenizes every sentence of the documents (batches of 8192 sentences); ids as `dtype`."""
    sentences = [s for doc in documents for s in doc]
    lengths: list[int] = []
    ids: list[list[int]] = []
    for start in range(0, len(sentences), 8192):
        encoded = tokenizer.encode_batch(sentences[start : start + 8192])
        lengths.extend(map(len, encoded))
        ids.extend(encoded)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(lengths))
    sentence_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    document_starts = np.concatenate(
        [[0], np.cumsum([len(doc) for doc in documents], dtype=np.int64)]
    )
    return TokenizedCorpus(flat, sentence_starts, document_starts)


# --------------------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Range:
    """The documents of one input file that start in [start, end)."""

    path: str
    size: int
    start: int
    end: int

    def documents(self) -> Iterator[corpus_lib.Document]:
        """The range's documents, in file order."""
        return corpus_lib.read_documents(
            corpus_lib.InputFile(self.path, self.size), self.start, self.end
        )


def plan_shards(files: Sequence[corpus_lib.InputFile], num_shards: int) -> list[tuple[Range, ...]]:
    """The byte ranges of each shard: shard i owns the documents starting in the i-th of
    `num_shards` equal shares of the inputs' bytes (files taken in sorted order)."""
    total = sum(f.size for f in files)
    bounds = [i * total // num_shards for i in range(num_shards + 1)]
    shards: list[list[Range]] = [[] for _ in range(num_shards)]
    offset = 0
    for file in files:
        if not file.splittable:
            owner = max(i for i in range(num_shards) if bounds[i] <= offset) if total else 0
            shards[owner].append(Range(file.path, file.size, 0, file.size))
        else:
            for i in range(num_shards):
                start, end = max(bounds[i], offset), min(bounds[i + 1], offset + file.size)
                if start < end:
                    shards[i].append(Range(file.path, file.size, start - offset, end - offset))
        offset += file.size
    return [tuple(ranges) for ranges in shards]


@dataclasses.dataclass(frozen=True)
class Task:
    """What one shard task needs: picklable plain values (a Beam or pool worker runs it)."""

    shard: int
    num_shards: int
    ranges: tuple[Range, ...]
    output: str  # the prepared directory: a local path or a URL (gs://...)
    family: str
    data: dict[str, Any]
    seed: int
    split_key: int
    eval_threshold: int = 0  # eval iff the document hash is below it (write passes)
    eval_shards: int = 1  # held-out documents are dealt to this many eval shards by hash
    sample_threshold: int = 0  # the tokenizer sample takes documents whose sample hash is below
    split: str = "train"  # the write pass: "train" reads the inputs, "eval" the held-out buckets

    @property
    def objective(self) -> objectives.Objective:
        """The family's objective module."""
        return objectives.get(self.family)


# ---------------------------------------------------------------------- local or a URL output

_STAGING: dict[str, str] = {}


def _is_url(path: str) -> bool:
    return "://" in path


def local_dir(output: str) -> Path:
    """Where this process writes files of `output`: the directory itself, or for a URL a local
    staging directory whose finished files are copied there (`publish`)."""
    if not _is_url(output):
        return Path(output)
    if output not in _STAGING:
        _STAGING[output] = tempfile.mkdtemp(prefix="jaxgen-prepare-")
    return Path(_STAGING[output])


def publish(output: str, name: str) -> None:
    """Copies a finished file from the staging directory to a URL output (no-op when local)."""
    if not _is_url(output):
        return
    from etils import epath

    target = epath.Path(output) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(local_dir(output)) / name).copy(target, overwrite=True)


def _size(output: str, name: str) -> int | None:
    """The size of a file of the output, or None when it is not there."""
    if not _is_url(output):
        path = Path(output, name)
        return path.stat().st_size if path.is_file() else None
    from etils import epath

    path = epath.Path(output) / name
    return path.stat().length if path.exists() else None


def fetch(output: str, name: str) -> Path:
    """A local copy of a file (or directory) of the output (the file itself when local)."""
    local = local_dir(output) / name
    if _is_url(output) and not local.exists():
        from etils import epath

        source = epath.Path(output) / name
        if source.is_dir():
            local.mkdir(parents=True, exist_ok=True)
            for file in source.iterdir():
                (local / file.name).write_bytes(file.read_bytes())
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(source.read_bytes())
    return local


def _remove(output: str, name: str) -> None:
    if _is_url(output):
        from etils import epath

        (epath.Path(output) / name).unlink(missing_ok=True)
    (local_dir(output) / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ the passes


def scan_shard(task: Task) -> None:
    """Pass 1 of one shard: writes .work/scan-i.npy (its document hashes) and .work/sample-i.jsonl
    (the tokenizer sample: each sampled document's hash and sentences)."""
    hashes, sample = [], []
    for part in task.ranges:
        for doc in part.documents():
            text = doc.text
            value = corpus_lib.document_hash(text, task.split_key)
            hashes.append(value)
            if corpus_lib.document_hash(text, task.split_key ^ SAMPLE_KEY) < task.sample_threshold:
                sample.append(json.dumps({"hash": value, "sentences": doc.sentences}))
    work = local_dir(task.output) / WORK
    work.mkdir(parents=True, exist_ok=True)
    name = f"sample-{task.shard:05d}.jsonl"
    (work / name).write_text("".join(line + "\n" for line in sample))
    publish(task.output, f"{WORK}/{name}")
    # The hashes last, under a temporary name: their file marks the shard as scanned.
    name = f"scan-{task.shard:05d}.npy"
    with open(work / f"{name}.tmp", "wb") as f:
        np.save(f, np.asarray(hashes, np.uint64))
    os.replace(work / f"{name}.tmp", work / name)
    publish(task.output, f"{WORK}/{name}")


def marker_name(split: str, shard: int) -> str:
    """The marker a finished shard of a split writes last, with its counts."""
    return f"{WORK}/{split}-{shard:05d}.json"


def bucket_name(shard: int, bucket: int) -> str:
    """The held-out documents input shard `shard` deals to eval shard `bucket` (JSON lines)."""
    return f"{WORK}/heldout-{shard:05d}-{bucket:05d}.jsonl"


def eval_bucket(value: int, task: Task) -> int:
    """The eval shard of a held-out document: its place below the threshold, in equal parts."""
    return value * task.eval_shards // task.eval_threshold


def write_shard(task: Task) -> dict[str, Any]:
    """Pass 2 of one shard: a train task writes its input range's train records and deals its
    held-out documents to the eval shards' buckets; an eval task writes the records of one
    bucket of held-out documents (NotNext partners from the whole bucket). Files are written under
    temporary names and renamed when complete, then published, then the marker."""
    objective = task.objective
    data = objective.Data.from_mapping(task.data)
    tokenizer = tokenizer_lib.load_tokenizer(fetch(task.output, "tokenizer"))
    dtype = records.token_dtype(tokenizer.vocab_size)
    counts: dict[str, Any] = {"split": task.split, "shard": task.shard}
    if task.split == "eval":
        docs = []
        for shard in range(task.num_shards):
            with open(fetch(task.output, bucket_name(shard, task.shard))) as f:
                docs.extend(json.loads(line) for line in f)
        name = records.shard_path("eval", task.shard, task.eval_shards)
    else:
        docs, held_out = [], [[] for _ in range(task.eval_shards)]
        for part in task.ranges:
            for doc in part.documents():
                value = corpus_lib.document_hash(doc.text, task.split_key)
                if value < task.eval_threshold:
                    held_out[eval_bucket(value, task)].append(json.dumps(doc.sentences))
                else:
                    docs.append(doc.sentences)
        for bucket, lines in enumerate(held_out):
            name = bucket_name(task.shard, bucket)
            (local_dir(task.output) / name).write_text("".join(line + "\n" for line in lines))
            publish(task.output, name)
        counts["held_out"] = [len(lines) for lines in held_out]
        name = records.shard_path("train", task.shard, task.num_shards)
    counts.update(_write_split(task, name, docs, tokenizer, dtype, data))
    counts["documents"] = len(docs)
    publish(task.output, name)
    records.write_json(local_dir(task.output) / marker_name(task.split, task.shard), counts)
    publish(task.output, marker_name(task.split, task.shard))
    return counts


def _write_split(
    task: Task,
    name: str,
    docs: list[list[str]],
    tokenizer: tokenizer_lib.Tokenizer,
    dtype: np.dtype,
    data: DataConfig,
) -> dict[str, int]:
    from array_record.python.array_record_module import ArrayRecordWriter

    path = local_dir(task.output) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = tokens = 0
    objective = task.objective
    encode, size = objective.encode_record, objective.record_tokens
    writer = ArrayRecordWriter(str(tmp), records.WRITER_OPTIONS)
    try:
        if docs:
            # Ids in the records' dtype from the start: encoding a record then copies nothing.
            corpus = tokenize_documents(docs, tokenizer, dtype)
            made = objective.make_records(
                corpus, tokenizer, data, task.split, task.seed, task.shard
            )
            for record in made:
                writer.write(encode(record, dtype, data))
                count += 1
                tokens += size(record)
        writer.close()
    except BaseException:
        if writer.is_open():
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return {"records": count, "tokens": tokens, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------- runners


def _worker_init() -> None:
    # One tokenizer thread per worker process: the pool is the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class Runner:
    """Runs shard tasks: in this process (1 worker), in spawned worker processes kept for every
    pass, or as an Apache Beam pipeline (kind 'beam', with its pipeline options)."""

    def __init__(self, workers: int = 1, kind: str = "local", args: Sequence[str] = ()) -> None:
        if kind not in ("local", "beam"):
            raise DataError(f"--runner must be local or beam, got {kind!r}")
        self.workers, self.kind, self.args = workers, kind, list(args)
        self._pool: Any = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            if exc[0] is not None:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()
            self._pool = None

    def map(self, function: Callable[[Task], Any], tasks: Sequence[Task], desc: str = "") -> None:
        """Runs `function` on every task (any order), with a progress bar."""
        if not tasks:
            return
        if self.kind == "beam":
            _run_beam(function, tasks, self.workers, self.args)
            return
        with tqdm(total=len(tasks), desc=desc, unit="shard", disable=len(tasks) < 2) as bar:
            if self.workers <= 1:
                for task in tasks:
                    function(task)
                    bar.update(1)
                return
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = context.Pool(self.workers, initializer=_worker_init)
            for _ in self._pool.imap_unordered(function, tasks):
                bar.update(1)


def _run_beam(
    function: Callable[[Task], Any], tasks: Sequence[Task], workers: int, args: Sequence[str]
) -> None:
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as err:
        raise DataError("--runner beam needs Apache Beam: pip install 'jaxgen[beam]'") from err
    args = list(args)
    if not any(a.startswith("--runner") for a in args):
        # Beam's default local runner first downloads a Prism binary: name one that runs here.
        mode = "multi_processing" if workers > 1 else "in_memory"
        args += ["--runner=FnApiRunner", f"--direct_num_workers={max(workers, 1)}",
                 f"--direct_running_mode={mode}"]  # fmt: skip
    with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
        _ = pipeline | beam.Create(list(tasks), reshuffle=False) | beam.Map(function)


# -------------------------------------------------------------------------------------- prepare


def eval_threshold(hashes: np.ndarray, data: DataConfig, min_documents: int) -> tuple[int, int]:
    """(threshold, held-out documents): documents whose hash is below the threshold are eval.

    The rule is the eval_fraction of the hash space when that holds at least data.eval_documents
    documents (then adding inputs never moves a document between splits), else the
    eval_documents smallest hashes. Both splits must keep `min_documents` documents.
    """
    total = len(hashes)
    threshold = min(int(data.eval_fraction * 2**64), 2**64 - 1)
    held_out = int(np.sum(hashes < np.uint64(threshold))) if threshold else 0
    if held_out < data.eval_documents:
        held_out = min(data.eval_documents, total)
        ordered = np.sort(hashes)
        threshold = int(ordered[held_out]) if held_out < total else 2**64
        held_out = int(np.sum(hashes < np.uint64(min(threshold, 2**64 - 1))))
    if held_out < min_documents or total - held_out < min_documents:
        raise DataError(
            f"the corpus has {total} document(s): holding out {held_out} (data.eval_fraction="
            f"{data.eval_fraction}, data.eval_documents={data.eval_documents}) leaves "
            f"{total - held_out} to train on, and each split needs at least {min_documents}; "
            "use a larger corpus or change the eval split"
        )
    return threshold, held_out


def command_settings(
    run: RunConfig, files: Sequence[corpus_lib.InputFile], num_shards: int, seed: int
) -> dict[str, Any]:
    """What prepared records are a function of; a re-run with other settings is refused."""
    objective = objectives.get(run.family)
    return {
        "format_version": records.FORMAT_VERSION,
        "family": run.family,
        "settings": records.record_settings(objective, run.data),
        "seed": seed,
        "num_shards": num_shards,
        "vocab": {"path": run.data.vocab_path, "model_vocab_size": run.model.vocab_size},
        "inputs": [{"path": f.path, "size": f.size} for f in files],
    }


def _check_same(existing: dict[str, Any], wanted: dict[str, Any], output: str) -> None:
    changed = [
        f"{key}: prepared {existing.get(key)!r}, now {value!r}"
        for key, value in wanted.items()
        if existing.get(key) != value
    ]
    if changed:
        raise DataError(
            f"{output} was prepared by another command ({'; '.join(changed)}); prepare into a "
            "new --output, or repeat the original command"
        )


def prepare(
    run: RunConfig,
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    num_shards: int | None = None,
    workers: int = 1,
    runner: str = "local",
    runner_args: Sequence[str] = (),
    seed: int | None = None,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
) -> str:
    """Prepares `inputs` (paths, directories, globs, 'builtin') for the run's family and data
    settings into `output` (a directory or a gs:// URL); returns it. Re-running the same command
    finishes what is missing and redoes a half-written or truncated shard.

    seed: keys the records' rngs (default train.seed).
    """
    objective = objectives.get(run.family)
    files = corpus_lib.list_inputs(inputs)
    total = sum(f.size for f in files)
    num_shards = num_shards or max(1, math.ceil(total / DEFAULT_SHARD_BYTES))
    seed = run.train.seed if seed is None else seed
    output = str(output)
    local_dir(output).mkdir(parents=True, exist_ok=True)
    wanted = command_settings(run, files, num_shards, seed)
    manifest = None
    if _size(output, records.MANIFEST) is not None:
        manifest = json.loads(fetch(output, records.MANIFEST).read_text())
        _check_same(manifest, wanted, output)
        if _complete(manifest, output):
            log.info("%s is already prepared", output)
            return output
    plan = plan_shards(files, num_shards)
    base = Task(0, num_shards, (), output, run.family, run.data.to_dict(), seed,
                run.data.split_seed)  # fmt: skip
    with Runner(workers, runner, runner_args) as pool:  # one set of workers for every pass
        if manifest is None:
            manifest = _scan(run, objective, base, plan, wanted, total, tokenizer_sample_bytes,
                             pool)  # fmt: skip
            records.write_json(local_dir(output) / records.MANIFEST, manifest)
            publish(output, records.MANIFEST)
        split = manifest["split"]
        base = dataclasses.replace(
            base, eval_threshold=split["threshold"], eval_shards=split["eval_shards"]
        )
        _clean_partial(output)
        train = [dataclasses.replace(base, shard=i, ranges=ranges) for i, ranges in enumerate(plan)]
        held_out = [
            dataclasses.replace(base, split="eval", shard=j) for j in range(base.eval_shards)
        ]
        try:
            # Train shards first: they deal the held-out documents to the eval shards' buckets.
            pool.map(write_shard, [t for t in train if not _shard_done(output, t)],
                     desc=f"prepare {run.family} train")  # fmt: skip
            pool.map(write_shard, [t for t in held_out if not _shard_done(output, t)],
                     desc=f"prepare {run.family} eval")  # fmt: skip
        except OSError as err:
            done = sum(_shard_done(output, t) for t in train)
            raise DataError(
                f"prepare stopped: {err}. {done} of {num_shards} train shards are finished and "
                f"kept in {output}; fix the cause and run the same command again to write the rest"
            ) from err
    _finish(manifest, output, train + held_out, run.data.seq_len)
    return output


def _scan(
    run: RunConfig,
    objective: objectives.Objective,
    base: Task,
    plan: Sequence[tuple[Range, ...]],
    wanted: dict[str, Any],
    total: int,
    sample_bytes: int,
    pool: Runner,
) -> dict[str, Any]:
    """Pass 1 and what the driver decides from it: the eval rule and the tokenizer."""
    output = base.output
    fraction = 0.0 if run.data.vocab_path else min(1.0, sample_bytes / max(total, 1))
    base = dataclasses.replace(
        base, sample_threshold=2**64 if fraction >= 1.0 else int(fraction * 2**64)
    )
    tasks = [dataclasses.replace(base, shard=i, ranges=r) for i, r in enumerate(plan)]
    todo = [t for t in tasks if _size(output, f"{WORK}/scan-{t.shard:05d}.npy") is None]
    pool.map(scan_shard, todo, desc=f"scan {run.family}")
    hashes = [np.load(fetch(output, f"{WORK}/scan-{t.shard:05d}.npy")) for t in tasks]
    everything = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    if not len(everything):
        inputs = ", ".join(f["path"] for f in wanted["inputs"])
        raise DataError(f"the corpus {inputs} is empty (no documents with text)")
    threshold, held_out = eval_threshold(everything, run.data, objective.MIN_DOCUMENTS)
    # As many eval shards as the held-out share of the train shards, each with enough documents
    # for the objective's records (NSP pairs documents).
    eval_shards = math.ceil(len(plan) * held_out / len(everything))
    eval_shards = max(1, min(eval_shards, held_out // max(4 * objective.MIN_DOCUMENTS, 1)))
    tokenizer = _tokenizer(run, output, tasks, threshold)
    local = local_dir(output)
    tmp = local / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    shutil.rmtree(local / "tokenizer", ignore_errors=True)
    os.replace(tmp, local / "tokenizer")
    for file in (local / "tokenizer").iterdir():
        publish(output, f"tokenizer/{file.name}")
    return {
        **wanted,
        "split": {
            "threshold": threshold,
            "eval_documents": held_out,
            "eval_shards": eval_shards,
            "train_documents": len(everything) - held_out,
        },  # fmt: skip
        "tokenizer": {
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
        },  # fmt: skip
        "token_dtype": records.token_dtype(tokenizer.vocab_size).name,
        "documents_per_shard": [len(h) for h in hashes],
    }


def _tokenizer(
    run: RunConfig, output: str, tasks: Sequence[Task], threshold: int
) -> tokenizer_lib.Tokenizer:
    data = run.data
    if data.vocab_path:
        return tokenizer_lib.load_vocabulary(data.tokenizer, data.vocab_path, data.lowercase)
    sentences: list[str] = []
    for task in tasks:
        with open(fetch(output, f"{WORK}/sample-{task.shard:05d}.jsonl")) as f:
            for line in f:
                entry = json.loads(line)
                if entry["hash"] >= threshold:  # train documents only
                    sentences.extend(entry["sentences"])
    log.info("training a %s tokenizer on %d sentences", data.tokenizer, len(sentences))
    return tokenizer_lib.train_tokenizer(
        data.tokenizer, sentences, run.model.vocab_size, data.lowercase
    )


def _shard_path(task: Task) -> str:
    count = task.eval_shards if task.split == "eval" else task.num_shards
    return records.shard_path(task.split, task.shard, count)


def _shard_done(output: str, task: Task) -> bool:
    """Whether a shard's marker and file are there with the recorded size (else the marker goes,
    and the shard is written again)."""
    marker = marker_name(task.split, task.shard)
    if _size(output, marker) is None:
        return False
    counts = json.loads(fetch(output, marker).read_text())
    if _size(output, _shard_path(task)) != counts["bytes"]:
        _remove(output, marker)
        return False
    return True


def _clean_partial(output: str) -> None:
    """Removes files a killed run left half-written here (they are written again)."""
    for split in records.SPLITS:
        for tmp in (local_dir(output) / split).glob("*.tmp"):
            tmp.unlink()


def _complete(manifest: dict[str, Any], output: str) -> bool:
    """Whether a finished directory still holds every file at its recorded size (else its
    COMPLETED is removed, so that the broken shards are written again)."""
    if _size(output, records.COMPLETED) is None or "files" not in manifest:
        return False
    for split in records.SPLITS:
        for entry in manifest["files"][split]:
            if _size(output, entry["path"]) != entry["bytes"]:
                log.warning(
                    "%s/%s is missing or truncated: writing it again", output, entry["path"]
                )
                _remove(output, records.COMPLETED)
                return False
    return True


def _finish(manifest: dict[str, Any], output: str, tasks: Sequence[Task], seq_len: int) -> None:
    """Adds every file's counts to the manifest and writes COMPLETED last."""
    files: dict[str, list[dict[str, Any]]] = {split: [] for split in records.SPLITS}
    for task in tasks:
        counts = json.loads(fetch(output, marker_name(task.split, task.shard)).read_text())
        entry = {"path": _shard_path(task)}
        entry.update({k: counts[k] for k in ("records", "tokens", "bytes", "documents")})
        files[task.split].append(entry)
    for split in records.SPLITS:
        if not any(entry["records"] for entry in files[split]):
            raise DataError(
                f"the {split} split of {output} has no records of data.seq_len={seq_len}: its "
                "documents are too short or too few"
            )
    manifest["files"] = files
    local = local_dir(output)
    records.write_json(local / records.MANIFEST, manifest)
    publish(output, records.MANIFEST)
    (local / records.COMPLETED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    publish(output, records.COMPLETED)


def iter_records(root: str | os.PathLike, split: str) -> Iterable[bytes]:
    """Every encoded record of one split of a prepared directory, file by file."""
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = records.load_manifest(root)
    for entry in manifest["files"][split]:
        if entry["records"]:
            reader = ArrayRecordReader(str(Path(root) / entry["path"]))
            yield from reader.read_all()
            reader.close()
