"""Tokenizers: WordPiece (BERT), byte-level BPE (GPT-2) and SentencePiece unigram (T5).

Each is trained locally on the corpus (once, then cached by a hash of corpus and settings) or loaded
from the usual files: `vocab.txt`, `vocab.json` + `merges.txt`, or a `.model`. A workdir carries its
tokenizer via `Tokenizer.save(dir)` / `load_tokenizer(dir)`, so sampling reloads exactly what
training used.

SentencePiece follows T5: pad 0, eos 1, unk 2, and 100 sentinels `<extra_id_0>`..`<extra_id_99>` on
top of the trained pieces, `<extra_id_0>` being the last id (vocab_size - 1) and the others counting
down.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen.config import DataConfig

KINDS = DataConfig.TOKENIZERS
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
END_OF_TEXT = "<|endoftext|>"
NUM_SENTINELS = 100
META_FILE = "jaxgen_tokenizer.json"
# Bump when training settings change, so caches made by older code are not reused.
_FORMAT_VERSION = 1
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, loaded or used; the message names the file or setting."""


class Tokenizer:
    """Common interface: encode/decode, vocab_size, special ids and the word-start table for
    whole-word masking.

    Family specials that a kind lacks are None (WordPiece has no eos_id; BPE has no cls_id, sep_id,
    mask_id).
    """

    kind: str
    vocab_size: int
    lowercase: bool
    pad_id: int
    unk_id: int | None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    eos_id: int | None = None
    sentinel_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without any special tokens added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (faster than encode one by one)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (special tokens written out, e.g. [MASK] or <extra_id_0>)."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id."""
        raise NotImplementedError

    @property
    def word_starts(self) -> np.ndarray:
        """[vocab_size] bool: True where a token begins a word (specials count as word starts)."""
        raise NotImplementedError

    def is_word_start(self, token_id: int) -> bool:
        """Whether `token_id` begins a new word (False for WordPiece '##' continuations)."""
        return bool(self.word_starts[token_id])

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens (pad, unk, cls, sep, mask, eos, sentinels) that a kind has."""
        ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.eos_id)
        return tuple(sorted({i for i in ids if i is not None} | set(self.sentinel_ids)))

    def sentinel_id(self, index: int) -> int:
        """Id of `<extra_id_{index}>` (SentencePiece only): vocab_size - 1 - index."""
        if not self.sentinel_ids:
            raise TokenizerError(f"a {self.kind} tokenizer has no sentinel tokens")
        return self.sentinel_ids[index]

    @property
    def fingerprint(self) -> str:
        """A hash of the vocabulary and settings, used to key caches of tokenized data."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer into `directory` so that `load_tokenizer(directory)` rebuilds it."""
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        return {
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "lowercase": self.lowercase,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """WordPiece or byte-level BPE backed by a HuggingFace `tokenizers.Tokenizer`."""

    def __init__(self, kind: str, backend: Any, lowercase: bool):
        self.kind, self.backend, self.lowercase = kind, backend, lowercase
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        find = backend.token_to_id
        if kind == "wordpiece":
            missing = [t for t in WORDPIECE_SPECIALS if find(t) is None]
            if missing:
                raise TokenizerError(f"WordPiece vocabulary lacks special tokens {missing}")
            self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
                find(t) for t in WORDPIECE_SPECIALS
            )
        else:
            if find(END_OF_TEXT) is None:
                raise TokenizerError(f"BPE vocabulary lacks {END_OF_TEXT}")
            # GPT-2 has no padding token: padding positions carry eos and weight 0.
            self.eos_id = self.pad_id = find(END_OF_TEXT)
            self.unk_id = None
        self._word_starts: np.ndarray | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (the Rust backend encodes them in parallel)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; special tokens are kept so masks and separators stay visible."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_with_offsets(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, (char start, char end) in `text`) of every token (SQuAD's answer alignment)."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return [(i, (int(a), int(b))) for i, (a, b) in zip(encoding.ids, encoding.offsets,
                                                            strict=True)]  # fmt: skip

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id."""
        return self.backend.id_to_token(int(token_id))

    @property
    def word_starts(self) -> np.ndarray:
        """[vocab_size] bool: WordPiece '##x' and BPE pieces with no leading 'Ġ' continue words."""
        if self._word_starts is None:
            table = np.ones(self.vocab_size, dtype=bool)
            for token, index in self.backend.get_vocab(with_added_tokens=True).items():
                if self.kind == "wordpiece":
                    table[index] = not token.startswith("##")
                else:
                    table[index] = token.startswith("Ġ")
            table[list(self.special_ids)] = True
            self._word_starts = table
        return self._word_starts

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, meta and vocab.txt (wordpiece) or vocab.json+merges.txt (bpe)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        self.backend.model.save(str(directory))
        (directory / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model plus T5's sentinels appended on top of its pieces."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, lowercase: bool):
        import sentencepiece as spm

        self.model_proto, self.lowercase = model_proto, lowercase
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.num_pieces = self.processor.get_piece_size()
        self.pad_id, self.eos_id = self.processor.pad_id(), self.processor.eos_id()
        self.unk_id = self.processor.unk_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                "SentencePiece model needs pad and eos pieces (T5 uses pad=0, eos=1)"
            )
        if self.processor.piece_to_id("<extra_id_0>") != self.unk_id:
            # Sentinels already inside the model (some exported T5 vocabularies): use them as they
            # are.
            self.vocab_size = self.num_pieces
            self._appended = 0
            self.sentinel_ids = tuple(
                self.processor.piece_to_id(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)
            )
        else:
            self.vocab_size = self.num_pieces + NUM_SENTINELS
            self._appended = NUM_SENTINELS
            self.sentinel_ids = tuple(self.vocab_size - 1 - i for i in range(NUM_SENTINELS))
        self._sentinel_of = {s: i for i, s in enumerate(self.sentinel_ids)}
        self._word_starts: np.ndarray | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts; literal `<extra_id_N>` strings become sentinel ids."""
        if not any("<extra_id_" in t for t in texts):
            return self.processor.encode(list(texts))
        return [self._encode_with_sentinels(t) for t in texts]

    def _encode_with_sentinels(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in _SENTINEL.finditer(text):
            ids += self.processor.encode(text[start : match.start()])
            index = int(match.group(1))
            if index >= NUM_SENTINELS:
                raise TokenizerError(
                    f"sentinel {match.group(0)} out of range (0..{NUM_SENTINELS - 1})"
                )
            ids.append(self.sentinel_ids[index])
            start = match.end()
        return ids + self.processor.encode(text[start:])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; sentinels are written as `<extra_id_N>`, pad and eos are dropped."""
        parts, run = [], []
        for i in (int(i) for i in ids):
            if i in self._sentinel_of:
                parts.append(self.processor.decode(run))
                parts.append(f"<extra_id_{self._sentinel_of[i]}>")
                run = []
            elif i not in (self.pad_id, self.eos_id):
                run.append(i)
        parts.append(self.processor.decode(run))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str:
        """The piece of one id (`<extra_id_N>` for sentinels)."""
        token_id = int(token_id)
        if token_id in self._sentinel_of:
            return f"<extra_id_{self._sentinel_of[token_id]}>"
        return self.processor.id_to_piece(token_id)

    @property
    def word_starts(self) -> np.ndarray:
        """[vocab_size] bool: pieces beginning with '▁' start a word."""
        if self._word_starts is None:
            table = np.ones(self.vocab_size, dtype=bool)
            for i in range(self.num_pieces):
                table[i] = self.processor.id_to_piece(i).startswith("▁")
            table[list(self.special_ids)] = True
            self._word_starts = table
        return self._word_starts

    @property
    def fingerprint(self) -> str:
        """sha256 of the model proto and the sentinel layout."""
        return hashlib.sha256(self.model_proto + f"|{self._appended}".encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes spiece.model and meta."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spiece.model").write_bytes(self.model_proto)
        (directory / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------- training


def _wordpiece_backend(lowercase: bool, vocab: Mapping[str, int] | None = None) -> Any:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    model = (
        models.WordPiece(dict(vocab), unk_token="[UNK]")
        if vocab
        else models.WordPiece(unk_token="[UNK]")
    )
    backend = Backend(model)
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    if vocab:
        # Registered as special so that "[MASK]" in text is one token, never split into pieces.
        backend.add_special_tokens([t for t in WORDPIECE_SPECIALS if t in vocab])
    return backend


def _bpe_backend(model: Any | None = None) -> Any:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(model if model is not None else models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    kind: str, sentences: Sequence[str], vocab_size: int, lowercase: bool
) -> Tokenizer:
    """Trains a tokenizer of `kind` with at most `vocab_size` entries on the given sentences."""
    if kind == "wordpiece":
        from tokenizers import trainers

        backend = _wordpiece_backend(lowercase)
        # The trainer creates '##x' continuation tokens in hash-map order, and their ids break ties
        # between equally frequent merges, so the same corpus can give different vocabularies
        # (huggingface/tokenizers#1794). Declaring every '##x' up front fixes their ids.
        continuations = set()
        for sentence in sentences:
            text = backend.normalizer.normalize_str(sentence)
            for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
                continuations.update(word[1:])
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=[*WORDPIECE_SPECIALS, *("##" + c for c in sorted(continuations))],
            show_progress=False,
        )
        backend.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
        # Renumbered canonically (specials, words, continuations, each sorted); rebuilt from the
        # vocabulary so that only the five specials are special tokens.
        learnt = backend.get_vocab()
        rest = sorted(
            (t for t in learnt if t not in WORDPIECE_SPECIALS),
            key=lambda t: (t.startswith("##"), t),
        )
        vocab = {t: i for i, t in enumerate([*WORDPIECE_SPECIALS, *rest])}
        return HFTokenizer("wordpiece", _wordpiece_backend(lowercase, vocab), lowercase)
    if kind == "bpe":
        from tokenizers import normalizers, pre_tokenizers, trainers

        backend = _bpe_backend()
        if lowercase:
            backend.normalizer = normalizers.Lowercase()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
        return HFTokenizer("bpe", backend, lowercase)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(
            _train_sentencepiece(sentences, vocab_size, lowercase), lowercase
        )
    raise TokenizerError(f"unknown tokenizer {kind!r}; expected one of {KINDS}")


def _train_sentencepiece(sentences: Sequence[str], vocab_size: int, lowercase: bool) -> bytes:
    import sentencepiece as spm

    num_pieces = vocab_size - NUM_SENTINELS
    if num_pieces < 16:
        raise TokenizerError(
            f"vocab_size={vocab_size} leaves no room for SentencePiece pieces beside "
            f"{NUM_SENTINELS} sentinels"
        )
    model = io.BytesIO()
    # An iterator rather than a temp file: the input path would be stored in the model and change
    # its hash.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s.replace("\n", " ") for s in sentences]),
        model_writer=model,
        model_type="unigram",
        vocab_size=num_pieces,
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        shuffle_input_sentence=False,
        num_threads=1,  # single-threaded EM keeps the result reproducible
        minloglevel=2,
    )
    return model.getvalue()


# ----------------------------------------------------------------------------------------- loading


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Reloads a tokenizer written by `Tokenizer.save(directory)`."""
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise TokenizerError(f"{directory} holds no saved tokenizer ({META_FILE} missing)")
    meta = json.loads(meta_file.read_text())
    kind, lowercase = meta["kind"], bool(meta["lowercase"])
    if kind == "sentencepiece":
        tokenizer: Tokenizer = SentencePieceTokenizer(
            (directory / "spiece.model").read_bytes(), lowercase
        )
    else:
        from tokenizers import Tokenizer as Backend

        tokenizer = HFTokenizer(
            kind, Backend.from_file(str(directory / "tokenizer.json")), lowercase
        )
    if tokenizer.fingerprint != meta.get("fingerprint", tokenizer.fingerprint):
        raise TokenizerError(f"tokenizer files in {directory} do not match {META_FILE} (edited?)")
    return tokenizer


def load_vocabulary(kind: str, path: str | os.PathLike, lowercase: bool) -> Tokenizer:
    """Loads existing vocabulary files: vocab.txt (wordpiece), vocab.json+merges.txt (bpe), .model
    (sp).

    `path` may be the file itself, a directory holding it, or a directory written by
    `Tokenizer.save`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"vocab_path {path} does not exist")
    if path.is_dir() and (path / META_FILE).is_file():
        tokenizer = load_tokenizer(path)
        if tokenizer.kind != kind:
            raise TokenizerError(
                f"{path} holds a {tokenizer.kind} tokenizer, config asks for {kind}"
            )
        return tokenizer
    if kind == "wordpiece":
        file = path / "vocab.txt" if path.is_dir() else path
        tokens = [line.rstrip("\n") for line in _read(file).splitlines()]
        vocab = {token: i for i, token in enumerate(tokens) if token}
        return HFTokenizer("wordpiece", _wordpiece_backend(lowercase, vocab), lowercase)
    if kind == "bpe":
        from tokenizers import AddedToken, models, normalizers

        folder = path if path.is_dir() else path.parent
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab, merges):
            if not file.is_file():
                raise TokenizerError(f"BPE vocabulary needs {file}")
        backend = _bpe_backend(models.BPE.from_file(str(vocab), str(merges)))
        if lowercase:
            backend.normalizer = normalizers.Lowercase()
        backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
        return HFTokenizer("bpe", backend, lowercase)
    if kind == "sentencepiece":
        if path.is_dir():
            models_found = sorted(path.glob("*.model"))
            if not models_found:
                raise TokenizerError(f"no .model file in {path}")
            path = models_found[0]
        try:
            return SentencePieceTokenizer(path.read_bytes(), lowercase)
        except RuntimeError as err:
            raise TokenizerError(f"{path} is not a SentencePiece model: {err}") from err
    raise TokenizerError(f"unknown tokenizer {kind!r}; expected one of {KINDS}")


def _read(file: Path) -> str:
    if not file.is_file():
        raise TokenizerError(f"vocabulary file {file} does not exist")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{file} is not UTF-8 text") from err
