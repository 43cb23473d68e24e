"""`jaxgen sample`: a trained run's config, latest checkpoint and tokenizer -> generated texts.

One function per family turns a prompt into the pure sampler's inputs and its output back into
text (`GENERATORS`, the explicit table). Sampling settings the caller does not give keep the pure
samplers' defaults (`jaxgen.sample`), the one place they are set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import config as config_lib
from jaxgen import models, sample
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.models import lora as lora_lib
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import loop


class _Run:
    """What a generator needs of a run: module, params, tokenizer, context and a label."""

    def __init__(self, workdir: Path) -> None:
        config_file = workdir / "config.json"
        if not config_file.is_file():
            raise checkpoint_lib.CheckpointError(
                f"{workdir} holds no jaxgen run (no config.json): train first with "
                f"`jaxgen train --config configs/<family>.py:smoke --workdir {workdir}`"
            )
        self.config = config_lib.load_saved_config(config_file)
        self.workdir = workdir
        self.family = self.config.family
        if self.family == "gpt" and self.config.model.num_labels:  # the score head replaces it
            raise ValueError(
                f"{workdir} holds a GPT classifier (model.num_labels="
                f"{self.config.model.num_labels}), which has no LM head to sample from"
            )

    def load(self) -> None:
        """Reads the checkpoint and the tokenizer (slow; after the cheap checks)."""
        self.step, self.params = loop.load_run_params(self.workdir, self.config)
        if self.config.lora.rank:  # sampled from the merged model: the same function, faster
            self.params = lora_lib.merge(self.params, self.config.lora)
        self.tokenizer = tokenizer_lib.load_tokenizer(self.workdir / "tokenizer")
        self.module = models.build(self.config.model)
        self.max_len = self.config.model.max_len
        self.label = f"{self.workdir} ({self.family}, step {self.step})"

    def text(self, ids: Any) -> str:
        """Decodes ids; ids beyond the tokenizer (a larger model.vocab_size) are dropped."""
        size = self.tokenizer.vocab_size
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < size])

    def too_long(self, what: str, length: int, hint: str) -> ValueError:
        """The error for an input longer than the model's context."""
        return ValueError(
            f"{what} is {length} tokens, longer than the context of the model in {self.label}: "
            f"max_len={self.max_len}; {hint}"
        )


def _gpt(run: _Run, prompt: str, num_samples: int, max_new_tokens: int, **settings: Any) -> list:
    if not prompt:
        raise ValueError(
            f"empty prompt: GPT ({run.workdir}) continues a prompt; give --prompt 'some text'"
        )
    run.load()
    tok = run.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens ({run.label})")
    if len(ids) >= run.max_len:
        raise run.too_long("the prompt", len(ids), "shorten --prompt")
    if len(ids) + max_new_tokens > run.max_len:
        raise run.too_long(
            f"the prompt ({len(ids)}) + --max_new_tokens ({max_new_tokens})",
            len(ids) + max_new_tokens,
            f"use --max_new_tokens <= {run.max_len - len(ids)}",
        )
    prompts = np.tile(np.asarray([ids], np.int32), (num_samples, 1))
    if _beams(settings, num_samples):
        out = sample.beam_search_gpt(
            run.module, run.params, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
            pad_id=tok.pad_id if tok.pad_id is not None else 0, **settings,
        )  # fmt: skip
    else:
        out = sample.sample_gpt(
            run.module, run.params, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
            **settings,
        )  # fmt: skip
    texts = []
    for row in np.asarray(out):
        new = row[len(ids) :]
        stop = np.flatnonzero(new == tok.eos_id)  # generation ends at end-of-text
        texts.append(run.text(ids + list(new[: stop[0] if stop.size else len(new)])))
    return texts


def _t5(run: _Run, prompt: str, num_samples: int, max_new_tokens: int, **settings: Any) -> list:
    if not prompt:
        raise ValueError(
            f"empty prompt: T5 ({run.workdir}) decodes an input; give --prompt, e.g. "
            "'The <extra_id_0> walks in <extra_id_1> park'"
        )
    run.load()
    tok = run.tokenizer
    # T5 inputs end with EOS, as the span-corruption examples it was trained on.
    ids = tok.encode(prompt) + [tok.eos_id]
    if len(ids) > run.max_len:
        raise run.too_long("the prompt (with EOS)", len(ids), "shorten --prompt")
    decode = sample.beam_search_t5 if _beams(settings, num_samples) else sample.decode_t5
    out = decode(
        run.module, run.params, np.tile(np.asarray([ids], np.int32), (num_samples, 1)),
        np.ones((num_samples, len(ids)), np.int32), max_decode_len=max_new_tokens,
        decoder_start_id=tok.pad_id, eos_id=tok.eos_id, pad_id=tok.pad_id,  # T5 starts from pad
        **settings,
    )  # fmt: skip
    return [run.text(row) for row in np.asarray(out)]


def _beams(settings: dict[str, Any], num_samples: int) -> bool:
    """Whether the settings ask for beam search (num_beams); refuses sampling settings with it."""
    if "num_beams" not in settings:
        if "alpha" in settings:
            raise ValueError(
                "--length_penalty is the beam search's brevity penalty: add --beam_size"
            )
        return False
    sampling = sorted(set(settings) & set(_SAMPLING))
    if sampling:
        raise ValueError(
            f"beam search (--beam_size) is deterministic: drop {', '.join(sampling)} (or --greedy)"
        )
    if num_samples != 1:
        raise ValueError("beam search returns its best beam: use --num_samples 1 with --beam_size")
    return True


def _bert(run: _Run, prompt: str, num_samples: int, length: int, **settings: Any) -> list:
    if length < 0:
        raise ValueError(f"length must be >= 0; got {length}")
    if "top_p" in settings:
        raise ValueError("top_p is not supported by BERT Gibbs sampling; use --top_k")
    run.load()
    tok = run.tokenizer
    # A literal [MASK] in the prompt is resampled too (a partly masked prompt).
    ids = [tok.cls_id, *(tok.encode(prompt) if prompt else []), *[tok.mask_id] * length, tok.sep_id]
    if len(ids) > run.max_len:
        raise run.too_long(
            "[CLS] + prompt + --length [MASK] + [SEP]", len(ids),
            "shorten --prompt or lower --length",
        )  # fmt: skip
    if tok.mask_id not in ids:
        raise ValueError(
            f"nothing to sample ({run.label}): set --length > 0 or put [MASK] in the prompt"
        )
    unused = range(tok.vocab_size, run.module.config.vocab_size)
    specials = (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id)
    out = sample.gibbs_bert(
        run.module, run.params, np.tile(np.asarray([ids], np.int32), (num_samples, 1)),
        mask_id=tok.mask_id, banned_ids=[i for i in (*specials, *unused) if i is not None],
        **settings,
    )  # fmt: skip
    return [run.text(row[1:-1]) for row in np.asarray(out)]


_SAMPLING = ("temperature", "top_k", "top_p", "seed")
_DECODING = (*_SAMPLING, "num_beams", "alpha")
# family -> (generator, the keyword it takes for the generated length, the settings it takes)
GENERATORS: dict[str, tuple[Callable[..., list[str]], str, tuple[str, ...]]] = {
    "bert": (_bert, "length", ("temperature", "top_k", "top_p", "seed", "num_sweeps", "order")),
    "gpt": (_gpt, "max_new_tokens", _DECODING),
    "t5": (_t5, "max_new_tokens", _DECODING),
}


def generate(
    workdir: str | os.PathLike,
    prompt: str = "",
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    length: int = 32,
    greedy: bool = False,
    **settings: Any,
) -> list[str]:
    """`num_samples` texts from the latest checkpoint of the run in `workdir`.

    GPT continues `prompt` (returned with it); T5 decodes `prompt` (e.g. with <extra_id_N>
    sentinels) into at most max_new_tokens tokens; BERT Gibbs-samples `length` tokens after the
    optional prompt in a `[CLS] prompt ... [SEP]` layout and returns the text between [CLS] and
    [SEP]. settings: the sampler's keywords (temperature, top_k, top_p, seed; BERT num_sweeps,
    order; GPT and T5 num_beams and alpha, t5x's brevity penalty, for beam search); `greedy` sets
    the temperature to 0. Raises CheckpointError or ValueError naming the
    workdir.
    """
    if greedy:
        settings["temperature"] = 0.0
    # Checked before the (slow) checkpoint read.
    given = {k: settings[k] for k in ("temperature", "top_k", "top_p") if k in settings}
    sample.check_sampling(**given)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    run = _Run(Path(workdir))
    generator, length_key, accepted = GENERATORS[run.family]
    unused = sorted(set(settings) - set(accepted))
    if unused:
        raise ValueError(f"{run.family} sampling does not take {', '.join(unused)} ({workdir})")
    lengths = {"max_new_tokens": max_new_tokens, "length": length}
    return generator(run, prompt, num_samples, lengths[length_key], **settings)
