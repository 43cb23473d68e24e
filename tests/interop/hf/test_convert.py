"""`jaxgen convert`: HF directory -> jaxgen run -> HF directory, weights and vocabulary intact."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxgen import cli
from jaxgen import config as config_lib
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.interop import hf
from jaxgen.train import checkpoint

TEXT = "The quick brown fox jumped over the lazy dogs, quickly."


def _vocab() -> list[str]:
    letters = list(string.ascii_lowercase)
    words = ["the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "##ed", "##ly"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *letters,
            *("##" + c for c in letters), *words]  # fmt: skip


def _run(argv: list[str]) -> int:
    args, extra = cli.build_parser().parse_known_args(argv)
    return args.func(args, extra)


@pytest.fixture()
def bert_src(bert_dir, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(bert_dir[0], src)
    (src / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    return src


def test_convert_from_hf_and_back(bert_src, bert_dir, tmp_path):
    workdir, dst = tmp_path / "run", tmp_path / "dst"
    assert _run(["convert", "--from", "hf", "--src", str(bert_src), "--workdir", str(workdir)]) == 0

    config, params = hf.load(bert_src)
    saved = config_lib.load_saved_config(workdir / "config.json")
    assert saved.model.to_dict() == config.model.to_dict()
    assert (
        saved.data.tokenizer == "wordpiece"
        and Path(saved.data.vocab_path) == (workdir / "tokenizer").absolute()
    )
    step, restored = checkpoint.load_params(workdir)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)

    # The converted tokenizer tokenizes like the original's.
    tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
    original = transformers.BertTokenizer.from_pretrained(bert_src)
    assert tokenizer.encode(TEXT) == original.encode(TEXT, add_special_tokens=False)
    assert tokenizer.unk_id not in tokenizer.encode(TEXT)

    assert _run(["convert", "--to", "hf", "--workdir", str(workdir), "--dst", str(dst)]) == 0
    assert (dst / "vocab.txt").read_text() == (bert_src / "vocab.txt").read_text()
    exported = transformers.BertForPreTraining.from_pretrained(dst)
    reference = bert_dir[1].state_dict()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
    again = transformers.BertTokenizer.from_pretrained(dst)
    assert again.encode(TEXT) == original.encode(TEXT)

    with pytest.raises(hf.InteropError, match="already holds checkpoints"):
        _run(["convert", "--from", "hf", "--src", str(bert_src), "--workdir", str(workdir)])


def test_tokenizer_json_only_vocabulary(bert_src, tmp_path):
    """transformers 5 saves tokenizer.json without vocab.txt: the vocabulary is taken from it."""
    transformers.BertTokenizer.from_pretrained(bert_src).save_pretrained(bert_src)
    (bert_src / "vocab.txt").unlink(missing_ok=True)
    assert (bert_src / "tokenizer.json").is_file()
    workdir = tmp_path / "run"
    hf.import_workdir(bert_src, workdir)
    tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
    original = transformers.AutoTokenizer.from_pretrained(bert_src)
    assert tokenizer.encode(TEXT) == original.encode(TEXT, add_special_tokens=False)


def test_convert_argument_errors(tmp_path):
    with pytest.raises(hf.InteropError, match="--src"):
        _run(["convert", "--from", "hf", "--workdir", str(tmp_path / "w")])
    with pytest.raises(hf.InteropError, match="--dst"):
        _run(["convert", "--to", "hf", "--workdir", str(tmp_path / "w")])
    with pytest.raises(hf.InteropError, match="config.json"):
        _run(["convert", "--to", "hf", "--workdir", str(tmp_path / "w"), "--dst", str(tmp_path)])


def test_gpt_convert_with_bpe_vocabulary(tmp_path):
    """vocab.json + merges.txt travel both ways; the export names the end-of-text id."""
    sentences = [TEXT, "Over the lazy dog the fox jumps.", "Brown dogs are quick."] * 4
    trained = tokenizer_lib.train_tokenizer("bpe", sentences, vocab_size=300, lowercase=False)
    src = tmp_path / "src"
    trained.save(src)
    for name in ("tokenizer.json", tokenizer_lib.META_FILE):
        (src / name).unlink()  # leave only the plain GPT-2 files
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    workdir, dst = tmp_path / "run", tmp_path / "dst"
    assert _run(["convert", "--from", "hf", "--src", str(src), "--workdir", str(workdir)]) == 0
    tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
    original = transformers.GPT2TokenizerFast.from_pretrained(src)
    assert tokenizer.kind == "bpe"
    assert tokenizer.encode(TEXT) == original.encode(TEXT)

    assert _run(["convert", "--to", "hf", "--workdir", str(workdir), "--dst", str(dst)]) == 0
    exported = json.loads((dst / "config.json").read_text())
    assert exported["eos_token_id"] == tokenizer.eos_id
    for name in ("vocab.json", "merges.txt"):
        assert (dst / name).read_bytes() == (workdir / "tokenizer" / name).read_bytes()
    again = transformers.GPT2TokenizerFast.from_pretrained(dst)
    assert again.encode(TEXT) == tokenizer.encode(TEXT)
