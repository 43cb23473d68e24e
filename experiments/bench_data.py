"""Data path at scale: `jaxgen prepare` throughput and memory, trainer start-up and reader speed.

    python experiments/bench_data.py                       # 200 MB corpus in /tmp/jaxgen-bench-data
    python experiments/bench_data.py --corpus_mb 50 --skip_large

On a corpus this script generates (English-like text from the built-in corpus's words, Zipf word
frequencies, documents of 2 to 80 sentences, several BERT-format files), in one run:

- the raw tokenizer: `tokenizers`' `encode_batch` on the corpus's sentences, one thread
  (RAYON_NUM_THREADS=1), MB/s and tokens/s;
- `jaxgen prepare` for configs/bert.py:base (seq_len 512, dupe_factor 10) with 1 and 2 workers, the
  vocabulary given (its training is timed on its own), MB/s and tokens/s per worker and the ratio
  to the raw tokenizer;
- peak RSS of prepare (1 worker, the largest process) at two corpus sizes;
- trainer start-up from the prepared directory: the run's data source, its first train batch and
  its eval batches (no model);
- reader throughput: BERT-base batches (256 x 512, 80 predictions, dynamic masking) on one
  process, examples/s.

Goals (the issue's): prepare >= 0.7x the raw tokenizer per worker and >= 1.6x with 2 workers; peak
RSS < 1.5 GB and within 20% between the sizes; start-up < 10 s; reader >= 2,500 examples/s. The last
lines read `RESULT data <name>=<value> ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/bert.py:base"
FILE_MB = 25  # the generated corpus comes in files of this size


def generate_corpus(directory: Path, megabytes: int, seed: int = 0) -> list[Path]:
    """BERT-format files of English-like text, `megabytes` in all (kept if already there)."""
    from jaxgen.data.corpus import load_documents

    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "DONE"
    files = sorted(directory.glob("part-*.txt"))
    if done.is_file() and done.read_text().strip() == str(megabytes):
        return files
    for old in files:
        old.unlink()
    words = sorted({w for doc in load_documents("builtin") for s in doc for w in s.split()})
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1  # Zipf
    weights /= weights.sum()
    order = rng.permutation(len(words))
    target = megabytes * 2**20
    written, index = 0, 0
    while written < target:
        path = directory / f"part-{index:05d}.txt"
        chunks, size = [], 0
        while size < min(FILE_MB * 2**20, target - written):
            sentences = []
            for length in rng.integers(4, 30, rng.integers(2, 80)):
                picked = order[rng.choice(len(words), length, p=weights)]
                text = " ".join(words[i] for i in picked)
                sentences.append(text[:1].upper() + text[1:] + ".")
            chunk = "\n".join(sentences) + "\n\n"
            chunks.append(chunk)
            size += len(chunk)
        path.write_text("".join(chunks))
        written += size
        index += 1
    done.write_text(f"{megabytes}\n")
    return sorted(directory.glob("part-*.txt"))


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Runs a Python snippet in a fresh process; returns the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"benchmark step failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_vocabulary(corpus: Path, out: Path) -> dict:
    """BERT's 30,522-entry WordPiece vocabulary trained on the corpus's sentences."""
    return run_python(
        f"""
        import json, pathlib, time
        from jaxgen.data.tokenizer import train_tokenizer
        lines = [l for p in sorted(pathlib.Path({str(corpus)!r}).glob("part-*.txt"))
                 for l in p.read_text().split("\\n") if l]
        start = time.perf_counter()
        train_tokenizer("wordpiece", lines, 30522, True).save({str(out)!r})
        print(json.dumps(dict(seconds=time.perf_counter() - start)))
        """
    )


def raw_tokenizer(corpus: Path, vocab: Path) -> dict:
    """encode_batch on every sentence of the corpus, one thread."""
    return run_python(
        f"""
        import json, time
        from jaxgen.data.tokenizer import load_vocabulary
        tok = load_vocabulary("wordpiece", {str(vocab)!r}, True)
        nbytes = tokens = 0
        start = time.perf_counter()
        for path in sorted(__import__("pathlib").Path({str(corpus)!r}).glob("part-*.txt")):
            lines = [l for l in path.read_text().split("\\n") if l]
            nbytes += sum(len(l) + 1 for l in lines)
            for i in range(0, len(lines), 8192):
                tokens += sum(len(e) for e in tok.encode_batch(lines[i:i + 8192]))
        seconds = time.perf_counter() - start
        print(json.dumps(dict(seconds=seconds, mb_per_s=nbytes / 2**20 / seconds,
                              tokens_per_s=tokens / seconds, tokens=tokens)))
        """,
        env={"RAYON_NUM_THREADS": "1"},
    )


def prepare_run(corpus: Path, output: Path, workers: int, extra: list[str]) -> dict:
    """`jaxgen prepare` in a fresh process: seconds, MB/s, peak RSS of the largest process."""
    return run_python(
        f"""
        import json, resource, time
        from jaxgen import config
        from jaxgen.data import prepare, records
        run = config.load_config({CONFIG!r}, {extra!r})
        start = time.perf_counter()
        prepare.prepare(run, {str(corpus / "part-*.txt")!r}, {str(output)!r}, workers={workers})
        seconds = time.perf_counter() - start
        manifest = records.load_manifest({str(output)!r})
        nbytes = sum(i["size"] for i in manifest["inputs"])
        rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        print(json.dumps(dict(seconds=seconds, mb_per_s=nbytes / 2**20 / seconds,
                              peak_rss_mb=rss / 1024, mb=nbytes / 2**20)))
        """,
        env={"RAYON_NUM_THREADS": "1"},
    )


def startup_and_reader(prepared: Path, workdir: Path, batches: int) -> dict:
    """Start-up to the first train batch and the eval batches, then reader examples/s."""
    return run_python(
        f"""
        import json, time
        start = time.perf_counter()
        from jaxgen import config
        from jaxgen.data.source import DataSource
        run = config.load_config({CONFIG!r}, ["data.corpus={prepared}", "train.eval_steps=2",
                                              "data.dynamic_masking=true"])
        source = DataSource(run, {str(workdir)!r})
        iterator = source.dataset("train")
        next(iterator)
        evals = list(source.dataset("eval"))
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range({batches}):
            next(iterator)
        seconds = time.perf_counter() - start
        print(json.dumps(dict(startup_s=startup, examples_per_s={batches} * 256 / seconds)))
        """
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "jaxgen-bench-data")
    )
    parser.add_argument("--corpus_mb", type=int, default=200)
    parser.add_argument("--small_mb", type=int, default=50)
    parser.add_argument("--reader_batches", type=int, default=20)
    parser.add_argument("--skip_large", action="store_true", help="only the small corpus")
    args = parser.parse_args()
    root = Path(args.workdir)
    sizes = [args.small_mb] if args.skip_large else [args.small_mb, args.corpus_mb]
    corpora = {mb: root / f"corpus-{mb}mb" for mb in sizes}
    for mb, directory in corpora.items():
        start = time.perf_counter()
        generate_corpus(directory, mb)
        print(f"corpus {mb} MB in {directory} ({time.perf_counter() - start:.0f} s)", flush=True)
    large = corpora[sizes[-1]]

    # The vocabulary, trained once on the small corpus (timed on its own).
    vocab = root / "vocab" / "vocab.txt"
    if not vocab.is_file():
        trained = train_vocabulary(corpora[sizes[0]], vocab.parent)
        print(f"WordPiece training on {sizes[0]} MB: {trained['seconds']:.0f} s")
    given = [f"data.vocab_path={vocab}"]

    raw = raw_tokenizer(large, vocab)
    print(
        f"raw tokenizer: {raw['mb_per_s']:.2f} MB/s, {raw['tokens_per_s']:,.0f} tokens/s (1 thread)"
    )
    results = {"raw_mb_per_s": raw["mb_per_s"], "raw_tokens_per_s": raw["tokens_per_s"]}
    for workers in (1, 2):
        output = root / f"prepared-{sizes[-1]}mb-{workers}w"
        if output.exists():
            import shutil

            shutil.rmtree(output)
        measured = prepare_run(large, output, workers, given)
        per_worker = measured["mb_per_s"] / workers
        print(f"prepare, {workers} worker(s): {measured['seconds']:.0f} s, "
              f"{measured['mb_per_s']:.2f} MB/s ({per_worker:.2f} per worker) -> "
              f"{measured['mb_per_s'] / raw['mb_per_s']:.2f}x the raw tokenizer")  # fmt: skip
        results[f"prepare_{workers}w_ratio"] = measured["mb_per_s"] / raw["mb_per_s"]
        results[f"prepare_{workers}w_mb_per_s"] = measured["mb_per_s"]
    for mb, directory in corpora.items():
        output = root / f"rss-{mb}mb"
        if output.exists():
            import shutil

            shutil.rmtree(output)
        measured = prepare_run(directory, output, 1, given)
        print(f"peak RSS of prepare, {mb} MB: {measured['peak_rss_mb']:.0f} MB")
        results[f"peak_rss_{mb}mb"] = measured["peak_rss_mb"]
    timing = startup_and_reader(root / f"prepared-{sizes[-1]}mb-1w", root / "run",
                                args.reader_batches)  # fmt: skip
    print(f"start-up from the prepared directory: {timing['startup_s']:.1f} s; reader "
          f"{timing['examples_per_s']:,.0f} BERT-base examples/s")  # fmt: skip
    results.update(startup_s=timing["startup_s"], reader_examples_per_s=timing["examples_per_s"])
    print("RESULT data " + " ".join(f"{k}={v:.3g}" for k, v in results.items()))


if __name__ == "__main__":
    main()
