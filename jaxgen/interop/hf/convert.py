"""Whole conversions: a HF directory <-> (run config, params), and a HF directory <-> a jaxgen run
directory (`jaxgen convert --from hf` / `--to hf`).

`import_workdir` writes a run directory whose step-0 checkpoint holds a full TrainState (fresh
optimizer state from the config's `optim`); `train.init_from` reads only its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config as config_lib
from jaxgen.config import RunConfig
from jaxgen.data import tokenizer as tokenizer_lib
from jaxgen.interop.hf import architectures, files, names, peft
from jaxgen.interop.hf.errors import InteropError, unsupported
from jaxgen.models import lora as lora_lib
from jaxgen.models.config import ModelConfig
from jaxgen.train import checkpoint as checkpoint_lib
from jaxgen.train import optim
from jaxgen.train.state import TrainState

log = logging.getLogger(__name__)


def _t5_tying(tensors: dict[str, np.ndarray], model: dict[str, Any], arch: str) -> None:
    """Sets model['tie_embeddings'] from the weights and HF's output scaling; may fill lm_head."""
    scaled = model["tie_embeddings"]  # set from the config's output scaling
    shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    head = tensors.get("lm_head.weight")
    separate = head is not None and (shared is None or not np.array_equal(head, shared))
    if scaled and separate:
        raise unsupported(arch, "a separate lm_head with d_model**-0.5 output scaling")
    if not scaled:
        model["tie_embeddings"] = False
        if head is None and shared is not None:
            # HF ties lm_head to the embedding but does not scale: jaxgen holds a copy as lm_head.
            tensors["lm_head.weight"] = shared


def load(path: str | os.PathLike, *, scan_layers: bool = False) -> tuple[RunConfig, names.Params]:
    """A local HF model directory -> (run config, params: nested dict of float32 arrays).

    scan_layers: the config's model.scan_layers, the params' layers stacked to match.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory (expected a HuggingFace model directory)")
    hf = files.read_json(path / files.CONFIG_FILE)
    arch = architectures.architecture(hf)
    model = dict(architectures.model_config_from_hf(hf), scan_layers=scan_layers)
    tensors = files.read_weights(path)
    if arch == "T5ForConditionalGeneration":  # the weights say whether the output is tied
        _t5_tying(tensors, model, arch)
    params = names.params_from_hf(tensors, model, arch)
    run = architectures.full_config(model, name=f"hf:{path}")
    kind, vocab_path, lowercase = files.tokenizer_settings(path, run.family)
    data = dataclasses.replace(run.data, tokenizer=kind, vocab_path=vocab_path, lowercase=lowercase)
    return dataclasses.replace(run, data=data), params


def save(
    model: RunConfig | ModelConfig | Mapping[str, Any],
    params: names.Params,
    path: str | os.PathLike,
    *,
    token_ids: Mapping[str, int | None] | None = None,
) -> None:
    """Writes config.json + model.safetensors (HF layout, float32) that from_pretrained reads.

    model: a run config or its model section; `token_ids` (pad/bos/eos_token_id) go into
    config.json when known.
    """
    model = model.model if isinstance(model, RunConfig) else model
    hf = architectures.hf_config_from_model(model, token_ids)
    tensors = names.params_to_hf(params, model)
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    files.write_weights(tensors, path)
    (path / files.CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    generation = {k: hf[k] for k in keys if hf.get(k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def import_workdir(src: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """HF directory -> jaxgen run directory (config.json, checkpoints/0, tokenizer); returns it."""
    workdir = Path(workdir).expanduser()
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise InteropError(f"{workdir} already holds checkpoints; convert into a new directory")
    run, params = load(src)
    workdir.mkdir(parents=True, exist_ok=True)
    data = run.data
    if not data.vocab_path:
        extracted = files.extract_vocabulary(Path(src).expanduser(), workdir / "tokenizer")
        if extracted is not None:
            kind, lowercase = extracted
            data = dataclasses.replace(
                data, tokenizer=kind, lowercase=lowercase, vocab_path=str(workdir / "tokenizer")
            )
    if data.vocab_path:
        tokenizer = tokenizer_lib.load_vocabulary(data.tokenizer, data.vocab_path, data.lowercase)
        if tokenizer.vocab_size > run.model.vocab_size:
            log.warning("the tokenizer has %d tokens, more than model.vocab_size=%d",
                        tokenizer.vocab_size, run.model.vocab_size)  # fmt: skip
        tokenizer.save(workdir / "tokenizer")
        # Later runs with train.init_from=<workdir> can point data.vocab_path here.
        data = dataclasses.replace(data, vocab_path=str((workdir / "tokenizer").absolute()))
    else:
        log.warning("%s has no vocabulary files; the run will train its own tokenizer", src)
    run = dataclasses.replace(run, data=data)
    config_lib.save_config(run, workdir / "config.json")

    optimizer = optim.make_optimizer(run.optim, run.train.num_steps)
    jax_params = jax.tree.map(jnp.asarray, params)
    state = TrainState.create(
        jax_params, optimizer.init(jax_params), jax.random.key(run.train.seed)
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, use_async=False)
    try:
        checkpointer.save(0, state, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    log.info("converted %s into %s (step 0)", src, workdir)
    return workdir


def export_workdir(
    workdir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None
) -> int:
    """A run's latest (or given) checkpoint -> HF directory plus vocabulary; returns the step.

    A LoRA run (lora.rank > 0) exports its merged model, and its adapters in peft's format under
    `dst/adapter/` (for the base model its train.init_from run exports).
    """
    workdir, dst = Path(workdir).expanduser(), Path(dst).expanduser()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise InteropError(f"{config_file} not found: is {workdir} a jaxgen run directory?")
    run = config_lib.load_saved_config(config_file)
    from jaxgen.train import loop  # the trainer, only for exports

    step, params = loop.load_run_params(workdir, run, step)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if run.lora.rank:  # the merged model, and the adapters for peft beside it
        base = str(Path(run.train.init_from).expanduser()) if run.train.init_from else ""
        adapter_dir = peft.save_adapters(params, run.model, run.lora, dst / "adapter", base)
        log.info("wrote the LoRA adapters in peft's format to %s", adapter_dir)
        params = jax.tree.map(np.asarray, lora_lib.merge(params, run.lora))
    token_ids: dict[str, int | None] = {}
    tokenizer_dir = workdir / "tokenizer"
    if (tokenizer_dir / tokenizer_lib.META_FILE).is_file():
        tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        token_ids = {"pad_token_id": tokenizer.pad_id}
        if tokenizer.eos_id is not None:
            token_ids.update(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    save(run.model, params, dst, token_ids=token_ids)
    copied = []
    for name in files.VOCAB_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dst / name)
            copied.append(name)
    if copied:
        settings = {"do_lower_case": run.data.lowercase, "model_max_length": run.model.max_len}
        (dst / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    log.info(
        "exported %s step %d to %s (%s)", workdir, step, dst, ", ".join(copied) or "no vocabulary"
    )
    return step
